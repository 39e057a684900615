//! `scenario`: built-in workloads against a real sluice (and optionally the unbounded baseline), sampled every 100 ms into DIR/report.json and DIR/report.svg.
//!
//! # Layout
//! - `args.rs`: the command line and each scenario's defaults.
//! - `workloads.rs`: the upstream and clients of each scenario the rig runs as they are.
//! - `steady.rs`: slow-readers, slow-upstream, mixed and many-conns: a fixed set of clients,
//!   queued bytes within conns × bound.
//! - `soak.rs`: connections churning for minutes; RSS after warm-up must not grow.
//! - `budget.rs`: slow readers sharing `buffer.total`: RSS against it, used ≤ limit, a new
//!   client's latency and /metrics latency under it.
//! - `balance.rs`: one service, two fast servers and a slow one: each server's share of new
//!   connections and the clients' completion times per policy.
//! - `bound.rs`: sluice's RSS against what its bounds allow.
//! - `report.rs`: report.json's runs and summaries, their console lines, report.svg.

mod args;
mod balance;
mod bound;
mod budget;
mod report;
mod soak;
mod steady;
mod workloads;

use anyhow::Result;

pub use args::{ScenarioArgs, ScenarioName};

use crate::UsageError;

/// `sluice-stress scenario NAME ...`.
pub async fn run(args: ScenarioArgs) -> Result<()> {
    let conns = args.conns();
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
        ScenarioName::Soak => soak::run(&args).await,
        ScenarioName::Budget => budget::run(&args).await,
        ScenarioName::Balance => balance::run(&args).await,
        _ => steady::run(&args).await,
    }
}
