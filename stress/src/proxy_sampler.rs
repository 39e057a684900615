//! Samples a running proxy every 100 ms on a thread of its own: its RSS, what its /metrics says (queued bytes, pauses, connections, byte rates, the budget), and the kernel memory in its sockets.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use crate::kernel_memory::{self, SocketMemory};
use sluice::metrics::names;

use crate::proxy_process::{DIRECTIONS, Metrics, ProxyProcess, http_get, rss_of};

/// How often the proxy is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// sluice's gauge of the bytes in its sockets' kernel queues, by direction (newer daemons).
pub const KERNEL_QUEUED: &str = names::KERNEL_QUEUED_BYTES;
/// sluice's gauges of its buffer budget (`buffer.total`; newer daemons).
pub const BUDGET_USED: &str = names::BUDGET_USED_BYTES;
pub const BUDGET_LIMIT: &str = names::BUDGET_LIMIT_BYTES;

/// Whether the samples include the kernel memory in the proxy's sockets (read with `ss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelMemory {
    Read,
    /// `ss` costs a fifth of a core with thousands of sockets, which a latency
    /// measurement would feel.
    Skip,
}

/// One sample of the proxy, taken every 100 ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Seconds since sampling began ([`ProxySampler::started`]).
    pub t: f64,
    pub rss_bytes: u64,
    pub queued_client_to_upstream: u64,
    pub queued_upstream_to_client: u64,
    pub pauses_total: u64,
    pub drains_total: u64,
    pub paused_connections: u64,
    pub connections_active: u64,
    pub bytes_per_sec_client_to_upstream: f64,
    pub bytes_per_sec_upstream_to_client: f64,
    /// Kernel memory in the proxy's TCP sockets, receive plus send queues (`ss` skmem
    /// r + w; see kernel_memory.rs). Absent when `ss` is not installed, and in samples
    /// between readings when there are so many sockets that reading them every 100 ms
    /// would cost more than a fifth of a core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_bytes: Option<u64>,
    /// Of those, the receive queues (skmem r, rmem_alloc).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_rmem_alloc: Option<u64>,
    /// Of those, the send queues (skmem w, wmem_queued).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_wmem_queued: Option<u64>,
    /// sluice's own count of the bytes its sockets' kernel queues hold
    /// (`sluice_kernel_queued_bytes`), when its /metrics has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_queued_client_to_upstream: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_queued_upstream_to_client: Option<u64>,
    /// `sluice_budget_used_bytes` and `sluice_budget_limit_bytes`, when its /metrics has them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_limit_bytes: Option<u64>,
    /// How long this sample's GET /metrics took (connect to last byte), seconds.
    pub scrape_secs: f64,
}

impl Sample {
    pub fn queued(&self) -> u64 {
        self.queued_client_to_upstream + self.queued_upstream_to_client
    }

    /// Both directions of `sluice_kernel_queued_bytes`, when the proxy reports it.
    pub fn kernel_queued(&self) -> Option<u64> {
        Some(self.kernel_queued_client_to_upstream? + self.kernel_queued_upstream_to_client?)
    }
}

/// Samples a proxy every [`SAMPLE_EVERY`] on its own thread, so a busy runtime cannot skew
/// the timing.
pub struct ProxySampler {
    /// When sampling began: samples' `t` counts from here.
    started: Instant,
    shared: Arc<Shared>,
    thread: std::thread::JoinHandle<()>,
}

/// What the sampling thread and the [`ProxySampler`] share.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    samples: Mutex<Vec<Sample>>,
    /// Failed scrapes and kernel readings.
    errors: Mutex<usize>,
}

impl ProxySampler {
    /// Starts sampling `proxy`. Fails only where the kernel memory must be read and cannot
    /// be (`ss` missing under CI).
    pub fn start(proxy: &ProxyProcess, kernel: KernelMemory) -> Result<Self> {
        let pid = proxy.pid();
        let kernel = (kernel == KernelMemory::Read && kernel_memory::ss_available()?)
            .then(|| kernel_memory::Reader::new(vec![pid], SAMPLE_EVERY));
        let started = Instant::now();
        let probe = Probe {
            pid,
            metrics: proxy.metrics_addr(),
            kernel,
            started,
            last_bytes: None,
        };
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = shared.clone();
            std::thread::spawn(move || probe.sample_until_stopped(&shared))
        };
        Ok(ProxySampler {
            started,
            shared,
            thread,
        })
    }

    /// When sampling began; samples' `t` is seconds since then.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The latest sample (zeros before the first).
    pub fn last(&self) -> Sample {
        lock(&self.shared.samples)
            .last()
            .cloned()
            .unwrap_or_default()
    }

    /// Stops sampling; returns the samples and how many scrapes failed.
    pub fn finish(self) -> (Vec<Sample>, usize) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let samples = std::mem::take(&mut *lock(&self.shared.samples));
        let errors = *lock(&self.shared.errors);
        (samples, errors)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the sampling thread reads from, and what it remembers from one sample to the next.
struct Probe {
    pid: u32,
    metrics: Option<SocketAddr>,
    kernel: Option<kernel_memory::Reader>,
    started: Instant,
    /// When the last sample was taken and `sluice_bytes_total` by direction then, for the
    /// byte rates.
    last_bytes: Option<(Instant, [f64; 2])>,
}

/// One round of readings.
struct Round {
    /// None when the scrape failed.
    sample: Option<Sample>,
    /// How many readings failed (the scrape, the kernel's).
    failed: usize,
}

impl Probe {
    /// Takes a sample every [`SAMPLE_EVERY`] until `shared.stop`, or until the process is gone.
    fn sample_until_stopped(mut self, shared: &Shared) {
        let mut next = Instant::now();
        while !shared.stop.load(Ordering::Relaxed) {
            // No RSS: the process is gone (the baseline at its cap); nothing more to see.
            let Some(round) = self.read() else { break };
            *lock(&shared.errors) += round.failed;
            if let Some(sample) = round.sample {
                lock(&shared.samples).push(sample);
            }
            next += SAMPLE_EVERY;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
    }

    /// One round: GET /metrics, then RSS right after, so memory and queue describe the same
    /// moment, then the kernel memory. None once the process is gone.
    fn read(&mut self) -> Option<Round> {
        let asked = Instant::now();
        let text = self.metrics.map(|addr| http_get(addr, "/metrics"));
        // The request alone: connect, send, read to the last byte.
        let scrape_secs = asked.elapsed().as_secs_f64();
        let rss = rss_of(self.pid).ok()?;
        let mut failed = 0;
        let in_sockets = match self.kernel.as_mut().and_then(|k| k.poll(false)) {
            Some(Ok(reading)) => Some(reading),
            Some(Err(_)) => {
                failed += 1;
                None
            }
            None => None,
        };
        let scraped = match text {
            Some(text) => text.map(|t| Metrics::parse(&t)),
            None => Ok(Metrics::default()),
        };
        let sample = match scraped {
            Ok(m) => Some(self.sample(&m, rss, in_sockets, scrape_secs)),
            Err(_) => {
                failed += 1;
                None
            }
        };
        Some(Round { sample, failed })
    }

    /// A sample from one scrape and the readings beside it.
    fn sample(
        &mut self,
        m: &Metrics,
        rss: u64,
        in_sockets: Option<SocketMemory>,
        scrape_secs: f64,
    ) -> Sample {
        let rates = self.byte_rates(DIRECTIONS.map(|d| m.direction(names::BYTES_TOTAL, d)));
        let queued = |dir| m.direction(names::QUEUED_BYTES, dir) as u64;
        let gauge = |name, labels: &[(&str, &str)]| m.get(name, labels).map(|v| v as u64);
        let kernel_queued = |dir| gauge(KERNEL_QUEUED, &[("direction", dir)]);
        Sample {
            t: self.started.elapsed().as_secs_f64(),
            rss_bytes: rss,
            queued_client_to_upstream: queued(DIRECTIONS[0]),
            queued_upstream_to_client: queued(DIRECTIONS[1]),
            pauses_total: m.sum(names::PAUSES_TOTAL) as u64,
            drains_total: m.sum(names::DRAINS_TOTAL) as u64,
            paused_connections: m.sum(names::PAUSED_CONNECTIONS) as u64,
            connections_active: m.sum(names::CONNECTIONS_ACTIVE) as u64,
            bytes_per_sec_client_to_upstream: rates[0],
            bytes_per_sec_upstream_to_client: rates[1],
            kernel_bytes: in_sockets.map(|k| k.bytes()),
            kernel_rmem_alloc: in_sockets.map(|k| k.rmem_alloc),
            kernel_wmem_queued: in_sockets.map(|k| k.wmem_queued),
            kernel_queued_client_to_upstream: kernel_queued(DIRECTIONS[0]),
            kernel_queued_upstream_to_client: kernel_queued(DIRECTIONS[1]),
            budget_used_bytes: gauge(BUDGET_USED, &[]),
            budget_limit_bytes: gauge(BUDGET_LIMIT, &[]),
            scrape_secs,
        }
    }

    /// Bytes per second by direction since the last sample (zeros for the first), from
    /// the byte counters `bytes` now.
    fn byte_rates(&mut self, bytes: [f64; 2]) -> [f64; 2] {
        let now = Instant::now();
        let rates = match self.last_bytes {
            Some((t0, b0)) => {
                let dt = now.duration_since(t0).as_secs_f64().max(1e-3);
                [(bytes[0] - b0[0]) / dt, (bytes[1] - b0[1]) / dt]
            }
            None => [0.0, 0.0],
        };
        self.last_bytes = Some((now, bytes));
        rates
    }
}
