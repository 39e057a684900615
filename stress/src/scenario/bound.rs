//! sluice's RSS against what its bounds allow: printed after every run of a fixed workload and of soak; many-conns fails when RSS passes it.

use anyhow::Result;

use super::report::Report;
use crate::units::{KIB, format_bytes};

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
