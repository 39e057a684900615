//! Many services and many servers through one sluice, as their users meet them: each
//! service relays to its own servers, each balancing policy picks as documented, a
//! failing server is taken out and comes back, a failed connect is retried elsewhere,
//! and reloads add, move and remove services.

use sluice_testkit as common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::config::{self, service, with_services};
use common::{Proxy, echo_upstream, eventually, refusing_address, upstream};
use sluice::config::ServiceSpec;
use sluice::pool::Balance;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A server that says its name first, then echoes; it counts the clients it got.
struct Named {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

async fn named(name: &'static [u8]) -> Named {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let addr = upstream(move |mut s| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            let _ = s.write_all(name).await;
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    })
    .await;
    Named { addr, accepted }
}

/// Connects to `addr` and reads the one-byte name of the server it reached.
async fn who(addr: SocketAddr) -> (TcpStream, u8) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let mut name = [0u8; 1];
    c.read_exact(&mut name).await.unwrap();
    (c, name[0])
}

/// One service balancing `servers` as `balance` says.
fn balanced(name: &str, servers: &[SocketAddr], balance: Balance) -> ServiceSpec {
    ServiceSpec {
        balance,
        ..service(name, servers)
    }
}

/// One service with `[service.health]` keys.
fn with_health<const N: usize>(
    name: &str,
    servers: &[SocketAddr],
    health: [(&str, toml::Value); N],
) -> ServiceSpec {
    ServiceSpec {
        health: Some(config::table(health)),
        ..service(name, servers)
    }
}

fn server_series(metric: &str, service: &str, server: SocketAddr) -> String {
    format!("{metric}{{service=\"{service}\",server=\"{server}\"}}")
}

#[tokio::test]
async fn each_service_relays_to_its_own_servers_and_is_counted_apart() {
    let (a, b) = (named(b"A").await, named(b"B").await);
    let proxy = Proxy::start_config(with_services(vec![
        service("alpha", &[a.addr]),
        service("beta", &[b.addr]),
    ]))
    .await;
    for _ in 0..2 {
        assert_eq!(who(proxy.address("alpha")).await.1, b'A');
    }
    assert_eq!(who(proxy.address("beta")).await.1, b'B');
    proxy.settled().await;
    assert_eq!(
        proxy.value("sluice_connections_accepted_total{service=\"alpha\"}"),
        2.0
    );
    assert_eq!(
        proxy.value("sluice_connections_accepted_total{service=\"beta\"}"),
        1.0
    );
    assert_eq!(
        proxy.value("sluice_bytes_total{service=\"beta\",direction=\"upstream_to_client\"}"),
        1.0
    );
    assert_eq!(
        proxy.value(&server_series("sluice_server_up", "alpha", a.addr)),
        1.0
    );
}

#[tokio::test]
async fn round_robin_gives_each_server_its_turn() {
    let servers = [named(b"A").await, named(b"B").await, named(b"C").await];
    let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
    let rr = balanced("rr", &addrs, Balance::RoundRobin);
    let proxy = Proxy::start_config(with_services(vec![rr])).await;
    for _ in 0..30 {
        who(proxy.addr).await;
    }
    let counts: Vec<_> = servers
        .iter()
        .map(|s| s.accepted.load(Ordering::SeqCst))
        .collect();
    assert_eq!(counts, [10, 10, 10]);
}

#[tokio::test]
async fn least_connections_sends_new_clients_to_the_emptier_server() {
    let (a, b) = (named(b"A").await, named(b"B").await);
    let lc = balanced("lc", &[a.addr, b.addr], Balance::LeastConnections);
    let proxy = Proxy::start_config(with_services(vec![lc])).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(who(proxy.addr).await);
    }
    let on = |name: u8, held: &[(TcpStream, u8)]| held.iter().filter(|(_, n)| *n == name).count();
    assert_eq!((on(b'A', &held), on(b'B', &held)), (2, 2));
    // Both of A's clients leave: the next two go to A.
    held.retain(|(_, n)| *n != b'A');
    eventually("A's connections end", Duration::from_secs(5), || {
        proxy.value(&server_series("sluice_server_connections", "lc", a.addr)) == 0.0
    })
    .await;
    for _ in 0..2 {
        held.push(who(proxy.addr).await);
    }
    assert_eq!((on(b'A', &held), on(b'B', &held)), (2, 2));
}

/// A server that reads nothing (a stalled database, say) fills the buffers of the
/// connections sent to it. least_queued sees that and sends the next clients to the
/// other server; round_robin keeps sending it half of them.
#[tokio::test]
async fn least_queued_avoids_a_server_whose_buffers_are_full() {
    async fn run(balance: Balance) -> usize {
        let stalled_count = Arc::new(AtomicUsize::new(0));
        let count = stalled_count.clone();
        let stalled = upstream(move |s| {
            count.fetch_add(1, Ordering::SeqCst);
            async move {
                // Holds the connection open and never reads.
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(s);
            }
        })
        .await;
        let sink = upstream(|mut s| async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        let q = balanced("q", &[stalled, sink], balance);
        let proxy = Proxy::start_config(with_services(vec![q])).await;
        // Clients upload until one has reached the stalled server and filled its buffer.
        let mut stuck = Vec::new();
        while stalled_count.load(Ordering::SeqCst) == 0 {
            let mut c = TcpStream::connect(proxy.addr).await.unwrap();
            stuck.push(tokio::spawn(async move {
                let _ = c.write_all(&vec![7u8; 4 << 20]).await;
                c
            }));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eventually("the stalled server's buffer fills", Duration::from_secs(10), || {
            proxy.value(&format!(
                "sluice_server_queued_bytes{{service=\"q\",server=\"{stalled}\",direction=\"client_to_upstream\"}}"
            )) >= 32.0 * 1024.0
        })
        .await;
        let before = stalled_count.load(Ordering::SeqCst);
        for _ in 0..10 {
            let mut c = TcpStream::connect(proxy.addr).await.unwrap();
            c.write_all(&[1u8; 1024]).await.unwrap();
            c.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_millis(200), c.read_to_end(&mut rest)).await;
        }
        for s in stuck {
            s.abort();
        }
        stalled_count.load(Ordering::SeqCst) - before
    }
    let queued = run(Balance::LeastQueued).await;
    let rr = run(Balance::RoundRobin).await;
    assert_eq!(
        queued, 0,
        "least_queued sent new clients to the stalled server"
    );
    assert!(rr >= 4, "round_robin sent {rr} of 10 to the stalled server");
}

/// Connects that fail are retried on the other server, the failing server is ejected
/// after `health.max_failures` in a row, and clients stop paying for it.
#[tokio::test]
async fn a_refusing_server_is_retried_around_and_ejected() {
    let (dead, _guard) = refusing_address();
    let live = named(b"L").await;
    let r = with_health(
        "r",
        &[dead, live.addr],
        [("max_failures", 2.into()), ("cooldown", "1h".into())],
    );
    let proxy = Proxy::start_config(with_services(vec![r])).await;
    for _ in 0..10 {
        assert_eq!(who(proxy.addr).await.1, b'L', "every client is served");
    }
    let errors = proxy.value(&format!(
        "sluice_upstream_connect_errors_total{{service=\"r\",server=\"{dead}\",kind=\"refused\"}}"
    ));
    assert_eq!(errors, 2.0, "no connect after the ejection");
    assert_eq!(
        proxy.value("sluice_upstream_retries_total{service=\"r\"}"),
        2.0
    );
    assert_eq!(
        proxy.value(&server_series("sluice_server_up", "r", dead)),
        0.0
    );
    assert_eq!(
        proxy.value(&server_series("sluice_server_ejections_total", "r", dead)),
        1.0
    );
    assert_eq!(
        proxy.value(
            "sluice_connections_closed_total{service=\"r\",reason=\"upstream_connect_failed\"}"
        ),
        0.0
    );
}

/// When every server refuses, the client is reset after `upstream.retries` more tries.
#[tokio::test]
async fn a_client_is_reset_when_every_server_fails() {
    let (d1, _g1) = refusing_address();
    let (d2, _g2) = refusing_address();
    let (d3, _g3) = refusing_address();
    let x = ServiceSpec {
        upstream: Some(config::table([("retries", 1.into())])),
        ..service("x", &[d1, d2, d3])
    };
    let proxy = Proxy::start_config(with_services(vec![x])).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    let mut rest = Vec::new();
    let r = c.read_to_end(&mut rest).await.map_err(|e| e.kind());
    assert_eq!(r, Err(std::io::ErrorKind::ConnectionReset));
    proxy.settled().await;
    assert_eq!(
        proxy.value(
            "sluice_connections_closed_total{service=\"x\",reason=\"upstream_connect_failed\"}"
        ),
        1.0
    );
    assert_eq!(
        proxy.value("sluice_upstream_retries_total{service=\"x\"}"),
        1.0
    );
    assert_eq!(
        proxy.value("sluice_upstream_connect_errors_total{service=\"x\"}"),
        2.0,
        "two servers tried: the first and one retry"
    );
}

/// An ejected server is tried again once its cooldown is over, and is back in rotation
/// when that connect succeeds.
#[tokio::test]
async fn an_ejected_server_returns_after_its_cooldown() {
    let (addr, sock) = refusing_address();
    let other = echo_upstream().await;
    let c = with_health(
        "c",
        &[addr, other],
        [("max_failures", 1.into()), ("cooldown", "200ms".into())],
    );
    let proxy = Proxy::start_config(with_services(vec![c])).await;
    let up = || proxy.value(&server_series("sluice_server_up", "c", addr));
    while up() == 1.0 {
        let _ = TcpStream::connect(proxy.addr)
            .await
            .unwrap()
            .write_all(b"x")
            .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The server comes up; clients find it again after the cooldown.
    sock.listen(128).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while up() == 0.0
        || proxy.value(&server_series("sluice_server_ejections_total", "c", addr)) != 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never came back"
        );
        let _ = TcpStream::connect(proxy.addr)
            .await
            .unwrap()
            .write_all(b"x")
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Up again and taking clients: its connects succeed.
    let before = proxy.value("sluice_upstream_connect_errors_total{service=\"c\"}");
    for _ in 0..4 {
        let _ = TcpStream::connect(proxy.addr)
            .await
            .unwrap()
            .write_all(b"x")
            .await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        proxy.value("sluice_upstream_connect_errors_total{service=\"c\"}"),
        before
    );
}

/// Active checks take a dead server out and bring it back without any client.
#[tokio::test]
async fn active_checks_follow_a_server_without_clients() {
    let (addr, sock) = refusing_address();
    let h = with_health(
        "h",
        &[addr],
        [
            ("interval", "50ms".into()),
            ("max_failures", 1.into()),
            ("cooldown", "1h".into()),
        ],
    );
    let proxy = Proxy::start_config(with_services(vec![h])).await;
    let up = || proxy.value(&server_series("sluice_server_up", "h", addr));
    eventually("the check takes it out", Duration::from_secs(10), || {
        up() == 0.0
    })
    .await;
    sock.listen(128).unwrap();
    eventually("the check brings it back", Duration::from_secs(10), || {
        up() == 1.0
    })
    .await;
    assert_eq!(
        proxy.value("sluice_connections_accepted_total{service=\"h\"}"),
        0.0,
        "no client was needed"
    );
}

/// A reload adds a service, moves one to a new address and removes one; a removed
/// service's live connection goes on until the shutdown grace ends it.
#[tokio::test]
async fn reload_adds_moves_and_removes_services() {
    let (a, b) = (named(b"A").await, named(b"B").await);
    let mut first = with_services(vec![service("alpha", &[a.addr])]);
    first.timeouts.shutdown_grace = Duration::from_millis(300);
    let proxy = Proxy::start_config(first.clone()).await;
    let alpha = proxy.address("alpha");
    let (mut live, name) = who(alpha).await;
    assert_eq!(name, b'A');

    // Add beta.
    let mut second = first.clone();
    second.services.push(service("beta", &[b.addr]));
    proxy.server.reload(second.clone()).unwrap();
    assert_eq!(who(proxy.address("beta")).await.1, b'B');
    assert_eq!(proxy.address("alpha"), alpha, "alpha is untouched");
    assert_eq!(who(alpha).await.1, b'A');

    // Move beta to another address: the new one serves, the old one refuses.
    let old_beta = proxy.address("beta");
    let (new_beta, _reserved) = common::reserved_address();
    let mut third = second.clone();
    third.services[1].listen = new_beta.to_string();
    proxy.server.reload(third).unwrap();
    assert_eq!(proxy.address("beta"), new_beta);
    assert_eq!(who(new_beta).await.1, b'B');
    eventually(
        "the old address stops accepting",
        Duration::from_secs(5),
        || std::net::TcpStream::connect(old_beta).is_err(),
    )
    .await;

    // Remove alpha: its address refuses, its live connection still works for now...
    let mut fourth = first.clone();
    fourth.services = vec![ServiceSpec {
        listen: new_beta.to_string(),
        ..service("beta", &[b.addr])
    }];
    proxy.server.reload(fourth.clone()).unwrap();
    eventually("alpha stops accepting", Duration::from_secs(5), || {
        std::net::TcpStream::connect(alpha).is_err()
    })
    .await;
    live.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    live.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    // ...until the grace is over.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), live.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the removed service's connection was closed");
    eventually(
        "it is counted as a shutdown close",
        Duration::from_secs(5),
        || {
            proxy.value("sluice_connections_closed_total{service=\"alpha\",reason=\"shutdown\"}")
                == 1.0
        },
    )
    .await;
    assert_eq!(who(new_beta).await.1, b'B');
    assert!(
        !proxy
            .metrics()
            .contains(&server_series("sluice_server_up", "alpha", a.addr)),
        "a removed service's servers leave the per-server gauges"
    );

    // A reload whose new address cannot be bound changes nothing.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut fifth = fourth;
    fifth.services[0].listen = taken.local_addr().unwrap().to_string();
    let err = proxy.server.reload(fifth).unwrap_err();
    assert!(err.to_string().contains("cannot listen"), "{err}");
    assert_eq!(proxy.address("beta"), new_beta);
    assert_eq!(who(new_beta).await.1, b'B');
}

/// A client loop connecting without pause: counts connections that got their echo and
/// those that did not (refused, reset, or cut short).
struct ClientLoop {
    served: Arc<AtomicUsize>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ClientLoop {
    fn start(addr: SocketAddr) -> ClientLoop {
        use std::io::{Read, Write};
        let served = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, f, st) = (served.clone(), failed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let one = || -> std::io::Result<()> {
                    let mut c = std::net::TcpStream::connect(addr)?;
                    c.set_read_timeout(Some(Duration::from_secs(10)))?;
                    c.write_all(b"?")?;
                    let mut echo = [0u8; 1];
                    c.read_exact(&mut echo)?;
                    Ok(())
                };
                match one() {
                    Ok(()) => s.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        f.lock().unwrap().push(e.to_string());
                        0
                    }
                };
            }
        });
        ClientLoop {
            served,
            failed,
            stop,
            thread: Some(thread),
        }
    }

    /// Returns once `n` more clients have been served.
    fn serve_more(&self, n: usize) {
        let target = self.served.load(Ordering::Relaxed) + n;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.served.load(Ordering::Relaxed) < target {
            assert!(
                std::time::Instant::now() < deadline,
                "the client loop stalled"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the loop; the failures it saw.
    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        let failed = self.failed.lock().unwrap().clone();
        (self.served.load(Ordering::Relaxed), failed)
    }
}

/// Whether the kernel moves the clients in a closing listener's backlog to another
/// socket bound to the address (`net.ipv4.tcp_migrate_req`, Linux ≥ 5.14). Without it,
/// a client whose handshake completes in the microseconds between the old sluice's last
/// accept and its close is reset: once in six runs of about 1,000 clients here, with
/// the other tests running. Under CI (.ci/run sets it) its absence fails the test;
/// elsewhere the test is skipped.
fn migrates_requests() -> bool {
    let on = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .is_ok_and(|v| v.trim() == "1");
    if !on {
        assert!(
            std::env::var_os("CI").is_none(),
            "net.ipv4.tcp_migrate_req is not 1: run `sysctl -w net.ipv4.tcp_migrate_req=1` (.ci/run does)"
        );
        eprintln!("skipped: net.ipv4.tcp_migrate_req is not 1");
    }
    on
}

/// An upgrade: a new sluice starts on the same address (SO_REUSEPORT) while the old
/// one serves, the old one is stopped with SIGTERM and drains, and the new one reloads:
/// a client loop connecting throughout is never refused.
#[test]
fn a_restart_and_a_reload_refuse_no_client() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(echo_upstream());
    if !migrates_requests() {
        return;
    }
    let (addr, _reserved) = common::reserved_address();
    let mut config = common::config(&up.to_string());
    config.listen.address = addr.to_string();
    config.timeouts.shutdown_grace = Duration::from_secs(5);
    let mut old = common::Daemon::start(&config);
    let clients = ClientLoop::start(addr);
    clients.serve_more(100);
    let mut new = common::Daemon::start(&config);
    clients.serve_more(300);
    old.signal(libc::SIGTERM);
    let status = old
        .wait(Duration::from_secs(20))
        .expect("the old sluice exits");
    assert!(status.success(), "{status:?}");
    clients.serve_more(300);
    new.reload();
    assert_eq!(
        new.value("sluice_config_reloads_total{result=\"success\"}"),
        1.0,
        "the reload was taken"
    );
    clients.serve_more(300);
    let (served, failed) = clients.finish();
    assert!(
        failed.is_empty(),
        "{} of {} clients failed: {:?}",
        failed.len(),
        served + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        new.value("sluice_connections_accepted_total") > 0.0,
        "the new sluice served"
    );
}
