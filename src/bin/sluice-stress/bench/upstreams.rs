//! The stand-in upstreams behind every subject, served in-process on 127.0.0.1:0: a sink that
//! counts what it reads, an echo server, and a source that writes as fast as it can.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What an upstream does with each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Read and discard, counting bytes (throughput).
    Sink,
    /// Write back what arrives (latency, connection rate, idle connections).
    Echo,
    /// Write as fast as the connection takes it (slow readers).
    Source,
}

/// A running upstream; dropping it stops it and every connection it holds.
pub struct Upstream {
    pub addr: SocketAddr,
    /// Bytes read from all connections so far.
    received: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start(mode: Mode) -> Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        // The accept task owns the connection tasks: aborting it drops the JoinSet, which
        // aborts them all.
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        conns.spawn(serve(stream, mode, counter.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Upstream {
            addr,
            received,
            task,
        })
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, mode: Mode, received: Arc<AtomicU64>) {
    match mode {
        Mode::Sink => {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        Mode::Echo => {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                received.fetch_add(n as u64, Ordering::Relaxed);
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            let _ = stream.shutdown().await;
        }
        Mode::Source => {
            let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
            while stream.write_all(&chunk).await.is_ok() {}
        }
    }
}
