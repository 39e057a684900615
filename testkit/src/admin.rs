//! sluice's admin endpoint as the async tests call it: a GET, and `/connections` as JSON.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// `GET path` on an admin endpoint: the status code and the body.
pub async fn get(endpoint: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || crate::http::get(endpoint, &path, TIMEOUT))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("GET http://{endpoint}: {e}"))
}

/// `GET /connections{query}`, which must answer 200, as JSON.
pub async fn connections(endpoint: SocketAddr, query: &str) -> serde_json::Value {
    let (status, body) = get(endpoint, &format!("/connections{query}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Asks for `/connections{query}` every 10 ms until `cond` holds (20 s at most);
/// returns that listing.
pub async fn poll_connections(
    endpoint: SocketAddr,
    query: &str,
    what: &str,
    mut cond: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listing = connections(endpoint, query).await;
        if cond(&listing) {
            return listing;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; last listing: {listing}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
