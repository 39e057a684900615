//! The load scenarios: `many-conns` (thousands of concurrent connections, sluice's RSS against its bound) and `soak` (connections churning for minutes; RSS after warm-up must not grow).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::clients::{self, ClientMode, ClientSpec, ConnResult, LiveStats};
use crate::proxy_process::ProxyProcess;
use crate::scenario::{
    Report, RunReport, RunSummary, Sample, Sampler, ScenarioArgs, ScenarioName, UpstreamSummary,
    Workload, render_svg, write_report,
};
use crate::units::{KIB, Rate, format_bytes};
use crate::upstream::{self, UpstreamMode, UpstreamSpec};

/// How long sluice may take to exit after SIGTERM (its generated shutdown_grace is 2 s).
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Soak connections echo this much each, then close and reconnect.
const SOAK_BYTES_PER_CONN: u64 = 256 * KIB;
/// The soak's RSS after warm-up may wobble by this much (allocator, scrape buffers)
/// without counting as growth.
const SOAK_RSS_TOLERANCE: u64 = 4 * 1024 * 1024;

/// `many-conns`: every connection echoes through sluice for the whole run. Three in four
/// trickle 2 KiB/s each way; one in four writes 16 KiB/s but reads only 2 KiB/s through a
/// 4 KiB receive buffer, so both of its directions in sluice fill to the bound and pause.
pub fn many_conns_workload(conns: usize) -> Workload {
    Workload {
        description: format!(
            "{conns} concurrent echo connections: 3/4 at 2 KiB/s, 1/4 writing 16 KiB/s and reading 2 KiB/s (bounds full)"
        ),
        upstream: UpstreamSpec {
            mode: UpstreamMode::Echo,
            rate: None,
            bytes: None,
            rcvbuf: Some(16 * KIB),
            sndbuf: Some(16 * KIB),
        },
        clients: (0..conns)
            .map(|i| {
                if i % 4 == 0 {
                    ClientSpec {
                        write_rate: Some(Rate(16 * KIB)),
                        read_rate: Some(Rate(2 * KIB)),
                        rcvbuf: Some(4 * KIB),
                        sndbuf: Some(16 * KIB),
                        ..ClientSpec::new(ClientMode::Echo)
                    }
                } else {
                    ClientSpec {
                        write_rate: Some(Rate(2 * KIB)),
                        ..ClientSpec::new(ClientMode::Echo)
                    }
                }
            })
            .collect(),
    }
}

/// What a connection may cost besides its queued bytes (its task, two sockets' state in
/// the runtime, the relay, allocator slack) when checking RSS against the bound. Measured:
/// about 9 KiB (many-conns, 8,000 connections).
const CONN_OVERHEAD_ALLOWANCE: u64 = 16 * KIB;

/// sluice's RSS against what its bounds allow:
/// start RSS + conns × (both bounds + [`CONN_OVERHEAD_ALLOWANCE`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BoundCheck {
    pub conns: u64,
    pub peak_active: u64,
    pub start_rss: u64,
    pub peak_rss: u64,
    pub peak_queued: u64,
    /// conns × (client_to_upstream + upstream_to_client): what queued bytes may reach.
    pub queued_bound: u64,
    /// start RSS + queued_bound + conns × the per-connection allowance.
    pub bound: u64,
    /// (peak RSS − start RSS − peak queued) / peak active: what a connection costs
    /// besides its queued bytes (task, sockets, relay state, allocator slack).
    pub overhead_per_conn: u64,
}

/// Prints sluice's RSS against its bound; with `enforce`, an error if RSS passed it.
pub fn check_bound(report: &Report, enforce: bool) -> Result<BoundCheck> {
    let run = &report.runs[0];
    let s = &run.summary;
    let per_conn =
        s.bound_client_to_upstream.unwrap_or(0) + s.bound_upstream_to_client.unwrap_or(0);
    let conns = report.conns as u64;
    let peak_active = run
        .samples
        .iter()
        .map(|x| x.connections_active)
        .max()
        .unwrap_or(0);
    let check = BoundCheck {
        conns,
        peak_active,
        start_rss: s.start_rss_bytes,
        peak_rss: s.peak_rss_bytes,
        peak_queued: s.peak_queued_bytes,
        queued_bound: conns * per_conn,
        bound: s.start_rss_bytes + conns * (per_conn + CONN_OVERHEAD_ALLOWANCE),
        overhead_per_conn: s
            .peak_rss_bytes
            .saturating_sub(s.start_rss_bytes + s.peak_queued_bytes)
            / peak_active.max(1),
    };
    println!(
        "   bound: peak {} connections active; peak queued {} of {} ({} conns × {}); peak RSS {} vs bound {} (start {} + {} conns × ({} + {})); ~{} per connection besides queued bytes",
        check.peak_active,
        format_bytes(check.peak_queued),
        format_bytes(check.queued_bound),
        conns,
        format_bytes(per_conn),
        format_bytes(check.peak_rss),
        format_bytes(check.bound),
        format_bytes(check.start_rss),
        conns,
        format_bytes(per_conn),
        format_bytes(CONN_OVERHEAD_ALLOWANCE),
        format_bytes(check.overhead_per_conn),
    );
    if enforce && check.peak_rss > check.bound {
        anyhow::bail!(
            "sluice's RSS peaked at {} bytes, over its bound of {} bytes",
            check.peak_rss,
            check.bound
        );
    }
    Ok(check)
}

/// The soak's memory verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SoakCheck {
    pub warmup_secs: f64,
    pub rss_at_warmup_end: u64,
    pub rss_at_end: u64,
    pub max_rss_after_warmup: u64,
    /// Least-squares slope of RSS over the samples after warm-up, bytes per minute.
    pub rss_slope_per_min: f64,
    /// The same for RSS minus queued bytes: memory that is not connection buffers.
    pub unqueued_slope_per_min: f64,
    /// Connections opened (and closed) during the run.
    pub connections: u64,
}

/// Least-squares slope of `points` (seconds, bytes), bytes per minute.
fn slope_per_min(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx * 60.0 }
}

/// Median RSS of the samples in [from, to) seconds; a single sample is noisy.
fn median_rss(samples: &[Sample], from: f64, to: f64) -> u64 {
    let mut v: Vec<u64> = samples
        .iter()
        .filter(|s| s.t >= from && s.t < to)
        .map(|s| s.rss_bytes)
        .collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// `soak`: one client spec per slot. Each slot echoes 256 KiB per connection, closes and
/// reconnects. One slot in four writes 64 KiB/s and reads 16 KiB/s through a 4 KiB receive
/// buffer (its directions fill and pause); the rest echo at 256 KiB/s.
pub fn soak_workload(conns: usize) -> Workload {
    Workload {
        description: format!(
            "{conns} slots churning echo connections of {} each: 1/4 reading at 16 KiB/s, the rest at 256 KiB/s",
            format_bytes(SOAK_BYTES_PER_CONN)
        ),
        upstream: UpstreamSpec {
            mode: UpstreamMode::Echo,
            rate: None,
            bytes: None,
            rcvbuf: Some(16 * KIB),
            sndbuf: Some(16 * KIB),
        },
        clients: (0..conns)
            .map(|i| {
                if i % 4 == 0 {
                    ClientSpec {
                        bytes: Some(SOAK_BYTES_PER_CONN),
                        write_rate: Some(Rate(64 * KIB)),
                        read_rate: Some(Rate(16 * KIB)),
                        rcvbuf: Some(4 * KIB),
                        ..ClientSpec::new(ClientMode::Echo)
                    }
                } else {
                    ClientSpec {
                        bytes: Some(SOAK_BYTES_PER_CONN),
                        write_rate: Some(Rate(256 * KIB)),
                        ..ClientSpec::new(ClientMode::Echo)
                    }
                }
            })
            .collect(),
    }
}

/// Runs the soak workload for `--duration`; the first quarter is warm-up, after which
/// RSS must not grow.
pub async fn soak(args: &ScenarioArgs) -> Result<()> {
    let (conns, duration) = (args.conns(), args.duration());
    let wl = soak_workload(conns);
    let description = format!(
        "{} for {}",
        wl.description,
        humantime::format_duration(duration)
    );
    eprintln!("scenario soak: {description}");
    let up_spec = Arc::new(wl.upstream.clone());
    let up = upstream::LocalUpstream::start(up_spec)?;
    let config = args.proxy_config(up.addr);
    let up_stats = up.stats.clone();
    let mut proxy = ProxyProcess::spawn_sluice(&config)?;
    let sampler = Sampler::start(&proxy)?;
    let target = proxy.listen_addr();

    let stop = CancellationToken::new();
    let live = Arc::new(LiveStats::default());
    let slots: Vec<_> = wl
        .clients
        .into_iter()
        .map(|spec| {
            let (stop, live) = (stop.clone(), live.clone());
            tokio::spawn(async move {
                let mut results: Vec<ConnResult> = Vec::new();
                while !stop.is_cancelled() {
                    let r = clients::run_clients(
                        target,
                        vec![spec.clone()],
                        stop.clone(),
                        clients::DEFAULT_DRAIN,
                        live.clone(),
                    )
                    .await;
                    results.extend(r);
                }
                (spec, results)
            })
        })
        .collect();

    let bar = crate::progress::bar(Some(duration));
    let started = Instant::now();
    while started.elapsed() < duration && proxy.try_exited().is_none() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let last = sampler.last();
        crate::progress::update(
            &bar,
            started.elapsed().min(duration),
            format!(
                "sluice: RSS {}, queued {}, {} connections so far, {} errors",
                format_bytes(last.rss_bytes),
                format_bytes(last.queued()),
                live.connected.load(Ordering::Relaxed),
                live.errors.load(Ordering::Relaxed),
            ),
        );
    }
    stop.cancel();
    let mut specs = Vec::new();
    let mut results = Vec::new();
    for slot in slots {
        let (spec, r) = slot.await.context("a soak slot failed")?;
        specs.extend(std::iter::repeat_n(spec, r.len()));
        results.extend(r);
    }
    bar.finish_and_clear();
    let (samples, sample_errors) = sampler.finish();
    up.stop().await;
    let exit = proxy.stop(STOP_GRACE)?;

    let client_summary = clients::summarize(&specs, &results);
    let upstream = UpstreamSummary::of(&up_stats);
    let summary = RunSummary::of(
        &samples,
        Some((args.bound, args.bound)),
        conns as u64,
        client_summary,
        upstream,
        exit.to_string(),
        sample_errors,
    );

    // The verdict: warm-up is the first quarter; compare medians of 5 s windows. Samples
    // after the deadline (clients draining, sluice stopping) are left out.
    let total = duration.as_secs_f64();
    let warmup = total / 4.0;
    let after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.t >= warmup && s.t < total)
        .collect();
    let check = SoakCheck {
        warmup_secs: warmup,
        rss_at_warmup_end: median_rss(&samples, warmup, warmup + 5.0),
        rss_at_end: median_rss(&samples, total - 5.0, total),
        max_rss_after_warmup: after.iter().map(|s| s.rss_bytes).max().unwrap_or(0),
        rss_slope_per_min: slope_per_min(
            &after
                .iter()
                .map(|s| (s.t, s.rss_bytes as f64))
                .collect::<Vec<_>>(),
        ),
        unqueued_slope_per_min: slope_per_min(
            &after
                .iter()
                .map(|s| (s.t, s.rss_bytes as f64 - s.queued() as f64))
                .collect::<Vec<_>>(),
        ),
        connections: summary.clients.conns as u64,
    };

    let report = Report {
        scenario: ScenarioName::Soak,
        description,
        conns,
        duration_secs: duration.as_secs_f64(),
        runs: vec![RunReport {
            proxy: "sluice".to_string(),
            summary,
            samples,
        }],
    };
    let section = ("soak", serde_json::to_value(&check)?);
    let wrote = write_report(&args.out, &report, Some(section), Some(render_svg(&report)))?;
    crate::scenario::print_run(&report.runs[0]);
    check_bound(&report, false)?;
    println!(
        "    soak: {} connections in {:.0} s; RSS {} at warm-up end ({:.0} s), {} at the end, max {} after warm-up; slope {}/min (without queued bytes {}/min)",
        check.connections,
        total,
        format_bytes(check.rss_at_warmup_end),
        check.warmup_secs,
        format_bytes(check.rss_at_end),
        format_bytes(check.max_rss_after_warmup),
        signed_bytes(check.rss_slope_per_min),
        signed_bytes(check.unqueued_slope_per_min),
    );
    println!("wrote {wrote}");

    let s = &report.runs[0].summary;
    let mut problems = Vec::new();
    if s.errors > 0 {
        problems.push(format!("{} errors through sluice", s.errors));
    }
    if check.rss_at_end > check.rss_at_warmup_end + SOAK_RSS_TOLERANCE {
        problems.push(format!(
            "RSS grew after warm-up: {} → {}",
            format_bytes(check.rss_at_warmup_end),
            format_bytes(check.rss_at_end)
        ));
    }
    if !problems.is_empty() {
        anyhow::bail!("soak failed: {}", problems.join("; "));
    }
    Ok(())
}

fn signed_bytes(v: f64) -> String {
    let sign = if v < 0.0 { "-" } else { "+" };
    format!("{sign}{}", format_bytes(v.abs() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_per_minute() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 100.0 * i as f64)).collect();
        assert!((slope_per_min(&pts) - 6000.0).abs() < 1e-6);
        assert_eq!(slope_per_min(&[(1.0, 5.0)]), 0.0);
    }
}
