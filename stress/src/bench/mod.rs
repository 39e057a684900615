//! `sluice-stress bench`: sluice measured side by side with a direct connection, tokio's
//! copy_bidirectional, HAProxy and nginx, in one run, on this machine.
//!
//! # Layout
//! - `subjects.rs`: what is measured; generated configs, start-up on free loopback ports,
//!   process-tree RSS, stopping.
//! - `copy_bidirectional.rs`: tokio's copy_bidirectional as a relay, served from a child
//!   process (hidden flag); not the daemon's `relay.rs`.
//! - `upstreams.rs`: in-process sink, echo and source upstreams.
//! - `traffic.rs`: the traffic: streams, ping-pong, connection churn, HTTP requests (built-in
//!   client), idle conns, slow readers; each speed case reads the subject's CPU time.
//! - `iperf.rs`: iperf3 through the proxy for the one-stream figure.
//! - `http.rs`: wrk through the proxy to a real nginx for the request/response figure.
//! - `cpu.rs`: CPU seconds of a subject's process tree from `/proc/PID/stat`.
//! - `memory.rs`: memory per connection on a fresh process, and what a slow reader costs
//!   (RSS plus the kernel memory of the subject's sockets, read by `crate::kernel_memory`).
//! - `report.rs`: medians, the Markdown table, the JSON.
//!
//! Speed tests start each subject afresh for every measurement and rotate the order of the
//! subjects every round, so slow drift of a shared machine spreads over all of them; the
//! figures quoted are medians of the rounds.

mod copy_bidirectional;
pub mod cpu;
mod http;
mod iperf;
mod memory;
mod report;
mod subjects;
mod traffic;
mod upstreams;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::clients::nearest_rank;
use crate::kernel_memory;
use cpu::CpuMeter;
use memory::{MemoryFigure, SlowReaders};
use report::{Machine, Report, Series, Settings, SubjectResult};
use subjects::{Profile, Subject, SubjectKind};
use upstreams::{Mode, Upstream};

/// Command-line arguments of `sluice-stress bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Shrink every measurement so the whole run takes seconds (for tests; figures meaningless).
    #[arg(long)]
    pub quick: bool,

    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// The sluice binary to measure [default: `sluice` next to this program, then PATH].
    #[arg(long, env = "SLUICE_BIN", value_name = "PATH")]
    pub sluice: Option<PathBuf>,

    /// Measure only these subjects (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "SUBJECTS")]
    pub only: Vec<SubjectKind>,

    /// Rounds of every speed measurement; the median is quoted [default: 3, 1 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeats: Option<u32>,

    /// Use sluice-stress's own stream for the one-stream figure even when iperf3 is installed.
    #[arg(long)]
    pub no_iperf3: bool,

    /// Use sluice-stress's own HTTP client and upstream for the request/response figure even
    /// when wrk and nginx are installed.
    #[arg(long)]
    pub no_wrk: bool,

    /// Internal: serve tokio's copy_bidirectional in front of UPSTREAM (a bench subject).
    #[arg(long, hide = true, value_name = "UPSTREAM")]
    pub serve_copy_bidirectional: Option<SocketAddr>,

    /// Internal: per-direction buffer of the copy_bidirectional relay, bytes.
    #[arg(long, hide = true, default_value_t = copy_bidirectional::TOKIO_DEFAULT_BUFFER)]
    pub relay_buffer: usize,
}

/// Slow readers read this many bytes per second each (the figure; the slow-readers
/// scenario's clients read 16 KiB/s).
const SLOW_RATE: f64 = 32.0 * 1024.0;

/// Slow readers' SO_RCVBUF, so the kernel does not hide the proxy's buffering.
const SLOW_RCVBUF: u32 = 4096;

/// How big and long each measurement is.
struct Plan {
    repeats: usize,
    /// `Some(seconds)` when iperf3 gives the one-stream figure.
    iperf_seconds: Option<u32>,
    warmup: Duration,
    window: Duration,
    latency: Duration,
    connect: Duration,
    /// The request/response window (wrk counts whole seconds).
    http: Duration,
    idle_conns: usize,
    idle_hold: Duration,
    slow_readers: usize,
    slow_duration: Duration,
}

impl Plan {
    fn new(args: &BenchArgs) -> Plan {
        let use_iperf3 = !args.quick && !args.no_iperf3;
        let iperf_seconds = if use_iperf3 && iperf::version().is_some() {
            Some(3)
        } else {
            None
        };
        if args.quick {
            Plan {
                repeats: args.repeats.unwrap_or(1) as usize,
                iperf_seconds,
                warmup: Duration::from_millis(50),
                window: Duration::from_millis(200),
                latency: Duration::from_millis(200),
                connect: Duration::from_millis(200),
                http: Duration::from_secs(1),
                idle_conns: 100,
                idle_hold: Duration::from_millis(100),
                slow_readers: 20,
                slow_duration: Duration::from_millis(400),
            }
        } else {
            Plan {
                repeats: args.repeats.unwrap_or(3) as usize,
                iperf_seconds,
                warmup: Duration::from_millis(500),
                window: Duration::from_secs(3),
                latency: Duration::from_secs(2),
                connect: Duration::from_secs(2),
                http: Duration::from_secs(3),
                idle_conns: 2000,
                idle_hold: Duration::from_millis(500),
                slow_readers: 200,
                slow_duration: Duration::from_secs(4),
            }
        }
    }

    fn slow_readers(&self) -> SlowReaders {
        SlowReaders {
            conns: self.slow_readers,
            rcvbuf: SLOW_RCVBUF,
            rate: SLOW_RATE,
            duration: self.slow_duration,
        }
    }

    fn http_seconds(&self) -> u32 {
        self.http.as_secs().max(1) as u32
    }
}

/// Where the request/response figure comes from.
enum HttpCase {
    /// wrk against a real nginx serving the file.
    Wrk(http::NginxUpstream),
    /// The built-in client against the built-in upstream.
    Own,
}

impl HttpCase {
    /// wrk and nginx when both are there (and not refused); the built-in pair otherwise, with
    /// the reason in the report.
    fn choose(args: &BenchArgs) -> (HttpCase, String) {
        let own = "sluice-stress's own client and HTTP upstream";
        if args.no_wrk {
            return (HttpCase::Own, format!("{own} (--no-wrk)"));
        }
        let Some(version) = http::wrk_version() else {
            return (HttpCase::Own, format!("{own} (wrk is not installed)"));
        };
        match http::NginxUpstream::start() {
            Ok(upstream) => (
                HttpCase::Wrk(upstream),
                format!(
                    "{version} (`wrk -t{} -c{} --latency`) against nginx (HTTP, worker_processes \
                     {}, keep-alive, access_log off) serving a 1 KiB file",
                    http::WRK_THREADS,
                    traffic::HTTP_CONNS,
                    http::NGINX_WORKERS
                ),
            ),
            Err(e) => {
                eprintln!("the HTTP case runs without wrk: {e:#}");
                (HttpCase::Own, format!("{own} (nginx: {e:#})"))
            }
        }
    }
}

/// Run `sluice-stress bench` (or, with the hidden flag, the copy_bidirectional relay).
pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(upstream) = args.serve_copy_bidirectional {
        return copy_bidirectional::serve(upstream, args.relay_buffer);
    }
    // A runtime of our own on a thread of our own: this works whether or not the caller's
    // main already runs inside a tokio runtime. Two workers, like every subject.
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("building the runtime")?
            .block_on(bench(args))
    })
    .join()
    .map_err(|_| anyhow!("the benchmark thread panicked"))?
}

async fn bench(args: BenchArgs) -> Result<()> {
    let machine = Machine::here();
    let plan = Plan::new(&args);
    let (subjects, skipped) = discover(&args)?;
    let iperf_server = match plan.iperf_seconds {
        Some(_) => Some(iperf::Server::start()?),
        None => None,
    };
    let (http_case, http_tool) = tokio::task::block_in_place(|| HttpCase::choose(&args));
    let read_kernel = kernel_memory::ss_available()?;

    let mut results: Vec<SubjectResult> = subjects
        .iter()
        .map(|s| SubjectResult {
            id: s.kind.id(),
            name: s.label(),
            version: s.version.clone(),
            config: s.config_note(),
            ..SubjectResult::default()
        })
        .collect();
    for (round, i) in rotation(plan.repeats, subjects.len()) {
        let (subject, result) = (&subjects[i], &mut results[i]);
        let tag = format!("[{}/{}] {}", round + 1, plan.repeats, subject.kind.id());
        let iperf = iperf_server.as_ref();
        speed_round(subject, result, &plan, iperf, &http_case, &tag).await;
    }
    memory_rounds(&subjects, &mut results, &plan, read_kernel).await;
    drop(iperf_server);
    let http_seconds = match http_case {
        HttpCase::Wrk(_) => f64::from(plan.http_seconds()),
        HttpCase::Own => plan.http.as_secs_f64(),
    };
    tokio::task::block_in_place(|| drop(http_case));

    let report = Report {
        command: command_line(),
        quick: args.quick,
        machine: Machine {
            load_after: report::load_average(),
            ..machine
        },
        settings: settings(&args, &plan, http_tool, http_seconds, read_kernel),
        subjects: results,
        skipped,
    };
    publish(&report, args.json.as_deref())
}

/// The subjects to measure and those skipped (said on stderr), with a note when this is
/// a debug build.
fn discover(args: &BenchArgs) -> Result<(Vec<Subject>, Vec<subjects::Skipped>)> {
    let (subjects, skipped) = subjects::discover(args.sluice.as_deref(), &args.only)?;
    if subjects.is_empty() {
        bail!("no subject to measure");
    }
    if !args.quick
        && std::env::current_exe()?
            .components()
            .any(|c| c.as_os_str() == "debug")
    {
        eprintln!(
            "note: this is a debug build; build with `cargo build --release` for real figures"
        );
    }
    for s in &skipped {
        eprintln!("skipping {}: {}", s.id, s.reason);
    }
    Ok((subjects, skipped))
}

/// Every round's subjects in turn, the first one moving on each round, so slow drift of a
/// shared machine spreads over all of them: (round, subject index).
fn rotation(repeats: usize, subjects: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..repeats).flat_map(move |round| (0..subjects).map(move |k| (round, (k + round) % subjects)))
}

/// Memory: a fresh process per measurement, the same rotation, medians again; every
/// round of one test before the next. The last is what a slow reader costs the machine:
/// the same readers, every subject as shipped, its RSS and the kernel memory in its
/// sockets.
async fn memory_rounds(
    subjects: &[Subject],
    results: &mut [SubjectResult],
    plan: &Plan,
    read_kernel: bool,
) {
    for test in [
        MemoryTest::Idle,
        MemoryTest::SlowReader,
        MemoryTest::SlowReaderCost,
    ] {
        for (round, i) in rotation(plan.repeats, subjects.len()) {
            let (subject, result) = (&subjects[i], &mut results[i]);
            if !subject.kind.has_process() {
                continue;
            }
            let tag = format!("[{}/{}] {}", round + 1, plan.repeats, subject.kind.id());
            let measured = test.measure(subject, plan, read_kernel).await;
            record_memory(result, &tag, test, measured);
        }
    }
    for result in results {
        result.slow_reader_cost = report::median_run(&result.slow_reader_cost_runs);
    }
}

/// This command line, as run.
fn command_line() -> String {
    std::env::args()
        .enumerate()
        .map(|(i, a)| if i == 0 { "sluice-stress".into() } else { a })
        .collect::<Vec<_>>()
        .join(" ")
}

/// How the run was set up, for the report.
fn settings(
    args: &BenchArgs,
    plan: &Plan,
    http_tool: String,
    http_seconds: f64,
    read_kernel: bool,
) -> Settings {
    let throughput_1_tool = match (plan.iperf_seconds, iperf::version()) {
        (Some(secs), Some(version)) => {
            format!("{version} (`iperf3 -c -t {secs}`)")
        }
        _ if args.quick => "sluice-stress (--quick does not run iperf3)".into(),
        _ if args.no_iperf3 => "sluice-stress (--no-iperf3)".into(),
        _ => "sluice-stress (iperf3 is not installed)".into(),
    };
    let kernel_memory_tool = if read_kernel {
        format!(
            "`ss {}` ({}): skmem r + w of the sockets in the subject's /proc/PID/fd",
            kernel_memory::SS_ARGS.join(" "),
            kernel_memory::ss_version().unwrap_or_else(|| "ss".into())
        )
    } else {
        "not measured: ss (iproute2) is not installed".into()
    };
    Settings {
        repeats: plan.repeats,
        throughput_1_tool,
        throughput_seconds: plan
            .iperf_seconds
            .map_or(plan.window.as_secs_f64(), f64::from),
        latency_seconds: plan.latency.as_secs_f64(),
        connect_seconds: plan.connect.as_secs_f64(),
        connect_concurrency: traffic::CONNECT_CONCURRENCY,
        http_tool,
        http_seconds,
        http_conns: traffic::HTTP_CONNS,
        clock_ticks_per_sec: cpu::ticks_per_second(),
        idle_conns: plan.idle_conns,
        slow_readers: plan.slow_readers,
        slow_reader_rate_bytes_per_sec: SLOW_RATE,
        slow_reader_rcvbuf_bytes: SLOW_RCVBUF,
        slow_reader_seconds: plan.slow_duration.as_secs_f64(),
        memory_buffer_bytes: subjects::MEMORY_BUFFER,
        kernel_memory_tool,
    }
}

/// Prints the table, writes the JSON when asked; fails when a measurement did.
fn publish(report: &Report, json: Option<&std::path::Path>) -> Result<()> {
    print!("{}", report.markdown());
    if let Some(path) = json {
        let json = serde_json::to_string_pretty(report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    let errors: usize = report.subjects.iter().map(|r| r.errors.len()).sum();
    if errors > 0 {
        bail!("{errors} measurement(s) failed; see the errors under the table");
    }
    Ok(())
}

fn failed(result: &mut SubjectResult, what: &str, error: &anyhow::Error) {
    eprintln!("{}: {what} failed: {error:#}", result.id);
    result.errors.push(format!("{what}: {error:#}"));
}

/// Start `subject` in front of `upstream`, run `measure` against its address with a reader of
/// its CPU time, stop it.
async fn with_subject<F, Fut, T>(subject: &Subject, upstream: SocketAddr, measure: F) -> Result<T>
where
    F: FnOnce(SocketAddr, CpuMeter) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut running = tokio::task::block_in_place(|| subject.launch(upstream, Profile::Defaults))?;
    let outcome = measure(running.addr, running.cpu_meter()).await;
    tokio::task::block_in_place(|| running.stop());
    outcome
}

/// Gbit/s, and CPU seconds per GB when the subject has a process.
struct Stream {
    gbps: f64,
    cpu_per_gb: Option<f64>,
}

async fn own_streams(subject: &Subject, streams: usize, plan: &Plan) -> Result<Stream> {
    let sink = Upstream::start(Mode::Sink).await?;
    with_subject(subject, sink.addr, |target, meter| async move {
        let s =
            traffic::throughput(target, &sink, streams, plan.warmup, plan.window, &meter).await?;
        Ok(Stream {
            gbps: s.gbps,
            cpu_per_gb: cpu::cost(&meter, s.cpu_seconds, s.bytes as f64, 1e9),
        })
    })
    .await
}

async fn iperf_stream(subject: &Subject, server: &iperf::Server, secs: u32) -> Result<Stream> {
    with_subject(subject, server.addr, |target, meter| async move {
        let before = meter.seconds();
        let t = iperf::client(target, secs).await?;
        Ok(Stream {
            gbps: t.gbps,
            cpu_per_gb: cpu::cost(&meter, meter.seconds() - before, t.bytes as f64, 1e9),
        })
    })
    .await
}

async fn http_requests(
    subject: &Subject,
    case: &HttpCase,
    plan: &Plan,
) -> Result<traffic::Requests> {
    match case {
        HttpCase::Wrk(nginx) => {
            let secs = plan.http_seconds();
            with_subject(subject, nginx.addr, |target, _| http::wrk(target, secs)).await
        }
        HttpCase::Own => {
            let upstream = Upstream::start(Mode::Http).await?;
            with_subject(subject, upstream.addr, |target, _| {
                traffic::http_requests(target, plan.http)
            })
            .await
        }
    }
}

/// Record a CPU cost: a number when measured, nothing for a subject without a process.
fn record_cost(result: &mut SubjectResult, tag: &str, what: &str, slot: Slot, cost: Option<f64>) {
    if let Some(cost) = cost {
        record(result, tag, what, slot, Ok(cost));
    }
}

fn record(result: &mut SubjectResult, tag: &str, what: &str, slot: Slot, value: Result<f64>) {
    match value {
        Ok(v) => {
            eprintln!("{tag}: {what} {v:.2}");
            slot.get(result).get_or_insert_with(Series::default).push(v);
        }
        Err(e) => failed(result, what, &e),
    }
}

#[derive(Clone, Copy)]
enum MemoryTest {
    Idle,
    SlowReader,
    /// Slow readers at the shipped defaults, RSS and kernel; the figure quoted is the run
    /// with the median total, chosen once every round is in.
    SlowReaderCost,
}

impl MemoryTest {
    /// Measures `subject` on a fresh process.
    async fn measure(
        self,
        subject: &Subject,
        plan: &Plan,
        read_kernel: bool,
    ) -> Result<MemoryFigure> {
        let readers = plan.slow_readers();
        match self {
            MemoryTest::Idle => memory::idle(subject, plan.idle_conns, plan.idle_hold).await,
            MemoryTest::SlowReader => {
                memory::slow_readers(subject, Profile::Memory, readers, read_kernel).await
            }
            MemoryTest::SlowReaderCost => {
                memory::slow_readers(subject, Profile::Shipped, readers, read_kernel).await
            }
        }
    }

    /// What the figure is, in progress lines and failures.
    fn what(self) -> &'static str {
        match self {
            MemoryTest::Idle => "idle KiB/conn",
            MemoryTest::SlowReader => "slow reader KiB/conn",
            MemoryTest::SlowReaderCost => "slow reader cost, RSS KiB/conn",
        }
    }
}

fn record_memory(
    result: &mut SubjectResult,
    tag: &str,
    test: MemoryTest,
    measured: Result<MemoryFigure>,
) {
    let what = test.what();
    match measured {
        Ok(m) => {
            match &m.kernel {
                Some(kernel) => eprintln!(
                    "{tag}: {what} {:.2}, kernel KiB/conn {:.2}",
                    m.kib_per_conn, kernel.kib_per_conn
                ),
                None => eprintln!("{tag}: {what} {:.2}", m.kib_per_conn),
            }
            let (series, runs) = match test {
                MemoryTest::Idle => (&mut result.idle_kib_per_conn, &mut result.idle_runs),
                MemoryTest::SlowReader => (
                    &mut result.slow_reader_kib_per_conn,
                    &mut result.slow_reader_runs,
                ),
                MemoryTest::SlowReaderCost => {
                    result.slow_reader_cost_runs.push(m);
                    return;
                }
            };
            series
                .get_or_insert_with(Series::default)
                .push(m.kib_per_conn);
            runs.push(m);
        }
        Err(e) => failed(result, what, &e),
    }
}

/// Which figure of a `SubjectResult` a measurement fills.
#[derive(Clone, Copy)]
enum Slot {
    Throughput1,
    Throughput8,
    Latency1P50,
    Latency1P99,
    Latency64P50,
    Latency64P99,
    ConnectRate,
    Cpu1Stream,
    Cpu64Conns,
    CpuConnect,
    HttpRate,
    HttpP50,
    HttpP99,
}

impl Slot {
    fn get(self, r: &mut SubjectResult) -> &mut Option<Series> {
        match self {
            Slot::Throughput1 => &mut r.throughput_1_gbps,
            Slot::Throughput8 => &mut r.throughput_8_gbps,
            Slot::Latency1P50 => &mut r.latency_1_p50_us,
            Slot::Latency1P99 => &mut r.latency_1_p99_us,
            Slot::Latency64P50 => &mut r.latency_64_p50_us,
            Slot::Latency64P99 => &mut r.latency_64_p99_us,
            Slot::ConnectRate => &mut r.connections_per_sec,
            Slot::Cpu1Stream => &mut r.cpu_s_per_gb_1_stream,
            Slot::Cpu64Conns => &mut r.cpu_s_per_100k_round_trips_64_conns,
            Slot::CpuConnect => &mut r.cpu_s_per_10k_conns,
            Slot::HttpRate => &mut r.http_requests_per_sec,
            Slot::HttpP50 => &mut r.http_p50_us,
            Slot::HttpP99 => &mut r.http_p99_us,
        }
    }
}

/// One round of every speed measurement for one subject, each on a freshly started process.
async fn speed_round(
    subject: &Subject,
    result: &mut SubjectResult,
    plan: &Plan,
    iperf_server: Option<&iperf::Server>,
    http_case: &HttpCase,
    tag: &str,
) {
    one_stream_round(subject, result, plan, iperf_server, tag).await;
    let eight = own_streams(subject, 8, plan).await.map(|s| s.gbps);
    record(result, tag, "8 streams Gbit/s", Slot::Throughput8, eight);
    latency_round(subject, result, plan, tag).await;
    http_round(subject, result, plan, http_case, tag).await;
    churn_round(subject, result, plan, tag).await;
}

/// One stream's Gbit/s (iperf3 when there) and its CPU cost.
async fn one_stream_round(
    subject: &Subject,
    result: &mut SubjectResult,
    plan: &Plan,
    iperf_server: Option<&iperf::Server>,
    tag: &str,
) {
    let one = match (iperf_server, plan.iperf_seconds) {
        (Some(server), Some(secs)) => iperf_stream(subject, server, secs).await,
        _ => own_streams(subject, 1, plan).await,
    };
    match one {
        Ok(one) => {
            record(
                result,
                tag,
                "1 stream Gbit/s",
                Slot::Throughput1,
                Ok(one.gbps),
            );
            let what = "1 stream CPU s/GB";
            record_cost(result, tag, what, Slot::Cpu1Stream, one.cpu_per_gb);
        }
        Err(e) => failed(result, "1 stream Gbit/s", &e),
    }
}

/// Ping-pong round-trip times over 1 and 64 connections, and the CPU cost of the latter.
async fn latency_round(subject: &Subject, result: &mut SubjectResult, plan: &Plan, tag: &str) {
    for (conns, p50, p99) in [
        (1, Slot::Latency1P50, Slot::Latency1P99),
        (64, Slot::Latency64P50, Slot::Latency64P99),
    ] {
        let measured = async {
            let echo = Upstream::start(Mode::Echo).await?;
            with_subject(subject, echo.addr, |target, meter| async move {
                let pings = traffic::latency(target, conns, plan.latency, &meter).await?;
                let cost = cpu::cost(&meter, pings.cpu_seconds, pings.round_trips as f64, 1e5);
                Ok((pings.samples, cost))
            })
            .await
        }
        .await;
        let what = format!("RTT {conns} conn(s) p50 µs");
        match measured {
            Ok((samples, cost)) => {
                let q99 = nearest_rank(&samples, 0.99);
                record(result, tag, &what, p50, Ok(nearest_rank(&samples, 0.5)));
                record(result, tag, "      p99 µs", p99, Ok(q99));
                if conns == 64 {
                    let what = "      CPU s/100k round trips";
                    record_cost(result, tag, what, Slot::Cpu64Conns, cost);
                }
            }
            Err(e) => failed(result, &what, &e),
        }
    }
}

/// HTTP keep-alive requests per second and their latency.
async fn http_round(
    subject: &Subject,
    result: &mut SubjectResult,
    plan: &Plan,
    http_case: &HttpCase,
    tag: &str,
) {
    match http_requests(subject, http_case, plan).await {
        Ok(r) => {
            record(result, tag, "HTTP req/s", Slot::HttpRate, Ok(r.per_sec));
            record(result, tag, "     p50 µs", Slot::HttpP50, Ok(r.p50_us));
            record(result, tag, "     p99 µs", Slot::HttpP99, Ok(r.p99_us));
        }
        Err(e) => failed(result, "HTTP req/s", &e),
    }
}

/// Connections per second, and the CPU cost of each.
async fn churn_round(subject: &Subject, result: &mut SubjectResult, plan: &Plan, tag: &str) {
    let churn = async {
        let greeter = Upstream::start(Mode::Greet).await?;
        with_subject(subject, greeter.addr, |target, meter| async move {
            let churn = traffic::connect_rate(target, plan.connect, &meter).await?;
            let cost = cpu::cost(&meter, churn.cpu_seconds, churn.conns as f64, 1e4);
            Ok((churn.per_sec, cost))
        })
        .await
    }
    .await;
    match churn {
        Ok((per_sec, cost)) => {
            record(result, tag, "conn/s", Slot::ConnectRate, Ok(per_sec));
            record_cost(result, tag, "CPU s/10k conns", Slot::CpuConnect, cost);
        }
        Err(e) => failed(result, "conn/s", &e),
    }
}
