//! The relay end to end through a real proxy on loopback: bytes arrive intact, the
//! bounds hold, half-close, resets and timeouts behave, and the counters move.

use sluice_testkit as common;

use std::time::Duration;

use common::*;
use sluice::config::{RelayMode, Scheduler};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const C2U: &str = "client_to_upstream";
const U2C: &str = "upstream_to_client";

/// Two tests from one `async fn(RelayMode)`: `$copy` runs it with `relay.mode = "copy"`,
/// `$spliced` with `relay.mode = "splice"`. Doc comments before the names are `$copy`'s.
macro_rules! in_copy_and_splice_modes {
    ($(#[$doc:meta])* $copy:ident, $spliced:ident, $test_in:ident) => {
        $(#[$doc])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $copy() {
            $test_in(RelayMode::Copy).await;
        }

        /// The same with `relay.mode = "splice"`.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $spliced() {
            $test_in(RelayMode::Splice).await;
        }
    };
}

in_copy_and_splice_modes! {
    /// 64 MiB each way at the same time, random chunk sizes, compared by hash; and the byte
    /// counters equal what crossed.
    sixty_four_mib_each_way_at_once,
    sixty_four_mib_each_way_at_once_spliced,
    sixty_four_mib_each_way_at_once_in
}

async fn sixty_four_mib_each_way_at_once_in(mode: RelayMode) {
    const LEN: usize = 64 << 20;
    let down = data(2, LEN);
    let down_hash = sha(&down);
    let up_addr = {
        let down = std::sync::Arc::new(down);
        upstream(move |s| {
            let down = down.clone();
            async move {
                let (mut r, mut w) = s.into_split();
                let writer = tokio::spawn(async move { write_chunked(&mut w, &down, 7).await });
                let got = read_hash(&mut r).await.unwrap();
                writer.await.unwrap().unwrap();
                // Report what arrived by echoing the hash back is not possible after
                // shutdown; the client checks the reply and the proxy counters instead.
                assert_eq!(got.1, LEN);
                assert_eq!(got.0, sha(&data(1, LEN)), "client→upstream bytes corrupted");
            }
        })
        .await
    };
    let proxy = Proxy::start(up_addr, |c| c.relay.mode = mode).await;
    let up = data(1, LEN);
    let s = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move { write_chunked(&mut w, &up, 3).await });
    let (hash, len) = read_hash(&mut r).await.unwrap();
    writer.await.unwrap().unwrap();
    assert_eq!(len, LEN);
    assert_eq!(hash, down_hash, "upstream→client bytes corrupted");
    proxy.settled().await;
    assert_eq!(
        proxy.value(&format!("sluice_bytes_total{{direction=\"{C2U}\"}}")),
        LEN as f64
    );
    assert_eq!(
        proxy.value(&format!("sluice_bytes_total{{direction=\"{U2C}\"}}")),
        LEN as f64
    );
    assert_eq!(proxy.closed("complete"), 1.0);
    proxy.shutdown().await;
}

/// 200 concurrent connections, each with its own data, through an echo upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_each_intact() {
    two_hundred_concurrent_connections_each_intact_in(RelayMode::Copy, Scheduler::Stealing).await;
}

/// The same with `relay.mode = "splice"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_each_intact_spliced() {
    two_hundred_concurrent_connections_each_intact_in(RelayMode::Splice, Scheduler::Stealing).await;
}

/// The same on the pinned scheduler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_each_intact_when_pinned() {
    two_hundred_concurrent_connections_each_intact_in(RelayMode::Copy, Scheduler::Pinned).await;
}

async fn two_hundred_concurrent_connections_each_intact_in(mode: RelayMode, scheduler: Scheduler) {
    const CONNS: u64 = 200;
    const LEN: usize = 256 << 10;
    let proxy = Proxy::start(echo_upstream().await, |c| {
        c.relay.mode = mode;
        c.buffer.client_to_upstream = bytesize::ByteSize::kib(16);
        c.buffer.upstream_to_client = bytesize::ByteSize::kib(16);
        c.runtime.workers = 2;
        c.runtime.scheduler = scheduler;
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..CONNS {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let mine = data(100 + i, LEN);
            let s = TcpStream::connect(addr).await.unwrap();
            let (mut r, mut w) = s.into_split();
            let expect = sha(&mine);
            let writer = tokio::spawn(async move { write_chunked(&mut w, &mine, i).await });
            let (hash, len) = read_hash(&mut r).await.unwrap();
            writer.await.unwrap().unwrap();
            assert_eq!((hash, len), (expect, LEN), "connection {i} corrupted");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    proxy.settled().await;
    let total = (CONNS as usize * LEN) as f64;
    assert_eq!(
        proxy.value(&format!("sluice_bytes_total{{direction=\"{C2U}\"}}")),
        total
    );
    assert_eq!(
        proxy.value(&format!("sluice_bytes_total{{direction=\"{U2C}\"}}")),
        total
    );
    assert_eq!(proxy.closed("complete"), CONNS as f64);
    assert_eq!(
        proxy.value("sluice_connections_accepted_total"),
        CONNS as f64
    );
    proxy.shutdown().await;
}

in_copy_and_splice_modes! {
    /// The client half-closes first and still receives the whole reply.
    client_half_closes_and_still_gets_the_whole_reply,
    client_half_closes_and_still_gets_the_whole_reply_spliced,
    client_half_closes_and_still_gets_the_whole_reply_in
}

async fn client_half_closes_and_still_gets_the_whole_reply_in(mode: RelayMode) {
    const REPLY: usize = 3 << 20;
    let up = upstream(|mut s| async move {
        // Read the whole request (to EOF), then answer at length.
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request");
        s.write_all(&data(9, REPLY)).await.unwrap();
        s.shutdown().await.unwrap();
    })
    .await;
    let proxy = Proxy::start(up, |c| c.relay.mode = mode).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"request").await.unwrap();
    s.shutdown().await.unwrap();
    let (hash, len) = read_hash(&mut s).await.unwrap();
    assert_eq!((hash, len), (sha(&data(9, REPLY)), REPLY));
    proxy.settled().await;
    assert_eq!(proxy.closed("complete"), 1.0);
    proxy.shutdown().await;
}

in_copy_and_splice_modes! {
    /// The upstream half-closes first and still receives everything the client sends after.
    upstream_half_closes_and_still_gets_the_whole_upload,
    upstream_half_closes_and_still_gets_the_whole_upload_spliced,
    upstream_half_closes_and_still_gets_the_whole_upload_in
}

async fn upstream_half_closes_and_still_gets_the_whole_upload_in(mode: RelayMode) {
    const UPLOAD: usize = 3 << 20;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let up = upstream(move |mut s| {
        let tx = tx.lock().unwrap().take();
        async move {
            s.write_all(b"ready").await.unwrap();
            s.shutdown().await.unwrap();
            let got = read_hash(&mut s).await.unwrap();
            let _ = tx.unwrap().send(got);
        }
    })
    .await;
    let proxy = Proxy::start(up, |c| c.relay.mode = mode).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut greeting = Vec::new();
    s.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"ready");
    write_chunked(&mut s, &data(5, UPLOAD), 5).await.unwrap();
    let got = rx.await.unwrap();
    assert_eq!(got, (sha(&data(5, UPLOAD)), UPLOAD));
    proxy.settled().await;
    assert_eq!(proxy.closed("complete"), 1.0);
    proxy.shutdown().await;
}

/// Samples `direction`'s queued bytes every few ms until `done`; returns the maximum.
fn watch_queue(
    proxy: &Proxy,
    direction: &'static str,
) -> (
    tokio::task::JoinHandle<f64>,
    tokio_util::sync::CancellationToken,
) {
    let server = proxy.server.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let s2 = stop.clone();
    let h = tokio::spawn(async move {
        let mut max = 0f64;
        while !s2.is_cancelled() {
            let q = value(
                &server.metrics().render(),
                &format!("sluice_queued_bytes{{direction=\"{direction}\"}}"),
            );
            max = max.max(q);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        max
    });
    (h, stop)
}

in_copy_and_splice_modes! {
    /// A fast upstream and a client reading 16 KiB/s through a small SO_RCVBUF: the queue
    /// never exceeds the bound, pauses and drains are counted, the data is exact.
    slow_reader_is_held_to_the_bound,
    slow_reader_is_held_to_the_bound_spliced,
    slow_reader_is_held_to_the_bound_in
}

async fn slow_reader_is_held_to_the_bound_in(mode: RelayMode) {
    const LEN: usize = 64 << 10;
    const BOUND: u64 = 16 << 10;
    let up = upstream(|mut s| async move {
        let _ = s.write_all(&data(11, LEN)).await;
        let _ = s.shutdown().await;
    })
    .await;
    let proxy = Proxy::start(up, |c| {
        c.relay.mode = mode;
        c.buffer.upstream_to_client = bytesize::ByteSize::b(BOUND);
        c.socket.client_send_buffer = bytesize::ByteSize::kib(4);
        c.socket.upstream_recv_buffer = bytesize::ByteSize::kib(4);
    })
    .await;
    let (watch, stop) = watch_queue(&proxy, U2C);
    let mut s = connect_small_rcvbuf(proxy.addr, 4096).await;
    let got = read_slowly(&mut s, 16 << 10).await.unwrap();
    drop(s);
    stop.cancel();
    let max = watch.await.unwrap();
    assert_eq!(
        sha(&got),
        sha(&data(11, LEN)),
        "slow reader's data corrupted"
    );
    assert!(
        max > 0.0 && max <= BOUND as f64,
        "queued bytes peaked at {max}, bound {BOUND}"
    );
    let pauses = proxy.value(&format!("sluice_pauses_total{{direction=\"{U2C}\"}}"));
    let drains = proxy.value(&format!("sluice_drains_total{{direction=\"{U2C}\"}}"));
    assert!(
        pauses >= 2.0 && drains >= 1.0,
        "pauses {pauses}, drains {drains}"
    );
    assert!(
        proxy.value(&format!(
            "sluice_paused_seconds_total{{direction=\"{U2C}\"}}"
        )) > 0.0
    );
    assert_eq!(
        proxy.value(&format!("sluice_pauses_total{{direction=\"{C2U}\"}}")),
        0.0
    );
    proxy.settled().await;
    assert_eq!(
        proxy.value(&format!("sluice_bytes_total{{direction=\"{U2C}\"}}")),
        LEN as f64
    );
    proxy.shutdown().await;
}

in_copy_and_splice_modes! {
    /// A fast client and an upstream reading 16 KiB/s: the same in the other direction.
    slow_upstream_is_held_to_the_bound,
    slow_upstream_is_held_to_the_bound_spliced,
    slow_upstream_is_held_to_the_bound_in
}

async fn slow_upstream_is_held_to_the_bound_in(mode: RelayMode) {
    const LEN: usize = 64 << 10;
    const BOUND: u64 = 16 << 10;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let up = upstream_with_rcvbuf(4096, move |mut s| {
        let tx = tx.lock().unwrap().take();
        async move {
            let got = read_slowly(&mut s, 16 << 10).await.unwrap();
            let _ = tx.unwrap().send(got);
        }
    })
    .await;
    let proxy = Proxy::start(up, |c| {
        c.relay.mode = mode;
        c.buffer.client_to_upstream = bytesize::ByteSize::b(BOUND);
        c.socket.upstream_send_buffer = bytesize::ByteSize::kib(4);
        c.socket.upstream_recv_buffer = bytesize::ByteSize::kib(4);
        c.socket.client_recv_buffer = bytesize::ByteSize::kib(4);
    })
    .await;
    let (watch, stop) = watch_queue(&proxy, C2U);
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&data(12, LEN)).await.unwrap();
    s.shutdown().await.unwrap();
    let got = rx.await.unwrap();
    drop(s);
    stop.cancel();
    let max = watch.await.unwrap();
    assert_eq!(sha(&got), sha(&data(12, LEN)), "upload corrupted");
    assert!(
        max > 0.0 && max <= BOUND as f64,
        "queued bytes peaked at {max}, bound {BOUND}"
    );
    let pauses = proxy.value(&format!("sluice_pauses_total{{direction=\"{C2U}\"}}"));
    let drains = proxy.value(&format!("sluice_drains_total{{direction=\"{C2U}\"}}"));
    assert!(
        pauses >= 2.0 && drains >= 1.0,
        "pauses {pauses}, drains {drains}"
    );
    proxy.settled().await;
    proxy.shutdown().await;
}

/// Nothing listens upstream: the client is closed at once and the error counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refused_closes_the_client_at_once() {
    let (refusing, _guard) = refusing_address();
    let proxy = Proxy::start(refusing, |_| {}).await;
    // The reset can arrive before connect() has returned; either way the client is told.
    if let Ok(mut s) = TcpStream::connect(proxy.addr).await {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("client closed promptly");
        assert!(matches!(r, Ok(0)) || r.is_err(), "client got data: {r:?}");
    }
    proxy.settled().await;
    assert_eq!(
        proxy.value("sluice_upstream_connect_errors_total{kind=\"refused\"}"),
        1.0
    );
    assert_eq!(proxy.closed("upstream_connect_failed"), 1.0);
    proxy.shutdown().await;
}

/// An upstream whose handshake never completes: the client is closed within
/// `connect_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_closes_the_client() {
    let (addr, _fillers, _listener) = blackhole().await;
    let proxy = Proxy::start(addr, |c| {
        c.upstream.connect_timeout = Duration::from_millis(300)
    })
    .await;
    let started = Instant::now();
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("client closed");
    assert!(matches!(r, Ok(0)) || r.is_err(), "client got data: {r:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "closed before the timeout: {took:?}"
    );
    proxy.settled().await;
    assert_eq!(
        proxy.value("sluice_upstream_connect_errors_total{kind=\"timeout\"}"),
        1.0
    );
    proxy.shutdown().await;
}

in_copy_and_splice_modes! {
    /// An upstream reset reaches the client as a reset, and a client reset reaches the
    /// upstream as a reset.
    resets_are_passed_on_as_resets,
    resets_are_passed_on_as_resets_spliced,
    resets_are_passed_on_as_resets_in
}

async fn resets_are_passed_on_as_resets_in(mode: RelayMode) {
    // Upstream resets after a greeting.
    let up = upstream(|mut s| async move {
        s.write_all(b"hello").await.unwrap();
        let mut b = [0u8; 5];
        s.read_exact(&mut b).await.unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
    })
    .await;
    let proxy = Proxy::start(up, |c| c.relay.mode = mode).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).await.unwrap();
    s.write_all(b"bye!!").await.unwrap();
    let mut rest = Vec::new();
    let r = s.read_to_end(&mut rest).await;
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    proxy.settled().await;
    assert_eq!(proxy.closed("upstream_reset"), 1.0);
    proxy.shutdown().await;

    // Client resets: the upstream sees a reset.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let up = upstream(move |mut s| {
        let tx = tx.lock().unwrap().take();
        async move {
            s.write_all(b"hello").await.unwrap();
            let mut rest = Vec::new();
            let r = s.read_to_end(&mut rest).await.map_err(|e| e.kind());
            let _ = tx.unwrap().send(r);
        }
    })
    .await;
    let proxy = Proxy::start(up, |c| c.relay.mode = mode).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).await.unwrap();
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    let r = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r, Err(std::io::ErrorKind::ConnectionReset));
    proxy.settled().await;
    assert_eq!(proxy.closed("client_reset"), 1.0);
    proxy.shutdown().await;
}

/// No byte either way for `timeouts.idle` closes both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let up = upstream(|mut s| async move {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    })
    .await;
    let proxy = Proxy::start(up, |c| c.timeouts.idle = Duration::from_millis(300)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    // Activity keeps it open past one idle period...
    for _ in 0..4 {
        s.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(proxy.value("sluice_connections_active"), 1.0);
    // ...silence closes it.
    let started = Instant::now();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
        .await
        .expect("closed");
    assert!(matches!(r, Ok(0)), "{r:?}");
    assert!(started.elapsed() >= Duration::from_millis(150));
    proxy.settled().await;
    assert_eq!(proxy.closed("idle_timeout"), 1.0);
    proxy.shutdown().await;
}

/// A connection half-closed for longer than `timeouts.half_close` is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_connections_are_closed_after_the_timeout() {
    let up = upstream(|mut s| async move {
        // Reads the request to EOF and then never answers nor closes.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let proxy = Proxy::start(up, |c| c.timeouts.half_close = Duration::from_millis(300)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"req").await.unwrap();
    s.shutdown().await.unwrap();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
        .await
        .expect("closed");
    // The reply never came: the client is told with a reset, not a clean empty reply.
    assert_eq!(
        r.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::ConnectionReset)
    );
    proxy.settled().await;
    assert_eq!(proxy.closed("half_close_timeout"), 1.0);
    proxy.shutdown().await;
}

/// At `max_connections` sluice stops accepting (counted); the waiting client is served
/// as soon as a slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_leaves_clients_in_the_backlog() {
    let proxy = Proxy::start(echo_upstream().await, |c| {
        c.listen.max_connections = Some(1)
    })
    .await;
    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    first.write_all(b"1").await.unwrap();
    let mut b = [0u8; 1];
    first.read_exact(&mut b).await.unwrap();
    // The second handshake completes in the kernel, but sluice does not take it yet.
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    second.write_all(b"2").await.unwrap();
    eventually("the listener pauses", Duration::from_secs(5), || {
        proxy.value("sluice_listener_paused_total") >= 1.0
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), second.read_exact(&mut b))
            .await
            .is_err(),
        "second served while first is live"
    );
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), second.read_exact(&mut b))
        .await
        .expect("second served")
        .unwrap();
    assert_eq!(&b, b"2");
    drop(second);
    proxy.settled().await;
    proxy.shutdown().await;
}

/// Every series exists from start-up, before any traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_exists_at_start_up() {
    let (refusing, _guard) = refusing_address();
    let proxy = Proxy::start(refusing, |_| {}).await;
    let m = proxy.metrics();
    for series in [
        "sluice_connections_accepted_total",
        "sluice_connections_active",
        "sluice_listener_paused_total",
        "sluice_connections_closed_total{reason=\"complete\"}",
        "sluice_connections_closed_total{reason=\"shutdown\"}",
        "sluice_upstream_connect_errors_total{kind=\"resolve\"}",
        "sluice_upstream_connect_duration_seconds_count",
        "sluice_connection_duration_seconds_count",
        "sluice_bytes_total{direction=\"client_to_upstream\"}",
        "sluice_queued_bytes{direction=\"upstream_to_client\"}",
        "sluice_pauses_total{direction=\"client_to_upstream\"}",
        "sluice_drains_total{direction=\"upstream_to_client\"}",
        "sluice_paused_connections{direction=\"client_to_upstream\"}",
        "sluice_paused_seconds_total{direction=\"upstream_to_client\"}",
        "sluice_connections_rejected_total{reason=\"not_allowed\"}",
        "sluice_config_reloads_total{result=\"failure\"}",
    ] {
        assert_eq!(value(&m, series), 0.0, "{series}");
    }
    assert_eq!(
        value(
            &m,
            "sluice_buffer_limit_bytes{direction=\"client_to_upstream\"}"
        ),
        65536.0
    );
    assert_eq!(
        value(
            &m,
            &format!(
                "sluice_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert!(value(&m, "process_resident_memory_bytes") > 0.0);
    assert!(value(&m, "process_open_fds") > 0.0);
    proxy.shutdown().await;
}

/// On the pinned scheduler, a burst of clients is spread over the worker threads (each
/// connection stays on the one that serves it), and every one of them, handed over or
/// not, relays intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_clients_is_spread_over_the_workers() {
    let proxy = Proxy::start(echo_upstream().await, |c| {
        c.runtime.workers = 2;
        c.runtime.scheduler = Scheduler::Pinned;
    })
    .await;
    // All at once, as a burst: handshakes complete in the kernel before sluice accepts.
    let connects = (0..16).map(|_| TcpStream::connect(proxy.addr));
    let mut clients: Vec<TcpStream> = futures_util::future::join_all(connects)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (i, s) in clients.iter_mut().enumerate() {
        let msg = [i as u8; 100];
        s.write_all(&msg).await.unwrap();
        let mut back = [0u8; 100];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg, "client {i} got its own bytes back");
    }
    let loads = proxy.server.worker_connections();
    assert_eq!(loads.len(), 2);
    assert_eq!(
        loads.iter().sum::<usize>(),
        16,
        "every live client is counted once"
    );
    let (lo, hi) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
    assert!(
        hi - lo <= 2,
        "16 clients spread over 2 workers as {loads:?}"
    );
    drop(clients);
    proxy.settled().await;
    assert_eq!(proxy.server.worker_connections(), vec![0, 0]);
    proxy.shutdown().await;
}

in_copy_and_splice_modes! {
    /// Thousands of tiny segments while the client is not reading: in splice mode each
    /// segment can take a pipe slot of its own, so the pipe runs out of slots long before it
    /// holds the bound. Nothing may stall or be lost, and the bound still holds.
    tiny_segments_to_a_stalled_reader_arrive_intact,
    tiny_segments_to_a_stalled_reader_arrive_intact_spliced,
    tiny_segments_to_a_stalled_reader_arrive_intact_in
}

async fn tiny_segments_to_a_stalled_reader_arrive_intact_in(mode: RelayMode) {
    const SEGMENTS: usize = 20_000;
    const SEGMENT: usize = 7;
    const BOUND: u64 = 64 << 10;
    let expect = data(31, SEGMENTS * SEGMENT);
    let up = {
        let expect = expect.clone();
        upstream(move |mut s| {
            let expect = expect.clone();
            async move {
                s.set_nodelay(true).unwrap();
                for chunk in expect.chunks(SEGMENT) {
                    s.write_all(chunk).await.unwrap();
                    // Let each write leave as a segment of its own.
                    tokio::task::yield_now().await;
                }
                s.shutdown().await.unwrap();
            }
        })
        .await
    };
    let proxy = Proxy::start(up, |c| {
        c.relay.mode = mode;
        c.buffer.upstream_to_client = bytesize::ByteSize::b(BOUND);
        c.socket.client_send_buffer = bytesize::ByteSize::kib(4);
    })
    .await;
    let (watch, stop) = watch_queue(&proxy, U2C);
    let mut s = connect_small_rcvbuf(proxy.addr, 4096).await;
    // Not reading yet: the segments pile up in the proxy and the sockets.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (hash, len) = tokio::time::timeout(Duration::from_secs(20), read_hash(&mut s))
        .await
        .expect("the relay does not stall")
        .unwrap();
    stop.cancel();
    let max = watch.await.unwrap();
    assert_eq!((hash, len), (sha(&expect), expect.len()));
    assert!(max <= BOUND as f64, "queued bytes peaked at {max}");
    drop(s);
    proxy.settled().await;
    proxy.shutdown().await;
}

/// With several pinned workers, an accept loop waiting for a client holds a permit; a
/// worker that finds none free because of that is not paused by the limit, so nothing is
/// counted until live connections reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_pauses_are_counted_only_at_the_limit_with_pinned_workers() {
    let proxy = Proxy::start(echo_upstream().await, |c| {
        c.runtime.workers = 2;
        c.runtime.scheduler = Scheduler::Pinned;
        c.listen.max_connections = Some(2);
    })
    .await;
    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    first.write_all(b"1").await.unwrap();
    let mut b = [0u8; 1];
    first.read_exact(&mut b).await.unwrap();
    assert_eq!(
        proxy.value("sluice_listener_paused_total"),
        0.0,
        "one live connection of two allowed is no pause"
    );
    let mut second = TcpStream::connect(proxy.addr).await.unwrap();
    second.write_all(b"2").await.unwrap();
    second.read_exact(&mut b).await.unwrap();
    eventually(
        "the listener pauses at the limit",
        Duration::from_secs(5),
        || proxy.value("sluice_listener_paused_total") >= 1.0,
    )
    .await;
    drop((first, second));
    proxy.settled().await;
    proxy.shutdown().await;
}
