//! The `balance` scenario: one sluice service in front of two fast servers and a slow one; clients arrive at a steady rate and upload; each server's share of new connections and the clients' completion times, per balancing policy.
//!
//! # The run (once per `--policy`, each with fresh servers and a fresh sluice)
//!
//! 1. Three stand-in sinks on loopback, in `servers` order `fast-1`, `fast-2`, `slow`: the
//!    fast ones read as fast as they can, the slow one [`SLOW_RATE`] per connection. All
//!    have a 16 KiB SO_RCVBUF, so a slow server's backpressure reaches sluice's buffers
//!    instead of hiding in the kernel. Each closes its side after the client's EOF.
//! 2. sluice with one `[[service]]` over them and the policy's `balance`.
//! 3. `--conns` clients arrive over `--duration` as a Poisson process drawn from `--seed`
//!    (the same moments for every policy). Each uploads `--upload` bytes of the verifiable
//!    pattern (as fast as it can, or at `--upload-rate`), half-closes, and waits for the
//!    server's close: its completion time runs from before its connect to that close.
//!
//! # What it reports
//!
//! Per policy, the connections each server accepted (counted by the server itself, and
//! by sluice where its /metrics counts connects per server), and the completion time's
//! p50/p90/p99/max. With `round_robin` and `least_queued` both run, the two
//! targets, printed met or missed: with `least_queued` the slow server gets at most a
//! third of its `round_robin` share, and p99 completion time improves. They are
//! measurements, so the command fails only when something broke (a client's bytes did
//! not all arrive, a server saw a wrong byte, sluice died).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::args::{Policy, ScenarioArgs, ScenarioName};
use super::report::{Chart, Report, RunReport, Target, UpstreamSummary};
use crate::UsageError;
use crate::clients::{self, ClientMode, ClientSpec, ConnResult, LiveStats, Percentiles};
use crate::pattern::word;
use crate::proxy_process::{DIRECTIONS, Metrics, ServiceConfig};
use crate::proxy_sampler::KernelMemory;
use crate::rig::{Proxy, Rig, STOP_GRACE, Workload, upstream_spec};
use crate::units::{KIB, Rate, format_bytes, format_secs as secs};
use crate::upstream::{LocalUpstream, UpstreamMode, UpstreamSpec};

/// The slow server's read rate, per connection.
pub const SLOW_RATE: Rate = Rate(64 * KIB);
/// SO_RCVBUF of every server and SO_SNDBUF of every client: small, so a slow server's
/// backpressure reaches sluice's buffers quickly.
const SOCKET_BUFFER: u64 = 16 * KIB;
/// The servers, in `servers` order, and whether each is the slow one.
const SERVERS: [(&str, bool); 3] = [("fast-1", false), ("fast-2", false), ("slow", true)];
/// The service's name, its metrics' `service` label.
const SERVICE: &str = "balance";
/// How long a client may wait for its server's close before it counts as failed.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(120);
/// Target 1: with least_queued the slow server's share may be at most this fraction of
/// its round_robin share.
const SHARE_FACTOR: f64 = 1.0 / 3.0;
/// sluice's count of the connections made to each server: its connect-latency
/// histogram's `_count`, one per successful connect.
const SLUICE_CONNECTS: &str = "sluice_upstream_connect_duration_seconds_count";
/// sluice's gauges of each server's live connections and of the bytes it holds for them.
const SLUICE_LIVE: &str = "sluice_server_connections";
const SLUICE_QUEUED: &str = "sluice_server_queued_bytes";
/// How often the servers' live connections and sluice's gauges are read.
const OBSERVE_EVERY: Duration = Duration::from_millis(250);

/// The fast servers (`upstream`; the slow one adds [`SLOW_RATE`]) and the clients, each
/// uploading `upload` bytes at `rate` (or as fast as it can).
pub fn workload(conns: usize, upload: u64, rate: Option<Rate>) -> Workload {
    Workload {
        description: format!(
            "{conns} clients each uploading {}{} into one service of three sink servers: two reading as fast as they can, one {SLOW_RATE} per connection",
            format_bytes(upload),
            rate.map_or(String::new(), |r| format!(" at {r}")),
        ),
        upstream: UpstreamSpec {
            rcvbuf: Some(SOCKET_BUFFER),
            ..upstream_spec(UpstreamMode::Sink)
        },
        clients: vec![
            ClientSpec {
                bytes: Some(upload),
                write_rate: rate,
                sndbuf: Some(SOCKET_BUFFER),
                ..ClientSpec::new(ClientMode::Write)
            };
            conns
        ],
    }
}

/// When each client arrives, from the run's start: a Poisson process of `conns / duration`
/// a second drawn from `seed`, so every policy sees the same clients at the same moments.
pub fn arrivals(conns: usize, duration: Duration, seed: u64) -> Vec<Duration> {
    let mean_gap = duration.as_secs_f64() / conns.max(1) as f64;
    let mut at = 0.0;
    (0..conns as u64)
        .map(|i| {
            let arrival = Duration::from_secs_f64(at);
            // Uniform in [0, 1) from the top 53 bits, then an exponential gap.
            let u = (word(seed, i) >> 11) as f64 / (1u64 << 53) as f64;
            at += -(1.0 - u).ln() * mean_gap;
            arrival
        })
        .collect()
}

/// What one server got under one policy.
#[derive(Debug, Clone, Serialize)]
pub struct ServerShare {
    pub name: &'static str,
    pub address: String,
    pub slow: bool,
    /// Connections it accepted, counted by the server.
    pub accepted: u64,
    /// `accepted` over all servers' accepted.
    pub share: f64,
    /// Connections it closed after the client's EOF.
    pub completed: u64,
    /// Bytes it checked against the pattern.
    pub bytes_verified: u64,
    /// Its highs over the run, read every [`OBSERVE_EVERY`].
    pub peak: Peak,
    /// Connections sluice made to it ([`SLUICE_CONNECTS`]), when its /metrics has them.
    pub sluice_connects: Option<u64>,
}

/// One server's highs over a run: what it saw, and what sluice's gauges said.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Peak {
    /// Most connections it held at once.
    pub live: u64,
    /// Highest [`SLUICE_LIVE`], when sluice reports it.
    pub sluice_connections: Option<u64>,
    /// Highest `client_to_upstream` [`SLUICE_QUEUED`]: bytes waiting for it to read.
    pub sluice_queued: Option<u64>,
}

impl Peak {
    /// Raises the highs to what `server` and `metrics` say now.
    fn observe(&mut self, server: &LocalUpstream, metrics: Option<&Metrics>) {
        let address = server.addr.to_string();
        let labels = [("service", SERVICE), ("server", address.as_str())];
        let live = metrics.and_then(|m| m.get(SLUICE_LIVE, &labels));
        let queued_labels = [labels[0], labels[1], ("direction", DIRECTIONS[0])];
        let queued = metrics.and_then(|m| m.get(SLUICE_QUEUED, &queued_labels));
        // `None` orders below any `Some`: a reading raises the high, no reading keeps it.
        let higher = |peak: Option<u64>, now: Option<f64>| peak.max(now.map(|v| v as u64));
        self.live = self.live.max(server.stats.active.load(Ordering::Relaxed));
        self.sluice_connections = higher(self.sluice_connections, live);
        self.sluice_queued = higher(self.sluice_queued, queued);
    }
}

/// One policy's run.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRun {
    pub policy: Policy,
    pub servers: Vec<ServerShare>,
    /// Seconds from a client's connect to its server's close, over the clients that
    /// completed.
    pub completion: Percentiles,
    pub clients: usize,
    pub completed: usize,
    /// Clients that failed, and servers' verification or I/O errors.
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Bytes the servers verified, against what the clients uploaded (conns × upload).
    pub bytes_verified: u64,
    pub bytes_expected: u64,
    pub proxy_exit: String,
    /// sluice exited with status 0 (what [`check`] asks; `proxy_exit` is for people).
    #[serde(skip)]
    pub proxy_ok: bool,
}

impl PolicyRun {
    /// The slow server's share of new connections.
    fn slow_share(&self) -> f64 {
        self.servers
            .iter()
            .filter(|s| s.slow)
            .map(|s| s.share)
            .sum()
    }

    /// Whether every client completed and every uploaded byte reached a server intact.
    fn all_arrived(&self) -> bool {
        self.errors == 0
            && self.completed == self.clients
            && self.bytes_verified == self.bytes_expected
    }
}

/// report.json's `balance` section.
#[derive(Debug, Clone, Serialize)]
pub struct BalanceReport {
    pub conns: usize,
    pub duration_secs: f64,
    pub upload: u64,
    /// Each client's upload pace, bytes/s; absent: as fast as it can.
    pub upload_rate: Option<u64>,
    pub slow_rate: u64,
    pub seed: u64,
    pub runs: Vec<PolicyRun>,
    /// The two targets; empty unless round_robin and least_queued both ran.
    pub targets: Vec<Target>,
}

/// `sluice-stress scenario balance`.
pub async fn run(args: &ScenarioArgs) -> Result<()> {
    if args.upload == 0 {
        return Err(UsageError("--upload must be more than 0".into()).into());
    }
    let (conns, duration) = (args.conns(), args.duration());
    let policies = match args.policy.is_empty() {
        true => vec![Policy::RoundRobin, Policy::LeastQueued],
        false => args.policy.clone(),
    };
    let wl = workload(conns, args.upload, args.upload_rate);
    let description = format!(
        "{} over {} (Poisson arrivals, seed {})",
        wl.description,
        humantime::format_duration(duration),
        args.seed
    );
    eprintln!("scenario balance: {description}");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let schedule = arrivals(conns, duration, args.seed);
    let (mut runs, mut balance_runs) = (Vec::new(), Vec::new());
    for policy in policies {
        let (run, balance) = run_policy(args, &wl, policy, &schedule).await?;
        runs.push(run);
        balance_runs.push(balance);
    }
    let balance = BalanceReport {
        conns,
        duration_secs: duration.as_secs_f64(),
        upload: args.upload,
        upload_rate: args.upload_rate.map(|r| r.0),
        slow_rate: SLOW_RATE.0,
        seed: args.seed,
        targets: targets(&balance_runs),
        runs: balance_runs,
    };
    let report = Report::new(ScenarioName::Balance, description, conns, duration, runs);
    let section = ("balance", serde_json::to_value(&balance)?);
    let wrote = report.write(&args.out, Some(section), Chart::Skip)?;
    report.print_runs();
    balance.print();
    println!("wrote {wrote}");
    check(&balance.runs)
}

/// Fails when something broke: a client's upload did not all arrive, sluice died.
fn check(runs: &[PolicyRun]) -> Result<()> {
    for r in runs {
        if !r.all_arrived() {
            bail!(
                "{}: {} of {} clients completed, {} of {} bytes verified, {} errors",
                r.policy.as_config(),
                r.completed,
                r.clients,
                r.bytes_verified,
                r.bytes_expected,
                r.errors
            );
        }
        if !r.proxy_ok {
            bail!(
                "{}: sluice ended with {}",
                r.policy.as_config(),
                r.proxy_exit
            );
        }
    }
    Ok(())
}

/// One policy: fresh servers and sluice, the clients on `schedule`, then everything stopped.
async fn run_policy(
    args: &ScenarioArgs,
    wl: &Workload,
    policy: Policy,
    schedule: &[Duration],
) -> Result<(RunReport, PolicyRun)> {
    let servers = start_servers(wl)?;
    let mut config = args.proxy_config();
    config.services = vec![ServiceConfig {
        name: SERVICE.to_string(),
        servers: servers.iter().map(|s| s.addr).collect(),
        balance: policy.as_config(),
    }];
    // Spawned from the main thread (see proxy_process).
    let mut rig = Rig::in_front_of(servers, Proxy::Sluice(config), KernelMemory::Skip)?;
    let label = policy.as_config();
    let (results, peaks) = drive(&mut rig, &wl.clients[0], schedule, label).await;
    let stopped = rig.stop(STOP_GRACE).await?;
    let seen: Vec<_> = (stopped.upstreams.iter())
        .map(|(addr, stats)| (*addr, UpstreamSummary::of(stats)))
        .collect();
    let shares = server_shares(&seen, &peaks, stopped.metrics.as_ref());
    let proxy_ok = stopped.exit.success();
    let clients = clients::summarize(&wl.clients, &results);
    let mut run = RunReport::of(stopped, results.len() as u64, clients);
    run.proxy = label.to_string();
    let balance = policy_run(policy, shares, &results, &run, args.upload, proxy_ok);
    Ok((run, balance))
}

/// The two fast servers and the slow one, in [`SERVERS`] order.
fn start_servers(wl: &Workload) -> Result<Vec<LocalUpstream>> {
    SERVERS
        .iter()
        .map(|&(_, slow)| {
            let spec = UpstreamSpec {
                rate: slow.then_some(SLOW_RATE),
                ..wl.upstream.clone()
            };
            LocalUpstream::start(Arc::new(spec))
        })
        .collect()
}

/// Starts each client at its arrival time and waits for all of them, with a progress
/// line; returns their results in arrival order and each server's highs.
async fn drive(
    rig: &mut Rig,
    spec: &ClientSpec,
    schedule: &[Duration],
    label: &str,
) -> (Vec<ConnResult>, Vec<Peak>) {
    let target = rig.proxy().listen_addr();
    let (stop, live) = (CancellationToken::new(), Arc::new(LiveStats::default()));
    let start = Instant::now();
    let tasks: Vec<_> = schedule
        .iter()
        .map(|&at| {
            let (spec, stop, live) = (spec.clone(), stop.clone(), live.clone());
            tokio::spawn(async move {
                tokio::time::sleep_until(start + at).await;
                upload(target, &spec, &stop, &live).await
            })
        })
        .collect();
    let last = schedule.last().copied().unwrap_or_default();
    let bar = crate::progress::bar(Some(last));
    let mut peaks = vec![Peak::default(); rig.upstreams().len()];
    let mut tick = tokio::time::interval(OBSERVE_EVERY);
    while !tasks.iter().all(|t| t.is_finished()) {
        tick.tick().await;
        if rig.proxy_mut().try_exited().is_some() {
            stop.cancel();
        }
        // A loopback scrape takes about a millisecond; this runtime has other threads.
        let metrics = rig.proxy().scrape().ok();
        let servers = rig.upstreams();
        for (peak, server) in peaks.iter_mut().zip(servers) {
            peak.observe(server, metrics.as_ref());
        }
        let active: Vec<u64> = servers
            .iter()
            .map(|s| s.stats.active.load(Ordering::Relaxed))
            .collect();
        let done = tasks.iter().filter(|t| t.is_finished()).count();
        let msg = format!(
            "{label}: {done}/{} clients done, live per server {active:?}, {} errors",
            tasks.len(),
            live.errors.load(Ordering::Relaxed)
        );
        crate::progress::update(&bar, start.elapsed().min(last), msg);
    }
    bar.finish_and_clear();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.unwrap_or_else(|e| ConnResult {
            error: Some(format!("client task failed: {e}")),
            ..ConnResult::default()
        }));
    }
    (results, peaks)
}

/// One client: upload, half-close, wait for the server's close, within
/// [`COMPLETION_TIMEOUT`].
async fn upload(
    target: std::net::SocketAddr,
    spec: &ClientSpec,
    stop: &CancellationToken,
    live: &LiveStats,
) -> ConnResult {
    let client = clients::run_client(target, spec, stop, clients::DEFAULT_DRAIN, live);
    match tokio::time::timeout(COMPLETION_TIMEOUT, client).await {
        Ok(result) => result,
        Err(_) => {
            live.errors.fetch_add(1, Ordering::Relaxed);
            ConnResult {
                elapsed_secs: COMPLETION_TIMEOUT.as_secs_f64(),
                error: Some(format!(
                    "no close from the server within {COMPLETION_TIMEOUT:?}"
                )),
                ..ConnResult::default()
            }
        }
    }
}

/// Each server's share, from what it saw, and sluice's own count where it has one.
fn server_shares(
    seen: &[(std::net::SocketAddr, UpstreamSummary)],
    peaks: &[Peak],
    metrics: Option<&Metrics>,
) -> Vec<ServerShare> {
    let total: u64 = seen.iter().map(|s| s.1.accepted).sum();
    seen.iter()
        .zip(SERVERS)
        .zip(peaks)
        .map(|(((addr, s), (name, slow)), peak)| {
            let address = addr.to_string();
            let sluice_connects = metrics
                .and_then(|m| {
                    m.get(
                        SLUICE_CONNECTS,
                        &[("service", SERVICE), ("server", &address)],
                    )
                })
                .map(|v| v as u64);
            ServerShare {
                name,
                slow,
                accepted: s.accepted,
                share: s.accepted as f64 / total.max(1) as f64,
                completed: s.completed,
                bytes_verified: s.bytes_verified,
                peak: peak.clone(),
                sluice_connects,
                address,
            }
        })
        .collect()
}

/// A policy's figures from its servers' shares, its clients' results and the run's summary.
fn policy_run(
    policy: Policy,
    servers: Vec<ServerShare>,
    results: &[ConnResult],
    run: &RunReport,
    upload: u64,
    proxy_ok: bool,
) -> PolicyRun {
    let summary = &run.summary;
    let times = results
        .iter()
        .filter(|r| r.completed && r.error.is_none())
        .map(|r| r.elapsed_secs)
        .collect();
    PolicyRun {
        policy,
        completion: Percentiles::of(times),
        clients: results.len(),
        completed: summary.clients.completed,
        errors: summary.errors,
        error_samples: summary.error_samples.clone(),
        bytes_verified: servers.iter().map(|s| s.bytes_verified).sum(),
        bytes_expected: results.len() as u64 * upload,
        proxy_exit: summary.proxy_exit.clone(),
        proxy_ok,
        servers,
    }
}

/// The two targets, when round_robin and least_queued both ran.
fn targets(runs: &[PolicyRun]) -> Vec<Target> {
    let find = |p: Policy| runs.iter().find(|r| r.policy == p);
    let (Some(rr), Some(lq)) = (find(Policy::RoundRobin), find(Policy::LeastQueued)) else {
        return Vec::new();
    };
    let share_limit = rr.slow_share() * SHARE_FACTOR;
    vec![
        Target {
            name: "slow server's share with least_queued",
            measured: lq.slow_share(),
            limit: share_limit,
            unit: "share",
            pass: lq.slow_share() <= share_limit,
        },
        Target {
            name: "p99 completion with least_queued",
            measured: lq.completion.p99,
            limit: rr.completion.p99,
            unit: "seconds",
            pass: lq.completion.p99 < rr.completion.p99,
        },
    ]
}

impl BalanceReport {
    /// A table, a row per policy, then the targets.
    fn print(&self) {
        let mut head = format!("{:<18}", "policy");
        for (name, _) in SERVERS {
            head += &format!(" {name:>14}");
        }
        println!(
            "{head}  {:>9} {:>9} {:>9} {:>9}  errors",
            "p50", "p90", "p99", "max"
        );
        for r in &self.runs {
            let mut row = format!("{:<18}", r.policy.as_config());
            for s in &r.servers {
                row += &format!(" {:>5} ({:>5.1}%)", s.accepted, 100.0 * s.share);
            }
            let c = &r.completion;
            println!(
                "{row}  {:>9} {:>9} {:>9} {:>9}  {}",
                secs(c.p50),
                secs(c.p90),
                secs(c.p99),
                secs(c.max),
                r.errors
            );
        }
        println!(
            "(new connections each server accepted, and the clients' completion time: connect to the server's close)"
        );
        for r in &self.runs {
            r.print_details();
        }
        self.print_targets();
    }

    fn print_targets(&self) {
        let verdict = |t: &Target| if t.pass { "met" } else { "missed" };
        let [share, p99] = self.targets.as_slice() else {
            println!("targets: need both round_robin and least_queued runs");
            return;
        };
        println!(
            "target: slow server's share with least_queued {:.1}% ≤ a third of round_robin's = {:.1}%: {}",
            100.0 * share.measured,
            100.0 * share.limit,
            verdict(share)
        );
        println!(
            "target: p99 completion with least_queued {} < round_robin's {}: {}",
            secs(p99.measured),
            secs(p99.limit),
            verdict(p99)
        );
    }
}

impl PolicyRun {
    /// Per server: sluice's own count of connects, peak live connections (the server's
    /// and sluice's count) and the most sluice held for it.
    fn print_details(&self) {
        let known = |v: Option<u64>, f: fn(u64) -> String| v.map_or("-".to_string(), f);
        let servers: Vec<String> = self
            .servers
            .iter()
            .map(|s| {
                format!(
                    "{} {} connects by sluice's count, peak live {} ({} by sluice's), peak queued {}",
                    s.name,
                    known(s.sluice_connects, |n| n.to_string()),
                    s.peak.live,
                    known(s.peak.sluice_connections, |n| n.to_string()),
                    known(s.peak.sluice_queued, format_bytes),
                )
            })
            .collect();
        println!(
            "  {}: {} of {} clients completed, {} verified",
            self.policy.as_config(),
            self.completed,
            self.clients,
            format_bytes(self.bytes_verified)
        );
        for s in servers {
            println!("    {s}");
        }
    }
}
