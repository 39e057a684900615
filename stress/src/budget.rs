//! The `budget` scenario: thousands of slow readers share sluice's `buffer.total`; measures its memory against the total, used ≤ limit, a new client's latency and /metrics latency.
//!
//! # Phases (one sluice process, one run)
//!
//! 1. **Start-up**: sluice with no connection; its RSS (median of five reads) is the
//!    start-up RSS.
//! 2. **Idle**: `--conns` clients connect with a 4 KiB SO_RCVBUF and send nothing. sluice
//!    connects each to the upstream, which (`per-connection` mode) waits for the client's
//!    first line, so nothing moves. (RSS − start-up RSS) / conns is a connection's idle cost.
//! 3. **Unloaded ping-pong**: [`PING_CONNS`] new clients in turn ask the upstream for echo
//!    and time [`ROUND_TRIPS`] 64-byte round trips in all.
//! 4. **Loaded**: the idle connections ask for `source` and read it at [`READ_RATE`]
//!    each. Once the budget's queue pool is granted out and the source has stopped
//!    filling kernel buffers (it writes no faster than all readers together read), or a
//!    third of `--duration` has passed, the ping-pong runs again, as soon after phase 3
//!    as that allows, so whatever else the machine is doing weighs on both alike (the CPU
//!    each phase saw, sluice's, this process's and everyone else's, is reported beside
//!    them). The readers read for `--duration`.
//!
//! The idle connections become the slow readers instead of being closed and replaced:
//! a connection's fixed cost then enters the memory limit once, measured in the same
//! process that is then loaded, and each process needs only two descriptors per
//! connection (16,000 of the 20,000 a process may have here at 8,000 connections).
//!
//! # Targets
//!
//! Printed as measured against limit with PASS or FAIL; they are measurements, so the
//! command fails only when something broke (a byte arrived wrong, sluice died).
//!
//! 1. sluice's peak RSS ≤ start-up RSS + conns × idle cost + total.
//! 2. `sluice_budget_used_bytes` ≤ `sluice_budget_limit_bytes` in every 100 ms sample.
//! 3. Loaded ping-pong p99 ≤ 2 × unloaded p99.
//! 4. `GET /metrics` while loaded: every one under 10 ms.
//!
//! The samples leave out `ss`'s kernel memory reading (it costs a fifth of a core at
//! 16,000 sockets, which the latency figures would feel); sluice's own
//! `sluice_kernel_queued_bytes` is reported instead, and `ss` is read once at the end,
//! after everything timed.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::bench::cpu::{CpuMeter, ticks_per_second};
use crate::clients::{self, ClientMode, ClientSpec, ConnResult, Percentiles};
use crate::kernel_memory;
use crate::pacing::TokenBucket;
use crate::pattern::Verifier;
use crate::proxy_process::{DIRECTIONS, Metrics, ProxyProcess};
use crate::scenario::{
    KERNEL_QUEUED, Report, RunReport, RunSummary, Sample, Sampler, ScenarioArgs, ScenarioName,
    UpstreamSummary, Workload, render_svg, write_report,
};
use crate::units::{KIB, Rate, format_bytes};
use crate::upstream::{self, UpstreamMode, UpstreamSpec};

/// Each slow reader's pace: 8,000 of them ask 31 MiB/s at most, which two cores carry
/// beside sluice (far less moves: only the readers holding a buffer have bytes to read).
pub const READ_RATE: Rate = Rate(4 * KIB);
/// The slow readers' SO_RCVBUF: small, so the kernel does not hide their slowness.
const READER_RCVBUF: u64 = 4 * KIB;
/// Bytes per read of a slow reader: four reads a second at 4 KiB/s.
const READ_CHUNK: usize = 1024;
/// Round trips timed per ping-pong phase.
pub const ROUND_TRIPS: usize = 2000;
/// The new clients a ping-pong phase uses in turn (ROUND_TRIPS / PING_CONNS each).
pub const PING_CONNS: usize = 20;
/// A ping's size.
const PING_BYTES: usize = 64;
/// Target 3: loaded p99 may be this many times the unloaded p99.
const LATENCY_FACTOR: f64 = 2.0;
/// Target 4: the slowest GET /metrics while loaded.
const SCRAPE_LIMIT: Duration = Duration::from_millis(10);
/// Connects in flight at once while the idle connections are opened (the listen backlog
/// is larger; this keeps SYNs from being dropped and retried a second later).
const CONNECT_AT_ONCE: usize = 256;
/// How long all idle connections may take to reach the upstream through sluice.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long sluice may take to exit after SIGTERM (its generated shutdown_grace is 2 s).
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a ping may wait for its echo before the phase fails.
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// The slowest round trips of each phase kept in the report, with when they happened.
const SLOWEST_KEPT: usize = 5;

/// The slow readers and their upstream, as a [`Workload`] (for the report's description
/// and the clients' summary; the readers themselves run in [`slow_reader`]).
pub fn workload(conns: usize) -> Workload {
    Workload {
        description: format!(
            "{conns} slow readers ({READ_RATE} each, {} SO_RCVBUF) of a fast source share buffer.total; a new client's 64-byte ping-pong before and while they hold it",
            format_bytes(READER_RCVBUF)
        ),
        upstream: UpstreamSpec {
            mode: UpstreamMode::PerConnection,
            rate: None,
            bytes: None,
            rcvbuf: None,
            sndbuf: None,
        },
        clients: vec![
            ClientSpec {
                read_rate: Some(READ_RATE),
                rcvbuf: Some(READER_RCVBUF),
                ..ClientSpec::new(ClientMode::Read)
            };
            conns
        ],
    }
}

/// One measured target.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: &'static str,
    pub measured: f64,
    pub limit: f64,
    /// `bytes`, `seconds` or `share` (a fraction of a whole).
    pub unit: &'static str,
    pub pass: bool,
}

/// Seconds since sampling began (the samples' `t`) at which each phase began.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    pub idle: f64,
    pub unloaded_ping: f64,
    pub loaded: f64,
    pub loaded_ping: f64,
    pub end: f64,
    /// Whether the budget's queue pool was granted out before the loaded ping-pong.
    pub budget_full_before_loaded_ping: bool,
    /// Whether the source had stopped filling kernel buffers by then (else the ping-pong
    /// began at a third of the duration anyway).
    pub source_settled_before_loaded_ping: bool,
}

/// CPU the machine spent over a span, in cores (CPU seconds per second).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuUse {
    pub secs: f64,
    pub cores: usize,
    pub sluice: f64,
    /// This process: the clients, the upstream, the sampler.
    pub stress: f64,
    /// Everything else on the machine.
    pub others: f64,
}

/// CPU counters at one instant, to subtract from a later one.
struct CpuMark {
    at: Instant,
    sluice: f64,
    stress: f64,
    machine_busy: f64,
}

impl CpuMark {
    fn now(sluice: &CpuMeter, stress: &CpuMeter) -> CpuMark {
        CpuMark {
            at: Instant::now(),
            sluice: sluice.seconds(),
            stress: stress.seconds(),
            machine_busy: machine_busy_seconds(),
        }
    }

    /// What was spent from `self` to now.
    fn used(&self, sluice: &CpuMeter, stress: &CpuMeter) -> CpuUse {
        let now = CpuMark::now(sluice, stress);
        let secs = now.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let sluice = (now.sluice - self.sluice) / secs;
        let stress = (now.stress - self.stress) / secs;
        let busy = (now.machine_busy - self.machine_busy) / secs;
        CpuUse {
            secs,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            sluice,
            stress,
            others: (busy - sluice - stress).max(0.0),
        }
    }
}

/// CPU seconds all cores have spent busy since boot (`/proc/stat`: user, nice, system,
/// irq, softirq, steal); 0 where it cannot be read.
fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum();
    busy as f64 / ticks_per_second()
}

/// Target 1's parts.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub start_rss: u64,
    pub idle_rss: u64,
    /// (idle RSS − start-up RSS) / conns.
    pub idle_cost_per_conn: u64,
    pub total: u64,
    /// start_rss + conns × idle_cost_per_conn + total.
    pub limit: u64,
    pub peak_rss: u64,
    pub peak_rss_at: f64,
}

/// Target 2's parts.
#[derive(Debug, Clone, Serialize)]
pub struct Used {
    /// Samples that had both gauges.
    pub samples: usize,
    pub max_used: u64,
    pub limit: u64,
    pub samples_over_limit: usize,
}

/// Target 3's parts: round-trip times, seconds.
#[derive(Debug, Clone, Serialize)]
pub struct PingPong {
    pub round_trips: usize,
    pub unloaded: Percentiles,
    pub loaded: Percentiles,
    /// The slowest round trips: [when it began (the samples' t), seconds].
    pub unloaded_slowest: Vec<[f64; 2]>,
    pub loaded_slowest: Vec<[f64; 2]>,
    /// Every round trip in order, [when it began, seconds], to line up with the samples.
    pub unloaded_series: Vec<[f64; 2]>,
    pub loaded_series: Vec<[f64; 2]>,
    pub unloaded_cpu: CpuUse,
    pub loaded_cpu: CpuUse,
}

/// One ping-pong phase: each round trip's start and time.
struct Pings(Vec<(Instant, f64)>);

impl Pings {
    fn percentiles(&self) -> Percentiles {
        Percentiles::of(self.0.iter().map(|p| p.1).collect())
    }

    /// Each round trip as [t since `origin`, seconds], in order.
    fn series(&self, origin: Instant) -> Vec<[f64; 2]> {
        self.0
            .iter()
            .map(|(at, rtt)| [at.duration_since(origin).as_secs_f64(), *rtt])
            .collect()
    }

    /// The slowest [`SLOWEST_KEPT`], slowest first, as [t since `origin`, seconds].
    fn slowest(&self, origin: Instant) -> Vec<[f64; 2]> {
        let mut v = self.series(origin);
        v.sort_by(|a, b| b[1].total_cmp(&a[1]));
        v.truncate(SLOWEST_KEPT);
        v
    }
}

/// Target 4's parts: GET /metrics times of the samples while loaded, seconds.
#[derive(Debug, Clone, Serialize)]
pub struct Scrapes {
    pub samples: usize,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
    /// The same from the loaded ping-pong on, leaving out the readers' start (all ask for
    /// their stream at once and the source fills the kernel's buffers).
    pub steady_samples: usize,
    pub steady_median: f64,
    pub steady_max: f64,
}

/// What the slow readers got.
#[derive(Debug, Clone, Serialize)]
pub struct Readers {
    pub conns: usize,
    /// Bytes each reader received over the loaded phase.
    pub bytes: Percentiles,
    /// Their 1st and 10th percentiles: how the least served fared.
    pub bytes_p1: u64,
    pub bytes_p10: u64,
    /// Readers that received nothing at all.
    pub none_at_all: usize,
    /// Readers that received nothing in the second half of the loaded phase.
    pub none_in_second_half: usize,
    /// Seconds from asking for the stream to its first byte, of the readers that got one.
    pub first_byte_secs: Percentiles,
    pub bytes_total: u64,
    pub errors: usize,
    /// CPU over the loaded phase.
    pub cpu: CpuUse,
}

/// sluice's counters at the end of the loaded phase.
#[derive(Debug, Clone, Serialize)]
pub struct AtEnd {
    /// `sluice_budget_waits_total{direction}`.
    pub waits_client_to_upstream: u64,
    pub waits_upstream_to_client: u64,
    /// `sluice_kernel_queued_bytes{direction}` (absent from older daemons).
    pub kernel_queued_client_to_upstream: Option<u64>,
    pub kernel_queued_upstream_to_client: Option<u64>,
    pub budget_used: Option<u64>,
    /// sluice's sockets' kernel memory (`ss` skmem, truesize), read once here where `ss`
    /// is installed: receive queues (mostly its upstream sockets') and send queues
    /// (mostly its client sockets').
    pub kernel_memory: Option<kernel_memory::SocketMemory>,
}

/// report.json's `budget` section.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetReport {
    pub conns: usize,
    pub bound: u64,
    pub read_rate: u64,
    pub targets: Vec<Target>,
    pub phases: Phases,
    pub memory: Memory,
    pub used: Used,
    pub ping_pong: PingPong,
    pub scrapes: Scrapes,
    pub readers: Readers,
    pub at_end: AtEnd,
}

/// One slow reader's progress, read by the scenario while it runs.
#[derive(Debug, Default)]
struct ReaderStat {
    bytes: AtomicU64,
    /// Microseconds from asking for the stream to the first byte; 0 until then.
    first_byte_micros: AtomicU64,
}

/// `sluice-stress scenario budget`.
pub async fn run(args: &ScenarioArgs) -> Result<()> {
    let (conns, duration) = (args.conns(), args.duration());
    let total = args.total().unwrap_or(0);
    let wl = workload(conns);
    let description = format!(
        "{}; buffer.total {}, bounds {}, for {}",
        wl.description,
        format_bytes(total),
        format_bytes(args.bound),
        humantime::format_duration(duration)
    );
    eprintln!("scenario budget: {description}");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    let up_spec = Arc::new(wl.upstream.clone());
    let up = upstream::LocalUpstream::start(up_spec)?;
    let config = args.proxy_config(up.addr);
    let up_stats = up.stats.clone();
    // Spawned from the main thread (see proxy_process).
    let mut proxy = ProxyProcess::spawn_sluice(&config)?;
    let sampler = Sampler::start_with(&proxy, false)?;
    let origin = sampler.started();
    let since = |at: Instant| at.duration_since(origin).as_secs_f64();
    let target = proxy.listen_addr();
    let (sluice_cpu, stress_cpu) = (
        CpuMeter::new(vec![proxy.pid()]),
        CpuMeter::new(vec![std::process::id()]),
    );
    let mut phases = Phases::default();

    // 1. Start-up.
    let start_rss = settled_rss(&proxy).await?;

    // 2. Idle connections.
    eprintln!("budget: connecting {conns} idle clients");
    phases.idle = since(Instant::now());
    let reader_spec = wl.clients[0].clone();
    let idle: Vec<TcpStream> = futures_util::stream::iter(0..conns)
        .map(|_| clients::connect(target, &reader_spec))
        .buffered(CONNECT_AT_ONCE)
        .try_collect()
        .await
        .context("connecting the idle clients")?;
    // sluice has connected them all once the upstream has accepted them all.
    let deadline = Instant::now() + IDLE_TIMEOUT;
    while (up_stats.accepted.load(Ordering::Relaxed) as usize) < conns {
        if Instant::now() > deadline || proxy.try_exited().is_some() {
            bail!(
                "only {} of {conns} connections reached the upstream through sluice; its log:\n{}",
                up_stats.accepted.load(Ordering::Relaxed),
                proxy.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle_rss = settled_rss(&proxy).await?;
    let idle_cost = idle_rss.saturating_sub(start_rss) / conns as u64;

    // 3. Unloaded ping-pong.
    eprintln!("budget: {ROUND_TRIPS} round trips unloaded");
    phases.unloaded_ping = since(Instant::now());
    let mark = CpuMark::now(&sluice_cpu, &stress_cpu);
    let unloaded = tokio::task::spawn_blocking(move || ping_pong(target, ROUND_TRIPS))
        .await?
        .context("the unloaded ping-pong")?;
    let unloaded_cpu = mark.used(&sluice_cpu, &stress_cpu);

    // 4. Loaded: the idle connections become slow readers.
    let stop = CancellationToken::new();
    let loaded_mark = CpuMark::now(&sluice_cpu, &stress_cpu);
    let go = Instant::now();
    phases.loaded = since(go);
    let stats: Vec<Arc<ReaderStat>> = (0..conns).map(|_| Arc::default()).collect();
    let readers: Vec<_> = idle
        .into_iter()
        .zip(&stats)
        .map(|(stream, stat)| {
            let (stat, stop) = (stat.clone(), stop.clone());
            tokio::spawn(async move {
                let outcome = slow_reader(stream, &stat, go, &stop).await;
                (outcome, go.elapsed())
            })
        })
        .collect();

    let bar = crate::progress::bar(Some(duration));
    let progress = |note: &str| {
        let last = sampler.last();
        crate::progress::update(
            &bar,
            go.elapsed().min(duration),
            format!(
                "sluice: RSS {}, budget used {}{note}",
                format_bytes(last.rss_bytes),
                format_bytes(last.budget_used_bytes.unwrap_or(0)),
            ),
        );
    };
    // The loaded ping-pong waits until the readers hold the budget's queue pool and the
    // source no longer writes faster than all readers together read: until then it is
    // filling kernel buffers (hundreds of MiB on loopback), a start-up burst of the
    // stand-in, not the steady load.
    let queue_pool = total - total / sluice::budget::RESERVE_SHARE as u64;
    let ping_by = go + duration / 3;
    let steady_rate = conns as f64 * READ_RATE.0 as f64;
    let mut last_out = (Instant::now(), up_stats.bytes_out.load(Ordering::Relaxed));
    while Instant::now() < ping_by && proxy.try_exited().is_none() {
        let used = sampler.last().budget_used_bytes.unwrap_or(0);
        phases.budget_full_before_loaded_ping = total > 0 && used + args.bound > queue_pool;
        if last_out.0.elapsed() >= Duration::from_millis(500) {
            let out = up_stats.bytes_out.load(Ordering::Relaxed);
            let rate = (out - last_out.1) as f64 / last_out.0.elapsed().as_secs_f64();
            phases.source_settled_before_loaded_ping = rate <= steady_rate;
            last_out = (Instant::now(), out);
        }
        if phases.budget_full_before_loaded_ping && phases.source_settled_before_loaded_ping {
            break;
        }
        progress(", waiting for it to fill and the source to settle");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    phases.loaded_ping = since(Instant::now());
    let loaded_ping = {
        let (sluice_cpu, stress_cpu) = (sluice_cpu.clone(), stress_cpu.clone());
        tokio::task::spawn_blocking(move || {
            let mark = CpuMark::now(&sluice_cpu, &stress_cpu);
            let pings = ping_pong(target, ROUND_TRIPS);
            pings.map(|p| (p, mark.used(&sluice_cpu, &stress_cpu)))
        })
    };

    let mut at_half: Option<Vec<u64>> = None;
    let end = go + duration;
    while Instant::now() < end && proxy.try_exited().is_none() {
        if at_half.is_none() && go.elapsed() >= duration / 2 {
            at_half = Some(snapshot(&stats));
        }
        progress("");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bar.finish_and_clear();
    let at_end_metrics = proxy.scrape().ok();
    let at_end_bytes = snapshot(&stats);
    phases.end = since(Instant::now());
    // One `ss` reading, after everything timed.
    let in_sockets = match kernel_memory::ss_available()? {
        true => Some(kernel_memory::of_processes(&[proxy.pid()])?),
        false => None,
    };
    let loaded_cpu = loaded_mark.used(&sluice_cpu, &stress_cpu);
    let (loaded, loaded_ping_cpu) = loaded_ping.await?.context("the loaded ping-pong")?;

    stop.cancel();
    let mut results = Vec::with_capacity(conns);
    for (reader, stat) in readers.into_iter().zip(&stats) {
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
    let (samples, sample_errors) = sampler.finish();
    up.stop().await;
    let exit = proxy.stop(STOP_GRACE)?;

    let summary = RunSummary::of(
        &samples,
        Some((args.bound, args.bound)),
        conns as u64,
        clients::summarize(&wl.clients, &results),
        UpstreamSummary::of(&up_stats),
        exit.to_string(),
        sample_errors,
    );
    let budget = BudgetReport::new(
        args,
        &samples,
        phases,
        Memory {
            start_rss,
            idle_rss,
            idle_cost_per_conn: idle_cost,
            total,
            limit: start_rss + conns as u64 * idle_cost + total,
            peak_rss: 0,
            peak_rss_at: 0.0,
        },
        PingPong {
            round_trips: ROUND_TRIPS,
            unloaded: unloaded.percentiles(),
            loaded: loaded.percentiles(),
            unloaded_slowest: unloaded.slowest(origin),
            loaded_slowest: loaded.slowest(origin),
            unloaded_series: unloaded.series(origin),
            loaded_series: loaded.series(origin),
            unloaded_cpu,
            loaded_cpu: loaded_ping_cpu,
        },
        Readers {
            cpu: loaded_cpu,
            ..readers_summary(&stats, &results, at_half.as_deref(), &at_end_bytes)
        },
        AtEnd {
            kernel_memory: in_sockets,
            ..at_end(at_end_metrics.as_ref())
        },
    );

    let report = Report {
        scenario: ScenarioName::Budget,
        description,
        conns,
        duration_secs: duration.as_secs_f64(),
        runs: vec![RunReport {
            proxy: "sluice".to_string(),
            summary,
            samples,
        }],
    };
    let section = ("budget", serde_json::to_value(&budget)?);
    let wrote = write_report(&args.out, &report, Some(section), Some(render_svg(&report)))?;
    crate::scenario::print_run(&report.runs[0]);
    budget.print();
    println!("wrote {wrote}");

    let s = &report.runs[0].summary;
    if s.errors > 0 {
        bail!("{} errors through sluice", s.errors);
    }
    if !exit.success() {
        bail!("sluice exited with {exit}");
    }
    Ok(())
}

impl BudgetReport {
    /// Fills in what the samples show and judges the four targets.
    fn new(
        args: &ScenarioArgs,
        samples: &[Sample],
        phases: Phases,
        mut memory: Memory,
        ping_pong: PingPong,
        readers: Readers,
        at_end: AtEnd,
    ) -> BudgetReport {
        if let Some(peak) = samples.iter().max_by_key(|s| s.rss_bytes) {
            memory.peak_rss = peak.rss_bytes;
            memory.peak_rss_at = peak.t;
        }
        let gauges: Vec<(u64, u64)> = samples
            .iter()
            .filter_map(|s| Some((s.budget_used_bytes?, s.budget_limit_bytes?)))
            .collect();
        let used = Used {
            samples: gauges.len(),
            max_used: gauges.iter().map(|g| g.0).max().unwrap_or(0),
            limit: gauges.iter().map(|g| g.1).max().unwrap_or(0),
            samples_over_limit: gauges.iter().filter(|(u, l)| u > l).count(),
        };
        let scrape_times = |from: f64| -> Vec<f64> {
            samples
                .iter()
                .filter(|s| s.t >= from && s.t <= phases.end)
                .map(|s| s.scrape_secs)
                .collect()
        };
        let (loaded, steady) = (
            scrape_times(phases.loaded),
            scrape_times(phases.loaded_ping),
        );
        let (p, q) = (
            Percentiles::of(loaded.clone()),
            Percentiles::of(steady.clone()),
        );
        let scrapes = Scrapes {
            samples: loaded.len(),
            median: p.p50,
            p99: p.p99,
            max: p.max,
            steady_samples: steady.len(),
            steady_median: q.p50,
            steady_max: q.max,
        };
        let latency_limit = LATENCY_FACTOR * ping_pong.unloaded.p99;
        let targets = vec![
            Target {
                name: "peak RSS",
                measured: memory.peak_rss as f64,
                limit: memory.limit as f64,
                unit: "bytes",
                pass: memory.peak_rss <= memory.limit,
            },
            Target {
                name: "budget used, every sample",
                measured: used.max_used as f64,
                limit: used.limit as f64,
                unit: "bytes",
                pass: used.samples > 0 && used.samples_over_limit == 0,
            },
            Target {
                name: "ping-pong p99 loaded",
                measured: ping_pong.loaded.p99,
                limit: latency_limit,
                unit: "seconds",
                pass: ping_pong.loaded.p99 <= latency_limit,
            },
            Target {
                name: "GET /metrics loaded, max",
                measured: scrapes.max,
                limit: SCRAPE_LIMIT.as_secs_f64(),
                unit: "seconds",
                pass: scrapes.samples > 0 && scrapes.max < SCRAPE_LIMIT.as_secs_f64(),
            },
        ];
        BudgetReport {
            conns: args.conns(),
            bound: args.bound,
            read_rate: READ_RATE.0,
            targets,
            phases,
            memory,
            used,
            ping_pong,
            scrapes,
            readers,
            at_end,
        }
    }

    /// The summary: each target measured against its limit, then what the readers got.
    fn print(&self) {
        let verdict = |t: &Target| if t.pass { "PASS" } else { "FAIL" };
        let m = &self.memory;
        let t = &self.targets;
        println!(
            "  1. peak RSS {} ≤ {} = start-up {} + {} conns × idle {} + total {}: {} (peak at {:.1} s; idle RSS {})",
            format_bytes(m.peak_rss),
            format_bytes(m.limit),
            format_bytes(m.start_rss),
            self.conns,
            format_bytes(m.idle_cost_per_conn),
            format_bytes(m.total),
            verdict(&t[0]),
            m.peak_rss_at,
            format_bytes(m.idle_rss),
        );
        let u = &self.used;
        println!(
            "  2. budget used ≤ limit in every sample: max used {} of limit {}, {} of {} samples over: {}",
            format_bytes(u.max_used),
            format_bytes(u.limit),
            u.samples_over_limit,
            u.samples,
            verdict(&t[1]),
        );
        let (un, lo) = (&self.ping_pong.unloaded, &self.ping_pong.loaded);
        println!(
            "  3. ping-pong p99 loaded {} ≤ 2 × unloaded p99 = {}: {} ({} round trips of {PING_BYTES} B each way, {PING_CONNS} new clients; unloaded p50 {} p99 {} max {}; loaded p50 {} p99 {} max {})",
            secs(lo.p99),
            secs(t[2].limit),
            verdict(&t[2]),
            self.ping_pong.round_trips,
            secs(un.p50),
            secs(un.p99),
            secs(un.max),
            secs(lo.p50),
            secs(lo.p99),
            secs(lo.max),
        );
        let p = &self.ping_pong;
        println!(
            "     CPU in cores of {}: unloaded ping-pong sluice {:.2}, sluice-stress {:.2}, others {:.2}; loaded ping-pong sluice {:.2}, sluice-stress {:.2}, others {:.2}",
            p.unloaded_cpu.cores,
            p.unloaded_cpu.sluice,
            p.unloaded_cpu.stress,
            p.unloaded_cpu.others,
            p.loaded_cpu.sluice,
            p.loaded_cpu.stress,
            p.loaded_cpu.others,
        );
        let slowest = |v: &[[f64; 2]]| {
            v.iter()
                .map(|[t, rtt]| format!("{} at {t:.2} s", secs(*rtt)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "     slowest round trips: unloaded {}; loaded {}",
            slowest(&p.unloaded_slowest),
            slowest(&p.loaded_slowest)
        );
        let sc = &self.scrapes;
        println!(
            "  4. GET /metrics while loaded, max {} < {}: {} (median {}, p99 {}, {} samples; from the loaded ping-pong on: median {}, max {}, {} samples)",
            secs(sc.max),
            secs(SCRAPE_LIMIT.as_secs_f64()),
            verdict(&t[3]),
            secs(sc.median),
            secs(sc.p99),
            sc.samples,
            secs(sc.steady_median),
            secs(sc.steady_max),
            sc.steady_samples,
        );
        let ph = &self.phases;
        println!(
            "     phases (s since start): idle {:.1}, unloaded ping-pong {:.1}, loaded {:.1}, loaded ping-pong {:.1}, end {:.1}",
            ph.idle, ph.unloaded_ping, ph.loaded, ph.loaded_ping, ph.end
        );
        if !ph.budget_full_before_loaded_ping {
            println!(
                "     note: the budget's queue pool was not granted out when the loaded ping-pong began"
            );
        }
        if !ph.source_settled_before_loaded_ping {
            println!(
                "     note: the source was still filling kernel buffers when the loaded ping-pong began"
            );
        }
        let e = &self.at_end;
        let opt = |v: Option<u64>| v.map_or("not reported".to_string(), format_bytes);
        println!(
            "     at the end: budget waits {} client_to_upstream, {} upstream_to_client; kernel queued {} client_to_upstream, {} upstream_to_client; budget used {}",
            e.waits_client_to_upstream,
            e.waits_upstream_to_client,
            opt(e.kernel_queued_client_to_upstream),
            opt(e.kernel_queued_upstream_to_client),
            opt(e.budget_used),
        );
        if let Some(k) = &e.kernel_memory {
            println!(
                "     sluice's {} sockets in the kernel (ss skmem, at the end): receive queues {}, send queues {}",
                k.sockets,
                format_bytes(k.rmem_alloc),
                format_bytes(k.wmem_queued),
            );
        }
        let r = &self.readers;
        println!(
            "     readers: {} at {READ_RATE}, {} received in all; per reader min {} p1 {} p10 {} p50 {} p99 {} max {}; {} got nothing at all, {} nothing in the second half; first byte after p50 {} p99 {} max {} (of {} that got one); {} errors",
            r.conns,
            format_bytes(r.bytes_total),
            format_bytes(r.bytes.min as u64),
            format_bytes(r.bytes_p1),
            format_bytes(r.bytes_p10),
            format_bytes(r.bytes.p50 as u64),
            format_bytes(r.bytes.p99 as u64),
            format_bytes(r.bytes.max as u64),
            r.none_at_all,
            r.none_in_second_half,
            secs(r.first_byte_secs.p50),
            secs(r.first_byte_secs.p99),
            secs(r.first_byte_secs.max),
            r.conns - r.none_at_all,
            r.errors,
        );
        println!(
            "     CPU over the loaded phase, cores of {}: sluice {:.2}, sluice-stress {:.2}, others {:.2}",
            r.cpu.cores, r.cpu.sluice, r.cpu.stress, r.cpu.others
        );
    }
}

/// A duration in seconds as µs, ms or s.
pub fn secs(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// sluice's RSS once it has settled: the median of five reads 100 ms apart, after a
/// second's wait (a single read can catch an allocation in flight).
async fn settled_rss(proxy: &ProxyProcess) -> Result<u64> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut reads = Vec::with_capacity(5);
    for _ in 0..5 {
        reads.push(proxy.rss_bytes()?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reads.sort_unstable();
    Ok(reads[2])
}

/// Each reader's bytes so far.
fn snapshot(stats: &[Arc<ReaderStat>]) -> Vec<u64> {
    stats
        .iter()
        .map(|s| s.bytes.load(Ordering::Relaxed))
        .collect()
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

/// [`ROUND_TRIPS`]-style ping-pong through sluice to the upstream's echo, on blocking
/// sockets in this thread (a runtime busy with thousands of readers would add its own
/// scheduling delay): `PING_CONNS` new clients in turn, each asking for echo and timing
/// its share of `round_trips` (write 64 bytes, read them back, compare). Returns each
/// round trip's start and time, seconds.
fn ping_pong(target: SocketAddr, round_trips: usize) -> Result<Pings> {
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

fn readers_summary(
    stats: &[Arc<ReaderStat>],
    results: &[ConnResult],
    at_half: Option<&[u64]>,
    at_end: &[u64],
) -> Readers {
    let first: Vec<f64> = stats
        .iter()
        .map(|s| s.first_byte_micros.load(Ordering::Relaxed))
        .filter(|&m| m > 0)
        .map(|m| m as f64 / 1e6)
        .collect();
    let none_in_second_half = match at_half {
        Some(half) => half.iter().zip(at_end).filter(|(h, e)| e <= h).count(),
        None => at_end.iter().filter(|&&e| e == 0).count(),
    };
    let mut sorted = at_end.to_vec();
    sorted.sort_unstable();
    Readers {
        conns: at_end.len(),
        bytes_p1: clients::nearest_rank(&sorted, 0.01),
        bytes_p10: clients::nearest_rank(&sorted, 0.10),
        bytes: Percentiles::of(at_end.iter().map(|&b| b as f64).collect()),
        none_at_all: at_end.iter().filter(|&&b| b == 0).count(),
        none_in_second_half,
        first_byte_secs: Percentiles::of(first),
        bytes_total: at_end.iter().sum(),
        errors: results.iter().filter(|r| r.error.is_some()).count(),
        cpu: CpuUse::default(),
    }
}

fn at_end(m: Option<&Metrics>) -> AtEnd {
    let waits = |d: &str| m.map_or(0.0, |m| m.direction("sluice_budget_waits_total", d)) as u64;
    let kernel = |d: &str| {
        m.and_then(|m| m.get(KERNEL_QUEUED, &[("direction", d)]))
            .map(|v| v as u64)
    };
    AtEnd {
        waits_client_to_upstream: waits(DIRECTIONS[0]),
        waits_upstream_to_client: waits(DIRECTIONS[1]),
        kernel_queued_client_to_upstream: kernel(DIRECTIONS[0]),
        kernel_queued_upstream_to_client: kernel(DIRECTIONS[1]),
        budget_used: m
            .and_then(|m| m.get(crate::scenario::BUDGET_USED, &[]))
            .map(|v| v as u64),
        kernel_memory: None,
    }
}
