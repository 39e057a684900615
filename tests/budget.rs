//! `buffer.total`: the budget all connections share, with real sockets.

use sluice_testkit as common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytesize::ByteSize;
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const BOUND: u64 = 16 << 10;
/// Room for three whole buffers in the queue pool (56 KiB) and two small ones in the
/// reserve (8 KiB).
const TOTAL: u64 = 64 << 10;

fn budgeted(c: &mut sluice::Config) {
    c.buffer.client_to_upstream = ByteSize::b(BOUND);
    c.buffer.upstream_to_client = ByteSize::b(BOUND);
    c.buffer.total = ByteSize::b(TOTAL);
}

fn used(p: &Proxy) -> f64 {
    p.value("sluice_budget_used_bytes")
}

/// Twelve slow readers behind a fast upstream want 12 × 16 KiB of buffers from a budget
/// with room for three: every sample shows used ≤ limit, they take turns (waits are
/// counted), and every one of them gets its whole stream intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_share_the_budget_take_turns_and_all_finish() {
    const LEN: usize = 96 << 10;
    let upstream = upstream(|mut s| async move {
        let _ = s.write_all(&data(7, LEN)).await;
    })
    .await;
    // A small send buffer towards the clients, so the bytes wait in sluice's buffers
    // rather than in the kernel's.
    let proxy = Arc::new(
        Proxy::start(upstream, |c| {
            budgeted(c);
            c.socket.client_send_buffer = ByteSize::b(4096);
        })
        .await,
    );
    assert_eq!(proxy.value("sluice_budget_limit_bytes"), TOTAL as f64);

    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (proxy, done) = (proxy.clone(), done.clone());
        tokio::spawn(async move {
            let mut samples = 0u64;
            while !done.load(Ordering::Relaxed) {
                let m = proxy.metrics();
                let (used, limit) = (
                    value(&m, "sluice_budget_used_bytes"),
                    value(&m, "sluice_budget_limit_bytes"),
                );
                assert!(used <= limit, "used {used} over the limit {limit}");
                samples += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            samples
        })
    };
    let readers: Vec<_> = (0..12)
        .map(|_| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let mut c = connect_small_rcvbuf(addr, 4096).await;
                read_slowly(&mut c, 256 << 10).await.unwrap()
            })
        })
        .collect();
    let want = sha(&data(7, LEN));
    for r in readers {
        let got = r.await.unwrap();
        assert_eq!(got.len(), LEN);
        assert_eq!(sha(&got), want, "every byte, in order");
    }
    done.store(true, Ordering::Relaxed);
    assert!(
        sampler.await.unwrap() > 10,
        "the budget was sampled throughout"
    );
    let waits = proxy.value("sluice_budget_waits_total{direction=\"upstream_to_client\"}");
    assert!(waits > 0.0, "the readers had to take turns");
    proxy.settled().await;
    assert_eq!(used(&proxy), 0.0, "every grant came back");
}

/// An upstream that floods a client whose first line is `flood`, and echoes lines for
/// everyone else.
async fn flood_or_echo() -> std::net::SocketAddr {
    upstream(|s| async move {
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let mut line = String::new();
        while r.read_line(&mut line).await.unwrap_or(0) > 0 {
            if line == "flood\n" {
                let chunk = vec![b'x'; 64 << 10];
                while w.write_all(&chunk).await.is_ok() {}
                return;
            }
            if w.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            line.clear();
        }
    })
    .await
}

/// Readers that never read hold every whole buffer the budget has, and more wait in
/// line for one; a new client's small request and reply still go through, from the
/// reserve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_client_gets_a_small_exchange_through_a_spent_budget() {
    let proxy = Proxy::start(flood_or_echo().await, budgeted).await;
    let mut stuck = Vec::new();
    for _ in 0..6 {
        let mut c = connect_small_rcvbuf(proxy.addr, 4096).await;
        c.write_all(b"flood\n").await.unwrap();
        stuck.push(c);
    }
    eventually(
        "the readers that never read hold the whole queue pool and others wait",
        Duration::from_secs(10),
        || {
            let m = proxy.metrics();
            value(&m, "sluice_budget_used_bytes") >= 3.0 * BOUND as f64
                && value(
                    &m,
                    "sluice_budget_waits_total{direction=\"upstream_to_client\"}",
                ) > 0.0
        },
    )
    .await;

    let mut c = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let ping = b"ping 0123456789abcdef0123456789abcdef0123456789abcdef0123456789\n";
    assert_eq!(ping.len(), 64);
    for _ in 0..3 {
        c.write_all(ping).await.unwrap();
        let mut reply = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut reply))
            .await
            .expect("the reply comes through a spent budget")
            .unwrap();
        assert_eq!(&reply, ping);
    }
    assert!(used(&proxy) <= TOTAL as f64);
    drop((c, stuck));
    proxy.settled().await;
    assert_eq!(used(&proxy), 0.0);
}

/// SIGHUP's reload puts a new total in force, and 0 turns the budget off.
#[tokio::test]
async fn a_reload_changes_the_budget() {
    let proxy = Proxy::start(echo_upstream().await, budgeted).await;
    assert_eq!(proxy.value("sluice_budget_limit_bytes"), TOTAL as f64);
    let mut c = proxy.server.config().as_ref().clone();
    c.buffer.total = ByteSize::b(4 * TOTAL);
    proxy.server.reload(c.clone()).unwrap();
    assert_eq!(proxy.value("sluice_budget_limit_bytes"), 4.0 * TOTAL as f64);

    // Bytes still go through, under the new total.
    let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(b"hello\n").await.unwrap();
    let mut reply = [0u8; 6];
    client.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"hello\n");

    c.buffer.total = ByteSize::b(0);
    proxy.server.reload(c).unwrap();
    assert_eq!(proxy.value("sluice_budget_limit_bytes"), 0.0);
    client.write_all(b"again\n").await.unwrap();
    client.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"again\n");
    drop(client);
    proxy.settled().await;
    assert_eq!(used(&proxy), 0.0);
}
