//! `GET /connections` and `sluice-stress top`: the live connections an operator sees, with
//! what each holds in sluice and in the kernel, against a proxy running in this process
//! (its admin endpoint served on 127.0.0.1:0 by `sluice::admin::serve`).

use sluice_testkit as common;

use std::net::SocketAddr;
use std::time::Duration;

use bytesize::ByteSize;
use common::{Proxy, connect_small_rcvbuf, data, echo_upstream, eventually, upstream};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous limit for anything the tests wait for; reached only when something is wrong.
const DEADLINE: Duration = Duration::from_secs(20);
/// `buffer.upstream_to_client` of the stuck proxy: the most its slow reader's direction may
/// queue.
const BOUND: u64 = 64 * 1024;
/// The first byte a client sends to [`flooding_upstream`] to be flooded.
const FLOOD: u8 = b'f';
const KERNEL_QUEUED_U2C: &str = "sluice_kernel_queued_bytes{direction=\"upstream_to_client\"}";

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// Three connections that exchanged bytes are listed, exactly they, with their upstream,
/// the bytes they exchanged and their ages (oldest first under sort=age); one that closes
/// leaves the list.
#[tokio::test]
async fn lists_exactly_the_live_connections() {
    let upstream = echo_upstream().await;
    let proxy = Proxy::start(upstream, |_| {}).await;
    let endpoint = proxy.serve_endpoint().await;

    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        let sent = data(i, 1000 * (i as usize + 1));
        c.write_all(&sent).await.unwrap();
        let mut back = vec![0; sent.len()];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(back, sent);
        clients.push((c, sent.len() as u64));
    }
    let addrs: Vec<String> = clients
        .iter()
        .map(|(c, _)| c.local_addr().unwrap().to_string())
        .collect();

    // Every byte echoed has been delivered both ways; the relay reports once per poll, so
    // the figures may trail the client's read by a moment.
    let listing =
        common::poll_connections(endpoint, "?sort=age", "the echoed bytes are counted", |l| {
            l["connections"].as_array().unwrap().iter().all(|c| {
                let sent = clients[position(&addrs, c)].1;
                c["client_to_upstream"]["bytes"] == sent && c["upstream_to_client"]["bytes"] == sent
            })
        })
        .await;
    assert_eq!(listing["live"], 3);
    assert_eq!(listing["sort"], "age");
    let listed = listing["connections"].as_array().unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|c| c["client"].as_str().unwrap())
            .collect::<Vec<_>>(),
        addrs,
        "exactly the three clients, oldest first"
    );
    for c in listed {
        assert_eq!(c["upstream"], upstream.to_string());
        assert!(c["age_seconds"].as_f64().unwrap() >= 0.0);
        for d in ["client_to_upstream", "upstream_to_client"] {
            assert_eq!(c[d]["queued"], 0, "{d}: everything was delivered");
            assert!(c[d]["paused_seconds"].is_null(), "{d}: reading");
        }
    }
    let field = |name: &'static str| -> Vec<f64> {
        listed.iter().map(|c| c[name].as_f64().unwrap()).collect()
    };
    assert!(field("id").is_sorted(), "ids in order of arrival");
    assert!(
        field("age_seconds").iter().rev().is_sorted(),
        "ages decrease down the list"
    );

    // The second client closes: it leaves the list, the others stay.
    drop(clients.remove(1));
    let listing = common::poll_connections(endpoint, "", "the closed connection is gone", |l| {
        l["live"] == 2
    })
    .await;
    let mut left: Vec<&str> = listing["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client"].as_str().unwrap())
        .collect();
    left.sort();
    let mut want = vec![addrs[0].as_str(), addrs[2].as_str()];
    want.sort();
    assert_eq!(left, want);

    drop(clients);
    proxy.settled().await;
    proxy.shutdown().await;
}

/// A client that does not read, behind an upstream that writes without end: its
/// upstream_to_client direction queues up to the bound and no more, is paused, and holds
/// bytes in the kernel; `sluice_kernel_queued_bytes` shows them while it is stuck and
/// returns to 0 once it has closed.
#[tokio::test]
async fn a_slow_reader_shows_queued_paused_and_kernel_bytes() {
    let stuck = Stuck::start().await;
    let listing = common::connections(stuck.endpoint, "").await;
    let c = stuck.entry(&listing);
    let u2c = &c["upstream_to_client"];
    let queued = u2c["queued"].as_u64().unwrap();
    assert!(
        queued > 0 && queued <= BOUND,
        "queued {queued}, bound {BOUND}"
    );
    assert!(u2c["paused_seconds"].as_f64().unwrap() >= 0.0, "{u2c}");
    assert!(u2c["kernel"].as_u64().unwrap() > 0, "{u2c}");
    assert_eq!(
        u2c["kernel"].as_u64().unwrap(),
        u2c["kernel_source_unread"].as_u64().unwrap()
            + u2c["kernel_destination_unacked"].as_u64().unwrap()
    );
    assert!(
        u2c["kernel_destination_unacked"].as_u64().unwrap() > 0,
        "the client's window is full, so sluice's send queue to it holds bytes: {u2c}"
    );
    assert!(c["client_to_upstream"]["paused_seconds"].is_null());

    // The gauge is sampled once a second: poll.
    eventually("the kernel gauge shows the stuck bytes", DEADLINE, || {
        stuck.proxy.value(KERNEL_QUEUED_U2C) > 0.0
    })
    .await;

    let Stuck {
        proxy,
        endpoint,
        slow,
        idle,
        ..
    } = stuck;
    let slow_addr = slow.local_addr().unwrap().to_string();
    drop(slow);
    common::poll_connections(endpoint, "", "the slow reader's connection is gone", |l| {
        l["live"] == 2
            && l["connections"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["client"] != slow_addr)
    })
    .await;
    eventually("the kernel gauge returns to 0", DEADLINE, || {
        proxy.value(KERNEL_QUEUED_U2C) == 0.0
    })
    .await;

    drop(idle);
    proxy.settled().await;
    proxy.shutdown().await;
}

/// `?sort=kernel&limit=1` lists the stuck connection alone, although it is the youngest;
/// bad parameters are refused with 400 and a reason.
#[tokio::test]
async fn sort_and_limit_pick_the_stuck_connection_and_bad_queries_are_refused() {
    let stuck = Stuck::start().await;
    let listing = common::connections(stuck.endpoint, "?sort=kernel&limit=1").await;
    assert_eq!(listing["live"], 3);
    assert_eq!(listing["sort"], "kernel");
    let listed = listing["connections"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listing}");
    assert_eq!(listed[0]["client"], stuck.slow_addr());

    // Oldest first puts it last.
    let listing = common::connections(stuck.endpoint, "?sort=age").await;
    assert_eq!(listing["connections"][2]["client"], stuck.slow_addr());

    for (query, reason) in [
        ("?sort=bogus", "sort=bogus"),
        ("?limit=x", "limit=x"),
        ("?sort=age&limit=-1", "limit=-1"),
    ] {
        let (status, body) = common::get(stuck.endpoint, &format!("/connections{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(reason), "{query}: {body}");
    }
}

/// `sluice-stress top --once` prints a table with a row for the stuck connection; against
/// an address where nothing listens it says so and exits with 1.
#[tokio::test]
async fn top_once_shows_the_stuck_connection() {
    let stuck = Stuck::start().await;
    let out = top(&["--once", "--metrics", &stuck.endpoint.to_string()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !stdout.contains('\x1b'),
        "no escape codes with --once:\n{stdout}"
    );
    let header = stdout.lines().next().unwrap();
    assert!(
        header.contains(&stuck.endpoint.to_string()) && header.contains("3 live"),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|l| l.contains(&stuck.slow_addr()))
        .unwrap_or_else(|| panic!("no row for {}:\n{stdout}", stuck.slow_addr()));
    assert!(row.contains(&stuck.upstream.to_string()), "{row}");
    // Sorted by queued bytes, the stuck connection comes first.
    assert_eq!(stdout.lines().nth(3), Some(row), "{stdout}");

    let (nowhere, _guard) = common::refusing_address();
    let out = top(&["--once", "--metrics", &nowhere.to_string()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains(&format!(
            "cannot reach sluice's metrics endpoint at {nowhere}"
        )),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A proxy with three live connections: two idle ones, then a slow reader that never reads
/// behind an upstream that writes without end, stuck (its upstream_to_client direction
/// paused) when `start` returns.
struct Stuck {
    proxy: Proxy,
    endpoint: SocketAddr,
    upstream: SocketAddr,
    /// The client that does not read.
    slow: TcpStream,
    idle: Vec<TcpStream>,
}

impl Stuck {
    async fn start() -> Stuck {
        let upstream = flooding_upstream().await;
        let proxy = Proxy::start(upstream, |c| {
            c.buffer.upstream_to_client = ByteSize::b(BOUND);
            // Small kernel buffers towards the client, so sluice's own queue fills soon.
            c.socket.client_send_buffer = ByteSize::kib(4);
        })
        .await;
        let endpoint = proxy.serve_endpoint().await;
        let mut idle = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(proxy.addr).await.unwrap();
            c.write_all(b"i").await.unwrap();
            idle.push(c);
        }
        // The idle ones are connected before the slow reader arrives, so it is the youngest.
        common::poll_connections(endpoint, "", "the idle connections are connected", |l| {
            let c = l["connections"].as_array().unwrap();
            c.len() == 2 && c.iter().all(|c| !c["upstream"].is_null())
        })
        .await;
        let mut slow = connect_small_rcvbuf(proxy.addr, 4096).await;
        slow.write_all(&[FLOOD]).await.unwrap();
        let slow_addr = slow.local_addr().unwrap().to_string();
        common::poll_connections(endpoint, "", "the slow reader's direction pauses", |l| {
            let Some(c) = find(l, &slow_addr) else {
                return false;
            };
            let u2c = &c["upstream_to_client"];
            let queued = u2c["queued"].as_u64().unwrap();
            assert!(queued <= BOUND, "queued {queued} > bound {BOUND}: {c}");
            !u2c["paused_seconds"].is_null()
        })
        .await;
        Stuck {
            proxy,
            endpoint,
            upstream,
            slow,
            idle,
        }
    }

    fn slow_addr(&self) -> String {
        self.slow.local_addr().unwrap().to_string()
    }

    /// The slow reader's entry in a listing.
    fn entry<'a>(&self, listing: &'a Value) -> &'a Value {
        find(listing, &self.slow_addr())
            .unwrap_or_else(|| panic!("{} not listed: {listing}", self.slow_addr()))
    }
}

/// An upstream that floods a connection whose first byte is [`FLOOD`] (writing until the
/// write fails), and otherwise reads until EOF.
async fn flooding_upstream() -> SocketAddr {
    upstream(|mut s| async move {
        let mut first = [0u8];
        if s.read_exact(&mut first).await.is_err() {
            return;
        }
        if first[0] == FLOOD {
            let chunk = data(7, 64 * 1024);
            while s.write_all(&chunk).await.is_ok() {}
        } else {
            let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
        }
    })
    .await
}

/// The listed connection from `client`, if any.
fn find<'a>(listing: &'a Value, client: &str) -> Option<&'a Value> {
    listing["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client"] == client)
}

/// Which of `addrs` a listed connection's client is.
fn position(addrs: &[String], c: &Value) -> usize {
    addrs
        .iter()
        .position(|a| c["client"] == a.as_str())
        .unwrap_or_else(|| panic!("a connection from an unknown client: {c}"))
}

/// Runs the built `sluice-stress top` with `args`.
async fn top(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(common::workspace_binary("sluice-stress"))
        .arg("top")
        .args(args)
        .output()
        .await
        .unwrap()
}
