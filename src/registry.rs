//! The live connections: who they are, what each holds in sluice and in the kernel, for
//! `sluice_kernel_queued_bytes` and `GET /connections`.
//!
//! A connection registers when its task starts and deregisters before its sockets close.
//! The relay keeps its entry's per-direction figures current (plain atomic stores, once
//! per poll, as it reports to the metrics). The kernel's share is asked of the sockets,
//! two `ioctl`s each: for `/connections` at the request, for the gauge by a sampler
//! thread once a second while scrapes come (see [`Registry::kernel_queued`]).
//!
//! The entries are spread over [`SHARDS`] mutexes, so a scrape holds any one of them only
//! for the few hundred connections it covers, and a connection that opens or closes waits
//! at most that long.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::socket::{unacked_bytes, unread_bytes};

/// Shards of the registry: enough that a scrape of 10,000 connections holds each lock
/// for about 150 of them.
const SHARDS: usize = 64;

/// Every live connection, by id.
pub struct Registry {
    shards: Box<[Shard]>,
    next_id: AtomicU64,
    sampler: Mutex<Sampler>,
}

/// The kernel figures' latest sample, and when it was last asked for.
struct Sampler {
    /// `None` while no sampler thread runs.
    totals: Option<KernelTotals>,
    asked: Instant,
}

/// How often the sampler thread samples the kernel's bytes (more seldom if sampling
/// takes more than 1/[`SAMPLE_SHARE`] of the time).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The sampler takes at most 1/SAMPLE_SHARE of one core (5 %): with many connections
/// it samples less often rather than costing the relay more.
const SAMPLE_SHARE: u32 = 20;
/// The sampler thread stops when nobody has asked for this long.
const SAMPLE_UNTIL_QUIET_FOR: Duration = Duration::from_secs(120);

/// The sampler thread: samples every [`SAMPLE_EVERY`] until the registry is gone or
/// nobody has asked for [`SAMPLE_UNTIL_QUIET_FOR`].
fn sample_while_asked(registry: Weak<Registry>) {
    let mut pause = SAMPLE_EVERY;
    loop {
        std::thread::sleep(pause);
        let Some(registry) = registry.upgrade() else {
            return;
        };
        let started = Instant::now();
        let totals = registry.kernel_totals();
        let took = started.elapsed();
        let mut sampler = registry.sampler.lock().unwrap_or_else(|e| e.into_inner());
        if sampler.asked.elapsed() > SAMPLE_UNTIL_QUIET_FOR {
            sampler.totals = None;
            return;
        }
        sampler.totals = Some(totals);
        pause = SAMPLE_EVERY.max(took * SAMPLE_SHARE);
    }
}

/// The kernel's bytes per direction, by service.
pub type KernelTotals = HashMap<Arc<str>, [u64; 2]>;

/// Some of the live connections, by id.
type Shard = Mutex<HashMap<u64, Arc<Entry>>>;

/// One live connection.
pub struct Entry {
    /// Unique for the life of the process, in order of arrival.
    pub id: u64,
    /// The service that accepted it.
    pub service: Arc<str>,
    pub client: SocketAddr,
    client_fd: RawFd,
    /// Set once the upstream has answered; until then the connection is connecting.
    upstream: OnceLock<SocketAddr>,
    /// The upstream socket while it is open (-1 before and after); taken off only under
    /// the entry's shard lock, which a scrape holds while it asks the socket.
    upstream_fd: AtomicI32,
    pub started: Instant,
    /// Client→upstream first.
    pub directions: [DirectionFigures; 2],
}

/// What one direction of a connection holds and has done, as the relay last reported.
#[derive(Default)]
pub struct DirectionFigures {
    /// Bytes delivered to the destination.
    pub delivered: AtomicU64,
    /// Bytes in sluice's queue.
    pub queued: AtomicU64,
    /// When the running pause began, on the metrics clock (`Metrics::now`, seconds, as
    /// f64 bits); 0 when not paused.
    paused_since: AtomicU64,
}

impl DirectionFigures {
    /// Records that a pause began at `at` (`Some`, on the metrics clock) or ended.
    pub fn set_paused(&self, at: Option<f64>) {
        // The clock has moved on from 0 by the time anything pauses; the floor keeps a
        // running pause from reading as none all the same.
        let v = at.map_or(0, |t| t.max(f64::MIN_POSITIVE).to_bits());
        self.paused_since.store(v, Ordering::Relaxed);
    }

    /// Whether a pause is running.
    pub fn is_paused(&self) -> bool {
        self.paused_since.load(Ordering::Relaxed) != 0
    }

    /// How long the running pause has lasted at `now` (metrics clock), if one is running.
    fn paused_for(&self, now: f64) -> Option<f64> {
        match self.paused_since.load(Ordering::Relaxed) {
            0 => None,
            v => Some((now - f64::from_bits(v)).max(0.0)),
        }
    }
}

/// Bytes the kernel holds for one direction: unread in the source socket's receive queue,
/// and not yet acknowledged by the peer (unsent or in flight) in the destination socket's
/// send queue. Both are bytes sluice's sockets pin in the kernel: a sent byte stays in
/// memory until the peer acknowledges it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KernelBytes {
    /// `SIOCINQ` on the source socket.
    pub source_unread: u64,
    /// `SIOCOUTQ` on the destination socket.
    pub destination_unacked: u64,
}

impl KernelBytes {
    pub fn total(&self) -> u64 {
        self.source_unread + self.destination_unacked
    }
}

impl Entry {
    /// The upstream this connection is relayed to, once connected.
    pub fn upstream(&self) -> Option<SocketAddr> {
        self.upstream.get().copied()
    }

    /// The kernel's bytes per direction now (zero while the upstream socket is not
    /// open, as nothing is relayed then). Call only with the entry's shard locked, or
    /// from the connection's own task.
    pub fn kernel_bytes(&self) -> [KernelBytes; 2] {
        let upstream = self.upstream_fd.load(Ordering::Relaxed);
        if upstream < 0 {
            return [KernelBytes::default(); 2];
        }
        let client = self.client_fd;
        [
            KernelBytes {
                source_unread: unread_bytes(&client) as u64,
                destination_unacked: unacked_bytes(&upstream) as u64,
            },
            KernelBytes {
                source_unread: unread_bytes(&upstream) as u64,
                destination_unacked: unacked_bytes(&client) as u64,
            },
        ]
    }
}

/// Keeps a connection in the registry; removes it on drop, which must come before its
/// sockets close.
pub struct Registered<'a> {
    registry: &'a Registry,
    entry: Arc<Entry>,
}

impl std::ops::Deref for Registered<'_> {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        &self.entry
    }
}

impl<'a> Registered<'a> {
    /// Records the connected upstream socket; the returned guard takes it off the entry
    /// and must drop before the socket closes.
    pub fn connected(&self, address: SocketAddr, fd: RawFd) -> UpstreamListed<'_, 'a> {
        let _ = self.entry.upstream.set(address);
        // No lock needed to put an open socket on the entry, only to take it off.
        self.entry.upstream_fd.store(fd, Ordering::Relaxed);
        UpstreamListed(self)
    }

    fn set_upstream_fd(&self, fd: RawFd) {
        let _shard = self
            .registry
            .shard(self.entry.id)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.entry.upstream_fd.store(fd, Ordering::Relaxed);
    }
}

/// Keeps a connection's upstream socket on its entry; see [`Registered::connected`].
pub struct UpstreamListed<'r, 'a>(&'r Registered<'a>);

impl Drop for UpstreamListed<'_, '_> {
    fn drop(&mut self) {
        self.0.set_upstream_fd(-1);
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry
            .shard(self.entry.id)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.entry.id);
    }
}

/// The orders `GET /connections` can list in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    /// Most bytes queued in sluice (both directions) first.
    Queued,
    /// Most bytes held in the kernel (both directions) first.
    Kernel,
    /// Oldest first.
    Age,
}

impl SortBy {
    pub fn parse(s: &str) -> Option<SortBy> {
        match s {
            "queued" => Some(SortBy::Queued),
            "kernel" => Some(SortBy::Kernel),
            "age" => Some(SortBy::Age),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SortBy::Queued => "queued",
            SortBy::Kernel => "kernel",
            SortBy::Age => "age",
        }
    }
}

/// What `GET /connections` answers.
#[derive(Debug, Serialize)]
pub struct Listing {
    /// Live connections, listed or not.
    pub live: usize,
    /// The order they are listed in.
    pub sort: &'static str,
    pub connections: Vec<ConnectionView>,
}

/// One connection as `GET /connections` shows it.
#[derive(Debug, Serialize)]
pub struct ConnectionView {
    pub id: u64,
    pub service: String,
    pub client: String,
    /// `null` while still connecting.
    pub upstream: Option<String>,
    pub age_seconds: f64,
    pub client_to_upstream: DirectionView,
    pub upstream_to_client: DirectionView,
}

/// One direction of a connection, for `GET /connections`.
#[derive(Debug, Serialize)]
pub struct DirectionView {
    /// Bytes delivered to the destination so far.
    pub bytes: u64,
    /// Bytes in sluice's queue now.
    pub queued: u64,
    /// Bytes in the kernel now: the source's unread plus the destination's unacknowledged.
    pub kernel: u64,
    pub kernel_source_unread: u64,
    pub kernel_destination_unacked: u64,
    /// How long the running pause has lasted; `null` when reading.
    pub paused_seconds: Option<f64>,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next_id: AtomicU64::new(1),
            sampler: Mutex::new(Sampler {
                totals: None,
                asked: Instant::now(),
            }),
        }
    }
}

impl Registry {
    fn shard(&self, id: u64) -> &Shard {
        &self.shards[id as usize % SHARDS]
    }

    /// Registers a client connection whose socket is `client_fd`; it stays listed until
    /// the guard drops, which must be before that socket closes.
    pub fn register(
        &self,
        service: Arc<str>,
        client: SocketAddr,
        client_fd: RawFd,
    ) -> Registered<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            id,
            service,
            client,
            client_fd,
            upstream: OnceLock::new(),
            upstream_fd: AtomicI32::new(-1),
            started: Instant::now(),
            directions: Default::default(),
        });
        self.shard(id)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, entry.clone());
        Registered {
            registry: self,
            entry,
        }
    }

    /// Calls `f` on every live entry, one shard lock at a time (so no entry deregisters,
    /// and no socket closes, while `f` looks at it).
    fn for_each(&self, mut f: impl FnMut(&Entry)) {
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for e in shard.values() {
                f(e);
            }
        }
    }

    /// The kernel's bytes per direction, summed over every live connection, as last
    /// sampled: at most [`SAMPLE_EVERY`] old while someone keeps asking (the first call,
    /// and the first after a quiet spell, samples on the spot).
    ///
    /// Sampling asks each socket (about 0.6 µs a question on the machines measured, so
    /// 20 ms at 8,000 connections), which a scrape should not wait for: a thread of its
    /// own keeps the sample fresh while scrapes come, and stops when they stop.
    pub fn kernel_queued(self: &Arc<Self>) -> KernelTotals {
        let mut sampler = self.sampler.lock().unwrap_or_else(|e| e.into_inner());
        sampler.asked = Instant::now();
        if let Some(totals) = &sampler.totals {
            return totals.clone();
        }
        let totals = self.kernel_totals();
        sampler.totals = Some(totals.clone());
        let registry = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("sluice-kernel-sampler".into())
            .spawn(move || sample_while_asked(registry));
        if spawned.is_err() {
            // No thread: the next scrape samples on the spot again.
            sampler.totals = None;
        }
        totals
    }

    /// The kernel's bytes per direction summed over every live connection of each
    /// service, now.
    pub fn kernel_totals(&self) -> KernelTotals {
        let mut totals = KernelTotals::new();
        self.for_each(|e| {
            let sums = totals.entry(e.service.clone()).or_default();
            for (t, k) in sums.iter_mut().zip(e.kernel_bytes()) {
                *t += k.total();
            }
        });
        totals
    }

    /// Every live connection, in `sort` order, at most `limit` of them; `clock` is now
    /// on the metrics clock, which pause times are kept in.
    pub fn list(&self, sort: SortBy, limit: usize, clock: f64) -> Listing {
        let now = Instant::now();
        let mut all = Vec::new();
        self.for_each(|e| all.push(view(e, now, clock)));
        let key = |c: &ConnectionView| match sort {
            SortBy::Queued => c.client_to_upstream.queued + c.upstream_to_client.queued,
            SortBy::Kernel => c.client_to_upstream.kernel + c.upstream_to_client.kernel,
            SortBy::Age => u64::MAX - c.id,
        };
        // Ties (most connections hold nothing) in order of arrival.
        all.sort_unstable_by(|a, b| key(b).cmp(&key(a)).then(a.id.cmp(&b.id)));
        let live = all.len();
        all.truncate(limit);
        Listing {
            live,
            sort: sort.as_str(),
            connections: all,
        }
    }
}

fn view(e: &Entry, now: Instant, clock: f64) -> ConnectionView {
    let kernel = e.kernel_bytes();
    let direction = |i: usize| {
        let d = &e.directions[i];
        DirectionView {
            bytes: d.delivered.load(Ordering::Relaxed),
            queued: d.queued.load(Ordering::Relaxed),
            kernel: kernel[i].total(),
            kernel_source_unread: kernel[i].source_unread,
            kernel_destination_unacked: kernel[i].destination_unacked,
            paused_seconds: d.paused_for(clock),
        }
    };
    ConnectionView {
        id: e.id,
        service: e.service.to_string(),
        client: e.client.to_string(),
        upstream: e.upstream().map(|a| a.to_string()),
        age_seconds: now.saturating_duration_since(e.started).as_secs_f64(),
        client_to_upstream: direction(0),
        upstream_to_client: direction(1),
    }
}
