//! `demo`: the README's first command. sluice with the shipped proxy.toml in front of a slow built-in upstream, slow readers and fast writers, a live status line, and a summary.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::UsageError;
use crate::clients::{ClientMode, ClientRun, ClientSpec, Connections};
use crate::progress::{CtrlC, Watch, Watched};
use crate::proxy_process::DIRECTIONS;
use crate::proxy_sampler::{KernelMemory, Sample};
use crate::rig::{Proxy, ProxyExit, Rig, Stopped, upstream_spec};
use crate::units::{KIB, Rate, format_bytes, parse_duration, parse_rate};
use crate::upstream::{UpstreamMode, UpstreamSpec};

/// How long sluice may take to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(35);
/// Without a terminal, print a plain status line this often instead of redrawing one.
const PLAIN_STATUS_EVERY: Duration = Duration::from_secs(5);

/// `sluice-stress demo`
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// How long to run (Ctrl-C ends it earlier, cleanly).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// sluice config to use; listen, upstream and metrics addresses are overridden with free
    /// loopback ports. Default: proxy.toml in the current directory or the source tree.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Clients that write fast and read slowly.
    #[arg(long, default_value_t = 50)]
    pub readers: usize,
    /// Clients that write (and read) as fast as they can.
    #[arg(long, default_value_t = 50)]
    pub writers: usize,
    /// Per-connection speed of the built-in slow upstream (an echo server).
    #[arg(long, default_value = "64KiB/s", value_parser = parse_rate)]
    pub upstream_rate: Rate,
    /// Per-connection read speed of the slow readers.
    #[arg(long, default_value = "16KiB/s", value_parser = parse_rate)]
    pub reader_rate: Rate,
    /// Keep the config's [socket] buffer sizes. By default the demo sets them to 16 KiB:
    /// with kernel autotuning, megabytes per connection sit in socket buffers before
    /// sluice's own bound is reached, and a 30-second demo would show no backpressure.
    #[arg(long)]
    pub kernel_buffers: bool,
}

/// SO_RCVBUF/SO_SNDBUF the demo gives sluice's sockets unless --kernel-buffers.
const DEMO_SOCKET_BUFFER: &str = "16KiB";

/// A copy of `config` with every `[socket]` buffer set to [`DEMO_SOCKET_BUFFER`], in `dir`.
fn with_small_socket_buffers(config: &Path, dir: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let mut table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", config.display()))?;
    let socket = table
        .entry("socket")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let socket = socket
        .as_table_mut()
        .ok_or_else(|| anyhow::anyhow!("[socket] in {} is not a table", config.display()))?;
    for key in [
        "client_recv_buffer",
        "client_send_buffer",
        "upstream_recv_buffer",
        "upstream_send_buffer",
    ] {
        socket.insert(
            key.to_string(),
            toml::Value::String(DEMO_SOCKET_BUFFER.into()),
        );
    }
    let path = dir.join("proxy.toml");
    std::fs::write(&path, toml::to_string(&table)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// `--config`, else `./proxy.toml`, else the source tree's `proxy.toml` (known at compile time).
fn find_config(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.is_file() {
            return Err(UsageError(format!("--config {}: no such file", path.display())).into());
        }
        return Ok(path);
    }
    let candidates = [
        PathBuf::from("proxy.toml"),
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../proxy.toml")),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot find proxy.toml (looked in {} and {}); pass --config FILE",
                candidates[0].display(),
                candidates[1].display()
            )
        })
}

pub async fn run(args: DemoArgs) -> Result<()> {
    if args.readers + args.writers == 0 {
        return Err(UsageError("--readers and --writers cannot both be 0".into()).into());
    }
    let config = find_config(args.config.clone())?;
    let tmp = tempfile::Builder::new().prefix("sluice-demo-").tempdir()?;
    let (run_config, config_note) = if args.kernel_buffers {
        (config.clone(), "[socket] buffers as configured".to_string())
    } else {
        (
            with_small_socket_buffers(&config, tmp.path())?,
            format!(
                "[socket] buffers set to {DEMO_SOCKET_BUFFER}; --kernel-buffers keeps the file's"
            ),
        )
    };
    let mut rig = Rig::start(
        &slow_upstream(args.upstream_rate),
        Proxy::SluiceFile(run_config),
        KernelMemory::Read,
    )
    .with_context(|| format!("starting sluice with {}", config.display()))?;
    let first = rig
        .proxy()
        .scrape()
        .context("first scrape of sluice's metrics")?;
    let bounds = DIRECTIONS.map(|d| first.direction("sluice_buffer_limit_bytes", d) as u64);
    print_setup(&args, &rig, &config, &config_note);

    let specs = client_specs(&args);
    let conns = specs.len() as u64;
    let watch = Watch {
        every: Duration::from_millis(500),
        ctrl_c: CtrlC::StopsTheClients,
        plain_every: Some(PLAIN_STATUS_EVERY),
        ..Watch::until(args.duration)
    };
    let during = ProxyExit::Fails { during: "the demo" };
    let watched = rig
        .run_clients(specs, Connections::Once, &watch, during, |last, live| {
            status_line(last, live.active.load(Ordering::Relaxed))
        })
        .await?;
    let stopped = rig.stop(STOP_GRACE).await?;
    print_summary(&watched, &stopped, bounds, conns);
    Ok(())
}

/// The slow upstream: echoes at `rate` per connection, small socket buffers.
fn slow_upstream(rate: Rate) -> UpstreamSpec {
    UpstreamSpec {
        rate: Some(rate),
        rcvbuf: Some(16 * KIB),
        sndbuf: Some(16 * KIB),
        ..upstream_spec(UpstreamMode::Echo)
    }
}

/// --readers slow readers, then --writers fast writers.
fn client_specs(args: &DemoArgs) -> Vec<ClientSpec> {
    let mut specs = vec![
        ClientSpec {
            read_rate: Some(args.reader_rate),
            rcvbuf: Some(4 * KIB),
            sndbuf: Some(16 * KIB),
            ..ClientSpec::new(ClientMode::Echo)
        };
        args.readers
    ];
    specs.extend(vec![ClientSpec::new(ClientMode::Echo); args.writers]);
    specs
}

/// What runs where, before the clients start.
fn print_setup(args: &DemoArgs, rig: &Rig, config: &Path, config_note: &str) {
    let sluice = rig.proxy();
    let metrics_url = sluice.metrics_url().unwrap_or_default();
    println!(
        "sluice (pid {}) with {} ({config_note})",
        sluice.pid(),
        config.display()
    );
    println!(
        "listening on {}, upstream {} (built-in echo server, {} per connection)",
        sluice.listen_addr(),
        rig.upstream().addr,
        args.upstream_rate
    );
    println!("metrics: {metrics_url}   (try: curl -s {metrics_url} | grep sluice_)");
    println!(
        "{} slow readers (write fast, read {} with a 4 KiB SO_RCVBUF) + {} fast writers, for {} s; Ctrl-C ends early",
        args.readers,
        args.reader_rate,
        args.writers,
        args.duration.as_secs()
    );
}

/// The closing summary: bytes moved, peak RSS and queued bytes against their limits
/// (`bounds` per direction × `conns`), pauses, errors.
fn print_summary(watched: &Watched<ClientRun>, stopped: &Stopped, bounds: [u64; 2], conns: u64) {
    let summary = watched.output.summary();
    let samples = &stopped.samples;
    let peak = |f: fn(&Sample) -> u64| samples.iter().map(f).max().unwrap_or(0);
    let last_metrics = stopped.metrics.as_ref();
    let moved = last_metrics.map_or([0.0; 2], |m| {
        DIRECTIONS.map(|d| m.direction("sluice_bytes_total", d))
    });
    let pauses = last_metrics.map_or(0.0, |m| m.sum("sluice_pauses_total"));
    println!();
    println!(
        "demo {} after {:.1} s: sluice exited ({})",
        if watched.interrupted {
            "interrupted"
        } else {
            "finished"
        },
        watched.started.elapsed().as_secs_f64(),
        stopped.exit
    );
    println!(
        "  bytes moved:  client→upstream {}, upstream→client {}; {} verified by the clients, {} errors",
        format_bytes(moved[0] as u64),
        format_bytes(moved[1] as u64),
        format_bytes(summary.bytes_verified),
        summary.errors
    );
    println!(
        "  peak RSS:     {} (started at {})",
        format_bytes(peak(|s| s.rss_bytes)),
        format_bytes(samples.first().map_or(0, |s| s.rss_bytes))
    );
    let peaks = [
        peak(|s| s.queued_client_to_upstream),
        peak(|s| s.queued_upstream_to_client),
    ];
    for ((dir, p), bound) in DIRECTIONS.iter().zip(peaks).zip(bounds) {
        println!(
            "  peak queued {dir}: {} (limit {} = {} connections × {})",
            format_bytes(p),
            format_bytes(bound * conns),
            conns,
            format_bytes(bound)
        );
    }
    println!(
        "  pauses:       {pauses:.0} (a direction stopped reading because its buffer was full)"
    );
    for e in &summary.error_samples {
        println!("  error: {e}");
    }
}

fn status_line(s: &Sample, clients: u64) -> String {
    format!(
        "{} conns | c→u {}/s u→c {}/s | queued c→u {} u→c {} | paused directions {} | pauses {} | RSS {}",
        s.connections_active.max(clients.min(s.connections_active)),
        format_bytes(s.bytes_per_sec_client_to_upstream as u64),
        format_bytes(s.bytes_per_sec_upstream_to_client as u64),
        format_bytes(s.queued_client_to_upstream),
        format_bytes(s.queued_upstream_to_client),
        s.paused_connections,
        s.pauses_total,
        format_bytes(s.rss_bytes)
    )
}
