//! The token bucket that paces one direction of one connection to a [`Rate`].

use std::time::Duration;

use tokio::time::Instant;

use crate::units::Rate;

/// Paces one direction of one connection. Tokens may go negative ("debt"): the caller
/// does its I/O, then `take`s what it moved and sleeps off any debt, so the average rate is
/// exact whatever sizes the socket returns.
#[derive(Debug)]
pub struct TokenBucket {
    /// Bytes per second.
    rate: f64,
    /// Most tokens that can pile up while idle, so a stalled peer cannot cause a burst later.
    burst: f64,
    tokens: f64,
    /// Bytes per I/O call.
    chunk: usize,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: Rate) -> Self {
        let chunk = Self::chunk_for(rate);
        TokenBucket {
            rate: rate.0 as f64,
            // A quarter second of catch-up: a peer that stalls briefly (a delayed window
            // update) does not lower the average, a long stall does not cause a flood.
            burst: (rate.0 as f64 / 4.0).max(chunk as f64),
            tokens: chunk as f64,
            chunk,
            last: Instant::now(),
        }
    }

    /// How many bytes to move per I/O call at this rate: about 1/16 s worth, so pacing is
    /// smooth, but at least 256 bytes and at most 64 KiB.
    pub fn chunk_for(rate: Rate) -> usize {
        (rate.0 / 16).clamp(256, 64 * 1024) as usize
    }

    /// The I/O size for this bucket.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// Accounts for `n` bytes moved and sleeps until the rate allows more.
    pub async fn take(&mut self, n: usize) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - n as f64;
        if self.tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / self.rate)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bucket_paces_to_the_rate() {
        // 512 KiB at 1 MiB/s, less the 256 KiB burst: at least a quarter second.
        let mut bucket = TokenBucket::new(Rate(1024 * 1024));
        let start = Instant::now();
        for _ in 0..128 {
            bucket.take(4096).await;
        }
        let secs = start.elapsed().as_secs_f64();
        assert!(secs >= 0.24, "512 KiB at 1 MiB/s took only {secs} s");
    }
}
