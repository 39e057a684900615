//! Waiting for a condition without sleeping a fixed time.

use std::time::Duration;

use tokio::time::Instant;

/// Polls `cond` every 10 ms until it holds; panics with `what` after `limit`.
pub async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
