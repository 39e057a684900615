//! Loopback addresses that misbehave on purpose (refuse, never complete a handshake) or
//! are kept free for a daemon to bind.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::TcpStream;

fn loopback_socket() -> Socket {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock
}

fn address_of(sock: &Socket) -> SocketAddr {
    sock.local_addr().unwrap().as_socket().unwrap()
}

/// A loopback address that refuses connections: a socket bound to it that never
/// listens, so no other test can take the port while the guard lives.
pub fn refusing_address() -> (SocketAddr, Socket) {
    let sock = loopback_socket();
    (address_of(&sock), sock)
}

/// A free loopback address kept for the caller: a socket bound to it with SO_REUSEPORT
/// (as sluice binds) that never listens, so sluice can bind it while no other test's
/// `127.0.0.1:0` is given the port meanwhile. Keep the socket alive while using it.
pub fn reserved_address() -> (SocketAddr, Socket) {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.set_reuse_address(true).unwrap();
    sock.set_reuse_port(true).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    (address_of(&sock), sock)
}

/// A loopback address whose handshakes never complete: a listener that never accepts,
/// with its backlog filled. Keep the returned value alive while using the address.
pub async fn blackhole() -> (SocketAddr, Vec<TcpStream>, Socket) {
    let sock = loopback_socket();
    sock.listen(0).unwrap();
    let addr = address_of(&sock);
    let mut fillers = Vec::new();
    // Fill the accept queue until a handshake stops completing.
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            _ => return (addr, fillers, sock),
        }
    }
    panic!("could not fill the backlog of {addr}");
}
