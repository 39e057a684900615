//! The `[socket]` options as the kernel holds them on sluice's own two sockets of a
//! relayed connection, read back with getsockopt.

use sluice_testkit as common;

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};

use common::*;
use sluice::Config;
use sluice::config::DEFAULT_NOTSENT_LOWAT;
use socket2::Socket;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// sluice's sockets of one connection: the one it accepted from the client and the one
/// it connected to the upstream.
struct SluiceSockets {
    client: Socket,
    upstream: Socket,
}

/// Relays one connection through an in-process proxy configured by `tweak`, and finds
/// sluice's two sockets of it among this process's descriptors by their addresses.
/// Returns them with the proxy and the client, which keep the connection open.
async fn relayed(tweak: impl FnOnce(&mut Config)) -> (SluiceSockets, Proxy, TcpStream) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let up_addr = upstream(move |mut s| {
        // sluice's upstream socket is the peer of the one accepted here.
        let _ = tx.send(s.peer_addr().unwrap());
        async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    })
    .await;
    let proxy = Proxy::start(up_addr, tweak).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    // A byte there and back: both of sluice's sockets exist and carry the connection.
    client.write_all(b"x").await.unwrap();
    let mut echoed = [0u8; 1];
    client.read_exact(&mut echoed).await.unwrap();
    let sluice_upstream_end = rx.recv().await.unwrap();
    let sockets = SluiceSockets {
        client: find_socket(proxy.addr, client.local_addr().unwrap()),
        upstream: find_socket(sluice_upstream_end, up_addr),
    };
    (sockets, proxy, client)
}

/// The TCP socket of this process with these local and peer addresses, as a duplicate
/// of its descriptor (so it stays open however the proxy's task goes on).
fn find_socket(local: SocketAddr, peer: SocketAddr) -> Socket {
    let sockets = sluice_testkit::procfs::descriptors(std::process::id())
        .into_iter()
        .filter(|(_, target)| target.to_string_lossy().starts_with("socket:"));
    for (fd, _) in sockets {
        // SAFETY: fcntl only duplicates the descriptor; a number that was closed since
        // the listing fails with EBADF, and one reused since is told apart by address.
        let dup = unsafe { libc::fcntl(fd as i32, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            continue;
        }
        // SAFETY: `dup` is a descriptor we just opened and nothing else owns.
        let socket = Socket::from(unsafe { OwnedFd::from_raw_fd(dup) });
        let addr = |a: std::io::Result<socket2::SockAddr>| a.ok().and_then(|a| a.as_socket());
        if addr(socket.local_addr()) == Some(local) && addr(socket.peer_addr()) == Some(peer) {
            return socket;
        }
    }
    panic!("no socket {local} -> {peer} in this process");
}

/// TCP_NOTSENT_LOWAT on sluice's client socket and upstream socket.
async fn notsent_lowat(tweak: impl FnOnce(&mut Config)) -> [u32; 2] {
    let (sockets, proxy, client) = relayed(tweak).await;
    let lowat = [
        sockets.client.tcp_notsent_lowat().unwrap(),
        sockets.upstream.tcp_notsent_lowat().unwrap(),
    ];
    drop(client);
    proxy.shutdown().await;
    lowat
}

/// The shipped default is set on the accepted client socket (inherited from the
/// listener) and on the upstream socket (set before connect).
#[tokio::test]
async fn default_notsent_lowat_is_set_on_both_sockets() {
    let expected = DEFAULT_NOTSENT_LOWAT as u32;
    assert!(expected > 0);
    assert_eq!(notsent_lowat(|_| {}).await, [expected, expected]);
}

#[tokio::test]
async fn configured_notsent_lowat_is_set_on_both_sockets() {
    let lowat = notsent_lowat(|c| c.socket.notsent_lowat = bytesize::ByteSize::kib(20)).await;
    assert_eq!(lowat, [20 * 1024, 20 * 1024]);
}

/// `0` leaves the option off: the kernel reports 0 (use net.ipv4.tcp_notsent_lowat).
#[tokio::test]
async fn zero_notsent_lowat_leaves_it_off() {
    let lowat = notsent_lowat(|c| c.socket.notsent_lowat = bytesize::ByteSize::b(0)).await;
    assert_eq!(lowat, [0, 0]);
}
