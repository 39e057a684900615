//! The daemon's life: graceful shutdown on SIGTERM, a second signal, SIGHUP reloads, and
//! running out of file descriptors. These run the real binary.

use sluice_testkit as common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upstream that streams `len` bytes of `data(seed)` at about `rate` bytes/s, then
/// closes.
async fn paced_source(seed: u64, len: usize, rate: usize) -> SocketAddr {
    upstream(move |mut s| async move {
        let bytes = data(seed, len);
        let chunk = (rate / 20).max(1);
        for part in bytes.chunks(chunk) {
            if s.write_all(part).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = s.shutdown().await;
    })
    .await
}

/// sluice in front of `up` with `shutdown_grace = grace`, and a client that has read the
/// first byte of its transfer (and that byte).
async fn transfer_under_way(up: SocketAddr, grace: Duration) -> (Daemon, TcpStream, [u8; 1]) {
    let mut c = config(&up.to_string());
    c.timeouts.shutdown_grace = grace;
    let d = Daemon::start(&c);
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    let mut first = [0u8; 1];
    s.read_exact(&mut first).await.unwrap();
    (d, s, first)
}

/// SIGTERM with a live transfer that finishes within the grace period: the transfer
/// completes byte-exact, new clients are refused from the signal on, and sluice exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_live_transfers_finish_then_exits_0() {
    const LEN: usize = 1 << 20;
    let up = paced_source(21, LEN, 1 << 20).await;
    let (mut d, mut s, first) = transfer_under_way(up, Duration::from_secs(20)).await;
    d.signal(libc::SIGTERM);
    // New clients are refused once the listener is closed.
    eventually("the listener closes", Duration::from_secs(5), || {
        std::net::TcpStream::connect(d.addr).is_err()
    })
    .await;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    let mut got = first.to_vec();
    got.extend(rest);
    assert_eq!(
        sha(&got),
        sha(&data(21, LEN)),
        "transfer not byte-exact across shutdown"
    );
    drop(s);
    let status = tokio::task::spawn_blocking(move || d.wait(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

/// A transfer that outlives the grace period is closed at the deadline and counted
/// with reason `shutdown`; the client is told with a reset, not a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_that_outlive_the_grace_are_closed_and_counted() {
    let up = paced_source(22, 64 << 20, 256 << 10).await;
    let proxy = Proxy::start(up, |c| {
        c.timeouts.shutdown_grace = Duration::from_millis(500)
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    let server = proxy.server.clone();
    let started = tokio::time::Instant::now();
    proxy.shutdown().await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed before the grace ran out"
    );
    assert_one_closed_by_shutdown(&server);
    let mut rest = Vec::new();
    let r = s.read_to_end(&mut rest).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "a cut transfer must end in a reset, not look complete: {r:?}"
    );
}

/// A second stop signal exits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let up = paced_source(23, 64 << 20, 64 << 10).await;
    let (mut d, _transfer, _) = transfer_under_way(up, Duration::from_secs(60)).await;
    d.signal(libc::SIGTERM);
    // Shutdown has begun once sluice says STOPPING=1.
    d.stopping();
    d.signal(libc::SIGINT);
    let status = tokio::task::spawn_blocking(move || d.wait(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(sluice::shutdown::EXIT_ON_SECOND_SIGNAL)
    );
}

/// SIGHUP re-reads the file: new connections use the new upstream, live ones carry on,
/// a bad file is rejected with the old config kept, and both outcomes are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_for_new_connections_only() {
    let named = |name: &'static [u8]| {
        upstream(move |mut s| async move {
            let _ = s.write_all(name).await;
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
    };
    let (a, b) = (named(b"A").await, named(b"B").await);
    let mut d = Daemon::start(&config(&a.to_string()));
    let mut live = TcpStream::connect(d.addr).await.unwrap();
    let mut who = [0u8; 1];
    live.read_exact(&mut who).await.unwrap();
    assert_eq!(&who, b"A");

    d.write_config(&config(&b.to_string()));
    // READY=1 comes once the reload is done, counter included.
    d.reload();
    assert_eq!(
        d.value("sluice_config_reloads_total{result=\"success\"}"),
        1.0,
        "the reload succeeds"
    );
    let mut fresh = TcpStream::connect(d.addr).await.unwrap();
    fresh.read_exact(&mut who).await.unwrap();
    assert_eq!(&who, b"B", "new connections use the new upstream");
    // The live connection still talks to A.
    live.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    live.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");

    // A bad file is rejected and the running configuration stays.
    let mut bad = config(&b.to_string());
    bad.buffer.resume_at = 7.0;
    d.write_config(&bad);
    // READY=1 comes once the reload is done, counter included.
    d.reload();
    assert_eq!(
        d.value("sluice_config_reloads_total{result=\"failure\"}"),
        1.0,
        "the reload fails"
    );
    let mut again = TcpStream::connect(d.addr).await.unwrap();
    again.read_exact(&mut who).await.unwrap();
    assert_eq!(&who, b"B");
    // The log line is written before the counter moves, but read by another thread.
    eventually("the rejection is logged", Duration::from_secs(5), || {
        d.log_lines()
            .iter()
            .any(|l| l.contains("reload rejected") && l.contains("resume_at"))
    })
    .await;

    // The metrics address cannot change on reload: rejected, said so.
    let mut moved = config(&b.to_string());
    moved.metrics.address = "127.0.0.1:1".into();
    assert!(
        sluice_testkit::config::to_toml(&moved).contains("\"127.0.0.1:1\""),
        "the metrics address is in the file"
    );
    d.write_config(&moved);
    // READY=1 comes once the reload is done, counter included.
    d.reload();
    assert_eq!(
        d.value("sluice_config_reloads_total{result=\"failure\"}"),
        2.0,
        "the reload fails again"
    );
    eventually(
        "the address change is refused in the log",
        Duration::from_secs(5),
        || {
            d.log_lines()
                .iter()
                .any(|l| l.contains("metrics.address cannot change"))
        },
    )
    .await;
}

/// With RLIMIT_NOFILE at 64 and 200 clients arriving at once, sluice stays up, says why
/// it serves fewer, does not spin while clients wait, and serves every one of them as
/// descriptors free up.
#[test]
fn descriptor_exhaustion_queues_clients_without_spinning() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(echo_upstream());
    // A limit the user set (sluice warns about it; one it derives from the descriptor
    // limit itself would fit quietly).
    let mut c = config(&up.to_string());
    c.listen.max_connections = Some(sluice::config::DEFAULT_MAX_CONNECTIONS);
    let mut d = Daemon::start_with(&c, |cmd| limit_descriptors(cmd, 64));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !d
        .log_lines()
        .iter()
        .any(|l| l.contains("too few file descriptors"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no warning: {:?}",
            d.log_lines()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // 200 clients connect and hold; the kernel backlog keeps those sluice cannot take yet.
    let mut clients: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect(d.addr).unwrap())
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.write_all(&(i as u32).to_be_bytes()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    let cpu = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<f64> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0.0))
            .collect();
        (f[11] + f[12]) / 100.0
    };
    let before = cpu(d.pid());
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu(d.pid()) - before;
    assert!(
        spent < 0.5,
        "sluice burned {spent:.2}s of CPU in 2s while clients waited"
    );
    assert!(d.value("sluice_listener_paused_total") >= 1.0);
    // Serve them in order: each reply frees a slot for the next waiting client.
    for (i, c) in clients.iter_mut().enumerate() {
        let mut b = [0u8; 4];
        c.read_exact(&mut b)
            .unwrap_or_else(|e| panic!("client {i} not served: {e}"));
        assert_eq!(u32::from_be_bytes(b), i as u32);
        c.shutdown(std::net::Shutdown::Both).unwrap();
    }
    drop(clients);
    let settled = std::time::Instant::now() + Duration::from_secs(10);
    while d.value("sluice_connections_active") != 0.0 {
        assert!(
            std::time::Instant::now() < settled,
            "connections did not drain"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        d.value("sluice_connections_closed_total{reason=\"complete\"}"),
        200.0
    );
    d.signal(libc::SIGTERM);
    assert_eq!(
        d.wait(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(0)
    );
}

/// The child's RLIMIT_NOFILE, soft and hard, set to `n` (raising the hard limit needs root,
/// as CI has).
fn limit_descriptors(cmd: &mut std::process::Command, n: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Quiet defaults: with a descriptor limit of 20,000 (room for about 9,990 connections),
/// the shipped default `listen.max_connections` fits itself to the limit without a word,
/// while the same 10,000 written in the file is warned about. Each daemon relays one
/// connection first, so its accept loop has sized the limit (where the warning comes from).
#[test]
fn the_default_connection_limit_fits_the_descriptor_limit_quietly() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(echo_upstream());
    let warned = |set: Option<usize>| {
        let mut c = config(&up.to_string());
        c.listen.max_connections = set;
        let mut d = Daemon::start_with(&c, |cmd| limit_descriptors(cmd, 20_000));
        let mut s = std::net::TcpStream::connect(d.addr).unwrap();
        s.write_all(b"x").unwrap();
        let mut echoed = [0u8; 1];
        s.read_exact(&mut echoed).unwrap();
        drop(s);
        // Once it has exited, its whole log has been written; give the reader a moment.
        d.signal(libc::SIGTERM);
        d.wait(Duration::from_secs(10))
            .expect("sluice exits on SIGTERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let found = d
                .log_lines()
                .iter()
                .any(|l| l.contains("too few file descriptors"));
            if found || std::time::Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(!warned(None), "the default warned");
    assert!(
        warned(Some(sluice::config::DEFAULT_MAX_CONNECTIONS)),
        "a value set in the file that the limit cannot cover was not warned about"
    );
}
