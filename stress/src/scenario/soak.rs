//! The `soak` scenario: `--conns` slots churning echo connections through sluice for `--duration`; after the first quarter (warm-up), sluice's RSS must not grow.

use std::time::Duration;

use anyhow::Result;

use super::args::{ScenarioArgs, ScenarioName};
use super::bound::check_bound;
use super::report::{Chart, Report, RunReport, RunSummary};
use super::workloads;
use crate::clients::Connections;
use crate::proxy_sampler::Sample;
use crate::rig::{Proxy, Rig};
use crate::units::format_bytes;

/// The soak's RSS after warm-up may wobble by this much (allocator, scrape buffers)
/// without counting as growth.
const SOAK_RSS_TOLERANCE: u64 = 4 * 1024 * 1024;

/// Runs the soak workload for `--duration`; the first quarter is warm-up, after which
/// RSS must not grow.
pub async fn run(args: &ScenarioArgs) -> Result<()> {
    let (conns, duration) = (args.conns(), args.duration());
    let wl = workloads::soak(conns);
    let description = format!(
        "{} for {}",
        wl.description,
        humantime::format_duration(duration)
    );
    eprintln!("scenario soak: {description}");
    let proxy = Proxy::Sluice(args.proxy_config());
    let (stopped, clients) = Rig::run_workload(&wl, proxy, Connections::Churn, duration).await?;
    let run = RunReport::of(stopped, conns as u64, clients.summary());
    let check = SoakCheck::of(&run.samples, duration, run.summary.clients.conns as u64);

    let report = Report::new(ScenarioName::Soak, description, conns, duration, vec![run]);
    let section = ("soak", serde_json::to_value(&check)?);
    let wrote = report.write(&args.out, Some(section), Chart::Draw)?;
    report.print_runs();
    check_bound(&report, false)?;
    check.print(duration);
    println!("wrote {wrote}");
    check.verdict(&report.runs[0].summary)
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

impl SoakCheck {
    /// The verdict's figures: warm-up is the first quarter; compare medians of 5 s windows.
    /// Samples after the deadline (clients draining, sluice stopping) are left out.
    fn of(samples: &[Sample], duration: Duration, connections: u64) -> SoakCheck {
        let total = duration.as_secs_f64();
        let warmup = total / 4.0;
        let after: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.t >= warmup && s.t < total)
            .collect();
        let slope = |bytes: fn(&Sample) -> f64| {
            slope_per_min(&after.iter().map(|s| (s.t, bytes(s))).collect::<Vec<_>>())
        };
        SoakCheck {
            warmup_secs: warmup,
            rss_at_warmup_end: median_rss(samples, warmup, warmup + 5.0),
            rss_at_end: median_rss(samples, total - 5.0, total),
            max_rss_after_warmup: after.iter().map(|s| s.rss_bytes).max().unwrap_or(0),
            rss_slope_per_min: slope(|s| s.rss_bytes as f64),
            unqueued_slope_per_min: slope(|s| s.rss_bytes as f64 - s.queued() as f64),
            connections,
        }
    }

    fn print(&self, duration: Duration) {
        println!(
            "    soak: {} connections in {:.0} s; RSS {} at warm-up end ({:.0} s), {} at the end, max {} after warm-up; slope {}/min (without queued bytes {}/min)",
            self.connections,
            duration.as_secs_f64(),
            format_bytes(self.rss_at_warmup_end),
            self.warmup_secs,
            format_bytes(self.rss_at_end),
            format_bytes(self.max_rss_after_warmup),
            signed_bytes(self.rss_slope_per_min),
            signed_bytes(self.unqueued_slope_per_min),
        );
    }

    /// Fails on errors through sluice, or RSS that grew after warm-up.
    fn verdict(&self, sluice: &RunSummary) -> Result<()> {
        let mut problems = Vec::new();
        if sluice.errors > 0 {
            problems.push(format!("{} errors through sluice", sluice.errors));
        }
        if self.rss_at_end > self.rss_at_warmup_end + SOAK_RSS_TOLERANCE {
            problems.push(format!(
                "RSS grew after warm-up: {} → {}",
                format_bytes(self.rss_at_warmup_end),
                format_bytes(self.rss_at_end)
            ));
        }
        if !problems.is_empty() {
            anyhow::bail!("soak failed: {}", problems.join("; "));
        }
        Ok(())
    }
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
