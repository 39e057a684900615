//! Memory per connection: a fresh subject process per test (allocators keep what they once
//! took), its resident memory sampled throughout, peak minus start divided by connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Result, ensure};

use super::load;
use super::subjects::{Profile, Running, Subject};
use super::upstreams::{Mode, Upstream};

/// How often resident memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Time a freshly started subject gets to finish its own start-up before "start" is read.
const SETTLE: Duration = Duration::from_millis(300);

/// One memory figure with the raw numbers behind it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryFigure {
    pub kib_per_conn: f64,
    pub conns: usize,
    /// RSS of the fresh process tree before any connection, KiB.
    pub start_kib: u64,
    /// Highest RSS seen while the connections were open, KiB.
    pub peak_kib: u64,
    /// Bytes the clients read (slow-reader test only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_read: Option<u64>,
}

/// Samples a running subject's RSS on a plain thread (so a busy runtime cannot starve it)
/// and keeps the highest value.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl Sampler {
    fn start(pids: Vec<u32>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                loop {
                    let rss = pids.iter().map(|&pid| super::subjects::rss_kib(pid)).sum();
                    peak.fetch_max(rss, Ordering::Relaxed);
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(SAMPLE_EVERY);
                }
            })
        };
        Sampler { stop, peak, thread }
    }

    /// Take one last sample and return the peak.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak.load(Ordering::Relaxed)
    }
}

async fn fresh(subject: &Subject, upstream: &Upstream) -> Result<(Running, u64)> {
    let running = tokio::task::block_in_place(|| subject.launch(upstream.addr, Profile::Memory))?;
    tokio::time::sleep(SETTLE).await;
    let start = running.rss_kib();
    ensure!(start > 0, "could not read the subject's RSS");
    Ok((running, start))
}

fn figure(conns: usize, start: u64, peak: u64, bytes_read: Option<u64>) -> MemoryFigure {
    MemoryFigure {
        kib_per_conn: peak.saturating_sub(start) as f64 / conns as f64,
        conns,
        start_kib: start,
        peak_kib: peak,
        bytes_read,
    }
}

/// `conns` idle proxied connections, each after one 64-byte round trip (so both sides were
/// really connected and any buffer taken for that data has had the chance to be given back).
pub async fn idle(subject: &Subject, conns: usize, hold: Duration) -> Result<MemoryFigure> {
    let upstream = Upstream::start(Mode::Echo).await?;
    let (mut running, start) = fresh(subject, &upstream).await?;
    let sampler = Sampler::start(running.pids());
    let streams = load::open_idle(running.addr, conns).await?;
    tokio::time::sleep(hold).await;
    let peak = sampler.finish();
    drop(streams);
    tokio::task::block_in_place(|| running.stop());
    Ok(figure(conns, start, peak, None))
}

/// Slow readers: `conns` clients with a small receive buffer, each reading `rate` bytes/s
/// from an upstream that writes as fast as it can.
pub async fn slow_readers(
    subject: &Subject,
    conns: usize,
    rcvbuf: u32,
    rate: f64,
    duration: Duration,
) -> Result<MemoryFigure> {
    let upstream = Upstream::start(Mode::Source).await?;
    let (mut running, start) = fresh(subject, &upstream).await?;
    let sampler = Sampler::start(running.pids());
    let report = load::slow_readers(running.addr, conns, rcvbuf, rate, duration).await?;
    let peak = sampler.finish();
    tokio::task::block_in_place(|| running.stop());
    ensure!(report.bytes > 0, "the slow readers received nothing");
    Ok(figure(conns, start, peak, Some(report.bytes)))
}
