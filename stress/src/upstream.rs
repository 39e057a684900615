//! `sluice-stress upstream`: the command line over the test kit's stand-in upstreams
//! (source, sink, echo, per-connection; faults with `--fault`, see chaos.rs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::UsageError;
use crate::chaos::{self, Chaos, ChaosStats, Fault};
use crate::units::{Rate, parse_rate, parse_size};
pub use sluice_testkit::upstream::{
    LocalUpstream, UpstreamMode, UpstreamSpec, UpstreamStats, bind, is_peer_gone, serve, stats_line,
};

/// `sluice-stress upstream`: a stand-in upstream for sluice.
#[derive(Debug, Clone, Args)]
pub struct UpstreamArgs {
    /// Address to listen on (port 0 picks a free port; the real one is printed).
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub listen: SocketAddr,
    /// What to do with each connection.
    #[arg(long, value_enum)]
    pub mode: UpstreamMode,
    /// Per-connection rate, e.g. 64KiB/s (a slow upstream). Unlimited when absent.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<Rate>,
    /// Source: bytes per connection (header included) before closing. Endless when absent.
    #[arg(long, value_parser = parse_size)]
    pub bytes: Option<u64>,
    /// SO_RCVBUF for accepted sockets (e.g. 16KiB), so a slow sink pushes back quickly.
    #[arg(long, value_parser = parse_size)]
    pub rcvbuf: Option<u64>,
    /// SO_SNDBUF for accepted sockets.
    #[arg(long, value_parser = parse_size)]
    pub sndbuf: Option<u64>,
    /// Misbehave on purpose (see chaos.rs): reset-after=BYTES, close-after=BYTES, stall,
    /// slow-close=DURATION, refuse, blackhole, trickle[=DURATION]. BYTES count the mode's
    /// main direction: written (source), read (sink), echoed (echo).
    #[arg(long, value_parser = chaos::parse_fault)]
    pub fault: Option<Fault>,
    /// With --fault: serve the first N connections normally, fault the rest (refuse and
    /// blackhole turn the listener faulty once N are accepted).
    #[arg(long, default_value_t = 0, requires = "fault")]
    pub healthy: u64,
}

impl From<&UpstreamArgs> for UpstreamSpec {
    fn from(a: &UpstreamArgs) -> Self {
        UpstreamSpec {
            mode: a.mode,
            rate: a.rate,
            bytes: a.bytes,
            rcvbuf: a.rcvbuf,
            sndbuf: a.sndbuf,
        }
    }
}

/// `sluice-stress upstream ...`: serve until Ctrl-C, printing totals every 5 s.
pub async fn run(args: UpstreamArgs) -> Result<()> {
    if let Some(fault) = args.fault {
        return run_faulty(args, fault).await;
    }
    let spec = Arc::new(UpstreamSpec::from(&args));
    let listener = bind(args.listen, &spec)?;
    let addr = listener.local_addr()?;
    sluice_testkit::notify::ready(&[("upstream", addr)], None);
    eprintln!(
        "upstream listening address={addr} mode={:?} rate={}",
        args.mode,
        args.rate.map_or("unlimited".to_string(), |r| r.to_string())
    );
    let stats = Arc::new(UpstreamStats::default());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn({
        let (stats, shutdown) = (stats.clone(), shutdown.clone());
        async move {
            serve(listener, spec, stats, shutdown).await;
            Ok(())
        }
    });
    serve_until_interrupted(server, shutdown, || stats_line(&stats)).await
}

/// `sluice-stress upstream --fault F ...`: the same with the fault.
async fn run_faulty(args: UpstreamArgs, fault: Fault) -> Result<()> {
    let spec = Arc::new(UpstreamSpec::from(&args));
    chaos::check(&spec, fault).map_err(UsageError)?;
    let chaos = Chaos {
        fault,
        healthy: args.healthy,
    };
    let listener = chaos::bind(args.listen, &spec, fault)?;
    let addr = listener.local_addr()?;
    sluice_testkit::notify::ready(&[("upstream", addr)], None);
    eprintln!(
        "upstream listening address={addr} mode={:?} fault={fault} healthy={}",
        args.mode, args.healthy
    );
    let stats = Arc::new(UpstreamStats::default());
    let chaos_stats = Arc::new(ChaosStats::default());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(chaos::serve(
        listener,
        spec,
        chaos,
        stats.clone(),
        chaos_stats.clone(),
        shutdown.clone(),
    ));
    serve_until_interrupted(server, shutdown, || chaos::stats_line(&stats, &chaos_stats)).await
}

/// Prints `totals` every 5 s until Ctrl-C, then stops `server` and prints them once more.
/// A server that ends by itself (a listener fault that could not be set up) ends the run.
async fn serve_until_interrupted(
    server: JoinHandle<Result<()>>,
    shutdown: CancellationToken,
    totals: impl Fn() -> String,
) -> Result<()> {
    tokio::pin!(server);
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = ticker.tick() => eprintln!("{}", totals()),
            r = &mut server => return r.context("the chaos upstream failed")?,
        }
    }
    shutdown.cancel();
    let _ = server.await;
    eprintln!("{}", totals());
    Ok(())
}
