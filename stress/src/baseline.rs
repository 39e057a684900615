//! The unbounded relay: the proxy without backpressure that sluice is compared against. It reads everything into an unbounded queue and kills itself at a memory cap.
//!
//! It runs as its own process (`sluice-stress unbounded-relay`, hidden from help) so its RSS
//! is measured the way sluice's is. It serves a tiny `/metrics` with the same names sluice
//! uses for the numbers it has (`sluice_queued_bytes`, `sluice_bytes_total`), so a scenario
//! samples both proxies with one code path, and says it is ready as sluice does (`READY=1` on
//! `NOTIFY_SOCKET`). It lives only in sluice-stress, never in the daemon.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use clap::Args;
use std::io::{Read, Write};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::proxy_process::{DIRECTIONS, own_rss};
use crate::units::{format_bytes, parse_size};

/// Exit code when the cap is reached, so a scenario can tell "killed at cap" from a crash.
pub const CAP_EXIT_CODE: i32 = 3;
/// How often the RSS is compared with the cap. At loopback speed the queue grows by about
/// 1-2 GiB/s, so the overshoot stays around 50 MiB.
const CAP_CHECK: Duration = Duration::from_millis(20);
/// Each read asks for up to this much; memory held is what was read, not this.
const READ_SIZE: usize = 64 * 1024;

/// `sluice-stress unbounded-relay`: a relay without backpressure (for scenarios' `--baseline unbounded`).
#[derive(Debug, Clone, Args)]
pub struct UnboundedArgs {
    /// Address clients connect to.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Where every client is relayed to.
    #[arg(long)]
    pub upstream: SocketAddr,
    /// Where `/metrics` is served.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics: SocketAddr,
    /// Exit (code 3) when the RSS or the queued bytes reach this, so it cannot take the machine down.
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    pub cap: u64,
}

/// Totals for one direction, over all connections.
#[derive(Debug, Default)]
struct DirStats {
    queued: AtomicU64,
    bytes: AtomicU64,
}

#[derive(Debug, Default)]
struct Stats {
    dirs: [DirStats; 2],
    active: AtomicU64,
}

pub async fn run(args: UnboundedArgs) -> Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot bind {}", args.listen))?;
    let metrics = std::net::TcpListener::bind(args.metrics)
        .with_context(|| format!("cannot bind {}", args.metrics))?;
    // Ready as sluice says it, so ProxyProcess learns the ports the same way.
    sluice_testkit::notify::ready(
        &[("default", listener.local_addr()?)],
        Some(metrics.local_addr()?),
    );
    eprintln!(
        "INFO unbounded relay listening address={} upstream={}",
        listener.local_addr()?,
        args.upstream
    );
    eprintln!(
        "INFO metrics endpoint listening address={}",
        metrics.local_addr()?
    );
    let stats = Arc::new(Stats::default());
    {
        let stats = stats.clone();
        std::thread::spawn(move || enforce_cap(args.cap, stats));
    }
    {
        let stats = stats.clone();
        std::thread::spawn(move || serve_metrics(metrics, stats));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let accepted = tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            r = listener.accept() => r,
        };
        let Ok((client, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (stats, upstream) = (stats.clone(), args.upstream);
        tokio::spawn(async move {
            stats.active.fetch_add(1, Ordering::Relaxed);
            if let Ok(up) = TcpStream::connect(upstream).await {
                let _ = (client.set_nodelay(true), up.set_nodelay(true));
                let (cr, cw) = client.into_split();
                let (ur, uw) = up.into_split();
                tokio::join!(
                    pump(cr, uw, stats.clone(), 0),
                    pump(ur, cw, stats.clone(), 1)
                );
            }
            stats.active.fetch_sub(1, Ordering::Relaxed);
        });
    }
    eprintln!("INFO unbounded relay stopping");
    Ok(())
}

/// Copies `src` to `dst` through an unbounded queue: reading never waits for writing.
async fn pump(
    mut src: impl AsyncRead + Unpin,
    mut dst: impl AsyncWrite + Unpin + Send + 'static,
    stats: Arc<Stats>,
    dir: usize,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    // Bytes this pump holds, returned to the global gauge when it ends however it ends.
    let held = Arc::new(AtomicU64::new(0));
    // The writer runs as its own task, as in a typical relay: the reader never waits for it.
    let writer = {
        let (stats, held) = (stats.clone(), held.clone());
        tokio::spawn(async move {
            let d = &stats.dirs[dir];
            while let Some(chunk) = rx.recv().await {
                dst.write_all(&chunk).await?;
                let n = chunk.len() as u64;
                held.fetch_sub(n, Ordering::Relaxed);
                d.queued.fetch_sub(n, Ordering::Relaxed);
                d.bytes.fetch_add(n, Ordering::Relaxed);
            }
            dst.shutdown().await
        })
    };
    let d = &stats.dirs[dir];
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(READ_SIZE);
        }
        match src.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                held.fetch_add(n as u64, Ordering::Relaxed);
                d.queued.fetch_add(n as u64, Ordering::Relaxed);
                if tx.send(buf.split().freeze()).is_err() {
                    // The writer failed (its peer is gone): nothing more to relay.
                    break;
                }
            }
        }
    }
    // Dropping `tx` lets the writer finish once the queue is empty.
    drop(tx);
    let _ = writer.await;
    d.queued
        .fetch_sub(held.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Exits the process when the queue or the RSS reaches `cap`. A plain thread, not a task:
/// the relay keeps both cores busy, and a starved runtime would check too late.
fn enforce_cap(cap: u64, stats: Arc<Stats>) {
    loop {
        std::thread::sleep(CAP_CHECK);
        let queued: u64 = stats
            .dirs
            .iter()
            .map(|d| d.queued.load(Ordering::Relaxed))
            .sum();
        let rss = own_rss().unwrap_or(0);
        if rss >= cap || queued >= cap {
            eprintln!(
                "ERROR unbounded relay reached its memory cap: rss={} queued={} cap={}; exiting",
                format_bytes(rss),
                format_bytes(queued),
                format_bytes(cap)
            );
            std::process::exit(CAP_EXIT_CODE);
        }
    }
}

/// Serves `/metrics` from a plain thread, so samples arrive on time however busy the relay is.
fn serve_metrics(listener: std::net::TcpListener, stats: Arc<Stats>) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        // Read the request head; its content does not matter.
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let body = exposition(&stats);
        let response = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(response.as_bytes());
    }
}

fn exposition(stats: &Stats) -> String {
    let mut out = String::new();
    for (name, pick) in [
        ("sluice_queued_bytes", 0usize),
        ("sluice_bytes_total", 1usize),
    ] {
        for (dir, d) in DIRECTIONS.iter().zip(&stats.dirs) {
            let v = if pick == 0 { &d.queued } else { &d.bytes };
            out.push_str(&format!(
                "{name}{{direction=\"{dir}\"}} {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
    }
    out.push_str(&format!(
        "sluice_connections_active {}\nprocess_resident_memory_bytes {}\n",
        stats.active.load(Ordering::Relaxed),
        own_rss().unwrap_or(0)
    ));
    out
}
