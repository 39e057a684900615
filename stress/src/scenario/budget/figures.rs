//! report.json's `budget` section: the four targets measured against their limits, the parts behind each, and their lines on the console.

use serde::Serialize;

use super::readers::{PING_BYTES, PING_CONNS, READ_RATE};
use crate::clients::{self, ConnResult, Percentiles};
use crate::kernel_memory;
use crate::proxy_process::{DIRECTIONS, Metrics};
use crate::proxy_sampler::{BUDGET_USED, KERNEL_QUEUED, Sample};
use crate::scenario::report::Target;
use crate::units::{format_bytes, format_secs as secs};

/// Target 3: loaded p99 may be this many times the unloaded p99.
const LATENCY_FACTOR: f64 = 2.0;
/// Target 4: the slowest GET /metrics while loaded.
pub const SCRAPE_LIMIT: std::time::Duration = std::time::Duration::from_millis(10);

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

/// What the run measured, before the samples fill in the rest.
pub struct Measured {
    pub conns: usize,
    pub bound: u64,
    pub phases: Phases,
    pub memory: Memory,
    pub ping_pong: PingPong,
    pub readers: Readers,
    pub at_end: AtEnd,
}

impl BudgetReport {
    /// Fills in what the samples show and judges the four targets.
    pub fn new(samples: &[Sample], measured: Measured) -> BudgetReport {
        let Measured {
            conns,
            bound,
            phases,
            mut memory,
            ping_pong,
            readers,
            at_end,
        } = measured;
        if let Some(peak) = samples.iter().max_by_key(|s| s.rss_bytes) {
            memory.peak_rss = peak.rss_bytes;
            memory.peak_rss_at = peak.t;
        }
        let used = Used::of(samples);
        let scrapes = Scrapes::of(samples, &phases);
        BudgetReport {
            conns,
            bound,
            read_rate: READ_RATE.0,
            targets: targets(&memory, &used, &ping_pong, &scrapes),
            phases,
            memory,
            used,
            ping_pong,
            scrapes,
            readers,
            at_end,
        }
    }
}

/// The four targets, in order.
fn targets(memory: &Memory, used: &Used, ping_pong: &PingPong, scrapes: &Scrapes) -> Vec<Target> {
    let latency_limit = LATENCY_FACTOR * ping_pong.unloaded.p99;
    vec![
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
    ]
}

impl Used {
    /// The budget's gauges over the samples that have both.
    fn of(samples: &[Sample]) -> Used {
        let gauges: Vec<(u64, u64)> = samples
            .iter()
            .filter_map(|s| Some((s.budget_used_bytes?, s.budget_limit_bytes?)))
            .collect();
        Used {
            samples: gauges.len(),
            max_used: gauges.iter().map(|g| g.0).max().unwrap_or(0),
            limit: gauges.iter().map(|g| g.1).max().unwrap_or(0),
            samples_over_limit: gauges.iter().filter(|(u, l)| u > l).count(),
        }
    }
}

impl Scrapes {
    /// The samples' GET /metrics times from the loaded phase on, and from the loaded
    /// ping-pong on, to its end.
    fn of(samples: &[Sample], phases: &Phases) -> Scrapes {
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
        Scrapes {
            samples: loaded.len(),
            median: p.p50,
            p99: p.p99,
            max: p.max,
            steady_samples: steady.len(),
            steady_median: q.p50,
            steady_max: q.max,
        }
    }
}

impl Readers {
    /// What the readers got: `first_byte_secs` of those that got a byte, their `results`,
    /// and each one's bytes at the loaded phase's half (if it got that far) and end.
    pub fn of(
        first_byte_secs: Vec<f64>,
        results: &[ConnResult],
        at_half: Option<&[u64]>,
        at_end: &[u64],
        cpu: CpuUse,
    ) -> Readers {
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
            first_byte_secs: Percentiles::of(first_byte_secs),
            bytes_total: at_end.iter().sum(),
            errors: results.iter().filter(|r| r.error.is_some()).count(),
            cpu,
        }
    }
}

impl AtEnd {
    /// sluice's counters from `m`, the scrape at the loaded phase's end; `kernel_memory`,
    /// its sockets' reading then.
    pub fn of(m: Option<&Metrics>, kernel_memory: Option<kernel_memory::SocketMemory>) -> AtEnd {
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
            budget_used: m.and_then(|m| m.get(BUDGET_USED, &[])).map(|v| v as u64),
            kernel_memory,
        }
    }
}

impl BudgetReport {
    /// The summary: each target measured against its limit, then what the readers got.
    pub fn print(&self) {
        self.print_memory();
        self.print_used();
        self.print_ping_pong();
        self.print_scrapes();
        self.print_phases();
        self.print_at_end();
        self.print_readers();
    }

    /// Target 1.
    fn print_memory(&self) {
        let m = &self.memory;
        println!(
            "  1. peak RSS {} ≤ {} = start-up {} + {} conns × idle {} + total {}: {} (peak at {:.1} s; idle RSS {})",
            format_bytes(m.peak_rss),
            format_bytes(m.limit),
            format_bytes(m.start_rss),
            self.conns,
            format_bytes(m.idle_cost_per_conn),
            format_bytes(m.total),
            verdict(&self.targets[0]),
            m.peak_rss_at,
            format_bytes(m.idle_rss),
        );
    }

    /// Target 2.
    fn print_used(&self) {
        let u = &self.used;
        println!(
            "  2. budget used ≤ limit in every sample: max used {} of limit {}, {} of {} samples over: {}",
            format_bytes(u.max_used),
            format_bytes(u.limit),
            u.samples_over_limit,
            u.samples,
            verdict(&self.targets[1]),
        );
    }

    /// Target 3, the CPU each ping-pong phase saw, the slowest round trips.
    fn print_ping_pong(&self) {
        let (un, lo) = (&self.ping_pong.unloaded, &self.ping_pong.loaded);
        println!(
            "  3. ping-pong p99 loaded {} ≤ 2 × unloaded p99 = {}: {} ({} round trips of {PING_BYTES} B each way, {PING_CONNS} new clients; unloaded p50 {} p99 {} max {}; loaded p50 {} p99 {} max {})",
            secs(lo.p99),
            secs(self.targets[2].limit),
            verdict(&self.targets[2]),
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
    }

    /// Target 4.
    fn print_scrapes(&self) {
        let sc = &self.scrapes;
        println!(
            "  4. GET /metrics while loaded, max {} < {}: {} (median {}, p99 {}, {} samples; from the loaded ping-pong on: median {}, max {}, {} samples)",
            secs(sc.max),
            secs(SCRAPE_LIMIT.as_secs_f64()),
            verdict(&self.targets[3]),
            secs(sc.median),
            secs(sc.p99),
            sc.samples,
            secs(sc.steady_median),
            secs(sc.steady_max),
            sc.steady_samples,
        );
    }

    /// When each phase began, and why the loaded ping-pong began when it did.
    fn print_phases(&self) {
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
    }

    /// sluice's counters and its sockets' kernel memory at the end.
    fn print_at_end(&self) {
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
    }

    /// What the readers got, and the CPU over the loaded phase.
    fn print_readers(&self) {
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

/// PASS or FAIL.
fn verdict(t: &Target) -> &'static str {
    if t.pass { "PASS" } else { "FAIL" }
}
