//! Splice mode's descriptors: a direction holds a pipe only while it has bytes queued,
//! and an idle connection holds none. A test binary of its own, with one test, so the
//! process's pipes are this test's alone and /proc/self/fd can be counted.

use sluice_testkit as common;

use std::time::Duration;

use common::*;
use sluice::config::RelayMode;
use sluice::relay::pipe::{live_pipes, pipes_in_use};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Pipe descriptors this process has open, as the kernel sees them.
fn pipe_fds() -> usize {
    sluice_testkit::procfs::open_of_kind(std::process::id(), "pipe:")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direction_holds_a_pipe_only_while_bytes_are_queued() {
    const LEN: usize = 1 << 20;
    let baseline = pipe_fds();
    assert_eq!(live_pipes(), 0);
    // An upstream that sends 1 MiB, then echoes whatever comes until the client ends.
    let up = upstream(|s| async move {
        let (mut r, mut w) = s.into_split();
        w.write_all(&data(21, LEN)).await.unwrap();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await;
    let proxy = Proxy::start(up, |c| {
        c.relay.mode = RelayMode::Splice;
        c.socket.client_send_buffer = bytesize::ByteSize::kib(4);
    })
    .await;
    let mut s = connect_small_rcvbuf(proxy.addr, 4096).await;

    // The client reads nothing yet: the upstream→client direction fills its pipe.
    eventually(
        "the stuck direction holds a pipe",
        Duration::from_secs(10),
        || pipes_in_use() == 1 && proxy.queued("upstream_to_client") > 0.0,
    )
    .await;
    assert_eq!(pipe_fds(), baseline + 2 * live_pipes());

    // Read it all: the queue empties and the pipe goes back to the stock.
    let mut got = vec![0u8; LEN];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(sha(&got), sha(&data(21, LEN)));
    // Some bytes the other way and back, then the connection sits idle.
    s.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    s.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
    eventually(
        "the idle connection holds no pipe",
        Duration::from_secs(10),
        || pipes_in_use() == 0,
    )
    .await;
    assert_eq!(proxy.value("sluice_connections_active"), 1.0);
    assert_eq!(proxy.queued("upstream_to_client"), 0.0);
    // What is left open is the per-thread stock of empty pipes, and nothing else.
    assert!(live_pipes() <= 2, "{} pipes open", live_pipes());
    assert_eq!(pipe_fds(), baseline + 2 * live_pipes());
    assert_eq!(
        proxy.value("sluice_bytes_total{direction=\"upstream_to_client\"}"),
        (LEN + 4) as f64
    );

    drop(s);
    proxy.settled().await;
    assert_eq!(pipes_in_use(), 0);
    proxy.shutdown().await;
}
