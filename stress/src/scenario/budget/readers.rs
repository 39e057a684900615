//! The clients the budget scenario drives itself: slow readers on the idle connections, and the new clients of the ping-pong.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clients::{self, ClientSpec, ConnResult, Percentiles};
use crate::pacing::TokenBucket;
use crate::pattern::Verifier;
use crate::units::{KIB, Rate};

/// Each slow reader's pace: 8,000 of them ask 31 MiB/s at most, which two cores carry
/// beside sluice (far less moves: only the readers holding a buffer have bytes to read).
pub const READ_RATE: Rate = Rate(4 * KIB);
/// The slow readers' SO_RCVBUF: small, so the kernel does not hide their slowness.
pub const READER_RCVBUF: u64 = 4 * KIB;
/// Bytes per read of a slow reader: four reads a second at 4 KiB/s.
const READ_CHUNK: usize = 1024;
/// Round trips timed per ping-pong phase.
pub const ROUND_TRIPS: usize = 2000;
/// The new clients a ping-pong phase uses in turn (ROUND_TRIPS / PING_CONNS each).
pub const PING_CONNS: usize = 20;
/// A ping's size.
pub const PING_BYTES: usize = 64;
/// Connects in flight at once while the idle connections are opened (the listen backlog
/// is larger; this keeps SYNs from being dropped and retried a second later).
const CONNECT_AT_ONCE: usize = 256;
/// How long a ping may wait for its echo before the phase fails.
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// The slowest round trips of each phase kept in the report, with when they happened.
const SLOWEST_KEPT: usize = 5;

/// Opens `conns` connections to `target` as `spec` says, a few at a time, and sends
/// nothing on them.
pub async fn connect_idle(
    target: SocketAddr,
    spec: &ClientSpec,
    conns: usize,
) -> Result<Vec<TcpStream>> {
    futures_util::stream::iter(0..conns)
        .map(|_| clients::connect(target, spec))
        .buffered(CONNECT_AT_ONCE)
        .try_collect()
        .await
        .context("connecting the idle clients")
}

/// One slow reader's progress, read by the scenario while it runs.
#[derive(Debug, Default)]
struct ReaderStat {
    bytes: AtomicU64,
    /// Microseconds from asking for the stream to the first byte; 0 until then.
    first_byte_micros: AtomicU64,
}

/// The slow readers at work, a task each.
pub struct SlowReaders {
    /// When they asked for their streams.
    pub asked: Instant,
    stop: CancellationToken,
    stats: Vec<Arc<ReaderStat>>,
    /// Each reader's outcome and how long it ran.
    tasks: Vec<JoinHandle<(Result<()>, Duration)>>,
}

impl SlowReaders {
    /// Turns the idle connections into slow readers: each asks the upstream for its stream
    /// and reads it at [`READ_RATE`].
    pub fn start(idle: Vec<TcpStream>) -> SlowReaders {
        let stop = CancellationToken::new();
        let asked = Instant::now();
        let stats: Vec<Arc<ReaderStat>> = idle.iter().map(|_| Arc::default()).collect();
        let tasks = idle
            .into_iter()
            .zip(&stats)
            .map(|(stream, stat)| {
                let (stat, stop) = (stat.clone(), stop.clone());
                tokio::spawn(async move {
                    let outcome = slow_reader(stream, &stat, asked, &stop).await;
                    (outcome, asked.elapsed())
                })
            })
            .collect();
        SlowReaders {
            asked,
            stop,
            stats,
            tasks,
        }
    }

    /// Each reader's bytes so far.
    pub fn snapshot(&self) -> Vec<u64> {
        self.stats
            .iter()
            .map(|s| s.bytes.load(Ordering::Relaxed))
            .collect()
    }

    /// Seconds from asking for the stream to its first byte, of the readers that got one.
    pub fn first_byte_secs(&self) -> Vec<f64> {
        self.stats
            .iter()
            .map(|s| s.first_byte_micros.load(Ordering::Relaxed))
            .filter(|&m| m > 0)
            .map(|m| m as f64 / 1e6)
            .collect()
    }

    /// Stops them; each one's outcome as a client's.
    pub async fn finish(self) -> Result<Vec<ConnResult>> {
        self.stop.cancel();
        let mut results = Vec::with_capacity(self.tasks.len());
        for (reader, stat) in self.tasks.into_iter().zip(&self.stats) {
            let (outcome, elapsed) = reader.await.context("a slow reader panicked")?;
            let bytes = stat.bytes.load(Ordering::Relaxed);
            results.push(ConnResult {
                bytes_read: bytes,
                bytes_verified: bytes,
                elapsed_secs: elapsed.as_secs_f64(),
                completed: false,
                error: outcome.err().map(|e| format!("slow reader: {e:#}")),
                ..ConnResult::default()
            });
        }
        Ok(results)
    }
}

/// Asks the upstream for its stream, then reads and verifies it at [`READ_RATE`] until
/// `stop`.
async fn slow_reader(
    mut stream: TcpStream,
    stat: &ReaderStat,
    asked: Instant,
    stop: &CancellationToken,
) -> Result<()> {
    stream
        .write_all(b"source\n")
        .await
        .context("asking for the stream")?;
    let mut bucket = TokenBucket::new(READ_RATE);
    let mut verifier = Verifier::new();
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = stream.read(&mut buf) => r.context("reading the stream")?,
        };
        if n == 0 {
            bail!("the stream ended (sluice or the upstream closed it)");
        }
        verifier.feed(&buf[..n])?;
        if stat.first_byte_micros.load(Ordering::Relaxed) == 0 {
            let micros = asked.elapsed().as_micros() as u64;
            stat.first_byte_micros
                .store(micros.max(1), Ordering::Relaxed);
        }
        stat.bytes.fetch_add(n as u64, Ordering::Relaxed);
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = bucket.take(n) => {}
        }
    }
}

/// One ping-pong phase: each round trip's start and time.
pub struct Pings(Vec<(Instant, f64)>);

impl Pings {
    pub fn percentiles(&self) -> Percentiles {
        Percentiles::of(self.0.iter().map(|p| p.1).collect())
    }

    /// Each round trip as [t since `origin`, seconds], in order.
    pub fn series(&self, origin: Instant) -> Vec<[f64; 2]> {
        self.0
            .iter()
            .map(|(at, rtt)| [at.duration_since(origin).as_secs_f64(), *rtt])
            .collect()
    }

    /// The slowest [`SLOWEST_KEPT`], slowest first, as [t since `origin`, seconds].
    pub fn slowest(&self, origin: Instant) -> Vec<[f64; 2]> {
        let mut v = self.series(origin);
        v.sort_by(|a, b| b[1].total_cmp(&a[1]));
        v.truncate(SLOWEST_KEPT);
        v
    }
}

/// [`ROUND_TRIPS`]-style ping-pong through sluice to the upstream's echo, on blocking
/// sockets in this thread (a runtime busy with thousands of readers would add its own
/// scheduling delay): `PING_CONNS` new clients in turn, each asking for echo and timing
/// its share of `round_trips` (write 64 bytes, read them back, compare). Returns each
/// round trip's start and time, seconds.
pub fn ping_pong(target: SocketAddr, round_trips: usize) -> Result<Pings> {
    let mut times = Vec::with_capacity(round_trips);
    let per_conn = round_trips.div_ceil(PING_CONNS);
    let mut ping = [0u8; PING_BYTES];
    let mut pong = [0u8; PING_BYTES];
    while times.len() < round_trips {
        let mut conn = std::net::TcpStream::connect(target)
            .with_context(|| format!("cannot connect to {target}"))?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(PING_TIMEOUT))?;
        conn.write_all(b"echo\n")?;
        for _ in 0..per_conn.min(round_trips - times.len()) {
            let n = times.len() as u64;
            for (i, b) in ping.iter_mut().enumerate() {
                *b = (n as u8).wrapping_add(i as u8);
            }
            let sent = Instant::now();
            conn.write_all(&ping)?;
            conn.read_exact(&mut pong)
                .with_context(|| format!("waiting for the echo of ping {n}"))?;
            times.push((sent, sent.elapsed().as_secs_f64()));
            if pong != ping {
                bail!("ping {n} came back changed");
            }
        }
    }
    Ok(Pings(times))
}
