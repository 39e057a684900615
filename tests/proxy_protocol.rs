//! The PROXY protocol both ways against a real HAProxy: HAProxy `send-proxy(-v2)` into an
//! `accept_proxy` service, whose access rules then see the client and not HAProxy; and
//! sluice `send_proxy` into HAProxy `accept-proxy`, whose rules see the client and not
//! sluice. Also: what a client that sends no header, or garbage, gets.
//!
//! Clients bind 127.0.0.2 or 127.0.0.3 before connecting (all of 127.0.0.0/8 is loopback
//! on Linux) while the proxies connect to each other from 127.0.0.1, so an address check
//! that used the socket's peer instead of the header would refuse or admit the wrong
//! client. Without `haproxy` installed the HAProxy tests are skipped with a note, except
//! under CI (env `CI` set), where that is a failure.

use sluice_testkit as common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;
use sluice::config::ServiceSpec;
use sluice::connection::PROXY_HEADER_TIMEOUT;
use sluice::proxy_protocol::{self, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout};

/// The longest any step here may take before the test says what it was waiting for.
const LIMIT: Duration = Duration::from_secs(20);

/// The client the access rules admit, and one they refuse.
const ADMITTED: &str = "127.0.0.2";
const REFUSED: &str = "127.0.0.3";

/// A service `name` in front of `server` that reads a PROXY header from each client.
fn accepting_proxy(name: &str, server: SocketAddr) -> ServiceSpec {
    ServiceSpec {
        accept_proxy: true,
        ..config::service(name, &[server])
    }
}

// ---------------------------------------------------------------------------------------
// HAProxy send-proxy → sluice accept_proxy
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_v2_gives_sluice_the_clients_address() {
    haproxy_in_front_of_sluice("send-proxy-v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_v1_gives_sluice_the_clients_address() {
    haproxy_in_front_of_sluice("send-proxy").await;
}

/// client (127.0.0.2 or .3) → HAProxy `mode tcp`, `server ... <send>` → sluice service
/// `edge` with `accept_proxy = true` and `allow = ["127.0.0.2/32"]` → echo.
async fn haproxy_in_front_of_sluice(send: &str) {
    if !haproxy_available() {
        return;
    }
    let edge = ServiceSpec {
        allow: Some(vec![format!("{ADMITTED}/32")]),
        ..accepting_proxy("edge", echo_upstream().await)
    };
    let proxy = Proxy::start_config(config::with_services(vec![edge])).await;
    let endpoint = proxy.serve_endpoint().await;
    let sluice = proxy.address("edge");
    let haproxy = Haproxy::start(
        |port| {
            format!(
                "frontend fe\n  bind {port}\n  default_backend be\nbackend be\n  server s1 {sluice} {send}\n"
            )
        },
        ADMITTED,
    )
    .await;

    // Admitted by sluice's allow list although HAProxy connects from 127.0.0.1.
    let mut client = connect_from(ADMITTED, haproxy.addr).await;
    let client_addr = client.local_addr().unwrap();
    assert!(
        echoes(&mut client).await,
        "{ADMITTED} is served through HAProxy"
    );

    // /connections lists it under its own address and port, and nothing as HAProxy's.
    let listing = common::poll_connections(endpoint, "", "the client is listed", |listing| {
        listed(listing)
            .iter()
            .any(|c| c["client"] == client_addr.to_string() && c["service"] == "edge")
    })
    .await;
    for c in listed(&listing) {
        let shown = c["client"].as_str().unwrap();
        assert!(
            shown.starts_with(&format!("{ADMITTED}:")),
            "{shown} is HAProxy's address, not a client's: {listing}"
        );
    }

    // Refused: HAProxy's connection from 127.0.0.1 carries 127.0.0.3.
    let refused_before = rejected(&proxy, "edge", "not_allowed");
    let mut other = connect_from(REFUSED, haproxy.addr).await;
    assert!(!echoes(&mut other).await, "{REFUSED} is not in allow");
    eventually("the refusal is counted", LIMIT, || {
        rejected(&proxy, "edge", "not_allowed") > refused_before
    })
    .await;
    assert_eq!(
        rejected(&proxy, "edge", "proxy_protocol"),
        0.0,
        "{}",
        haproxy.log()
    );

    // The admitted client was not disturbed.
    assert!(echoes(&mut client).await);
    drop((client, other, haproxy));
    proxy.settled().await;
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// sluice send_proxy → HAProxy accept-proxy
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_send_proxy_v2_gives_haproxy_the_clients_address() {
    sluice_in_front_of_haproxy(Version::V2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_send_proxy_v1_gives_haproxy_the_clients_address() {
    sluice_in_front_of_haproxy(Version::V1).await;
}

/// client (127.0.0.2 or .3) → sluice service `out` with `send_proxy` → HAProxy
/// `bind ... accept-proxy`, admitting only 127.0.0.2 → echo.
async fn sluice_in_front_of_haproxy(version: Version) {
    if !haproxy_available() {
        return;
    }
    let echo = echo_upstream().await;
    // `tcp-request connection` rules run at accept, before the PROXY header is read, so
    // they see the real peer (sluice, from 127.0.0.1); `tcp-request session` rules run
    // after it and see the client the header names.
    let haproxy = Haproxy::start(
        |port| {
            format!(
                "frontend fe\n  bind {port} accept-proxy\n  tcp-request connection reject unless {{ src 127.0.0.1 }}\n  tcp-request session reject unless {{ src {ADMITTED} }}\n  default_backend be\nbackend be\n  server s1 {echo}\n"
            )
        },
        "127.0.0.1",
    )
    .await;
    let out = ServiceSpec {
        send_proxy: Some(version),
        ..config::service("out", &[haproxy.addr])
    };
    let proxy = Proxy::start_config(config::with_services(vec![out])).await;
    let sluice = proxy.address("out");

    let mut client = connect_from(ADMITTED, sluice).await;
    assert!(
        echoes(&mut client).await,
        "HAProxy admits {ADMITTED} from sluice's header; its log:\n{}",
        haproxy.log()
    );
    let mut other = connect_from(REFUSED, sluice).await;
    assert!(
        !echoes(&mut other).await,
        "HAProxy refuses {REFUSED}, whose address only the header carries"
    );
    assert!(
        echoes(&mut client).await,
        "the admitted client is undisturbed"
    );
    drop((client, other));
    proxy.settled().await;
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Clients without a valid header
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_header_are_reset_and_counted() {
    let proxy = Proxy::start_config(config::with_services(vec![accepting_proxy(
        "edge",
        echo_upstream().await,
    )]))
    .await;
    let edge = proxy.address("edge");
    let mut oversized = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x10\x00".to_vec(); // 4096 bytes announced
    oversized.extend_from_slice(&[0; 64]);
    let sends: [(&str, &[u8]); 4] = [
        (
            "HTTP instead of a header",
            b"GET / HTTP/1.1\r\nHost: sluice\r\n\r\n",
        ),
        (
            "a malformed v1 line",
            b"PROXY TCP4 10.0.0.1 10.0.0.2 80 99999\r\nhello",
        ),
        ("an oversized v2 header", &oversized),
        ("nothing at all", b""),
    ];
    for (count, (what, bytes)) in (1..).zip(sends) {
        let started = Instant::now();
        let mut client = TcpStream::connect(edge).await.unwrap();
        assert!(
            sent_then_reset(&mut client, bytes).await,
            "{what}: the client is reset"
        );
        if bytes.is_empty() {
            // Only the silent client waits, for the header timeout.
            assert!(started.elapsed() >= PROXY_HEADER_TIMEOUT / 2, "{what}");
        }
        eventually(&format!("{what} is counted"), LIMIT, || {
            rejected(&proxy, "edge", "proxy_protocol") == f64::from(count)
        })
        .await;
    }

    // A client that does send a header (here: itself) is served as the header says.
    let mut client = TcpStream::connect(edge).await.unwrap();
    let claimed: SocketAddr = "192.0.2.7:4242".parse().unwrap();
    client
        .write_all(&proxy_protocol::encode(Version::V2, claimed, edge))
        .await
        .unwrap();
    assert!(echoes(&mut client).await);
    let endpoint = proxy.serve_endpoint().await;
    common::poll_connections(endpoint, "", "the claimed address is listed", |listing| {
        listed(listing)
            .iter()
            .any(|c| c["client"] == claimed.to_string())
    })
    .await;
    assert_eq!(rejected(&proxy, "edge", "proxy_protocol"), 4.0);
    drop(client);
    proxy.settled().await;
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Connects to `to` from `source` (a loopback address other than 127.0.0.1, on Linux).
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends a line and waits for its echo: true when it came back whole, false when the
/// connection was closed or reset instead.
async fn echoes(client: &mut TcpStream) -> bool {
    let line = b"a line that comes back\n";
    if client.write_all(line).await.is_err() {
        return false;
    }
    let mut back = [0u8; 23];
    match timeout(LIMIT, client.read_exact(&mut back)).await {
        Ok(Ok(_)) => back == *line,
        Ok(Err(_)) => false,
        Err(_) => panic!("neither an echo nor a close within {LIMIT:?}"),
    }
}

/// Sends `bytes`, then whether the connection ends in a reset (rather than data or a
/// clean close). A reset that arrives before the write is over counts too.
async fn sent_then_reset(client: &mut TcpStream, bytes: &[u8]) -> bool {
    if let Err(e) = client.write_all(bytes).await {
        return e.kind() == std::io::ErrorKind::ConnectionReset;
    }
    let mut buf = [0u8; 64];
    match timeout(LIMIT, client.read(&mut buf)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(Ok(_)) => false,
        Err(_) => panic!("the client was neither answered nor closed within {LIMIT:?}"),
    }
}

/// `sluice_connections_rejected_total{service,reason}`, 0 before the first refusal.
fn rejected(proxy: &Proxy, service: &str, reason: &str) -> f64 {
    let labels = format!("{{service=\"{service}\",reason=\"{reason}\"}}");
    proxy
        .metrics()
        .lines()
        .find_map(|line| {
            line.strip_prefix("sluice_connections_rejected_total")?
                .strip_prefix(labels.as_str())?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn listed(listing: &Value) -> &[Value] {
    listing["connections"].as_array().unwrap()
}

/// Whether `haproxy` can be run; under CI its absence fails the test instead of skipping.
fn haproxy_available() -> bool {
    let found = Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("haproxy is required under CI (apt-get install haproxy)");
        }
        eprintln!("note: haproxy not installed; skipping the HAProxy PROXY protocol test");
    }
    found
}

/// A HAProxy process in the foreground, with one frontend on a free loopback port;
/// stopped when dropped.
struct Haproxy {
    child: Child,
    /// Its frontend's address.
    addr: SocketAddr,
    /// What it wrote to stderr, for failure messages.
    log_path: PathBuf,
    /// Holds the config and the log until HAProxy is gone.
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts HAProxy with `sections(frontend_address)` after common `global` and
    /// `defaults` (`mode tcp`). The port comes from binding 127.0.0.1:0 and letting go, so
    /// another process may take it first: HAProxy then fails to bind and is started again
    /// on another one. Ready once a connection from `probe_from` to the frontend is
    /// accepted (tried in a loop, no sleeping on start-up).
    async fn start(sections: impl Fn(SocketAddr) -> String, probe_from: &str) -> Haproxy {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let config_path = dir.path().join("haproxy.cfg");
            let log_path = dir.path().join("haproxy.log");
            std::fs::write(
                &config_path,
                format!(
                    "global\n  maxconn 256\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n{}",
                    sections(addr)
                ),
            )
            .unwrap();
            let child = Command::new("haproxy")
                .arg("-db")
                .arg("-f")
                .arg(&config_path)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log_path).unwrap())
                .spawn()
                .expect("haproxy starts");
            let mut haproxy = Haproxy {
                child,
                addr,
                log_path,
                _dir: dir,
            };
            if haproxy.ready(probe_from).await {
                return haproxy;
            }
            let log = haproxy.log();
            assert!(
                attempt < ATTEMPTS && log.contains("cannot bind"),
                "haproxy exited on start-up:\n{log}"
            );
        }
        unreachable!()
    }

    /// Connects until the frontend accepts (true) or HAProxy exits (false).
    async fn ready(&mut self, probe_from: &str) -> bool {
        let deadline = Instant::now() + LIMIT;
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            let socket = TcpSocket::new_v4().unwrap();
            socket
                .bind(format!("{probe_from}:0").parse().unwrap())
                .unwrap();
            if socket.connect(self.addr).await.is_ok() {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {} within {LIMIT:?}:\n{}",
                self.addr,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
