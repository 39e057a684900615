//! The admin endpoint (`sluice::admin::serve`) over real sockets: each path, `/readyz`
//! before, while and after the services accept, keep-alive, and the clients that must
//! not keep a scrape from being answered (a slowloris, a flood of idle connections).

use sluice_testkit as common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Proxy, echo_upstream};
use sluice::Server;
use sluice::admin::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS, REQUEST_TIMEOUT};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Generous limit for anything the tests wait for; reached only when something is wrong.
const DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// Each path answers with its status, type and body; HEAD is a GET without the body;
/// an unknown path is 404 and another method 405.
#[tokio::test]
async fn each_path_answers() {
    let (proxy, endpoint) = proxy_with_admin().await;

    let metrics = fetch(endpoint, "GET", "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(
        metrics.body.contains("sluice_build_info{"),
        "{}",
        metrics.body
    );

    let head = fetch(endpoint, "HEAD", "/metrics").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.body, "");

    assert_eq!(
        fetch(endpoint, "GET", "/healthz").await.status_and_body(),
        (200, "ok\n")
    );
    assert_eq!(
        fetch(endpoint, "GET", "/readyz").await.status_and_body(),
        (200, "ready\n")
    );

    let listing = fetch(endpoint, "GET", "/connections?sort=age&limit=5").await;
    assert_eq!(listing.status, 200);
    assert_eq!(listing.header("content-type"), Some("application/json"));
    let listing: serde_json::Value = serde_json::from_str(&listing.body).unwrap();
    assert_eq!(listing["live"], 0);
    assert_eq!(listing["sort"], "age");
    let bad = fetch(endpoint, "GET", "/connections?sort=bogus").await;
    assert_eq!(
        bad.status_and_body(),
        (
            400,
            "sort=bogus: expected sort=queued, sort=kernel or sort=age\n"
        )
    );

    let unknown = fetch(endpoint, "GET", "/nope").await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.body.contains("/readyz"), "{}", unknown.body);
    let post = fetch(endpoint, "POST", "/metrics").await;
    assert_eq!(post.status_and_body(), (405, "GET only\n"));
    assert_eq!(post.header("allow"), Some("GET,HEAD"));

    proxy.shutdown().await;
}

/// `/readyz` is 503 while the services are bound but not yet served, 200 once every
/// one accepts, and 503 again from the moment the shutdown token fires, while a live
/// connection still drains; `/healthz` and `/metrics` answer throughout.
#[tokio::test]
async fn readyz_follows_the_servers_life() {
    let upstream = echo_upstream().await;
    let config = common::config(&upstream.to_string());
    let listeners = sluice::listener::bind(&config).unwrap();
    let address = listeners.addresses()[0].1;
    let server = Arc::new(Server::new(config));
    let (endpoint, admin_stop) = serve_admin(server.clone()).await;

    let before = fetch(endpoint, "GET", "/readyz").await;
    assert_eq!(before.status, 503, "{}", before.body);
    assert!(before.body.starts_with("starting"), "{}", before.body);
    assert_eq!(fetch(endpoint, "GET", "/healthz").await.status, 200);

    let stop = CancellationToken::new();
    let run = {
        let (server, stop) = (server.clone(), stop.clone());
        tokio::spawn(async move { server.run(listeners, stop).await.unwrap() })
    };
    server.ready().await;
    assert_eq!(
        fetch(endpoint, "GET", "/readyz").await.status_and_body(),
        (200, "ready\n")
    );

    // A live connection keeps the drain going after the stop.
    let mut client = TcpStream::connect(address).await.unwrap();
    client.write_all(b"x").await.unwrap();
    let mut echoed = [0u8];
    client.read_exact(&mut echoed).await.unwrap();
    stop.cancel();
    let draining = fetch(endpoint, "GET", "/readyz").await;
    assert_eq!(draining.status, 503, "{}", draining.body);
    assert!(draining.body.starts_with("draining"), "{}", draining.body);
    assert_eq!(fetch(endpoint, "GET", "/healthz").await.status, 200);
    assert_eq!(fetch(endpoint, "GET", "/metrics").await.status, 200);
    assert!(!run.is_finished(), "the live connection holds the drain");

    drop(client);
    tokio::time::timeout(DEADLINE, run)
        .await
        .expect("the drain ends once the client has gone")
        .unwrap();
    assert_eq!(fetch(endpoint, "GET", "/readyz").await.status, 503);
    admin_stop.cancel();
}

/// Two requests, one after the other, on one connection: keep-alive works.
#[tokio::test]
async fn two_requests_on_one_kept_alive_connection() {
    let (proxy, endpoint) = proxy_with_admin().await;

    let mut conn = Http::connect(endpoint).await;
    assert_eq!(
        conn.request("GET", "/healthz").await.status_and_body(),
        (200, "ok\n")
    );
    let scrape = conn.request("GET", "/metrics").await;
    assert_eq!(scrape.status, 200);
    assert!(
        scrape.body.contains("sluice_build_info{"),
        "{}",
        scrape.body
    );

    proxy.shutdown().await;
}

/// A client that trickles its headers and never ends them is cut once
/// `HEADER_READ_TIMEOUT` has passed, and other clients are answered meanwhile.
#[tokio::test]
async fn a_slowloris_is_cut_after_the_header_timeout_while_others_are_served() {
    let (proxy, endpoint) = proxy_with_admin().await;

    let started = Instant::now();
    let slow = TcpStream::connect(endpoint).await.unwrap();
    let (mut slow_read, mut slow_write) = slow.into_split();
    let trickle = tokio::spawn(async move {
        let head = b"GET /metrics HTTP/1.1\r\nHost: sluice\r\nX-Slow: ";
        if slow_write.write_all(head).await.is_err() {
            return;
        }
        // One more byte of the header now and then; the blank line never comes.
        while slow_write.write_all(b"z").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    for path in ["/healthz", "/metrics", "/connections"] {
        assert_eq!(fetch(endpoint, "GET", path).await.status, 200, "{path}");
    }
    let served = started.elapsed();

    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, slow_read.read_to_end(&mut rest))
        .await
        .expect("the slowloris is cut");
    let cut = started.elapsed();
    assert!(cut_off(read), "nothing answered to an unfinished head");
    assert!(cut >= HEADER_READ_TIMEOUT, "cut after {cut:?}");
    assert!(
        served < cut,
        "the others were answered ({served:?}) while the slowloris held its connection ({cut:?})"
    );
    trickle.abort();
    proxy.shutdown().await;
}

/// A client that sends requests and never reads the answers is closed once an answer
/// has waited `REQUEST_TIMEOUT` to be written.
#[tokio::test]
async fn a_client_that_never_reads_its_answers_is_cut_after_the_request_timeout() {
    let (proxy, endpoint) = proxy_with_admin().await;

    let started = Instant::now();
    // A small receive window, and requests sent back to back (pipelined) until the
    // endpoint closes the connection: the answers fill both sockets' buffers and the
    // one being written waits.
    let mut stuck = common::connect_small_rcvbuf(endpoint, 4096).await;
    let requests = b"GET /metrics HTTP/1.1\r\nHost: sluice\r\n\r\n".repeat(64);
    let written = tokio::time::timeout(DEADLINE, async {
        while stuck.write_all(&requests).await.is_ok() {}
    })
    .await;
    let cut = started.elapsed();
    assert!(written.is_ok(), "the endpoint closed the connection");
    assert!(cut >= REQUEST_TIMEOUT, "cut after {cut:?}");
    // The endpoint still answers others.
    assert_eq!(fetch(endpoint, "GET", "/healthz").await.status, 200);
    proxy.shutdown().await;
}

/// More idle connections than the bound (some with half a request head) do not keep a
/// scrape out: it is answered at once, before any of them could time out, because the
/// connections that waited longest were closed to make room.
#[tokio::test]
async fn a_flood_of_idle_connections_does_not_keep_a_scrape_out() {
    const EXTRA: usize = 16;
    let (proxy, endpoint) = proxy_with_admin().await;

    let started = Instant::now();
    let mut flood = Vec::new();
    for i in 0..MAX_CONNECTIONS + EXTRA {
        let mut c = TcpStream::connect(endpoint).await.unwrap();
        if i % 2 == 1 {
            c.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        }
        flood.push(c);
    }

    let scrape = fetch(endpoint, "GET", "/metrics").await;
    assert_eq!(scrape.status, 200);
    assert!(
        scrape.body.contains("sluice_build_info{"),
        "{}",
        scrape.body
    );

    // The scrape took the place of one more: the oldest EXTRA + 1 were closed, in the
    // order they came.
    let (closed, open) = flood.split_at_mut(EXTRA + 1);
    for (i, c) in closed.iter_mut().enumerate() {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(DEADLINE, c.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("flood connection {i} was closed"));
        assert!(
            cut_off(read),
            "flood connection {i} was closed without an answer"
        );
    }
    for (i, c) in open.iter().enumerate() {
        let mut byte = [0u8];
        let r = c.try_read(&mut byte);
        assert!(
            r.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
            "flood connection {} is still open: {r:?}",
            EXTRA + 1 + i
        );
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < HEADER_READ_TIMEOUT,
        "all of the above before the first header timeout could close anything ({elapsed:?})"
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A proxy in front of an echo upstream, with its admin endpoint served.
async fn proxy_with_admin() -> (Proxy, SocketAddr) {
    let proxy = Proxy::start(echo_upstream().await, |_| {}).await;
    let (endpoint, _) = serve_admin(proxy.server.clone()).await;
    (proxy, endpoint)
}

/// Serves `server`'s admin endpoint on a free loopback port until the returned token
/// fires.
async fn serve_admin(server: Arc<Server>) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(sluice::admin::serve(listener, server, stop.clone()));
    (addr, stop)
}

/// Whether a read to the end saw the endpoint close without answering: EOF at once, or
/// a reset (the endpoint closed with a request's bytes unread).
fn cut_off(read: std::io::Result<usize>) -> bool {
    matches!(read, Ok(0) | Err(_))
}

/// One request on a fresh connection.
async fn fetch(endpoint: SocketAddr, method: &str, path: &str) -> Reply {
    Http::connect(endpoint).await.request(method, path).await
}

/// An HTTP/1.1 client connection that reads each response by its `content-length`, so
/// the connection can carry the next request.
struct Http {
    stream: BufReader<TcpStream>,
}

/// A response: status, headers (names in lower case) and body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find_map(|(n, v)| (n == name).then_some(v.as_str()))
    }

    fn status_and_body(&self) -> (u16, &str) {
        (self.status, &self.body)
    }
}

impl Http {
    async fn connect(endpoint: SocketAddr) -> Http {
        Http {
            stream: BufReader::new(TcpStream::connect(endpoint).await.unwrap()),
        }
    }

    async fn request(&mut self, method: &str, path: &str) -> Reply {
        let request = format!("{method} {path} HTTP/1.1\r\nHost: sluice\r\n\r\n");
        self.stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .unwrap();
        let status_line = self.line().await;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("a header line");
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let mut reply = Reply {
            status,
            headers,
            body: String::new(),
        };
        if method != "HEAD" {
            let length: usize = reply
                .header("content-length")
                .expect("a content-length")
                .parse()
                .unwrap();
            let mut body = vec![0; length];
            self.stream.read_exact(&mut body).await.unwrap();
            reply.body = String::from_utf8(body).unwrap();
        }
        reply
    }

    /// One line of the response head, without its CRLF.
    async fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.stream.read_line(&mut line).await.unwrap();
        assert!(n > 0, "the endpoint closed the connection");
        line.trim_end_matches(['\r', '\n']).to_string()
    }
}
