//! Access rules: `listen.allow` and `listen.max_connections_per_client`. A refused client
//! is reset at once and counted; everyone else is unaffected.

use sluice_testkit as common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Connects from `source` (a loopback address) to `to`. `None` when the reset of a
/// refusal arrived before connect() returned.
async fn connect_from(source: &str, to: SocketAddr) -> Option<TcpStream> {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{source}:0").parse().unwrap()).unwrap();
    match s.connect(to).await {
        Ok(s) => Some(s),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("connect failed: {e}"),
    }
}

/// True when the proxy relays for this client (echo round trip), false when it was
/// refused (reset or closed without a reply).
async fn served(s: &mut Option<TcpStream>) -> bool {
    let Some(s) = s else { return false };
    if s.write_all(b"hi").await.is_err() {
        return false;
    }
    let mut b = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .expect("answered or closed")
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_admits_listed_networks_only() {
    let proxy = Proxy::start(echo_upstream().await, |c| {
        c.listen.allow = vec!["127.0.0.1".into(), "10.0.0.0/8".into()]
    })
    .await;
    let mut listed = connect_from("127.0.0.1", proxy.addr).await;
    assert!(served(&mut listed).await);
    let mut other = connect_from("127.0.0.2", proxy.addr).await;
    assert!(
        !served(&mut other).await,
        "127.0.0.2 is not in listen.allow"
    );
    eventually("the refusal is counted", Duration::from_secs(5), || {
        proxy.value("sluice_connections_rejected_total{reason=\"not_allowed\"}") == 1.0
    })
    .await;
    assert_eq!(proxy.value("sluice_connections_accepted_total"), 1.0);
    drop(listed);
    proxy.settled().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_limit_refuses_the_extra_connection_only() {
    let proxy = Proxy::start(echo_upstream().await, |c| {
        c.listen.max_connections_per_client = 2
    })
    .await;
    let mut a = connect_from("127.0.0.1", proxy.addr).await;
    let mut b = connect_from("127.0.0.1", proxy.addr).await;
    assert!(served(&mut a).await && served(&mut b).await);
    let mut c = connect_from("127.0.0.1", proxy.addr).await;
    assert!(
        !served(&mut c).await,
        "a third connection from one address is refused"
    );
    // Another address has its own allowance.
    let mut d = connect_from("127.0.0.3", proxy.addr).await;
    assert!(served(&mut d).await);
    assert_eq!(
        proxy.value("sluice_connections_rejected_total{reason=\"max_per_client\"}"),
        1.0
    );
    // A slot frees when a connection ends.
    drop(a);
    eventually("the slot frees", Duration::from_secs(5), || {
        proxy.value("sluice_connections_active") == 2.0
    })
    .await;
    let mut e = connect_from("127.0.0.1", proxy.addr).await;
    assert!(served(&mut e).await);
    assert!(served(&mut b).await, "live connections are unaffected");
    drop((b, d, e));
    proxy.settled().await;
    proxy.shutdown().await;
}
