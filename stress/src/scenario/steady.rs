//! slow-readers, slow-upstream, mixed and many-conns: a fixed set of clients for `--duration` through sluice (and again through the unbounded baseline with `--baseline`); sluice's queued bytes must stay within conns × bound, and many-conns' RSS within its bound.

use std::time::Duration;

use anyhow::{Context, Result};

use super::args::{Baseline, ScenarioArgs, ScenarioName};
use super::bound::check_bound;
use super::report::{Chart, Report, RunReport, RunSummary};
use super::workloads;
use crate::clients::Connections;
use crate::proxy_process::DIRECTIONS;
use crate::rig::{Proxy, Rig, Workload};

/// `sluice-stress scenario` for the four fixed workloads.
pub async fn run(args: &ScenarioArgs) -> Result<()> {
    let (conns, duration) = (args.conns(), args.duration());
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let wl = workloads::steady(args.name, conns);
    eprintln!("scenario {}: {}", args.name.slug(), wl.description);

    let mut runs = vec![run_once(Proxy::Sluice(args.proxy_config()), &wl, duration).await?];
    if args.baseline == Some(Baseline::Unbounded) {
        let cap = args.baseline_cap;
        runs.push(run_once(Proxy::Unbounded { cap }, &wl, duration).await?);
    }

    let report = Report::new(args.name, wl.description.clone(), conns, duration, runs);
    let wrote = report.write(&args.out, None, Chart::Draw)?;
    report.print_runs();
    println!("wrote {wrote}");
    // Every run reports RSS against the bound; many-conns fails when it is passed.
    check_bound(&report, args.name == ScenarioName::ManyConns)?;
    queued_within_bounds(&report.runs[0].summary)
}

/// Runs the workload through one proxy (spawned from this, the main, thread; see
/// proxy_process) while sampling it.
async fn run_once(proxy: Proxy, wl: &Workload, duration: Duration) -> Result<RunReport> {
    let (stopped, clients) = Rig::run_workload(wl, proxy, Connections::Once, duration).await?;
    let conns = wl.clients.len() as u64;
    Ok(RunReport::of(stopped, conns, clients.summary()))
}

/// Fails when sluice's run had errors or its queued bytes passed conns × bound.
fn queued_within_bounds(sluice: &RunSummary) -> Result<()> {
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
