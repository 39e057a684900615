//! sluice-stress: stand-in upstreams and clients, scenarios that watch a real sluice under a speed mismatch, and the demo.
//!
//! # Layout
//! - `pattern.rs`, `units.rs`, `pacing.rs`: the verifiable byte stream; sizes, rates and
//!   durations; the token bucket. All three live in the test kit (sluice-testkit), named here.
//! - `upstream.rs`: `upstream`, the command line over the kit's stand-in upstreams (source /
//!   sink / echo, or each connection's first line chooses) and its faults (`--fault`).
//! - `chaos.rs`: the kit's faults (resets, early closes, stalls, slow closes, refusals,
//!   blackholes, trickles), named here.
//! - `clients.rs`: `clients`, N concurrent verifying clients.
//! - `proxy_process.rs`: a proxy as a child process (the kit's `ChildProcess`: ready by
//!   `NOTIFY_SOCKET`, RSS, /metrics, SIGTERM) and the sluice config the tool generates.
//! - `kernel_memory.rs`: the kernel memory in a process's TCP sockets (`ss`'s skmem), for
//!   `bench` and the scenarios' samples.
//! - `baseline.rs`: `unbounded-relay`, the relay without backpressure sluice is compared with.
//! - `bench/`: `bench`, sluice side by side with a direct connection, copy_bidirectional,
//!   HAProxy and nginx.
//! - `proxy_sampler.rs`: a proxy sampled every 100 ms (RSS, /metrics, kernel socket memory).
//! - `rig.rs`: the run rig demo and the scenarios share: upstream → proxy → sampler →
//!   clients → progress → stop.
//! - `scenario/`: `scenario`, built-in workloads sampled into report.json and report.svg
//!   (steady workloads, soak, budget, balance; see its own layout).
//! - `svg.rs`: hand-written SVG line charts for report.svg.
//! - `demo.rs`: `demo`, the README's first command.
//! - `progress.rs`: progress bars, and the watch over running clients (deadline, Ctrl-C).
//! - `top.rs`: `top`, a running sluice's live connections from its `GET /connections`.

mod baseline;
mod bench;
mod chaos;
mod clients;
mod demo;
mod kernel_memory;
mod pacing;
mod pattern;
mod progress;
mod proxy_process;
mod proxy_sampler;
mod rig;
mod scenario;
mod svg;
mod top;
mod units;
mod upstream;

use std::fmt;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Load and stress tools for sluice: slow upstreams, slow readers, and proof that memory stays flat.
#[derive(Debug, Parser)]
#[command(name = "sluice-stress", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run sluice (with the shipped proxy.toml) in front of a slow upstream with slow readers
    /// and fast writers, with a live status line; ends with a summary.
    Demo(demo::DemoArgs),
    /// A stand-in upstream: source (writes a verifiable pattern), sink or echo; optionally slow,
    /// or faulty (--fault: resets, early closes, stalls, refusals, blackholes, trickles).
    Upstream(upstream::UpstreamArgs),
    /// N concurrent clients that read, write or echo the verifiable pattern through a proxy.
    Clients(clients::ClientsArgs),
    /// A built-in workload against a real sluice (and optionally the unbounded baseline),
    /// sampled every 100 ms into DIR/report.json and DIR/report.svg.
    Scenario(scenario::ScenarioArgs),
    /// Measure sluice side by side with a direct connection, tokio's copy_bidirectional,
    /// HAProxy and nginx: throughput, latency, connection rate, memory per connection.
    Bench(bench::BenchArgs),
    /// A running sluice's live connections, refreshed like top(1): what each holds in sluice
    /// and in the kernel per direction, and how long it has been paused.
    Top(top::TopArgs),
    /// The relay without backpressure used by `scenario --baseline unbounded`.
    #[command(hide = true)]
    UnboundedRelay(baseline::UnboundedArgs),
}

/// A bad argument found after clap's own checks; exits with code 2 like clap's usage errors.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `bench::run` builds its own runtime, so it runs outside `run_async`.
    let result = match cli.command {
        Command::Bench(args) => bench::run(args),
        command => run_async(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<UsageError>().is_some() => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs an async subcommand on a multi-threaded runtime. `block_on` polls the command on
/// this (the main) thread, so child processes it spawns from there keep their
/// parent-death signal for the whole run (see proxy_process).
fn run_async(command: Command) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match command {
            Command::Demo(args) => demo::run(args).await,
            Command::Upstream(args) => upstream::run(args).await,
            Command::Clients(args) => clients::run(args).await,
            Command::Scenario(args) => scenario::run(args).await,
            Command::Top(args) => top::run(args).await,
            Command::UnboundedRelay(args) => baseline::run(args).await,
            Command::Bench(_) => unreachable!("bench runs outside run_async"),
        }
    })
}
