//! Stand-in upstreams. `source` writes the verifiable pattern, `sink` reads (and verifies
//! it when it sees one), `echo` echoes, `per-connection` lets each client's first line
//! choose; optionally slow ([`UpstreamSpec`], [`LocalUpstream`], served by `sluice-stress
//! upstream` too). And for tests, a listener serving each connection with a closure
//! ([`upstream`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::pacing::TokenBucket;
use crate::pattern::{Pattern, Verifier};
use crate::units::{Rate, format_bytes};

/// I/O size when no rate is set.
pub(crate) const IO_CHUNK: usize = 64 * 1024;
/// How long a finished source (or a closing chaos connection) waits for its peer to close
/// before dropping the socket.
const LINGER: Duration = Duration::from_secs(30);
/// How many error messages we keep for the report.
const ERROR_SAMPLES: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamMode {
    /// Write the verifiable pattern (endlessly, or --bytes bytes, then close).
    Source,
    /// Read and discard; verify the pattern when the stream carries one.
    Sink,
    /// Write back what was read.
    Echo,
    /// Each connection's first line names its mode (`source\n`, `sink\n` or `echo\n`),
    /// then it is served that way: one upstream (sluice has one per process) can feed slow
    /// readers and answer a latency probe's pings. A connection that sends nothing is
    /// idle on both sides.
    PerConnection,
}

/// The longest first line a `per-connection` upstream reads before giving up on it.
const MODE_LINE_MAX: usize = 64;

/// A listener on a free loopback port serving each connection with `f`.
pub async fn upstream<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    upstream_with_rcvbuf(0, f).await
}

/// Like [`upstream`], with SO_RCVBUF set on the listener before listen() so accepted
/// sockets advertise a small window from their first segment (0: kernel default).
pub async fn upstream_with_rcvbuf<F, Fut>(rcvbuf: u32, f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let sock = TcpSocket::new_v4().unwrap();
    if rcvbuf > 0 {
        sock.set_recv_buffer_size(rcvbuf).unwrap();
    }
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(1024).unwrap();
    let addr = l.local_addr().unwrap();
    let f = Arc::new(f);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let f = f.clone();
            tokio::spawn(async move { f(s).await });
        }
    });
    addr
}

/// An upstream that echoes every byte and passes EOF on.
pub async fn echo_upstream() -> SocketAddr {
    upstream(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// What one upstream does per connection.
#[derive(Debug, Clone)]
pub struct UpstreamSpec {
    pub mode: UpstreamMode,
    pub rate: Option<Rate>,
    pub bytes: Option<u64>,
    pub rcvbuf: Option<u64>,
    pub sndbuf: Option<u64>,
}

/// Counters shared with whoever runs the upstream (a scenario reads them live).
#[derive(Debug, Default)]
pub struct UpstreamStats {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    /// Connections that ended cleanly (EOF, or --bytes written and the peer closed).
    pub completed: AtomicU64,
    /// Connections the peer reset or abandoned; normal when clients stop at a deadline.
    pub resets: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Sink: bytes checked against the pattern.
    pub bytes_verified: AtomicU64,
    /// Sink: streams without the pattern header (counted, not checked).
    pub unverified_streams: AtomicU64,
    /// Verification failures and unexpected I/O errors.
    pub errors: AtomicU64,
    pub error_samples: std::sync::Mutex<Vec<String>>,
}

impl UpstreamStats {
    pub fn error(&self, msg: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.error_samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() < ERROR_SAMPLES {
            samples.push(msg);
        }
    }
}

/// Binds a listener with the spec's socket buffer sizes (inherited by accepted sockets).
pub fn bind(addr: SocketAddr, spec: &UpstreamSpec) -> Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    if let Some(n) = spec.rcvbuf {
        socket.set_recv_buffer_size(n as u32)?;
    }
    if let Some(n) = spec.sndbuf {
        socket.set_send_buffer_size(n as u32)?;
    }
    socket
        .bind(addr)
        .with_context(|| format!("cannot bind the upstream to {addr}"))?;
    Ok(socket.listen(4096)?)
}

/// A stand-in upstream serving on a free loopback port in this process, until stopped:
/// what the scenarios and the demo put behind the proxy.
pub struct LocalUpstream {
    pub addr: SocketAddr,
    pub stats: Arc<UpstreamStats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl LocalUpstream {
    /// Binds 127.0.0.1:0 with `spec`'s socket options and serves it on this runtime.
    pub fn start(spec: Arc<UpstreamSpec>) -> Result<LocalUpstream> {
        let listener = bind("127.0.0.1:0".parse()?, &spec)?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(UpstreamStats::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, spec, stats.clone(), stop.clone()));
        Ok(LocalUpstream {
            addr,
            stats,
            stop,
            task,
        })
    }

    /// Stops accepting and waits for the accept loop to end.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Accepts and serves connections until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    spec: Arc<UpstreamSpec>,
    stats: Arc<UpstreamStats>,
    shutdown: CancellationToken,
) {
    while let Some(stream) = accept(&listener, &shutdown).await {
        let spec = spec.clone();
        let label = format!("upstream {:?}", spec.mode);
        spawn_connection(&stats, &shutdown, label, move |stats| async move {
            handle(stream, &spec, &stats).await
        });
    }
}

/// The next connection (with TCP_NODELAY), or `None` once `shutdown` fires. A failed
/// accept (EMFILE and friends) backs off instead of ending the upstream.
pub(crate) async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<TcpStream> {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                return Some(stream);
            }
            Err(e) => {
                eprintln!("upstream: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Counts a connection in `stats` and serves it on its own task with `serve` until it
/// ends or `shutdown` fires: a peer that went away is a reset, any other error is one of
/// `stats`' errors, prefixed with `label`.
pub(crate) fn spawn_connection<F, Fut>(
    stats: &Arc<UpstreamStats>,
    shutdown: &CancellationToken,
    label: String,
    serve: F,
) where
    F: FnOnce(Arc<UpstreamStats>) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<()>> + Send,
{
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    stats.active.fetch_add(1, Ordering::Relaxed);
    let (stats, shutdown) = (stats.clone(), shutdown.clone());
    tokio::spawn(async move {
        let result = tokio::select! {
            _ = shutdown.cancelled() => Ok(()),
            r = serve(stats.clone()) => r,
        };
        match result {
            Ok(()) => {}
            Err(e) if is_peer_gone(&e) => {
                stats.resets.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => stats.error(format!("{label}: {e}")),
        }
        stats.active.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Reads and discards until the peer's EOF, at most [`LINGER`] (then gives up without
/// an error), so unread input cannot turn our close into a reset.
pub(crate) async fn linger(
    stream: &mut TcpStream,
    buf: &mut [u8],
    stats: &UpstreamStats,
) -> io::Result<()> {
    let drain = async {
        loop {
            let n = stream.read(buf).await?;
            if n == 0 {
                return io::Result::Ok(());
            }
            stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    tokio::time::timeout(LINGER, drain).await.unwrap_or(Ok(()))
}

/// A reset, broken pipe or early EOF: the peer went away, which is how endless streams end.
pub fn is_peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
    )
}

/// Serves one connection as the mode says (also the healthy path of `--fault`).
pub async fn handle(
    mut stream: TcpStream,
    spec: &UpstreamSpec,
    stats: &UpstreamStats,
) -> io::Result<()> {
    let (mode, mut first) = match spec.mode {
        UpstreamMode::PerConnection => read_mode_line(&mut stream).await?,
        mode => (mode, Vec::new()),
    };
    let mut bucket = spec.rate.map(TokenBucket::new);
    let chunk = bucket.as_ref().map_or(IO_CHUNK, TokenBucket::chunk);
    // Room for what followed the mode line, whatever the chunk.
    let mut buf = vec![0u8; chunk.max(2 * MODE_LINE_MAX)];
    match mode {
        UpstreamMode::Source => {
            let pattern = Pattern::random();
            let limit = spec.bytes.unwrap_or(u64::MAX);
            let mut offset = 0u64;
            while offset < limit {
                let n = chunk.min((limit - offset) as usize);
                pattern.fill(offset, &mut buf[..n]);
                stream.write_all(&buf[..n]).await?;
                offset += n as u64;
                stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                if let Some(b) = bucket.as_mut() {
                    b.take(n).await;
                }
            }
            stream.shutdown().await?;
            let _ = linger(&mut stream, &mut buf, stats).await;
        }
        UpstreamMode::Sink | UpstreamMode::Echo => {
            let mut verifier = (mode == UpstreamMode::Sink).then(Verifier::new);
            loop {
                // What came after the mode line is the stream's first read.
                let n = if first.is_empty() {
                    stream.read(&mut buf).await?
                } else {
                    let n = first.len();
                    buf[..n].copy_from_slice(&first);
                    first.clear();
                    n
                };
                if n == 0 {
                    break;
                }
                stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                if let Some(v) = verifier.as_mut() {
                    match v.feed(&buf[..n]) {
                        Ok(()) => {
                            stats.bytes_verified.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(crate::pattern::VerifyError::BadMagic) if v.offset() == 0 => {
                            // Not our stream (nc, a file): just count it.
                            stats.unverified_streams.fetch_add(1, Ordering::Relaxed);
                            verifier = None;
                        }
                        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                    }
                }
                if mode == UpstreamMode::Echo {
                    stream.write_all(&buf[..n]).await?;
                    stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                }
                if let Some(b) = bucket.as_mut() {
                    b.take(n).await;
                }
            }
            stream.shutdown().await?;
        }
        UpstreamMode::PerConnection => unreachable!("the mode line names a concrete mode"),
    }
    stats.completed.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Reads a `per-connection` client's first line: the mode it asks for, and any bytes that
/// came after the line in the same reads.
async fn read_mode_line(stream: &mut TcpStream) -> io::Result<(UpstreamMode, Vec<u8>)> {
    let mut line = Vec::with_capacity(2 * MODE_LINE_MAX);
    let mut buf = [0u8; MODE_LINE_MAX];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            let rest = line.split_off(end + 1);
            let mode = match line.trim_ascii() {
                b"source" => UpstreamMode::Source,
                b"sink" => UpstreamMode::Sink,
                b"echo" => UpstreamMode::Echo,
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "per-connection: the first line must be source, sink or echo, not {:?}",
                            String::from_utf8_lossy(other)
                        ),
                    ));
                }
            };
            return Ok((mode, rest));
        }
        if line.len() > MODE_LINE_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("per-connection: no mode line in the first {MODE_LINE_MAX} bytes"),
            ));
        }
    }
}

pub fn stats_line(s: &UpstreamStats) -> String {
    format!(
        "upstream: {} accepted, {} active, {} in, {} out, {} verified, {} errors",
        s.accepted.load(Ordering::Relaxed),
        s.active.load(Ordering::Relaxed),
        format_bytes(s.bytes_in.load(Ordering::Relaxed)),
        format_bytes(s.bytes_out.load(Ordering::Relaxed)),
        format_bytes(s.bytes_verified.load(Ordering::Relaxed)),
        s.errors.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A per-connection upstream on port 0.
    fn per_connection() -> LocalUpstream {
        LocalUpstream::start(Arc::new(UpstreamSpec {
            mode: UpstreamMode::PerConnection,
            rate: None,
            bytes: None,
            rcvbuf: None,
            sndbuf: None,
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn the_first_line_chooses_each_connections_mode() {
        let upstream = per_connection();
        let (addr, stats) = (upstream.addr, &upstream.stats);
        // Echo, with bytes sent in the same write as the line.
        let mut echo = TcpStream::connect(addr).await.unwrap();
        echo.write_all(b"echo\nping").await.unwrap();
        let mut got = [0u8; 4];
        echo.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        // Source: the verifiable pattern.
        let mut source = TcpStream::connect(addr).await.unwrap();
        source.write_all(b"source\n").await.unwrap();
        let mut got = vec![0u8; 4096];
        source.read_exact(&mut got).await.unwrap();
        Verifier::new().feed(&got).unwrap();
        // Anything else is refused and counted as an error.
        let mut bad = TcpStream::connect(addr).await.unwrap();
        bad.write_all(b"firehose\n").await.unwrap();
        assert_eq!(bad.read(&mut got).await.unwrap_or(0), 0);
        // Counted just after the close.
        while stats.errors.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let samples = stats.error_samples.lock().unwrap().clone();
        assert!(samples[0].contains("firehose"), "{samples:?}");
        upstream.stop().await;
    }
}
