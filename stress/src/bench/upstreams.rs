//! The stand-in upstreams behind every subject, served in-process on 127.0.0.1:0: a sink that
//! counts what it reads, an echo server, a source that writes as fast as it can, a greeter that
//! speaks first and hangs up, and a minimal HTTP/1.1 keep-alive server.

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
    /// Write one byte and close (connection churn: the cheapest upstream that still proves
    /// the connection went end to end).
    Greet,
    /// Answer every request (anything up to a blank line) with `HTTP_RESPONSE`, keep-alive
    /// (the request/response case when wrk or nginx is missing).
    Http,
}

/// Size of the body the HTTP upstreams serve: the "small response" of users' traffic.
pub const HTTP_BODY: usize = 1024;

/// The built-in HTTP upstream's whole answer to every request, headers and 1 KiB body.
pub fn http_response() -> Vec<u8> {
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nServer: sluice-stress\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {HTTP_BODY}\r\n\r\n"
    )
    .into_bytes();
    response.extend((0..HTTP_BODY).map(|i| b'a' + (i % 26) as u8));
    response
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
        Mode::Greet => {
            // Dropping the stream closes it: the upstream hangs up first, so its TIME_WAIT
            // sockets hold no ephemeral port the proxy needs for the next connection.
            let _ = stream.write_all(b"x").await;
        }
        Mode::Http => serve_http(stream, received).await,
    }
}

/// Answer each request, found by its blank line, with the fixed response; requests that
/// arrive together (pipelined) are answered together.
async fn serve_http(mut stream: TcpStream, received: Arc<AtomicU64>) {
    let response = http_response();
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    while let Ok(n @ 1..) = stream.read(&mut buf).await {
        received.fetch_add(n as u64, Ordering::Relaxed);
        pending.extend_from_slice(&buf[..n]);
        let mut answers = Vec::new();
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            pending.drain(..end + 4);
            answers.extend_from_slice(&response);
        }
        if !answers.is_empty() && stream.write_all(&answers).await.is_err() {
            return;
        }
    }
}
