//! A scenario's report: report.json's runs and summaries (each scenario may add a section of its own), the console lines, and report.svg's chart.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use super::args::ScenarioName;
use crate::baseline::CAP_EXIT_CODE;
use crate::clients::ClientsSummary;
use crate::proxy_sampler::Sample;
use crate::rig::Stopped;
use crate::svg;
use crate::units::format_bytes;
use crate::upstream::UpstreamStats;

/// report.json.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: ScenarioName,
    pub description: String,
    pub conns: usize,
    pub duration_secs: f64,
    pub runs: Vec<RunReport>,
}

/// One proxy's run: its figures and every sample.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// "sluice" or "unbounded" (balance: the policy).
    pub proxy: String,
    pub summary: RunSummary,
    pub samples: Vec<Sample>,
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

    /// Several upstreams' counters as one's (balance's three servers).
    pub fn combined(parts: impl Iterator<Item = UpstreamSummary>) -> UpstreamSummary {
        parts.fold(UpstreamSummary::default(), |mut all, s| {
            all.accepted += s.accepted;
            all.completed += s.completed;
            all.bytes_in += s.bytes_in;
            all.bytes_out += s.bytes_out;
            all.bytes_verified += s.bytes_verified;
            all.errors += s.errors;
            all.error_samples.extend(s.error_samples);
            all
        })
    }
}

/// One measured target.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: &'static str,
    pub measured: f64,
    pub limit: f64,
    /// `bytes`, `seconds` or `share` (a fraction of a whole).
    pub unit: &'static str,
    pub pass: bool,
}

/// Whether [`Report::write`] draws report.svg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chart {
    Draw,
    /// No chart (balance: the chart labels its runs sluice and the unbounded baseline,
    /// not policies).
    Skip,
}

impl Report {
    pub fn new(
        scenario: ScenarioName,
        description: String,
        conns: usize,
        duration: Duration,
        runs: Vec<RunReport>,
    ) -> Report {
        Report {
            scenario,
            description,
            conns,
            duration_secs: duration.as_secs_f64(),
            runs,
        }
    }

    /// Writes report.json to `out`, with `section` (its name and value) beside the report's
    /// own fields, and with `Chart::Draw` report.svg; creates `out` if missing. Returns what
    /// it wrote, for the closing "wrote ..." line.
    pub fn write(
        &self,
        out: &Path,
        section: Option<(&str, serde_json::Value)>,
        chart: Chart,
    ) -> Result<String> {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let json_path = out.join("report.json");
        let mut json = serde_json::to_value(self)?;
        if let Some((name, value)) = section {
            json[name] = value;
        }
        std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("cannot write {}", json_path.display()))?;
        let mut wrote = json_path.display().to_string();
        if chart == Chart::Draw {
            let svg_path = out.join("report.svg");
            std::fs::write(&svg_path, self.chart())
                .with_context(|| format!("cannot write {}", svg_path.display()))?;
            wrote += &format!(" and {}", svg_path.display());
        }
        Ok(wrote)
    }

    /// Each run's line on the console.
    pub fn print_runs(&self) {
        for run in &self.runs {
            run.print();
        }
    }
}

impl RunReport {
    /// A run's report from what its rig saw and what its clients did; `conns`: how many
    /// connections ran at once.
    pub fn of(run: Stopped, conns: u64, clients: ClientsSummary) -> RunReport {
        RunReport {
            proxy: run.name.to_string(),
            summary: RunSummary::of(&run, conns, clients),
            samples: run.samples,
        }
    }
}

impl RunReport {
    /// The run's line on the console, and its first few errors.
    pub fn print(&self) {
        let s = &self.summary;
        println!(
            "{:>9}: peak RSS {} (start {}), peak kernel {}, peak queued {}{}, pauses {}, drains {}, verified {}, errors {}{}",
            self.proxy,
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
}

impl RunSummary {
    /// A run's figures from its samples and what its clients and upstreams saw; its
    /// queued limits are `conns` × its bounds.
    fn of(run: &Stopped, conns: u64, clients: ClientsSummary) -> RunSummary {
        let samples = &run.samples;
        let bounds = run.bounds;
        let upstream =
            UpstreamSummary::combined(run.upstreams.iter().map(|(_, s)| UpstreamSummary::of(s)));
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
            proxy_exit: run.exit.to_string(),
            killed_at_cap: run.name == "unbounded" && run.exit.code() == Some(CAP_EXIT_CODE),
            samples_taken: samples.len(),
            sample_errors: run.sample_errors,
        }
    }
}

/// The runs' line colours, in order (sluice, then the baseline).
const COLORS: [&str; 2] = ["#1f77b4", "#d62728"];

impl Report {
    /// The chart: RSS, queued bytes and (when read) the kernel memory in the proxy's
    /// sockets over time, a line per run.
    fn chart(&self) -> String {
        let mut panels = vec![
            svg::Panel {
                title: "Proxy memory (RSS)".to_string(),
                series: self.series(|s| Some(s.rss_bytes)),
                limit: None,
            },
            svg::Panel {
                title: "Queued bytes (all connections, both directions)".to_string(),
                series: self.series(|s| Some(s.queued())),
                limit: self.queued_limit(),
            },
        ];
        let kernel_read = self
            .runs
            .iter()
            .any(|r| r.samples.iter().any(|s| s.kernel_bytes.is_some()));
        if kernel_read {
            panels.push(svg::Panel {
                title: "Kernel memory in the proxy's sockets (ss skmem r + w)".to_string(),
                series: self.series(|s| s.kernel_bytes),
                limit: None,
            });
        }
        svg::render(
            &format!("sluice-stress scenario {}", self.scenario.slug()),
            &self.description,
            &panels,
        )
    }

    /// A line per run through the samples that have the value `pick` picks.
    fn series(&self, pick: fn(&Sample) -> Option<u64>) -> Vec<svg::Series> {
        self.runs
            .iter()
            .zip(COLORS)
            .map(|(r, color)| svg::Series {
                label: r.label(),
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
    }

    /// sluice's limit on queued bytes, for the dashed line: buffer.total when in force
    /// (the tighter limit), else conns × both bounds.
    fn queued_limit(&self) -> Option<(f64, (String, String))> {
        let sluice = &self.runs[0];
        let total = sluice
            .samples
            .iter()
            .filter_map(|s| s.budget_limit_bytes)
            .filter(|&l| l > 0)
            .max();
        let s = &sluice.summary;
        let (limit, how) = match (
            total,
            s.queued_limit_client_to_upstream,
            s.queued_limit_upstream_to_client,
        ) {
            (Some(total), _, _) => (total, "buffer.total"),
            (None, Some(a), Some(b)) => (a + b, "conns × bounds"),
            _ => return None,
        };
        let legend = format!("{how} = {}", format_bytes(limit));
        Some((limit as f64, ("sluice limit".to_string(), legend)))
    }
}

impl RunReport {
    /// The run's name in the chart's legend.
    fn label(&self) -> String {
        match self.proxy.as_str() {
            "sluice" => format!(
                "sluice ({} bound)",
                format_bytes(self.summary.bound_upstream_to_client.unwrap_or(0))
            ),
            _ => "unbounded relay".to_string(),
        }
    }
}
