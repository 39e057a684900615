//! Many concurrent clients, each paced on its own, that verify every byte they read (pattern or echo) and report totals, errors and per-connection throughput.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::UsageError;
use crate::pacing::TokenBucket;
use crate::pattern::{Pattern, Verifier};
use crate::progress::{self, CtrlC, Watch};
use crate::units::{Rate, format_bytes, parse_duration, parse_rate, parse_size};
use crate::upstream::is_peer_gone;

/// I/O size when a direction is not paced.
const IO_CHUNK: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After the deadline, how long writers wait for the peer to finish (EOF) before giving up.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientMode {
    /// Read and verify the pattern a `source` upstream writes.
    Read,
    /// Write the pattern (a `sink` upstream verifies it), then close.
    Write,
    /// Write the pattern and verify that it comes back unchanged.
    Echo,
}

/// `sluice-stress clients`: N concurrent clients against a proxy or an upstream.
#[derive(Debug, Clone, Args)]
pub struct ClientsArgs {
    /// Where to connect (sluice's listen address).
    #[arg(long)]
    pub target: SocketAddr,
    /// Number of concurrent connections.
    #[arg(long, default_value_t = 100)]
    pub conns: usize,
    /// What each client does.
    #[arg(long, value_enum)]
    pub mode: ClientMode,
    /// Per-connection rate of the main direction (read: reading; write/echo: writing), e.g. 16KiB/s.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<Rate>,
    /// Per connection: read (read mode) or write (write/echo) this many bytes, then close.
    #[arg(long, value_parser = parse_size)]
    pub bytes: Option<u64>,
    /// SO_RCVBUF set before connecting (e.g. 4KiB): keeps the kernel from hiding backpressure.
    #[arg(long, value_parser = parse_size)]
    pub rcvbuf: Option<u64>,
    /// SO_SNDBUF set before connecting.
    #[arg(long, value_parser = parse_size)]
    pub sndbuf: Option<u64>,
    /// Stop after this long (e.g. 30s). Without it, run until --bytes are done or Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print the summary as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What one client connection does.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub mode: ClientMode,
    pub read_rate: Option<Rate>,
    pub write_rate: Option<Rate>,
    pub bytes: Option<u64>,
    pub rcvbuf: Option<u64>,
    pub sndbuf: Option<u64>,
}

impl ClientSpec {
    pub fn new(mode: ClientMode) -> Self {
        ClientSpec {
            mode,
            read_rate: None,
            write_rate: None,
            bytes: None,
            rcvbuf: None,
            sndbuf: None,
        }
    }
}

/// The outcome of one connection.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnResult {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_verified: u64,
    pub elapsed_secs: f64,
    /// Ended by EOF or --bytes (rather than by the deadline).
    pub completed: bool,
    pub error: Option<String>,
}

impl ConnResult {
    /// Bytes/s of the connection's main direction.
    fn throughput(&self, mode: ClientMode) -> f64 {
        let bytes = match mode {
            ClientMode::Write => self.bytes_written,
            ClientMode::Read | ClientMode::Echo => self.bytes_read,
        };
        bytes as f64 / self.elapsed_secs.max(1e-6)
    }
}

/// Live totals over all clients, for progress lines.
#[derive(Debug, Default)]
pub struct LiveStats {
    pub connected: AtomicU64,
    pub active: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
}

/// Whether each client makes one connection, or keeps making them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connections {
    /// One connection per spec, for the whole run.
    Once,
    /// Each spec is a slot: when its connection ends, it opens the next, until told to stop.
    Churn,
}

/// Clients at work in the background: `stop` tells them to finish, `live` counts as they
/// go, `task` gives every connection's outcome.
pub struct RunningClients {
    pub stop: CancellationToken,
    pub live: Arc<LiveStats>,
    pub task: JoinHandle<Result<ClientRun>>,
}

/// Every connection the clients made, with the spec it followed, in the same order.
#[derive(Debug, Default)]
pub struct ClientRun {
    pub specs: Vec<ClientSpec>,
    pub results: Vec<ConnResult>,
}

impl ClientRun {
    pub fn summary(&self) -> ClientsSummary {
        summarize(&self.specs, &self.results)
    }
}

/// Starts a client per spec against `target` in the background; after `stop`, writers get
/// [`DEFAULT_DRAIN`] to finish.
pub fn start(
    target: SocketAddr,
    specs: Vec<ClientSpec>,
    connections: Connections,
) -> RunningClients {
    let stop = CancellationToken::new();
    let live = Arc::new(LiveStats::default());
    let task = match connections {
        Connections::Once => tokio::spawn(once(target, specs, stop.clone(), live.clone())),
        Connections::Churn => tokio::spawn(churn(target, specs, stop.clone(), live.clone())),
    };
    RunningClients { stop, live, task }
}

/// A connection per spec until each finishes or `stop` fires.
async fn once(
    target: SocketAddr,
    specs: Vec<ClientSpec>,
    stop: CancellationToken,
    live: Arc<LiveStats>,
) -> Result<ClientRun> {
    let tasks: Vec<_> = specs
        .iter()
        .map(|spec| {
            let (spec, stop, live) = (spec.clone(), stop.clone(), live.clone());
            tokio::spawn(
                async move { run_client(target, &spec, &stop, DEFAULT_DRAIN, &live).await },
            )
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.unwrap_or_else(|e| ConnResult {
            error: Some(format!("client task failed: {e}")),
            ..ConnResult::default()
        }));
    }
    Ok(ClientRun { specs, results })
}

/// A slot per spec, each opening connection after connection until `stop` fires.
async fn churn(
    target: SocketAddr,
    specs: Vec<ClientSpec>,
    stop: CancellationToken,
    live: Arc<LiveStats>,
) -> Result<ClientRun> {
    let slots: Vec<_> = specs
        .into_iter()
        .map(|spec| {
            let (stop, live) = (stop.clone(), live.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                while !stop.is_cancelled() {
                    results.push(run_client(target, &spec, &stop, DEFAULT_DRAIN, &live).await);
                }
                (spec, results)
            })
        })
        .collect();
    let mut run = ClientRun::default();
    for slot in slots {
        let (spec, results) = slot.await.context("a churning client slot failed")?;
        run.specs.extend(std::iter::repeat_n(spec, results.len()));
        run.results.extend(results);
    }
    Ok(run)
}

/// Runs one client as `spec` says until it finishes or `stop` fires (then a writer gets
/// `drain` to finish); its result's `elapsed_secs` runs from before the connect to the end.
pub async fn run_client(
    target: SocketAddr,
    spec: &ClientSpec,
    stop: &CancellationToken,
    drain: Duration,
    live: &LiveStats,
) -> ConnResult {
    let start = Instant::now();
    let mut result = ConnResult::default();
    live.active.fetch_add(1, Ordering::Relaxed);
    let conn = Conn { spec, stop, live };
    let outcome = conn.run(target, drain, &mut result).await;
    live.active.fetch_sub(1, Ordering::Relaxed);
    result.elapsed_secs = start.elapsed().as_secs_f64();
    match outcome {
        Ok(completed) => result.completed = completed,
        Err(e) => {
            live.errors.fetch_add(1, Ordering::Relaxed);
            result.error = Some(format!("{:?} client: {e:#}", spec.mode));
        }
    }
    result
}

/// Connects one client as `spec` says (socket buffers set before the handshake), Nagle off.
pub async fn connect(target: SocketAddr, spec: &ClientSpec) -> Result<TcpStream> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    // Before connect, so the window advertised in the handshake is already small.
    if let Some(n) = spec.rcvbuf {
        socket.set_recv_buffer_size(n as u32)?;
    }
    if let Some(n) = spec.sndbuf {
        socket.set_send_buffer_size(n as u32)?;
    }
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target))
        .await
        .with_context(|| format!("connect to {target} timed out"))?
        .with_context(|| format!("cannot connect to {target}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One client connection: what it does, when to stop, and the totals it adds to.
struct Conn<'a> {
    spec: &'a ClientSpec,
    stop: &'a CancellationToken,
    live: &'a LiveStats,
}

/// A direction's token bucket (`None`: as fast as it can) and a buffer of its I/O size.
fn paced(rate: Option<Rate>) -> (Option<TokenBucket>, Vec<u8>) {
    let bucket = rate.map(TokenBucket::new);
    let chunk = bucket.as_ref().map_or(IO_CHUNK, TokenBucket::chunk);
    (bucket, vec![0u8; chunk])
}

impl Conn<'_> {
    /// Returns whether the connection completed (EOF / --bytes) rather than hit the deadline.
    async fn run(
        &self,
        target: SocketAddr,
        drain: Duration,
        result: &mut ConnResult,
    ) -> Result<bool> {
        let stream = connect(target, self.spec).await?;
        self.live.connected.fetch_add(1, Ordering::Relaxed);
        match self.spec.mode {
            ClientMode::Read => self.read_side(stream, Verifier::new(), None, result).await,
            ClientMode::Write => self.write_then_await_close(stream, drain, result).await,
            ClientMode::Echo => self.echo(stream, drain, result).await,
        }
    }

    /// Writes the pattern, then waits for the peer to close (a sink closes after our EOF):
    /// the data arrived in full.
    async fn write_then_await_close(
        &self,
        stream: TcpStream,
        drain: Duration,
        result: &mut ConnResult,
    ) -> Result<bool> {
        let (mut rd, wr) = stream.into_split();
        let ended_by_limit = self.write_side(wr, Pattern::random(), result).await?;
        let mut buf = vec![0u8; 16 * 1024];
        let deadline = (!ended_by_limit).then(|| Instant::now() + drain);
        loop {
            let read = match deadline {
                Some(d) => match tokio::time::timeout_at(d, rd.read(&mut buf)).await {
                    Ok(r) => r,
                    Err(_) => return Ok(false),
                },
                None => rd.read(&mut buf).await,
            };
            match read {
                Ok(0) => return Ok(ended_by_limit),
                Ok(n) => {
                    result.bytes_read += n as u64;
                    self.live.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if is_peer_gone(&e) && !ended_by_limit => return Ok(false),
                Err(e) => return Err(e).context("waiting for the peer to close"),
            }
        }
    }

    /// Writes the pattern and verifies that all of it comes back unchanged.
    async fn echo(
        &self,
        stream: TcpStream,
        drain: Duration,
        result: &mut ConnResult,
    ) -> Result<bool> {
        let pattern = Pattern::random();
        let (rd, wr) = stream.into_split();
        let mut w_result = ConnResult::default();
        let writer = self.write_side(wr, pattern, &mut w_result);
        let reader = self.read_side(rd, Verifier::expecting(pattern), Some(drain), result);
        let (w, r) = tokio::join!(writer, reader);
        result.bytes_written = w_result.bytes_written;
        let ended_by_limit = w?;
        let eof = r?;
        if eof && result.bytes_read != result.bytes_written {
            anyhow::bail!(
                "echo truncated: wrote {} bytes, {} came back",
                result.bytes_written,
                result.bytes_read
            );
        }
        Ok(ended_by_limit && eof)
    }

    /// Writes the pattern until --bytes, or until `stop`; then half-closes. Returns whether
    /// it ended by reaching --bytes.
    async fn write_side(
        &self,
        mut wr: impl AsyncWriteExt + Unpin,
        pattern: Pattern,
        result: &mut ConnResult,
    ) -> Result<bool> {
        let (mut bucket, mut buf) = paced(self.spec.write_rate);
        let chunk = buf.len();
        let limit = self.spec.bytes.unwrap_or(u64::MAX);
        let stop = self.stop;
        let mut offset = 0u64;
        let mut filled = 0..0; // stream range currently in `buf`
        while offset < limit {
            if !filled.contains(&offset) {
                let n = chunk.min((limit - offset) as usize);
                pattern.fill(offset, &mut buf[..n]);
                filled = offset..offset + n as u64;
            }
            let start = (offset - filled.start) as usize;
            let end = (filled.end - filled.start) as usize;
            // `write` (not `write_all`) so a cancelled write has written nothing and the count stays exact.
            let n = tokio::select! {
                _ = stop.cancelled() => break,
                r = wr.write(&buf[start..end]) => match r {
                    Ok(0) => anyhow::bail!("the peer stopped accepting data at offset {offset}"),
                    Ok(n) => n,
                    Err(e) if is_peer_gone(&e) && stop.is_cancelled() => break,
                    Err(e) => return Err(e).with_context(|| format!("write at offset {offset}")),
                },
            };
            offset += n as u64;
            result.bytes_written = offset;
            self.live
                .bytes_written
                .fetch_add(n as u64, Ordering::Relaxed);
            if let Some(b) = bucket.as_mut() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = b.take(n) => {}
                }
            }
        }
        match wr.shutdown().await {
            Ok(()) => {}
            Err(e) if is_peer_gone(&e) => {}
            Err(e) => return Err(e).context("half-close"),
        }
        Ok(offset >= limit)
    }

    /// Reads and verifies until EOF or --bytes (read mode), or until `stop` (+`drain` if
    /// given). Returns whether it saw EOF / reached --bytes.
    async fn read_side(
        &self,
        mut rd: impl AsyncReadExt + Unpin,
        mut verifier: Verifier,
        drain: Option<Duration>,
        result: &mut ConnResult,
    ) -> Result<bool> {
        let (mut bucket, mut buf) = paced(self.spec.read_rate);
        let chunk = buf.len();
        let limit = match self.spec.mode {
            ClientMode::Read => self.spec.bytes.unwrap_or(u64::MAX),
            _ => u64::MAX,
        };
        let stop = self.stop;
        let deadline = async {
            stop.cancelled().await;
            if let Some(d) = drain {
                tokio::time::sleep(d).await;
            }
        };
        tokio::pin!(deadline);
        while result.bytes_read < limit {
            let want = chunk.min((limit - result.bytes_read) as usize);
            let n = tokio::select! {
                _ = &mut deadline => return Ok(false),
                r = rd.read(&mut buf[..want]) => match r {
                    Ok(0) => {
                        if limit != u64::MAX {
                            anyhow::bail!("truncated: EOF after {} of {limit} bytes", result.bytes_read);
                        }
                        return Ok(true);
                    }
                    Ok(n) => n,
                    Err(e) if is_peer_gone(&e) && stop.is_cancelled() => return Ok(false),
                    Err(e) => return Err(e).with_context(|| format!("read at offset {}", result.bytes_read)),
                },
            };
            verifier.feed(&buf[..n])?;
            result.bytes_read += n as u64;
            result.bytes_verified += n as u64;
            self.live.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(b) = bucket.as_mut() {
                tokio::select! {
                    _ = &mut deadline => return Ok(false),
                    _ = b.take(n) => {}
                }
            }
        }
        Ok(true)
    }
}

/// Per-connection throughput percentiles, bytes/s.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles; all zero for no values.
    pub fn of(mut values: Vec<f64>) -> Self {
        if values.is_empty() {
            return Percentiles::default();
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| nearest_rank(&values, q);
        Percentiles {
            min: values[0],
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: values[values.len() - 1],
        }
    }
}

/// The value at quantile `q` (0..=1) of `sorted`, by nearest rank: the smallest value with
/// at least `q` of them at or below it; the default (zero) when there are none.
pub fn nearest_rank<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len().max(1)) - 1)
        .copied()
        .unwrap_or_default()
}

/// Totals over a set of clients.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientsSummary {
    pub conns: usize,
    pub completed: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_verified: u64,
    pub errors: usize,
    /// The first few error messages.
    pub error_samples: Vec<String>,
    /// Per-connection throughput of each connection's main direction, bytes/s.
    pub throughput: Percentiles,
}

pub fn summarize(specs: &[ClientSpec], results: &[ConnResult]) -> ClientsSummary {
    let errors: Vec<_> = results.iter().filter_map(|r| r.error.clone()).collect();
    ClientsSummary {
        conns: results.len(),
        completed: results.iter().filter(|r| r.completed).count(),
        bytes_read: results.iter().map(|r| r.bytes_read).sum(),
        bytes_written: results.iter().map(|r| r.bytes_written).sum(),
        bytes_verified: results.iter().map(|r| r.bytes_verified).sum(),
        errors: errors.len(),
        error_samples: errors.into_iter().take(10).collect(),
        throughput: Percentiles::of(
            specs
                .iter()
                .zip(results)
                .map(|(s, r)| r.throughput(s.mode))
                .collect(),
        ),
    }
}

/// `sluice-stress clients ...`.
pub async fn run(args: ClientsArgs) -> Result<()> {
    if args.conns == 0 {
        return Err(UsageError("--conns must be at least 1".into()).into());
    }
    if args.duration.is_none() && args.bytes.is_none() {
        eprintln!("clients: no --duration or --bytes; running until Ctrl-C");
    }
    let mut spec = ClientSpec::new(args.mode);
    match args.mode {
        ClientMode::Read => spec.read_rate = args.rate,
        ClientMode::Write | ClientMode::Echo => spec.write_rate = args.rate,
    }
    spec.bytes = args.bytes;
    spec.rcvbuf = args.rcvbuf;
    spec.sndbuf = args.sndbuf;

    let RunningClients { stop, live, task } =
        start(args.target, vec![spec; args.conns], Connections::Once);
    let watch = Watch {
        duration: args.duration,
        every: Duration::from_millis(250),
        ctrl_c: CtrlC::StopsTheClients,
        plain_every: None,
    };
    let watched = progress::watch(task, &stop, &watch, || {
        Ok(format!(
            "{} active, {} read, {} written, {} errors",
            live.active.load(Ordering::Relaxed),
            format_bytes(live.bytes_read.load(Ordering::Relaxed)),
            format_bytes(live.bytes_written.load(Ordering::Relaxed)),
            live.errors.load(Ordering::Relaxed),
        ))
    })
    .await?;
    let summary = watched.output.summary();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary, watched.started.elapsed());
    }
    if summary.errors > 0 {
        anyhow::bail!("{} of {} connections failed", summary.errors, summary.conns);
    }
    Ok(())
}

fn print_summary(s: &ClientsSummary, elapsed: Duration) {
    let t = &s.throughput;
    let rate = |v: f64| format!("{}/s", format_bytes(v as u64));
    println!(
        "{} connections ({} completed) in {:.1} s: read {}, written {}, verified {}; {} errors",
        s.conns,
        s.completed,
        elapsed.as_secs_f64(),
        format_bytes(s.bytes_read),
        format_bytes(s.bytes_written),
        format_bytes(s.bytes_verified),
        s.errors
    );
    println!(
        "per-connection throughput: min {}  p50 {}  p90 {}  p99 {}  max {}",
        rate(t.min),
        rate(t.p50),
        rate(t.p90),
        rate(t.p99),
        rate(t.max)
    );
    for e in &s.error_samples {
        println!("  error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!(
            (p.min, p.p50, p.p90, p.p99, p.max),
            (1.0, 50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(Percentiles::of(vec![]).p50, 0.0);
    }

    #[test]
    fn nearest_rank_takes_the_smallest_value_with_q_at_or_below_it() {
        let sorted: Vec<u64> = (1..=10).collect();
        assert_eq!(nearest_rank(&sorted, 0.0), 1);
        assert_eq!(nearest_rank(&sorted, 0.01), 1);
        assert_eq!(nearest_rank(&sorted, 0.10), 1);
        assert_eq!(nearest_rank(&sorted, 0.11), 2);
        assert_eq!(nearest_rank(&sorted, 0.5), 5);
        assert_eq!(nearest_rank(&sorted, 1.0), 10);
        assert_eq!(nearest_rank::<u64>(&[], 0.5), 0);
    }
}
