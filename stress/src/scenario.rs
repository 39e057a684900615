//! `scenario`: a built-in workload run against a real sluice (and optionally the unbounded baseline), sampled every 100 ms into DIR/report.json and DIR/report.svg.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::UsageError;
use crate::baseline::CAP_EXIT_CODE;
use crate::clients::{self, ClientMode, ClientSpec, ClientsSummary, LiveStats};
use crate::kernel_memory;
use crate::proxy_process::{DIRECTIONS, Metrics, ProxyConfig, ProxyProcess};
use crate::svg;
use crate::units::{KIB, Rate, format_bytes, parse_duration, parse_rate, parse_size};
use crate::upstream::{self, UpstreamMode, UpstreamSpec, UpstreamStats};

/// How often the proxy is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// sluice's gauge of the bytes in its sockets' kernel queues, by direction (newer daemons).
pub const KERNEL_QUEUED: &str = "sluice_kernel_queued_bytes";
/// sluice's gauges of its buffer budget (`buffer.total`; newer daemons).
pub const BUDGET_USED: &str = "sluice_budget_used_bytes";
pub const BUDGET_LIMIT: &str = "sluice_budget_limit_bytes";
/// How long sluice may take to exit after SIGTERM (its generated shutdown_grace is 2 s).
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioName {
    /// A fast source upstream; clients read at 16 KiB/s each with a 4 KiB SO_RCVBUF.
    SlowReaders,
    /// Clients write as fast as they can; the upstream sink reads 64 KiB/s per connection.
    SlowUpstream,
    /// An echo upstream; a third of the clients write fast but read at 16 KiB/s (both
    /// directions fill), a third trickle at 16 KiB/s, a third stream at 1 MiB/s.
    Mixed,
    /// Load: every connection echoes for the whole run (try --conns 8000); 3/4 at 2 KiB/s,
    /// 1/4 fill both bounds. Reports sluice's RSS against conns × both bounds.
    ManyConns,
    /// Soak: --conns slots churn echo connections of 256 KiB for --duration (try 2m); RSS
    /// after the first quarter (warm-up) must not grow.
    Soak,
    /// buffer.total (--total, default 64MiB) shared by --conns (default 8000) slow readers
    /// at 4 KiB/s of a fast source: RSS against the budget, used ≤ limit at every sample, a
    /// new client's ping-pong latency loaded vs unloaded, /metrics latency (default 30s).
    Budget,
    /// One service, three servers: two fast sinks and one reading 64 KiB/s per connection;
    /// --conns clients (default 300) arrive over --duration (default 20s), each uploads
    /// --upload and waits for the server to close. Run once per --policy: each server's
    /// share of new connections and the clients' completion times.
    Balance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Baseline {
    /// A relay that reads everything into an unbounded queue (no backpressure).
    Unbounded,
}

/// `sluice-stress scenario NAME ...`
#[derive(Debug, Clone, Args)]
pub struct ScenarioArgs {
    /// Which built-in workload to run.
    #[arg(value_enum)]
    pub name: ScenarioName,
    /// Concurrent client connections [default: 200; budget: 8000; balance: 300].
    #[arg(long)]
    pub conns: Option<usize>,
    /// How long the clients run [default: 10s; budget: 30s; balance: 20s].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Directory for report.json and report.svg (created if missing).
    #[arg(long, default_value = "target/stress-report")]
    pub out: PathBuf,
    /// Run the same workload a second time through a relay without backpressure.
    #[arg(long, value_enum)]
    pub baseline: Option<Baseline>,
    /// Memory cap of the baseline relay (it exits when its RSS or queue reaches it).
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    pub baseline_cap: u64,
    /// sluice's per-connection bound for each direction.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub bound: u64,
    /// SO_RCVBUF/SO_SNDBUF on all of sluice's sockets (small, so backpressure reaches sluice
    /// quickly instead of being absorbed by the kernel) [default: 16KiB; budget: sluice's
    /// own default].
    #[arg(long, value_parser = parse_size)]
    pub socket_buffer: Option<u64>,
    /// sluice's buffer.total, the buffer memory all connections share [default: none;
    /// budget: 64MiB].
    #[arg(long, value_parser = parse_size)]
    pub total: Option<u64>,
    /// balance: the bytes each client uploads before it half-closes.
    #[arg(long, default_value = "512KiB", value_parser = parse_size)]
    pub upload: u64,
    /// balance: each client's upload pace (e.g. 128KiB/s) [default: as fast as it can].
    #[arg(long, value_parser = parse_rate)]
    pub upload_rate: Option<Rate>,
    /// balance: the seed of the clients' arrival times (the same for every policy).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// balance: a policy to run (repeat for more) [default: round_robin and least_queued].
    #[arg(long, value_enum)]
    pub policy: Vec<crate::balance::Policy>,
}

impl ScenarioArgs {
    /// --conns, or the scenario's default.
    pub fn conns(&self) -> usize {
        self.conns.unwrap_or(match self.name {
            ScenarioName::Budget => 8000,
            ScenarioName::Balance => 300,
            _ => 200,
        })
    }

    /// --duration, or the scenario's default.
    pub fn duration(&self) -> Duration {
        self.duration.unwrap_or(match self.name {
            ScenarioName::Budget => Duration::from_secs(30),
            ScenarioName::Balance => Duration::from_secs(20),
            _ => Duration::from_secs(10),
        })
    }

    /// --socket-buffer, or the scenario's default (`None`: sluice's own).
    pub fn socket_buffer(&self) -> Option<u64> {
        match (self.socket_buffer, self.name) {
            (Some(n), _) => Some(n),
            (None, ScenarioName::Budget) => None,
            (None, _) => Some(16 * KIB),
        }
    }

    /// --total, or the scenario's default (`None`: no total).
    pub fn total(&self) -> Option<u64> {
        match (self.total, self.name) {
            (Some(n), _) => Some(n),
            (None, ScenarioName::Budget) => Some(64 * 1024 * KIB),
            (None, _) => None,
        }
    }

    /// sluice's config for this run, in front of `upstream`.
    pub fn proxy_config(&self, upstream: std::net::SocketAddr) -> ProxyConfig {
        let mut config = ProxyConfig::new(upstream);
        config.client_to_upstream = self.bound;
        config.upstream_to_client = self.bound;
        config.socket_buffer = self.socket_buffer();
        config.total = self.total();
        config
    }
}

/// The upstream and clients of a scenario.
pub struct Workload {
    pub description: String,
    pub upstream: UpstreamSpec,
    pub clients: Vec<ClientSpec>,
}

/// The workload of a scenario [`run`] drives itself; soak, budget and balance have their
/// own runs and workloads.
pub fn workload(name: ScenarioName, conns: usize) -> Workload {
    let slow = Some(Rate(16 * KIB));
    match name {
        ScenarioName::SlowReaders => Workload {
            description: format!(
                "{conns} clients reading at 16 KiB/s (4 KiB SO_RCVBUF) from an upstream writing as fast as it can"
            ),
            upstream: UpstreamSpec {
                mode: UpstreamMode::Source,
                rate: None,
                bytes: None,
                rcvbuf: None,
                sndbuf: None,
            },
            clients: vec![
                ClientSpec {
                    read_rate: slow,
                    rcvbuf: Some(4 * KIB),
                    ..ClientSpec::new(ClientMode::Read)
                };
                conns
            ],
        },
        ScenarioName::SlowUpstream => Workload {
            description: format!(
                "{conns} clients writing as fast as they can into an upstream reading 64 KiB/s per connection"
            ),
            upstream: UpstreamSpec {
                mode: UpstreamMode::Sink,
                rate: Some(Rate(64 * KIB)),
                bytes: None,
                rcvbuf: Some(16 * KIB),
                sndbuf: None,
            },
            clients: vec![
                ClientSpec {
                    sndbuf: Some(16 * KIB),
                    ..ClientSpec::new(ClientMode::Write)
                };
                conns
            ],
        },
        ScenarioName::Mixed => Workload {
            description: format!(
                "{conns} echo clients: 1/3 write fast and read 16 KiB/s, 1/3 write 16 KiB/s, 1/3 write 1 MiB/s"
            ),
            upstream: UpstreamSpec {
                mode: UpstreamMode::Echo,
                rate: None,
                bytes: None,
                rcvbuf: Some(16 * KIB),
                sndbuf: Some(16 * KIB),
            },
            clients: (0..conns)
                .map(|i| match i % 3 {
                    0 => ClientSpec {
                        read_rate: slow,
                        rcvbuf: Some(4 * KIB),
                        sndbuf: Some(16 * KIB),
                        ..ClientSpec::new(ClientMode::Echo)
                    },
                    1 => ClientSpec {
                        write_rate: slow,
                        ..ClientSpec::new(ClientMode::Echo)
                    },
                    _ => ClientSpec {
                        write_rate: Some(Rate(1024 * KIB)),
                        ..ClientSpec::new(ClientMode::Echo)
                    },
                })
                .collect(),
        },
        ScenarioName::ManyConns => crate::load::many_conns_workload(conns),
        ScenarioName::Soak | ScenarioName::Budget | ScenarioName::Balance => {
            unreachable!("run() hands soak, budget and balance to their own modules")
        }
    }
}

/// Which proxy a run drives.
pub enum ProxyKind {
    Sluice(ProxyConfig),
    Unbounded { cap: u64 },
}

/// One sample of the proxy, taken every 100 ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Seconds since sampling began ([`Sampler::started`]).
    pub t: f64,
    pub rss_bytes: u64,
    pub queued_client_to_upstream: u64,
    pub queued_upstream_to_client: u64,
    pub pauses_total: u64,
    pub drains_total: u64,
    pub paused_connections: u64,
    pub connections_active: u64,
    pub bytes_per_sec_client_to_upstream: f64,
    pub bytes_per_sec_upstream_to_client: f64,
    /// Kernel memory in the proxy's TCP sockets, receive plus send queues (`ss` skmem
    /// r + w; see kernel_memory.rs). Absent when `ss` is not installed, and in samples
    /// between readings when there are so many sockets that reading them every 100 ms
    /// would cost more than a fifth of a core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_bytes: Option<u64>,
    /// Of those, the receive queues (skmem r, rmem_alloc).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_rmem_alloc: Option<u64>,
    /// Of those, the send queues (skmem w, wmem_queued).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_wmem_queued: Option<u64>,
    /// sluice's own count of the bytes its sockets' kernel queues hold
    /// (`sluice_kernel_queued_bytes`), when its /metrics has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_queued_client_to_upstream: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_queued_upstream_to_client: Option<u64>,
    /// `sluice_budget_used_bytes` and `sluice_budget_limit_bytes`, when its /metrics has them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_limit_bytes: Option<u64>,
    /// How long this sample's GET /metrics took (connect to last byte), seconds.
    pub scrape_secs: f64,
}

impl Sample {
    pub fn queued(&self) -> u64 {
        self.queued_client_to_upstream + self.queued_upstream_to_client
    }

    /// Both directions of `sluice_kernel_queued_bytes`, when the proxy reports it.
    pub fn kernel_queued(&self) -> Option<u64> {
        Some(self.kernel_queued_client_to_upstream? + self.kernel_queued_upstream_to_client?)
    }
}

/// What the upstream saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UpstreamSummary {
    pub accepted: u64,
    pub completed: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub bytes_verified: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
}

impl UpstreamSummary {
    /// A snapshot of the upstream's counters.
    pub fn of(stats: &UpstreamStats) -> UpstreamSummary {
        UpstreamSummary {
            accepted: stats.accepted.load(Ordering::Relaxed),
            completed: stats.completed.load(Ordering::Relaxed),
            bytes_in: stats.bytes_in.load(Ordering::Relaxed),
            bytes_out: stats.bytes_out.load(Ordering::Relaxed),
            bytes_verified: stats.bytes_verified.load(Ordering::Relaxed),
            errors: stats.errors.load(Ordering::Relaxed),
            error_samples: stats
                .error_samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    pub start_rss_bytes: u64,
    pub peak_rss_bytes: u64,
    /// Peak of the sum over both directions.
    pub peak_queued_bytes: u64,
    pub peak_queued_client_to_upstream: u64,
    pub peak_queued_upstream_to_client: u64,
    /// Highest kernel memory in the proxy's sockets (r + w) of any sample; absent when it
    /// was never read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_kernel_bytes: Option<u64>,
    /// Highest `sluice_kernel_queued_bytes`, both directions, when the proxy reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_kernel_queued_bytes: Option<u64>,
    /// sluice's per-connection bounds (absent for the baseline, which has none).
    pub bound_client_to_upstream: Option<u64>,
    pub bound_upstream_to_client: Option<u64>,
    /// conns × bound, per direction: what queued bytes may never exceed.
    pub queued_limit_client_to_upstream: Option<u64>,
    pub queued_limit_upstream_to_client: Option<u64>,
    pub pauses: u64,
    pub drains: u64,
    pub peak_paused_connections: u64,
    /// Bytes checked against the pattern, by clients and by the upstream sink.
    pub bytes_verified: u64,
    /// Client errors + upstream errors.
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub clients: ClientsSummary,
    pub upstream: UpstreamSummary,
    /// How the proxy ended ("exit status: 0", ...).
    pub proxy_exit: String,
    /// The baseline reached its memory cap and exited.
    pub killed_at_cap: bool,
    pub samples_taken: usize,
    pub sample_errors: usize,
}

impl RunSummary {
    /// A run's figures from its samples and what its clients and upstream saw; `bounds`
    /// are sluice's (client → upstream, upstream → client), `conns` how many connections
    /// ran at once.
    pub fn of(
        samples: &[Sample],
        bounds: Option<(u64, u64)>,
        conns: u64,
        clients: ClientsSummary,
        upstream: UpstreamSummary,
        proxy_exit: String,
        sample_errors: usize,
    ) -> RunSummary {
        let peak = |f: fn(&Sample) -> u64| samples.iter().map(f).max().unwrap_or(0);
        let mut error_samples = clients.error_samples.clone();
        error_samples.extend(upstream.error_samples.iter().cloned());
        RunSummary {
            start_rss_bytes: samples.first().map_or(0, |s| s.rss_bytes),
            peak_rss_bytes: peak(|s| s.rss_bytes),
            peak_queued_bytes: peak(Sample::queued),
            peak_queued_client_to_upstream: peak(|s| s.queued_client_to_upstream),
            peak_queued_upstream_to_client: peak(|s| s.queued_upstream_to_client),
            peak_kernel_bytes: samples.iter().filter_map(|s| s.kernel_bytes).max(),
            peak_kernel_queued_bytes: samples.iter().filter_map(Sample::kernel_queued).max(),
            bound_client_to_upstream: bounds.map(|b| b.0),
            bound_upstream_to_client: bounds.map(|b| b.1),
            queued_limit_client_to_upstream: bounds.map(|b| b.0 * conns),
            queued_limit_upstream_to_client: bounds.map(|b| b.1 * conns),
            pauses: samples.last().map_or(0, |s| s.pauses_total),
            drains: samples.last().map_or(0, |s| s.drains_total),
            peak_paused_connections: peak(|s| s.paused_connections),
            bytes_verified: clients.bytes_verified + upstream.bytes_verified,
            errors: clients.errors as u64 + upstream.errors,
            error_samples: error_samples.into_iter().take(10).collect(),
            clients,
            upstream,
            proxy_exit,
            killed_at_cap: false,
            samples_taken: samples.len(),
            sample_errors,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// "sluice" or "unbounded".
    pub proxy: String,
    pub summary: RunSummary,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: ScenarioName,
    pub description: String,
    pub conns: usize,
    pub duration_secs: f64,
    pub runs: Vec<RunReport>,
}

/// Writes `report` to `out`/report.json, with `section` (its name and value) beside the
/// report's own fields, and `svg` (its chart) to `out`/report.svg; creates `out` if missing.
/// Returns what it wrote, for the closing "wrote ..." line.
pub fn write_report(
    out: &Path,
    report: &Report,
    section: Option<(&str, serde_json::Value)>,
    svg: Option<String>,
) -> Result<String> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let json_path = out.join("report.json");
    let mut json = serde_json::to_value(report)?;
    if let Some((name, value)) = section {
        json[name] = value;
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    let mut wrote = json_path.display().to_string();
    if let Some(svg) = svg {
        let svg_path = out.join("report.svg");
        std::fs::write(&svg_path, svg)
            .with_context(|| format!("cannot write {}", svg_path.display()))?;
        wrote += &format!(" and {}", svg_path.display());
    }
    Ok(wrote)
}

pub async fn run(args: ScenarioArgs) -> Result<()> {
    let (conns, duration) = (args.conns(), args.duration());
    if conns == 0 {
        return Err(UsageError("--conns must be at least 1".into()).into());
    }
    if args.bound == 0 {
        return Err(UsageError("--bound must be more than 0".into()).into());
    }
    // Two descriptors per connection in this process (client and upstream end).
    let nofile = sluice::listener::raise_descriptor_limit();
    if (nofile as usize) < 2 * conns + 64 {
        eprintln!(
            "scenario: warning: RLIMIT_NOFILE is {nofile}, too few for {conns} connections (two descriptors each)"
        );
    }
    match args.name {
        ScenarioName::Soak => return crate::load::soak(&args).await,
        ScenarioName::Budget => return crate::budget::run(&args).await,
        ScenarioName::Balance => return crate::balance::run(&args).await,
        _ => {}
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let wl = workload(args.name, conns);
    eprintln!("scenario {}: {}", scenario_slug(args.name), wl.description);

    let mut runs = Vec::new();
    // Spawned from here (main thread), see proxy_process.
    let upstream_addr_placeholder = "127.0.0.1:0".parse().expect("valid");
    let config = args.proxy_config(upstream_addr_placeholder);
    runs.push(run_once(ProxyKind::Sluice(config), &wl, duration, true).await?);
    if args.baseline == Some(Baseline::Unbounded) {
        runs.push(
            run_once(
                ProxyKind::Unbounded {
                    cap: args.baseline_cap,
                },
                &wl,
                duration,
                true,
            )
            .await?,
        );
    }

    let report = Report {
        scenario: args.name,
        description: wl.description.clone(),
        conns,
        duration_secs: duration.as_secs_f64(),
        runs,
    };
    let wrote = write_report(&args.out, &report, None, Some(render_svg(&report)))?;
    for r in &report.runs {
        print_run(r);
    }
    println!("wrote {wrote}");
    // Every run reports RSS against the bound; many-conns fails when it is passed.
    crate::load::check_bound(&report, args.name == ScenarioName::ManyConns)?;

    let sluice = &report.runs[0].summary;
    let mut problems = Vec::new();
    if sluice.errors > 0 {
        problems.push(format!("{} errors through sluice", sluice.errors));
    }
    for (peak, limit, dir) in [
        (
            sluice.peak_queued_client_to_upstream,
            sluice.queued_limit_client_to_upstream,
            DIRECTIONS[0],
        ),
        (
            sluice.peak_queued_upstream_to_client,
            sluice.queued_limit_upstream_to_client,
            DIRECTIONS[1],
        ),
    ] {
        if let Some(limit) = limit
            && peak > limit
        {
            problems.push(format!(
                "queued {dir} peaked at {peak} bytes, over conns × bound = {limit}"
            ));
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("scenario failed: {}", problems.join("; "));
    }
    Ok(())
}

pub fn print_run(r: &RunReport) {
    let s = &r.summary;
    println!(
        "{:>9}: peak RSS {} (start {}), peak kernel {}, peak queued {}{}, pauses {}, drains {}, verified {}, errors {}{}",
        r.proxy,
        format_bytes(s.peak_rss_bytes),
        format_bytes(s.start_rss_bytes),
        match (s.peak_kernel_bytes, s.peak_kernel_queued_bytes) {
            (Some(k), Some(q)) => format!(
                "{} in sockets ({} queued by its count)",
                format_bytes(k),
                format_bytes(q)
            ),
            (Some(k), None) => format!("{} in sockets", format_bytes(k)),
            (None, _) => "not sampled".to_string(),
        },
        format_bytes(s.peak_queued_bytes),
        match (
            s.queued_limit_client_to_upstream,
            s.queued_limit_upstream_to_client
        ) {
            (Some(a), Some(b)) => format!(" (limit {} each way)", format_bytes(a.max(b))),
            _ => String::new(),
        },
        s.pauses,
        s.drains,
        format_bytes(s.bytes_verified),
        s.errors,
        if s.killed_at_cap {
            " — killed itself at its memory cap"
        } else {
            ""
        },
    );
    for e in s.error_samples.iter().take(3) {
        println!("           error: {e}");
    }
    if s.errors > 3 {
        println!("           ... (all in report.json)");
    }
}

/// Runs one workload against one proxy: start upstream and proxy, sample while the clients
/// run, stop everything, summarize.
pub async fn run_once(
    kind: ProxyKind,
    wl: &Workload,
    duration: Duration,
    show_progress: bool,
) -> Result<RunReport> {
    let up_spec = Arc::new(wl.upstream.clone());
    let up = upstream::LocalUpstream::start(up_spec)?;
    let upstream_addr = up.addr;
    let up_stats = up.stats.clone();

    let (name, bounds, proxy) = match kind {
        ProxyKind::Sluice(mut config) => {
            config.upstream = upstream_addr;
            let bounds = (config.client_to_upstream, config.upstream_to_client);
            ("sluice", Some(bounds), ProxyProcess::spawn_sluice(&config)?)
        }
        ProxyKind::Unbounded { cap } => {
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.arg("unbounded-relay")
                .arg("--upstream")
                .arg(upstream_addr.to_string())
                .arg("--cap")
                .arg(cap.to_string());
            (
                "unbounded",
                None,
                ProxyProcess::spawn(cmd, "unbounded relay", true, None)?,
            )
        }
    };
    let mut proxy = proxy;

    let sampler = Sampler::start(&proxy)?;
    let specs = wl.clients.clone();
    let live = Arc::new(LiveStats::default());
    let stop = CancellationToken::new();
    let runner = tokio::spawn(clients::run_clients(
        proxy.listen_addr(),
        specs.clone(),
        stop.clone(),
        clients::DEFAULT_DRAIN,
        live.clone(),
    ));
    tokio::pin!(runner);
    let bar = if show_progress {
        crate::progress::bar(Some(duration))
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let results = loop {
        tokio::select! {
            r = &mut runner => break r?,
            _ = tick.tick() => {
                if !stop.is_cancelled()
                    && (started.elapsed() >= duration || proxy.try_exited().is_some())
                {
                    stop.cancel();
                }
                let last = sampler.last();
                crate::progress::update(&bar, started.elapsed().min(duration), format!(
                    "{name}: RSS {}, queued {}, {} clients active, {} errors",
                    format_bytes(last.rss_bytes),
                    format_bytes(last.queued()),
                    live.active.load(Ordering::Relaxed),
                    live.errors.load(Ordering::Relaxed),
                ));
            }
        }
    };
    bar.finish_and_clear();
    let (samples, sample_errors) = sampler.finish();
    up.stop().await;
    let exit = proxy.stop(STOP_GRACE)?;
    let killed_at_cap = name == "unbounded" && exit.code() == Some(CAP_EXIT_CODE);

    let client_summary = clients::summarize(&specs, &results);
    let upstream = UpstreamSummary::of(&up_stats);
    let summary = RunSummary {
        killed_at_cap,
        ..RunSummary::of(
            &samples,
            bounds,
            specs.len() as u64,
            client_summary,
            upstream,
            exit.to_string(),
            sample_errors,
        )
    };
    Ok(RunReport {
        proxy: name.to_string(),
        summary,
        samples,
    })
}

/// Samples a proxy every [`SAMPLE_EVERY`] on its own thread, so a busy runtime cannot skew
/// the timing.
pub struct Sampler {
    /// When sampling began: samples' `t` counts from here.
    started: Instant,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    errors: Arc<Mutex<usize>>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling `proxy`, the kernel memory in its sockets included. Fails only
    /// where the kernel memory must be read and cannot be (`ss` missing under CI).
    pub fn start(proxy: &ProxyProcess) -> Result<Self> {
        Self::start_with(proxy, true)
    }

    /// Starts sampling `proxy`; with `read_kernel` false, `ss` is never run (it costs a
    /// fifth of a core with thousands of sockets, which a latency measurement would feel).
    pub fn start_with(proxy: &ProxyProcess, read_kernel: bool) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(0));
        let pid = proxy.pid();
        let metrics = proxy.metrics_addr();
        let mut kernel = (read_kernel && kernel_memory::ss_available()?)
            .then(|| kernel_memory::Reader::new(vec![pid], SAMPLE_EVERY));
        let started = Instant::now();
        let thread = {
            let (stop, samples, errors) = (stop.clone(), samples.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut prev: Option<(Instant, [f64; 2])> = None;
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let asked = Instant::now();
                    let text = metrics.map(|addr| crate::proxy_process::http_get(addr, "/metrics"));
                    // The request alone: connect, send, read to the last byte.
                    let scrape_secs = asked.elapsed().as_secs_f64();
                    let scraped = match text {
                        Some(text) => text.map(|t| Metrics::parse(&t)),
                        None => Ok(Metrics::default()),
                    };
                    // Read right after the scrape, so memory and queue describe the same moment.
                    let Ok(rss) = crate::proxy_process::rss_of(pid) else {
                        // The process is gone (the baseline at its cap); nothing more to see.
                        break;
                    };
                    let in_sockets = match kernel.as_mut().and_then(|k| k.poll(false)) {
                        Some(Ok(reading)) => Some(reading),
                        Some(Err(_)) => {
                            *errors.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                            None
                        }
                        None => None,
                    };
                    match scraped {
                        Ok(m) => {
                            let now = Instant::now();
                            let bytes = DIRECTIONS.map(|d| m.direction("sluice_bytes_total", d));
                            let rates = match prev {
                                Some((t0, b0)) => {
                                    let dt = now.duration_since(t0).as_secs_f64().max(1e-3);
                                    [(bytes[0] - b0[0]) / dt, (bytes[1] - b0[1]) / dt]
                                }
                                None => [0.0, 0.0],
                            };
                            prev = Some((now, bytes));
                            let s = Sample {
                                t: started.elapsed().as_secs_f64(),
                                rss_bytes: rss,
                                queued_client_to_upstream: m
                                    .direction("sluice_queued_bytes", DIRECTIONS[0])
                                    as u64,
                                queued_upstream_to_client: m
                                    .direction("sluice_queued_bytes", DIRECTIONS[1])
                                    as u64,
                                pauses_total: m.sum("sluice_pauses_total") as u64,
                                drains_total: m.sum("sluice_drains_total") as u64,
                                paused_connections: m.sum("sluice_paused_connections") as u64,
                                connections_active: m.sum("sluice_connections_active") as u64,
                                bytes_per_sec_client_to_upstream: rates[0],
                                bytes_per_sec_upstream_to_client: rates[1],
                                kernel_bytes: in_sockets.map(|k| k.bytes()),
                                kernel_rmem_alloc: in_sockets.map(|k| k.rmem_alloc),
                                kernel_wmem_queued: in_sockets.map(|k| k.wmem_queued),
                                kernel_queued_client_to_upstream: m
                                    .get(KERNEL_QUEUED, &[("direction", DIRECTIONS[0])])
                                    .map(|v| v as u64),
                                kernel_queued_upstream_to_client: m
                                    .get(KERNEL_QUEUED, &[("direction", DIRECTIONS[1])])
                                    .map(|v| v as u64),
                                budget_used_bytes: m.get(BUDGET_USED, &[]).map(|v| v as u64),
                                budget_limit_bytes: m.get(BUDGET_LIMIT, &[]).map(|v| v as u64),
                                scrape_secs,
                            };
                            samples.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                        }
                        Err(_) => *errors.lock().unwrap_or_else(|e| e.into_inner()) += 1,
                    }
                    next += SAMPLE_EVERY;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
            })
        };
        Ok(Sampler {
            started,
            stop,
            samples,
            errors,
            thread,
        })
    }

    /// When sampling began; samples' `t` is seconds since then.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The latest sample (zeros before the first).
    pub fn last(&self) -> Sample {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .cloned()
            .unwrap_or_default()
    }

    /// Stops sampling; returns the samples and how many scrapes failed.
    pub fn finish(self) -> (Vec<Sample>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let samples = std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()));
        let errors = *self.errors.lock().unwrap_or_else(|e| e.into_inner());
        (samples, errors)
    }
}

const COLORS: [&str; 2] = ["#1f77b4", "#d62728"];

fn run_label(r: &RunReport) -> String {
    match r.proxy.as_str() {
        "sluice" => format!(
            "sluice ({} bound)",
            format_bytes(r.summary.bound_upstream_to_client.unwrap_or(0))
        ),
        _ => "unbounded relay".to_string(),
    }
}

/// The chart: RSS, queued bytes and (when read) the kernel memory in the proxy's sockets over
/// time, a line per run.
pub fn render_svg(report: &Report) -> String {
    // A line per run through the samples that have the value.
    let series = |pick: fn(&Sample) -> Option<u64>| -> Vec<svg::Series> {
        report
            .runs
            .iter()
            .zip(COLORS)
            .map(|(r, color)| svg::Series {
                label: run_label(r),
                color,
                points: r
                    .samples
                    .iter()
                    .filter_map(|s| Some((s.t, pick(s)? as f64)))
                    .collect(),
                end_note: r
                    .summary
                    .killed_at_cap
                    .then(|| "killed at its memory cap".to_string()),
            })
            .collect()
    };
    let sluice = &report.runs[0].summary;
    // With buffer.total in force, it is the tighter limit on queued bytes.
    let total = report.runs[0]
        .samples
        .iter()
        .filter_map(|s| s.budget_limit_bytes)
        .filter(|&l| l > 0)
        .max();
    let limit = match (
        total,
        sluice.queued_limit_client_to_upstream,
        sluice.queued_limit_upstream_to_client,
    ) {
        (Some(total), _, _) => Some((
            total as f64,
            (
                "sluice limit".to_string(),
                format!("buffer.total = {}", format_bytes(total)),
            ),
        )),
        (None, Some(a), Some(b)) => Some((
            (a + b) as f64,
            (
                "sluice limit".to_string(),
                format!("conns × bounds = {}", format_bytes(a + b)),
            ),
        )),
        _ => None,
    };
    let mut panels = vec![
        svg::Panel {
            title: "Proxy memory (RSS)".to_string(),
            series: series(|s| Some(s.rss_bytes)),
            limit: None,
        },
        svg::Panel {
            title: "Queued bytes (all connections, both directions)".to_string(),
            series: series(|s| Some(s.queued())),
            limit,
        },
    ];
    if report
        .runs
        .iter()
        .any(|r| r.samples.iter().any(|s| s.kernel_bytes.is_some()))
    {
        panels.push(svg::Panel {
            title: "Kernel memory in the proxy's sockets (ss skmem r + w)".to_string(),
            series: series(|s| s.kernel_bytes),
            limit: None,
        });
    }
    svg::render(
        &format!("sluice-stress scenario {}", scenario_slug(report.scenario)),
        &report.description,
        &panels,
    )
}

fn scenario_slug(name: ScenarioName) -> String {
    name.to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}
