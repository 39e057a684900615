//! The traffic `bench` drives through a subject: bulk streams, 64-byte ping-pong, connection
//! churn, HTTP keep-alive requests (when wrk is not used), idle connections and slow readers.
//! Each speed case reads the subject's CPU time over its own window.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_util::{StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

use super::cpu::CpuMeter;
use super::upstreams::{self, Upstream};
use crate::clients::nearest_rank;

/// Size of each write in the throughput test: large enough that syscalls are not the limit.
const STREAM_CHUNK: usize = 128 * 1024;

/// Size of the ping-pong message in the latency test.
pub const MESSAGE: usize = 64;

/// Round trips per connection left out of the latency figures (connection warm-up).
const LATENCY_WARMUP: usize = 10;

/// Connections opened at once in the idle test, so no listen backlog overflows.
const OPEN_CONCURRENCY: usize = 32;

/// Concurrent connect-read-close loops in the connection-churn test: enough that the proxy
/// always has connections to accept and set up, not one client waiting on the next.
pub const CONNECT_CONCURRENCY: usize = 32;

/// Keep-alive connections of the built-in HTTP client (wrk's `-c`).
pub const HTTP_CONNS: usize = 64;

/// The request every HTTP client sends.
pub const HTTP_REQUEST: &[u8] =
    b"GET /1k HTTP/1.1\r\nHost: bench\r\nUser-Agent: sluice-stress\r\n\r\n";

/// Bulk streams' figures over the measured window.
pub struct Streamed {
    pub gbps: f64,
    /// Bytes that reached the sink in the window.
    pub bytes: u64,
    /// The subject's CPU seconds in the same window.
    pub cpu_seconds: f64,
}

/// Ping-pong figures: round-trip times and what they cost.
pub struct RoundTrips {
    /// Round-trip times after each connection's warm-up, microseconds, sorted.
    pub samples: Vec<f64>,
    /// Every round trip completed, warm-up included (what the CPU time paid for).
    pub round_trips: u64,
    pub cpu_seconds: f64,
}

/// Connection-churn figures.
pub struct Churn {
    pub per_sec: f64,
    pub conns: u64,
    pub cpu_seconds: f64,
}

/// Request/response figures.
pub struct Requests {
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

async fn connect(target: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// `streams` connections each writing as fast as they can into `sink` through `target`;
/// Gbit/s arriving at the sink over `window`, after `warmup`.
pub async fn throughput(
    target: SocketAddr,
    sink: &Upstream,
    streams: usize,
    warmup: Duration,
    window: Duration,
    cpu: &CpuMeter,
) -> Result<Streamed> {
    let mut writers = JoinSet::new();
    for _ in 0..streams {
        let mut stream = connect(target).await?;
        writers.spawn(async move {
            let chunk = vec![0x5au8; STREAM_CHUNK];
            loop {
                if let Err(e) = stream.write_all(&chunk).await {
                    return e;
                }
            }
        });
    }
    tokio::time::sleep(warmup).await;
    let (start, before, cpu_before) = (Instant::now(), sink.received(), cpu.seconds());
    tokio::time::sleep(window).await;
    let (elapsed, after, cpu_after) = (start.elapsed(), sink.received(), cpu.seconds());
    if let Some(done) = writers.try_join_next() {
        return Err(anyhow::Error::new(done?).context("a stream failed mid-run"));
    }
    writers.abort_all();
    let bytes = after - before;
    ensure!(bytes > 0, "no bytes reached the upstream");
    Ok(Streamed {
        gbps: bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
        bytes,
        cpu_seconds: cpu_after - cpu_before,
    })
}

/// Round-trip times of 64-byte messages, one outstanding per connection.
pub async fn latency(
    target: SocketAddr,
    conns: usize,
    duration: Duration,
    cpu: &CpuMeter,
) -> Result<RoundTrips> {
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        streams.push(connect(target).await?);
    }
    let cpu_before = cpu.seconds();
    let deadline = Instant::now() + duration;
    let mut tasks = JoinSet::new();
    for (id, mut stream) in streams.into_iter().enumerate() {
        tasks.spawn(async move {
            let mut samples = Vec::new();
            let mut reply = [0u8; MESSAGE];
            let mut round = 0u64;
            while Instant::now() < deadline {
                let mut message = [0u8; MESSAGE];
                message[..8].copy_from_slice(&(id as u64).to_le_bytes());
                message[8..16].copy_from_slice(&round.to_le_bytes());
                let start = Instant::now();
                stream.write_all(&message).await?;
                stream.read_exact(&mut reply).await?;
                let rtt = start.elapsed();
                ensure!(reply == message, "echo came back altered");
                if round >= LATENCY_WARMUP as u64 {
                    samples.push(rtt.as_secs_f64() * 1e6);
                }
                round += 1;
            }
            Ok::<_, anyhow::Error>((samples, round))
        });
    }
    let mut all = Vec::new();
    let mut round_trips = 0;
    while let Some(done) = tasks.join_next().await {
        let (samples, rounds) = done??;
        all.extend(samples);
        round_trips += rounds;
    }
    let cpu_seconds = cpu.seconds() - cpu_before;
    ensure!(!all.is_empty(), "no round trip completed");
    all.sort_by(f64::total_cmp);
    Ok(RoundTrips {
        samples: all,
        round_trips,
        cpu_seconds,
    })
}

/// Connection churn against a greeting upstream (`Mode::Greet`): connect, read the one byte
/// the upstream sends, read its close, close; `CONNECT_CONCURRENCY` loops at once. The
/// client never writes and the upstream never reads, so nearly all the work per connection
/// left is the proxy's: accept, connect upstream, relay a byte, pass on both closes.
pub async fn connect_rate(target: SocketAddr, duration: Duration, cpu: &CpuMeter) -> Result<Churn> {
    let cpu_before = cpu.seconds();
    let start = Instant::now();
    let deadline = start + duration;
    let mut loops = JoinSet::new();
    for _ in 0..CONNECT_CONCURRENCY {
        loops.spawn(async move {
            let mut done = 0u64;
            let mut reply = [0u8; 2];
            while Instant::now() < deadline {
                let mut stream = TcpStream::connect(target)
                    .await
                    .with_context(|| format!("connecting to {target}"))?;
                stream.read_exact(&mut reply[..1]).await?;
                ensure!(reply[0] == b'x', "greeting came back altered");
                let n = stream.read(&mut reply).await?;
                ensure!(n == 0, "the upstream's close did not come through");
                done += 1;
            }
            Ok::<_, anyhow::Error>(done)
        });
    }
    let mut conns = 0;
    while let Some(done) = loops.join_next().await {
        conns += done??;
    }
    let elapsed = start.elapsed();
    let cpu_seconds = cpu.seconds() - cpu_before;
    ensure!(conns > 0, "no connection completed");
    Ok(Churn {
        per_sec: conns as f64 / elapsed.as_secs_f64(),
        conns,
        cpu_seconds,
    })
}

/// The built-in HTTP client: `HTTP_CONNS` keep-alive connections, each sending `HTTP_REQUEST`
/// and reading the built-in upstream's fixed-size response, one request outstanding per
/// connection, for `duration`.
pub async fn http_requests(target: SocketAddr, duration: Duration) -> Result<Requests> {
    let expected = upstreams::http_response();
    let mut streams = Vec::with_capacity(HTTP_CONNS);
    for _ in 0..HTTP_CONNS {
        streams.push(connect(target).await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for mut stream in streams {
        let expected = expected.clone();
        tasks.spawn(async move {
            let mut samples = Vec::new();
            let mut response = vec![0u8; expected.len()];
            while Instant::now() < deadline {
                let sent = Instant::now();
                stream.write_all(HTTP_REQUEST).await?;
                stream.read_exact(&mut response).await?;
                samples.push(sent.elapsed().as_secs_f64() * 1e6);
                ensure!(response == expected, "the HTTP response came back altered");
            }
            Ok::<_, anyhow::Error>(samples)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    let elapsed = start.elapsed();
    ensure!(!all.is_empty(), "no request completed");
    all.sort_by(f64::total_cmp);
    Ok(Requests {
        per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50_us: nearest_rank(&all, 0.5),
        p99_us: nearest_rank(&all, 0.99),
    })
}

/// Open `conns` proxied connections to an echo upstream, each proven end to end with one
/// 64-byte round trip, and hand them back idle.
pub async fn open_idle(target: SocketAddr, conns: usize) -> Result<Vec<TcpStream>> {
    futures_util::stream::iter(0..conns)
        .map(|_| async move {
            let mut stream = connect(target).await?;
            let message = [0x42u8; MESSAGE];
            stream.write_all(&message).await?;
            let mut reply = [0u8; MESSAGE];
            stream.read_exact(&mut reply).await?;
            ensure!(reply == message, "echo came back altered");
            Ok(stream)
        })
        .buffer_unordered(OPEN_CONCURRENCY)
        .try_collect()
        .await
}

/// What the slow readers did.
pub struct SlowReport {
    pub bytes: u64,
    /// The connections, still open: the queues behind them are at their fullest now, and the
    /// caller measures before dropping them.
    pub streams: Vec<TcpStream>,
}

/// `conns` clients with an SO_RCVBUF of `rcvbuf`, each reading `rate` bytes/s for `duration`
/// from a source upstream behind `target`.
pub async fn slow_readers(
    target: SocketAddr,
    conns: usize,
    rcvbuf: u32,
    rate: f64,
    duration: Duration,
) -> Result<SlowReport> {
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        let socket = TcpSocket::new_v4()?;
        // Before connect(), so the window the client advertises is small from the start.
        socket.set_recv_buffer_size(rcvbuf)?;
        let stream = socket
            .connect(target)
            .await
            .with_context(|| format!("connecting to {target}"))?;
        streams.push(stream);
    }
    let mut readers = JoinSet::new();
    for mut stream in streams {
        readers.spawn(async move {
            let start = Instant::now();
            let mut got = 0u64;
            let mut buf = vec![0u8; 4096];
            while start.elapsed() < duration {
                let allowed = (rate * start.elapsed().as_secs_f64()) as u64;
                if got < allowed {
                    let want = ((allowed - got) as usize).min(buf.len());
                    let n = stream.read(&mut buf[..want]).await?;
                    if n == 0 {
                        bail!("the proxy closed a slow reader");
                    }
                    got += n as u64;
                } else {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
            Ok::<_, anyhow::Error>((got, stream))
        });
    }
    let mut bytes = 0;
    let mut streams = Vec::with_capacity(conns);
    while let Some(done) = readers.join_next().await {
        let (got, stream) = done??;
        bytes += got;
        streams.push(stream);
    }
    Ok(SlowReport { bytes, streams })
}
