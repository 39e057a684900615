//! Bytes to send and ways to move them: deterministic data, hashes, chunked writes, slow
//! reads, and clients with small socket buffers.

use std::net::SocketAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Deterministic pseudo-random bytes for stream `seed`.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

pub fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Writes `bytes` in random chunk sizes (1 byte to 64 KiB), then shuts the write half.
pub async fn write_chunked<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    bytes: &[u8],
    seed: u64,
) -> std::io::Result<()> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut at = 0;
    while at < bytes.len() {
        let n = rng.random_range(1..=65536).min(bytes.len() - at);
        w.write_all(&bytes[at..at + n]).await?;
        at += n;
    }
    w.shutdown().await
}

/// Reads to EOF, returning the hash and the length.
pub async fn read_hash<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<([u8; 32], usize)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((h.finalize().into(), total));
        }
        h.update(&buf[..n]);
        total += n;
    }
}

/// Connects with a small SO_RCVBUF (set before connect, so the window is small too).
pub async fn connect_small_rcvbuf(addr: SocketAddr, rcvbuf: u32) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(rcvbuf).unwrap();
    s.connect(addr).await.unwrap()
}

/// Reads to EOF at about `rate` bytes per second, in reads of at most 1 KiB.
pub async fn read_slowly<R: AsyncReadExt + Unpin>(
    r: &mut R,
    rate: u64,
) -> std::io::Result<Vec<u8>> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let due = start + Duration::from_secs_f64(out.len() as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}
