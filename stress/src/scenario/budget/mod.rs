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

mod figures;
mod readers;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::ProgressBar;
use tokio::net::TcpStream;

use self::figures::{AtEnd, BudgetReport, CpuUse, Measured, Memory, Phases, PingPong, Readers};
use self::readers::{Pings, READ_RATE, READER_RCVBUF, ROUND_TRIPS, SlowReaders};
use super::args::{ScenarioArgs, ScenarioName};
use super::report::{Chart, Report, RunReport};
use crate::bench::cpu::{CpuMeter, ticks_per_second};
use crate::clients::{self, ClientMode, ClientSpec, ClientsSummary};
use crate::kernel_memory;
use crate::progress;
use crate::proxy_process::ProxyProcess;
use crate::proxy_sampler::{KernelMemory, Sample};
use crate::rig::{Proxy, Rig, STOP_GRACE, Workload, upstream_spec};
use crate::units::format_bytes;
use crate::upstream::UpstreamMode;

/// How long all idle connections may take to reach the upstream through sluice.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The slow readers and their upstream, as a [`Workload`] (for the report's description
/// and the clients' summary; the readers themselves are [`SlowReaders`]).
pub fn workload(conns: usize) -> Workload {
    Workload {
        description: format!(
            "{conns} slow readers ({READ_RATE} each, {} SO_RCVBUF) of a fast source share buffer.total; a new client's 64-byte ping-pong before and while they hold it",
            format_bytes(READER_RCVBUF)
        ),
        upstream: upstream_spec(UpstreamMode::PerConnection),
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

/// `sluice-stress scenario budget`.
pub async fn run(args: &ScenarioArgs) -> Result<()> {
    let (conns, duration) = (args.conns(), args.duration());
    let wl = workload(conns);
    let description = format!(
        "{}; buffer.total {}, bounds {}, for {}",
        wl.description,
        format_bytes(args.total().unwrap_or(0)),
        format_bytes(args.bound),
        humantime::format_duration(duration)
    );
    eprintln!("scenario budget: {description}");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    // Spawned from the main thread (see proxy_process); no `ss` in the samples (see above).
    let config = args.proxy_config();
    let rig = Rig::start(&wl.upstream, Proxy::Sluice(config), KernelMemory::Skip)?;
    let mut run = BudgetRun::new(rig, args);
    let (memory, idle) = run.idle(&wl.clients[0]).await?;
    let unloaded = run.unloaded_ping_pong().await?;
    let loaded = run.loaded(idle, unloaded, &wl.clients).await?;
    let BudgetRun { rig, phases, .. } = run;
    let stopped = rig.stop(STOP_GRACE).await?;
    let exit = stopped.exit;

    let run = RunReport::of(stopped, conns as u64, loaded.clients);
    let measured = Measured {
        conns,
        bound: args.bound,
        phases,
        memory,
        ping_pong: loaded.ping_pong,
        readers: loaded.readers,
        at_end: loaded.at_end,
    };
    let budget = BudgetReport::new(&run.samples, measured);
    let report = Report::new(
        ScenarioName::Budget,
        description,
        conns,
        duration,
        vec![run],
    );
    let section = ("budget", serde_json::to_value(&budget)?);
    let wrote = report.write(&args.out, Some(section), Chart::Draw)?;
    report.print_runs();
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

/// The one sluice the phases run against, and when each phase began.
struct BudgetRun {
    rig: Rig,
    conns: usize,
    duration: Duration,
    /// `buffer.total`, 0 for none.
    total: u64,
    bound: u64,
    phases: Phases,
    cpu: Cpu,
}

/// The loaded phase's findings.
struct Loaded {
    clients: ClientsSummary,
    ping_pong: PingPong,
    readers: Readers,
    at_end: AtEnd,
}

impl BudgetRun {
    fn new(rig: Rig, args: &ScenarioArgs) -> BudgetRun {
        let cpu = Cpu {
            sluice: CpuMeter::new(vec![rig.proxy().pid()]),
            stress: CpuMeter::new(vec![std::process::id()]),
        };
        BudgetRun {
            rig,
            conns: args.conns(),
            duration: args.duration(),
            total: args.total().unwrap_or(0),
            bound: args.bound,
            phases: Phases::default(),
            cpu,
        }
    }

    /// Seconds since sampling began (the samples' `t`), now.
    fn now(&self) -> f64 {
        self.rig.sampler().started().elapsed().as_secs_f64()
    }

    fn target(&self) -> SocketAddr {
        self.rig.proxy().listen_addr()
    }

    /// Phases 1 and 2: the start-up RSS; then `conns` idle clients connected through
    /// sluice to the upstream, and what they cost.
    async fn idle(&mut self, reader: &ClientSpec) -> Result<(Memory, Vec<TcpStream>)> {
        let start_rss = settled_rss(self.rig.proxy()).await?;
        let conns = self.conns;
        eprintln!("budget: connecting {conns} idle clients");
        self.phases.idle = self.now();
        let idle = readers::connect_idle(self.target(), reader, conns).await?;
        self.await_upstream_accepts().await?;
        let idle_rss = settled_rss(self.rig.proxy()).await?;
        let idle_cost = idle_rss.saturating_sub(start_rss) / conns as u64;
        let memory = Memory {
            start_rss,
            idle_rss,
            idle_cost_per_conn: idle_cost,
            total: self.total,
            limit: start_rss + conns as u64 * idle_cost + self.total,
            peak_rss: 0,
            peak_rss_at: 0.0,
        };
        Ok((memory, idle))
    }

    /// Waits until sluice has connected every idle client: the upstream has accepted them
    /// all.
    async fn await_upstream_accepts(&mut self) -> Result<()> {
        let deadline = Instant::now() + IDLE_TIMEOUT;
        loop {
            let accepted = self.rig.upstream().stats.accepted.load(Ordering::Relaxed);
            if accepted as usize >= self.conns {
                return Ok(());
            }
            if Instant::now() > deadline || self.rig.proxy_mut().try_exited().is_some() {
                bail!(
                    "only {accepted} of {} connections reached the upstream through sluice; its log:\n{}",
                    self.conns,
                    self.rig.proxy().log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Phase 3: the ping-pong before any load.
    async fn unloaded_ping_pong(&mut self) -> Result<(Pings, CpuUse)> {
        eprintln!("budget: {ROUND_TRIPS} round trips unloaded");
        self.phases.unloaded_ping = self.now();
        let pings = self.cpu.ping_pong(self.target()).await?;
        pings.context("the unloaded ping-pong")
    }

    /// Phase 4: the idle connections become slow readers; once the load is steady, the
    /// ping-pong runs again; the readers read to the end of `duration`.
    async fn loaded(
        &mut self,
        idle: Vec<TcpStream>,
        (unloaded, unloaded_cpu): (Pings, CpuUse),
        specs: &[ClientSpec],
    ) -> Result<Loaded> {
        let loaded_mark = self.cpu.mark();
        let readers = SlowReaders::start(idle);
        self.phases.loaded = self.now();
        let line = LoadedLine {
            bar: progress::bar(Some(self.duration)),
            asked: readers.asked,
            duration: self.duration,
        };
        self.await_steady_load(&line).await;
        self.phases.loaded_ping = self.now();
        let loaded_ping = self.cpu.ping_pong(self.target());
        let at_half = self.read_until_end(&readers, &line).await;
        line.bar.finish_and_clear();
        let at_end = self.at_end(&readers)?;
        let loaded_cpu = self.cpu.used_since(&loaded_mark);
        let (loaded, loaded_ping_cpu) = loaded_ping.await?.context("the loaded ping-pong")?;

        let first_byte_secs = readers.first_byte_secs();
        let results = readers.finish().await?;
        let origin = self.rig.sampler().started();
        let (at_half, at_end_bytes) = (at_half.as_deref(), &at_end.1);
        Ok(Loaded {
            clients: clients::summarize(specs, &results),
            ping_pong: PingPong {
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
            readers: Readers::of(first_byte_secs, &results, at_half, at_end_bytes, loaded_cpu),
            at_end: at_end.0,
        })
    }

    /// Waits until the readers hold the budget's queue pool and the source no longer
    /// writes faster than all readers together read, a third of `duration` at most: until
    /// then it is filling kernel buffers (hundreds of MiB on loopback), a start-up burst of
    /// the stand-in, not the steady load. Notes in `phases` which came true.
    async fn await_steady_load(&mut self, line: &LoadedLine) {
        let queue_pool = self.total - self.total / sluice::budget::RESERVE_SHARE as u64;
        let ping_by = line.asked + self.duration / 3;
        let steady_rate = self.conns as f64 * READ_RATE.0 as f64;
        let bytes_out = |rig: &Rig| rig.upstream().stats.bytes_out.load(Ordering::Relaxed);
        let mut last_out = (Instant::now(), bytes_out(&self.rig));
        while Instant::now() < ping_by && self.rig.proxy_mut().try_exited().is_none() {
            let last = self.rig.sampler().last();
            let used = last.budget_used_bytes.unwrap_or(0);
            let phases = &mut self.phases;
            phases.budget_full_before_loaded_ping =
                self.total > 0 && used + self.bound > queue_pool;
            if last_out.0.elapsed() >= Duration::from_millis(500) {
                let out = bytes_out(&self.rig);
                let rate = (out - last_out.1) as f64 / last_out.0.elapsed().as_secs_f64();
                phases.source_settled_before_loaded_ping = rate <= steady_rate;
                last_out = (Instant::now(), out);
            }
            if phases.budget_full_before_loaded_ping && phases.source_settled_before_loaded_ping {
                break;
            }
            line.show(&last, ", waiting for it to fill and the source to settle");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Lets the readers read until `duration` has passed since they asked; returns each
    /// one's bytes at its half.
    async fn read_until_end(
        &mut self,
        readers: &SlowReaders,
        line: &LoadedLine,
    ) -> Option<Vec<u64>> {
        let mut at_half = None;
        let end = readers.asked + self.duration;
        while Instant::now() < end && self.rig.proxy_mut().try_exited().is_none() {
            if at_half.is_none() && readers.asked.elapsed() >= self.duration / 2 {
                at_half = Some(readers.snapshot());
            }
            line.show(&self.rig.sampler().last(), "");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        at_half
    }

    /// sluice's counters and each reader's bytes at the loaded phase's end, then one `ss`
    /// reading, after everything timed.
    fn at_end(&mut self, readers: &SlowReaders) -> Result<(AtEnd, Vec<u64>)> {
        let metrics = self.rig.proxy().scrape().ok();
        let bytes = readers.snapshot();
        self.phases.end = self.now();
        let in_sockets = match kernel_memory::ss_available()? {
            true => Some(kernel_memory::of_processes(&[self.rig.proxy().pid()])?),
            false => None,
        };
        Ok((AtEnd::of(metrics.as_ref(), in_sockets), bytes))
    }
}

/// The loaded phase's progress line.
struct LoadedLine {
    bar: ProgressBar,
    /// When the readers asked for their streams.
    asked: Instant,
    duration: Duration,
}

impl LoadedLine {
    fn show(&self, last: &Sample, note: &str) {
        progress::update(
            &self.bar,
            self.asked.elapsed().min(self.duration),
            format!(
                "sluice: RSS {}, budget used {}{note}",
                format_bytes(last.rss_bytes),
                format_bytes(last.budget_used_bytes.unwrap_or(0)),
            ),
        );
    }
}

/// The CPU time of sluice and of this process.
#[derive(Clone)]
struct Cpu {
    sluice: CpuMeter,
    stress: CpuMeter,
}

impl Cpu {
    fn mark(&self) -> CpuMark {
        CpuMark::now(&self.sluice, &self.stress)
    }

    fn used_since(&self, mark: &CpuMark) -> CpuUse {
        mark.used(&self.sluice, &self.stress)
    }

    /// A ping-pong phase through sluice on a blocking thread, and the CPU it saw.
    fn ping_pong(&self, target: SocketAddr) -> tokio::task::JoinHandle<Result<(Pings, CpuUse)>> {
        let cpu = self.clone();
        tokio::task::spawn_blocking(move || {
            let mark = cpu.mark();
            let pings = readers::ping_pong(target, ROUND_TRIPS)?;
            Ok((pings, cpu.used_since(&mark)))
        })
    }
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
