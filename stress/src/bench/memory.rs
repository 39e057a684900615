//! Memory per connection: a fresh subject process per test (allocators keep what they once
//! took), its resident memory sampled throughout, peak minus start divided by connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};

use super::subjects::{Profile, Running, Subject};
use super::traffic;
use super::upstreams::{Mode, Upstream};
use crate::kernel_memory::{self, SocketMemory};

/// How often resident memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// How often, at most, the kernel memory of the subject's sockets is read (each reading
/// runs `ss`; see `kernel_memory::Reader`).
const KERNEL_EVERY: Duration = Duration::from_millis(100);

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
    /// What the kernel held in the subject's own sockets (slow-reader tests, when `ss` is
    /// installed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelFigure>,
}

impl MemoryFigure {
    /// RSS plus kernel memory per connection, KiB, when the kernel was read.
    pub fn total_kib_per_conn(&self) -> Option<f64> {
        Some(self.kib_per_conn + self.kernel.as_ref()?.kib_per_conn)
    }
}

/// The kernel memory in a subject's own TCP sockets (client side and upstream side), at the
/// fullest reading while the connections were open. Before any connection the subject has
/// only its listener, which holds none, so nothing is subtracted.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelFigure {
    /// Receive queues plus send queues (skmem r + w) per connection, KiB.
    pub kib_per_conn: f64,
    /// Receive queues (skmem r, rmem_alloc) per connection, KiB.
    pub recv_kib_per_conn: f64,
    /// Send queues (skmem w, wmem_queued) per connection, KiB.
    pub send_kib_per_conn: f64,
    /// The fullest reading, summed over the subject's sockets, bytes.
    pub peak: SocketMemory,
}

/// What a [`PeakSampler`] saw: the highest RSS, KiB, and the fullest kernel reading.
struct Peaks {
    rss_kib: u64,
    kernel: Option<SocketMemory>,
}

/// Samples a running subject's RSS (and, if asked, its sockets' kernel memory) on a plain
/// thread, so a busy runtime cannot starve it, and keeps the highest values.
struct PeakSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Peaks>>,
}

impl PeakSampler {
    fn start(pids: Vec<u32>, read_kernel: bool) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut kernel =
                    read_kernel.then(|| kernel_memory::Reader::new(pids.clone(), KERNEL_EVERY));
                let mut peaks = Peaks {
                    rss_kib: 0,
                    kernel: None,
                };
                loop {
                    // The last round, after `finish`, reads everything once more.
                    let last = stop.load(Ordering::Relaxed);
                    let rss = pids.iter().map(|&pid| super::subjects::rss_kib(pid)).sum();
                    peaks.rss_kib = peaks.rss_kib.max(rss);
                    if let Some(reading) = kernel.as_mut().and_then(|k| k.poll(last)) {
                        let reading = reading?;
                        if peaks
                            .kernel
                            .is_none_or(|peak| reading.bytes() > peak.bytes())
                        {
                            peaks.kernel = Some(reading);
                        }
                    }
                    if last {
                        return Ok(peaks);
                    }
                    std::thread::sleep(SAMPLE_EVERY);
                }
            })
        };
        PeakSampler { stop, thread }
    }

    /// Take one last sample and return the peaks.
    fn finish(self) -> Result<Peaks> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the memory sampler panicked"))?
    }
}

async fn fresh(subject: &Subject, upstream: &Upstream, profile: Profile) -> Result<(Running, u64)> {
    let running = tokio::task::block_in_place(|| subject.launch(upstream.addr, profile))?;
    tokio::time::sleep(SETTLE).await;
    let start = running.rss_kib();
    ensure!(start > 0, "could not read the subject's RSS");
    Ok((running, start))
}

fn figure(conns: usize, start: u64, peaks: Peaks, bytes_read: Option<u64>) -> MemoryFigure {
    let per_conn = |bytes: u64| bytes as f64 / 1024.0 / conns as f64;
    MemoryFigure {
        kib_per_conn: peaks.rss_kib.saturating_sub(start) as f64 / conns as f64,
        conns,
        start_kib: start,
        peak_kib: peaks.rss_kib,
        bytes_read,
        kernel: peaks.kernel.map(|peak| KernelFigure {
            kib_per_conn: per_conn(peak.bytes()),
            recv_kib_per_conn: per_conn(peak.rmem_alloc),
            send_kib_per_conn: per_conn(peak.wmem_queued),
            peak,
        }),
    }
}

/// `conns` idle proxied connections, each after one 64-byte round trip (so both sides were
/// really connected and any buffer taken for that data has had the chance to be given back).
pub async fn idle(subject: &Subject, conns: usize, hold: Duration) -> Result<MemoryFigure> {
    let upstream = Upstream::start(Mode::Echo).await?;
    let (mut running, start) = fresh(subject, &upstream, Profile::Memory).await?;
    let sampler = PeakSampler::start(running.pids(), false);
    let streams = traffic::open_idle(running.addr, conns).await?;
    tokio::time::sleep(hold).await;
    let peaks = sampler.finish();
    drop(streams);
    tokio::task::block_in_place(|| running.stop());
    Ok(figure(conns, start, peaks?, None))
}

/// How the slow readers are set up.
#[derive(Clone, Copy, Debug)]
pub struct SlowReaders {
    pub conns: usize,
    /// The clients' SO_RCVBUF, bytes.
    pub rcvbuf: u32,
    /// Bytes per second each client reads.
    pub rate: f64,
    pub duration: Duration,
}

/// Slow readers: `conns` clients with a small receive buffer, each reading `rate` bytes/s
/// from an upstream that writes as fast as it can, through `subject` started with
/// `profile`. With `read_kernel`, the kernel memory of the subject's sockets is read too,
/// last at the end while the connections are still open and their queues full.
pub async fn slow_readers(
    subject: &Subject,
    profile: Profile,
    readers: SlowReaders,
    read_kernel: bool,
) -> Result<MemoryFigure> {
    let upstream = Upstream::start(Mode::Source).await?;
    let (mut running, start) = fresh(subject, &upstream, profile).await?;
    let sampler = PeakSampler::start(running.pids(), read_kernel);
    let SlowReaders {
        conns,
        rcvbuf,
        rate,
        duration,
    } = readers;
    let report = traffic::slow_readers(running.addr, conns, rcvbuf, rate, duration).await;
    let peaks = tokio::task::block_in_place(|| sampler.finish());
    let report = report?;
    drop(report.streams);
    tokio::task::block_in_place(|| running.stop());
    ensure!(report.bytes > 0, "the slow readers received nothing");
    Ok(figure(conns, start, peaks?, Some(report.bytes)))
}
