//! The fault suite: the real `sluice` binary in front of the real chaos upstream
//! (`sluice-stress upstream --mode echo --fault F --healthy 1`), one test per fault.
//!
//! Each test checks what a user would notice: what the faulty clients see, which close
//! reason and connect-error kind moved (and that no other did), that the live gauges
//! return to 0, that sluice holds as many sockets after as before (no descriptor leak),
//! and that a healthy echo transfer running through the same sluice the whole time
//! comes back byte-exact. The chaos upstream serves its first connection normally (`--healthy 1`):
//! that is the healthy transfer, opened before any faulty one.

use sluice_testkit as common;

use std::io;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::notify::Notice;
use common::procfs;
use common::*;
use futures_util::future::join_all;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const STRESS: &str = env!("CARGO_BIN_EXE_sluice-stress");
/// Faulty connections per test.
const FAULTY: usize = 3;
const REASONS: [&str; 8] = [
    "complete",
    "client_reset",
    "upstream_reset",
    "upstream_connect_failed",
    "idle_timeout",
    "half_close_timeout",
    "shutdown",
    "error",
];
const KINDS: [&str; 5] = ["refused", "timeout", "unreachable", "resolve", "other"];

/// `sluice-stress upstream --fault ...` as a child process.
struct ChaosUpstream {
    process: ChildProcess,
    addr: SocketAddr,
}

impl ChaosUpstream {
    /// Starts an echo upstream with `fault`, serving its first `healthy` connections
    /// normally; returns once it has said it is ready.
    fn start(fault: &str, healthy: u32) -> ChaosUpstream {
        let mut cmd = Command::new(STRESS);
        cmd.args(["upstream", "--listen", "127.0.0.1:0", "--mode", "echo"])
            .args(["--fault", fault, "--healthy", &healthy.to_string()]);
        let process = ChildProcess::spawn(cmd, "chaos upstream", false, None)
            .unwrap_or_else(|e| panic!("chaos upstream did not start: {e:#}"));
        let addr = process.listen_addr();
        ChaosUpstream { process, addr }
    }

    /// Waits until the upstream says it turned its listener faulty: `STATUS=chaos: now`
    /// followed by `refusing` or `blackholing`.
    fn turned(&mut self, now: &str) {
        let said = format!("chaos: now {now}");
        self.process
            .wait_for(
                &said,
                Duration::from_secs(10),
                |n| matches!(n, Notice::Status(s) if *s == said),
            )
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
}

/// Least a healthy transfer sends: 16 chunks, at least 80 ms of sending.
const HEALTHY_MIN: usize = 256 << 10;

/// An echo transfer that runs until told to finish: the writer sends 16 KiB every 5 ms.
struct Healthy {
    stop: CancellationToken,
    writer: JoinHandle<(usize, [u8; 32])>,
    reader: JoinHandle<io::Result<([u8; 32], usize)>>,
}

impl Healthy {
    /// Connects and makes one round trip, so the upstream has taken this connection (as
    /// its first, healthy one) before the test opens any other.
    async fn start(addr: SocketAddr) -> Healthy {
        let s = TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = s.into_split();
        w.write_all(b"hello").await.unwrap();
        let mut hello = [0u8; 5];
        r.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
        let stop = CancellationToken::new();
        let writer = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut sent, mut h) = (0, Sha256::new());
                for seed in 0.. {
                    // At least HEALTHY_MIN, so the transfer is still running after the
                    // fastest faults are over.
                    if stop.is_cancelled() && sent >= HEALTHY_MIN {
                        break;
                    }
                    let chunk = data(seed, 16 << 10);
                    w.write_all(&chunk).await.expect("healthy write");
                    h.update(&chunk);
                    sent += chunk.len();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                w.shutdown().await.expect("healthy half-close");
                (sent, h.finalize().into())
            })
        };
        let reader = tokio::spawn(async move { read_hash(&mut r).await });
        Healthy {
            stop,
            writer,
            reader,
        }
    }

    /// Ends the transfer and checks that every byte came back, in order, then EOF.
    async fn finish(self) {
        self.stop.cancel();
        let limit = Duration::from_secs(20);
        let (sent, sent_hash) = tokio::time::timeout(limit, self.writer)
            .await
            .expect("healthy writer ends")
            .unwrap();
        let (got_hash, got) = tokio::time::timeout(limit, self.reader)
            .await
            .expect("healthy reader ends")
            .unwrap()
            .expect("the healthy transfer ends in EOF, not an error");
        assert_eq!(got, sent, "healthy transfer: bytes back != bytes sent");
        assert_eq!(got_hash, sent_hash, "healthy transfer not byte-exact");
    }
}

/// A chaos upstream, sluice in front of it, a healthy transfer through both, and
/// sluice's socket count before any client came.
struct Rig {
    _chaos: ChaosUpstream,
    sluice: Daemon,
    healthy: Healthy,
    sockets_before: usize,
}

impl Rig {
    /// `tweak` changes sluice's config (`[upstream] connect_timeout` is 5 s before it).
    async fn start(fault: &str, tweak: impl FnOnce(&mut sluice::Config)) -> Rig {
        let mut chaos = ChaosUpstream::start(fault, 1);
        let mut config = config(&chaos.addr.to_string());
        config.upstream.connect_timeout = Duration::from_secs(5);
        tweak(&mut config);
        let sluice = Daemon::start(&config);
        // Counted before any scrape: a scrape's socket lingers a moment after the reply.
        let sockets_before = sluice.open_sockets();
        let healthy = Healthy::start(sluice.addr).await;
        if fault == "refuse" || fault == "blackhole" {
            chaos.turned(if fault == "refuse" {
                "refusing"
            } else {
                "blackholing"
            });
        }
        Rig {
            _chaos: chaos,
            sluice,
            healthy,
            sockets_before,
        }
    }

    /// Runs `n` clients against sluice at once.
    async fn clients(&self, n: usize, send: &[u8], half_close: bool) -> Vec<Exchange> {
        join_all((0..n).map(|_| exchange(self.sluice.addr, send.to_vec(), half_close))).await
    }

    /// Finishes the healthy transfer (byte-exact), then checks that the close reasons
    /// and connect-error kinds moved exactly as `closed` and `connect_errors` say (the
    /// healthy transfer adds one `complete`), that the live gauges are back to 0, and
    /// that sluice holds as many sockets as before.
    async fn finish(self, closed: &[(&str, f64)], connect_errors: &[(&str, f64)]) {
        self.healthy.finish().await;
        self.sluice.settled().await;
        let m = self.sluice.scrape();
        for reason in REASONS {
            let want = closed
                .iter()
                .find(|(r, _)| *r == reason)
                .map_or(0.0, |c| c.1)
                + if reason == "complete" { 1.0 } else { 0.0 };
            let series = format!("sluice_connections_closed_total{{reason=\"{reason}\"}}");
            assert_eq!(m.value(&series), want, "{series}");
        }
        for kind in KINDS {
            let want = connect_errors
                .iter()
                .find(|(k, _)| *k == kind)
                .map_or(0.0, |c| c.1);
            let series = format!("sluice_upstream_connect_errors_total{{kind=\"{kind}\"}}");
            assert_eq!(m.value(&series), want, "{series}");
        }
        let accepted = closed.iter().map(|c| c.1).sum::<f64>() + 1.0;
        assert_eq!(m.value("sluice_connections_accepted_total"), accepted);
        let before = self.sockets_before;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.sluice.open_sockets() != before {
            if Instant::now() > deadline {
                let fds = procfs::descriptors(self.sluice.pid());
                panic!("sluice held {before} sockets before the clients; after: {fds:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What one client saw.
#[derive(Debug)]
struct Exchange {
    /// Everything read before the end.
    read: Vec<u8>,
    /// `Ok` for EOF, else the error that ended reading.
    end: io::Result<()>,
    /// The error writing (or half-closing) met, if any.
    write_error: Option<io::Error>,
    /// From connect to the end of reading.
    elapsed: Duration,
}

impl Exchange {
    /// Reading ended in EOF and writing met no error: a clean close.
    fn clean_eof(&self) -> bool {
        self.end.is_ok() && self.write_error.is_none()
    }

    /// Whether the connection was reset. The kernel reports a reset once, to whichever
    /// call comes first: a read (ECONNRESET, then EOF) or a blocked write.
    fn reset(&self) -> bool {
        let is_reset = |e: &io::Error| e.kind() == io::ErrorKind::ConnectionReset;
        self.end.as_ref().err().is_some_and(is_reset)
            || (self.end.is_ok() && self.write_error.as_ref().is_some_and(is_reset))
    }
}

/// Connects, writes `send` in the background (then half-closes if `half_close`), and
/// reads until EOF or an error.
async fn exchange(addr: SocketAddr, send: Vec<u8>, half_close: bool) -> Exchange {
    let started = Instant::now();
    let s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(end) => {
            return Exchange {
                read: Vec::new(),
                end: Err(end),
                write_error: None,
                elapsed: started.elapsed(),
            };
        }
    };
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut failed = w.write_all(&send).await.err();
        if failed.is_none() && half_close {
            failed = w.shutdown().await.err();
        }
        // Keep the write half open (no FIN) until the reader is done.
        (w, failed)
    });
    let mut read = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(20), r.read(&mut buf)).await {
            Err(_) => panic!("client read hung: {} bytes read so far", read.len()),
            Ok(Ok(0)) => break Ok(()),
            Ok(Ok(n)) => read.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => break Err(e),
        }
    };
    let elapsed = started.elapsed();
    let (w, write_error) = writer.await.unwrap();
    drop(w);
    Exchange {
        read,
        end,
        write_error,
        elapsed,
    }
}

/// `reset-after=N`: the upstream echoes N bytes, then resets. Each client gets a prefix
/// of its own bytes (at most N), then ECONNRESET; counted as `upstream_reset`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_reaches_the_client_as_a_reset() {
    const N: usize = 64 << 10;
    let rig = Rig::start("reset-after=64KiB", |_| {}).await;
    let send = data(1, 4 * N);
    for c in rig.clients(FAULTY, &send, false).await {
        assert!(c.reset(), "expected ECONNRESET, got {c:?}");
        assert!(
            c.read.len() <= N,
            "read {} bytes past the reset",
            c.read.len()
        );
        assert_eq!(
            c.read,
            send[..c.read.len()],
            "bytes before the reset are exact"
        );
    }
    rig.finish(&[("upstream_reset", FAULTY as f64)], &[]).await;
}

/// `close-after=N`: the upstream echoes N bytes, then sends FIN. Each client gets
/// exactly those N bytes, then EOF; after the client finishes, the close is `complete`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_fin_delivers_every_byte_before_it_then_eof() {
    const N: usize = 100_000;
    let rig = Rig::start(&format!("close-after={N}"), |_| {}).await;
    let send = data(2, 3 * N);
    for c in rig.clients(FAULTY, &send, true).await {
        assert!(c.clean_eof(), "expected a clean EOF, got {c:?}");
        assert_eq!(c.read.len(), N);
        assert_eq!(
            sha(&c.read),
            sha(&send[..N]),
            "bytes before the FIN not exact"
        );
    }
    rig.finish(&[("complete", FAULTY as f64)], &[]).await;
}

/// `stall`: the upstream accepts and never reads or writes. Clients are closed by the
/// idle timeout: no bytes, a clean EOF (nothing of theirs was thrown away), reason
/// `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_ends_in_the_idle_timeout() {
    let rig = Rig::start("stall", |c| c.timeouts.idle = Duration::from_millis(500)).await;
    for c in rig.clients(FAULTY, &data(3, 1024), false).await {
        assert!(c.clean_eof(), "expected a clean EOF, got {c:?}");
        assert!(c.read.is_empty());
        assert!(
            c.elapsed >= Duration::from_millis(450),
            "closed after {:?}, before the idle timeout",
            c.elapsed
        );
    }
    rig.finish(&[("idle_timeout", FAULTY as f64)], &[]).await;
}

/// `slow-close=D`: the upstream echoes everything, then waits D before its FIN. Clients
/// get every byte, then EOF no earlier than D; reason `complete`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_close_delivers_everything_then_eof() {
    let rig = Rig::start("slow-close=600ms", |_| {}).await;
    let send = data(4, 200_000);
    for c in rig.clients(FAULTY, &send, true).await {
        assert!(c.clean_eof(), "expected a clean EOF, got {c:?}");
        assert_eq!(sha(&c.read), sha(&send), "echo not byte-exact");
        assert!(
            c.elapsed >= Duration::from_millis(550),
            "EOF after {:?}",
            c.elapsed
        );
    }
    rig.finish(&[("complete", FAULTY as f64)], &[]).await;
}

/// `refuse`: nothing listens any more. Clients are reset at once, counted as
/// `upstream_connect_failed` with kind `refused`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_upstream_resets_clients_at_once() {
    let rig = Rig::start("refuse", |_| {}).await;
    for c in rig.clients(FAULTY, b"anyone there?", false).await {
        assert!(c.reset(), "expected ECONNRESET, got {c:?}");
        assert!(c.read.is_empty());
        assert!(
            c.elapsed < Duration::from_secs(1),
            "reset after {:?}",
            c.elapsed
        );
    }
    rig.finish(
        &[("upstream_connect_failed", FAULTY as f64)],
        &[("refused", FAULTY as f64)],
    )
    .await;
}

/// `blackhole`: handshakes never complete. Clients are reset once `connect_timeout`
/// passes, counted as `upstream_connect_failed` with kind `timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_upstream_times_out_the_connect() {
    let rig = Rig::start("blackhole", |c| {
        c.upstream.connect_timeout = Duration::from_millis(300)
    })
    .await;
    for c in rig.clients(FAULTY, b"anyone there?", false).await {
        assert!(c.reset(), "expected ECONNRESET, got {c:?}");
        assert!(c.read.is_empty());
        assert!(
            c.elapsed >= Duration::from_millis(250) && c.elapsed < Duration::from_secs(3),
            "reset after {:?}, not at the connect timeout",
            c.elapsed
        );
    }
    rig.finish(
        &[("upstream_connect_failed", FAULTY as f64)],
        &[("timeout", FAULTY as f64)],
    )
    .await;
}

/// `trickle`: the upstream echoes one byte at a time, 2 ms apart. Every byte arrives,
/// exact and in order, then EOF; reason `complete`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_upstream_delivers_every_byte() {
    let rig = Rig::start("trickle=2ms", |_| {}).await;
    let send = data(5, 300);
    for c in rig.clients(FAULTY, &send, true).await {
        assert!(c.clean_eof(), "expected a clean EOF, got {c:?}");
        assert_eq!(c.read, send, "trickled bytes not exact");
    }
    rig.finish(&[("complete", FAULTY as f64)], &[]).await;
}

/// Shutdown past the grace while a client waits for a blackholed upstream's handshake:
/// the client is cut before any byte, so it must be told with a reset (as a failed
/// connect is), not a clean EOF that looks like an empty reply; counted as `shutdown`.
///
/// Fails on main as of this commit: src/connection.rs returns `CloseReason::Shutdown`
/// from the connect `select!` without `reset_on_close`, so the client gets a FIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_the_upstream_connect_resets_the_client() {
    let mut chaos = ChaosUpstream::start("blackhole", 0);
    chaos.turned("blackholing");
    let proxy = Proxy::start(chaos.addr, |c| {
        c.upstream.connect_timeout = Duration::from_secs(30);
        c.timeouts.shutdown_grace = Duration::from_millis(300);
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    eventually(
        "sluice is connecting upstream",
        Duration::from_secs(5),
        || proxy.value("sluice_connections_active") == 1.0,
    )
    .await;
    let server = proxy.server.clone();
    proxy.shutdown().await;
    assert_one_closed_by_shutdown(&server);
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the client is closed");
    assert!(rest.is_empty());
    assert_eq!(
        r.map_err(|e| e.kind()).err(),
        Some(io::ErrorKind::ConnectionReset),
        "a client cut at the shutdown deadline before its upstream answered got a clean EOF"
    );
}
