//! The accept loop: connection limits, access rules, accept-error backoff, reloads and
//! graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use ipnet::IpNet;
use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::budget::Budget;
use crate::config::{Config, Scheduler};
use crate::connection;
use crate::metrics::{CloseReason, Metrics};
use crate::socket::{Tuning, reset_on_close};

/// Longest wait between accept retries after an error such as EMFILE: short enough that
/// a freed descriptor is used soon, long enough that a full fd table does not spin a core.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one accept-error log line per this interval; the rest are counted into it.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(1);

/// A proxy instance: its configuration (replaceable while running) and its metrics.
pub struct Server {
    config: watch::Sender<Arc<Config>>,
    metrics: Arc<Metrics>,
    /// `buffer.total`, shared by every connection.
    budget: Arc<Budget>,
    /// Live connections per worker thread, once [`Server::run`] has started them.
    live: std::sync::OnceLock<Arc<[AtomicUsize]>>,
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0} cannot change on reload; restart sluice to change it")]
    Fixed(&'static str),
}

impl Server {
    /// A server for a validated configuration.
    pub fn new(config: Config) -> Server {
        let metrics = Metrics::new(config.bounds());
        let budget = Budget::new(
            config.buffer.total.as_u64() as usize,
            metrics.budget_gauges(),
        );
        Server {
            config: watch::Sender::new(Arc::new(config)),
            metrics,
            budget: Arc::new(budget),
            live: std::sync::OnceLock::new(),
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Live connections on each worker thread (empty before [`Server::run`] starts
    /// them): how evenly the connections are spread.
    pub fn worker_connections(&self) -> Vec<usize> {
        self.live.get().map_or_else(Vec::new, |live| {
            live.iter().map(|n| n.load(Ordering::Relaxed)).collect()
        })
    }

    /// The configuration new connections get now.
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Puts a validated configuration in force for new connections; live ones keep the
    /// one they started with. Addresses that are bound cannot change this way.
    pub fn reload(&self, new: Config) -> Result<(), ReloadError> {
        let old = self.config();
        if new.listen.address != old.listen.address {
            return Err(ReloadError::Fixed("listen.address"));
        }
        if new.metrics.address != old.metrics.address {
            return Err(ReloadError::Fixed("metrics.address"));
        }
        if new.runtime.worker_count() != old.runtime.worker_count() {
            return Err(ReloadError::Fixed("runtime.workers"));
        }
        if new.runtime.scheduler != old.runtime.scheduler {
            return Err(ReloadError::Fixed("runtime.scheduler"));
        }
        self.metrics.set_limits(new.bounds());
        self.budget.resize(new.buffer.total.as_u64() as usize);
        self.config.send_replace(Arc::new(new));
        Ok(())
    }

    /// Accepts and relays clients until `shutdown` fires, then lets live connections
    /// finish for up to `timeouts.shutdown_grace` and closes the rest.
    ///
    /// The work is done by `runtime.workers` threads. With `runtime.scheduler =
    /// "pinned"` each runs its own single-threaded tokio runtime and accept loop on the
    /// shared listening socket, and a connection stays on one of them (the least busy)
    /// for its whole life, so its wake-ups never cross threads (HAProxy's and nginx's
    /// shape). With `"stealing"` one accept loop runs on one work-stealing runtime of
    /// that many threads. Either way the limits, the drain and the metrics are shared,
    /// so they stay process-wide and exact.
    pub async fn run(&self, listener: TcpListener, shutdown: CancellationToken) -> io::Result<()> {
        let config = self.config();
        let local = listener.local_addr()?;
        // Accepted sockets inherit the listener's options (buffer sizes before their
        // handshake, nodelay, keepalive): set once here, not per client.
        Tuning::client(&config.socket).apply(&SockRef::from(&listener))?;
        let threads = config.runtime.worker_count();
        // Runtimes are built before any thread starts, so a failure leaves nothing behind.
        // Sockets and timers only: signals are the control thread's, and a signal driver
        // per runtime would cost a descriptor each.
        let runtimes = match config.runtime.scheduler {
            Scheduler::Pinned => (0..threads)
                .map(|_| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_io()
                        .enable_time()
                        .build()
                })
                .collect::<io::Result<Vec<_>>>()?,
            Scheduler::Stealing => vec![
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .thread_name("sluice-worker")
                    .enable_io()
                    .enable_time()
                    .build()?,
            ],
        };
        // One accept loop (and one balancing slot) per runtime.
        let workers = runtimes.len();
        let listener = listener.into_std()?;
        let fd_cap = descriptor_cap();
        let shared = Arc::new(Accepting {
            metrics: self.metrics.clone(),
            budget: self.budget.clone(),
            tracker: TaskTracker::new(),
            force_close: CancellationToken::new(),
            shutdown: shutdown.clone(),
            per_client: Arc::new(PerClient::default()),
            limit: Mutex::new(Limit::new(config.listen.max_connections.min(fd_cap))),
            fd_cap,
            warned_fd_cap: AtomicBool::new(false),
            live: self
                .live
                .get_or_init(|| (0..workers).map(|_| AtomicUsize::new(0)).collect())
                .clone(),
        });
        // Each worker's inbox, for clients another worker accepted and handed over.
        let (inboxes, inbox_rxs): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| mpsc::unbounded_channel()).unzip();
        let mut stopped = Vec::with_capacity(workers);
        let mut registered = Vec::with_capacity(workers);
        for (i, (runtime, inbox)) in runtimes.into_iter().zip(inbox_rxs).enumerate() {
            let listener = listener.try_clone()?;
            let (shared, config, inboxes) =
                (shared.clone(), self.config.subscribe(), inboxes.clone());
            let (accepting, accepting_rx) = tokio::sync::oneshot::channel();
            let (accepting_done, accepting_done_rx) = tokio::sync::oneshot::channel();
            registered.push(accepting_rx);
            stopped.push(accepting_done_rx);
            std::thread::Builder::new()
                .name(format!("sluice-worker-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        // Tracked, so the drain waits for clients still on their way here.
                        shared
                            .tracker
                            .spawn(receive_handoffs(shared.clone(), inbox));
                        let result = match TcpListener::from_std(listener) {
                            Ok(l) => {
                                let _ = accepting.send(());
                                accept_loop(&shared, i, l, config, inboxes).await
                            }
                            Err(e) => {
                                // Nothing to wait for from this worker: let `run` go on
                                // and the other workers' inboxes close when they stop.
                                drop((accepting, inboxes));
                                Err(e)
                            }
                        };
                        let _ = accepting_done.send(result);
                        // This thread's connections live on its runtime: keep it turning
                        // until every connection of every worker has ended.
                        shared.tracker.wait().await;
                    })
                })?;
        }
        // The workers hold their own handles on the listening socket, and the only
        // senders to each other's inboxes: once every accept loop has ended, every inbox
        // closes.
        drop(listener);
        drop(inboxes);
        // "Listening" once every worker is accepting (a worker that failed to register
        // reports why below).
        for rx in registered {
            let _ = rx.await;
        }
        tracing::info!(address = %local, upstream = %config.upstream.address, workers = threads, scheduler = ?config.runtime.scheduler, "sluice listening");

        let mut result = Ok(());
        for rx in stopped {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(io::Error::other("a worker thread died")),
            }
        }
        // New clients are refused from here on: every handle on the listening socket is
        // closed.
        let tracker = &shared.tracker;
        tracker.close();
        let grace = self.config().timeouts.shutdown_grace;
        tracing::info!(live = tracker.len(), grace = %humantime::format_duration(grace), "shutdown begun");
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::info!(
                live = tracker.len(),
                "shutdown grace over; closing live connections"
            );
            shared.force_close.cancel();
            tracker.wait().await;
        }
        tracing::info!("shutdown finished");
        result
    }
}

/// What the workers' accept loops share: one limit, one drain, one set of metrics.
struct Accepting {
    metrics: Arc<Metrics>,
    budget: Arc<Budget>,
    /// Every connection task, whichever worker runs it, for the drain at shutdown.
    tracker: TaskTracker,
    /// Cut live connections short: fired when the shutdown grace is over.
    force_close: CancellationToken,
    /// Stop accepting.
    shutdown: CancellationToken,
    per_client: Arc<PerClient>,
    /// `listen.max_connections`, resized by whichever worker first sees a reload.
    limit: Mutex<Limit>,
    /// Connections the descriptor limit leaves room for.
    fd_cap: usize,
    /// The descriptor warning is given once per process, not once per worker.
    warned_fd_cap: AtomicBool,
    /// Live connections on each worker, for balancing.
    live: Arc<[AtomicUsize]>,
}

/// A client accepted by one worker and handed to another, less busy one.
struct Handoff {
    /// Deregistered from the accepting worker's event loop; registered again on arrival.
    stream: std::net::TcpStream,
    peer: SocketAddr,
    config: Arc<Config>,
    held: Held,
}

/// What an admitted connection holds until it ends: its `max_connections` permit, its
/// per-client slot, and its place in its worker's live count.
type Held = (OwnedSemaphorePermit, ClientSlot, LiveOn);

/// A connection's place in its worker's live count; given back on drop.
struct LiveOn {
    live: Arc<[AtomicUsize]>,
    worker: usize,
}

impl LiveOn {
    fn new(live: Arc<[AtomicUsize]>, worker: usize) -> LiveOn {
        live[worker].fetch_add(1, Ordering::Relaxed);
        LiveOn { live, worker }
    }
}

impl Drop for LiveOn {
    fn drop(&mut self) {
        self.live[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves the clients other workers hand to this one, until every accept loop has
/// ended (and with it every sender).
async fn receive_handoffs(shared: Arc<Accepting>, mut inbox: mpsc::UnboundedReceiver<Handoff>) {
    while let Some(h) = inbox.recv().await {
        match TcpStream::from_std(h.stream) {
            Ok(stream) => shared.spawn(stream, h.peer, h.config, h.held),
            Err(e) => {
                // The client's socket is closed as `h` drops; nothing was relayed yet.
                tracing::warn!(client = %h.peer, error = %e, "cannot take over a handed-over client");
            }
        }
    }
}

/// One worker's accept loop: runs until `shutdown` fires (or the listener fails for
/// good), spawning each admitted client on this worker's runtime.
async fn accept_loop(
    shared: &Arc<Accepting>,
    me: usize,
    listener: TcpListener,
    config_rx: watch::Receiver<Arc<Config>>,
    inboxes: Vec<mpsc::UnboundedSender<Handoff>>,
) -> io::Result<()> {
    let shutdown = &shared.shutdown;
    let mut rules = Followed::new(config_rx);
    let mut errors = AcceptErrors::default();
    loop {
        let config = rules.current(&listener);
        if config.listen.max_connections > shared.fd_cap
            && !shared.warned_fd_cap.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                max_connections = config.listen.max_connections,
                serving_at_most = shared.fd_cap,
                max_fds = crate::process_metrics::max_fds(),
                "too few file descriptors for listen.max_connections (two per connection); raise the limit (ulimit -n, LimitNOFILE=) to serve more"
            );
        }
        let (permits, size) = {
            let mut limit = shared.limit.lock().unwrap_or_else(|e| e.into_inner());
            limit.resize(config.listen.max_connections.min(shared.fd_cap));
            (limit.permits.clone(), limit.size)
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Other workers' accept loops each hold a permit while they wait for a
                // client: only a limit reached by live connections is a pause.
                if shared.live_total() >= size {
                    shared.metrics.listener_paused.increment(1);
                    tracing::debug!(
                        max = config.listen.max_connections,
                        "connection limit reached; accepting paused"
                    );
                }
                tokio::select! {
                    p = permits.acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                errors.backoff = Duration::ZERO;
                a
            }
            Err(e) => {
                errors.record(&e);
                tokio::select! {
                    _ = tokio::time::sleep(errors.backoff) => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        // The client gets the configuration in force when it was accepted, not the one
        // in force when this loop began waiting.
        let config = rules.current(&listener);
        let Some(client_slot) = shared.admit(&config, &rules.allowed, &stream, peer) else {
            continue;
        };
        shared.metrics.accepted.increment(1);
        let admitted = (permit, client_slot);
        shared.place(me, stream, peer, config, admitted, &inboxes);
    }
    Ok(())
}

/// The configuration an accept loop works with, followed across reloads.
struct Followed {
    rx: watch::Receiver<Arc<Config>>,
    /// The configuration the listener's options and `allowed` were taken from.
    config: Arc<Config>,
    /// `listen.allow`, parsed once per configuration rather than per client.
    allowed: Vec<IpNet>,
}

impl Followed {
    fn new(mut rx: watch::Receiver<Arc<Config>>) -> Followed {
        let config = rx.borrow_and_update().clone();
        let allowed = config.allow_list().unwrap_or_default();
        Followed {
            rx,
            config,
            allowed,
        }
    }

    /// The configuration in force now. After a reload, new clients get the new socket
    /// options (set on `listener`, which accepted sockets inherit) and access rules.
    fn current(&mut self, listener: &TcpListener) -> Arc<Config> {
        let config = self.rx.borrow_and_update().clone();
        if !Arc::ptr_eq(&config, &self.config) {
            if let Err(e) = Tuning::client(&config.socket).apply(&SockRef::from(listener)) {
                tracing::warn!(error = %e, "cannot apply the reloaded [socket] options to the listener");
            }
            self.allowed = config.allow_list().unwrap_or_default();
            self.config = config.clone();
        }
        config
    }
}

impl Accepting {
    /// Live connections on all workers.
    fn live_total(&self) -> usize {
        self.live.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// The worker with the fewest live connections, `me` on a tie.
    fn least_busy(&self, me: usize) -> usize {
        let load = |i: usize| self.live[i].load(Ordering::Relaxed);
        (0..self.live.len()).fold(me, |best, i| if load(i) < load(best) { i } else { best })
    }

    /// Places an admitted client, accepted by worker `me`, on the worker with the fewest
    /// live connections: spawned here, or handed over through that worker's inbox.
    /// Connections stay on the worker that serves them, and a burst of clients otherwise
    /// lands on whichever worker woke first (all 8 of 8 streams, measured). The target's
    /// count goes up now, not on arrival, so the next decision sees it.
    fn place(
        &self,
        me: usize,
        stream: TcpStream,
        peer: SocketAddr,
        config: Arc<Config>,
        (permit, client_slot): (OwnedSemaphorePermit, ClientSlot),
        inboxes: &[mpsc::UnboundedSender<Handoff>],
    ) {
        let target = self.least_busy(me);
        let held = (permit, client_slot, LiveOn::new(self.live.clone(), target));
        if target == me {
            self.spawn(stream, peer, config, held);
            return;
        }
        let handoff = stream.into_std().map(|stream| Handoff {
            stream,
            peer,
            config,
            held,
        });
        match handoff {
            Ok(h) => {
                if let Err(mpsc::error::SendError(h)) = inboxes[target].send(h) {
                    // That worker has stopped (shutdown): serve the client here.
                    if let Ok(stream) = TcpStream::from_std(h.stream) {
                        self.spawn(stream, h.peer, h.config, h.held);
                    }
                }
            }
            Err(e) => tracing::warn!(client = %peer, error = %e, "cannot hand a client over"),
        }
    }

    /// Spawns an admitted client's connection on the current worker. The live count
    /// travels in `held`, not in a wrapping future: a wrapper would store the
    /// connection's future again (see `supervise`).
    fn spawn(&self, stream: TcpStream, peer: SocketAddr, config: Arc<Config>, held: Held) {
        let metrics = self.metrics.clone();
        // A debug span: connection-level events are debug, and an info span would cost
        // every connection a formatted record (7 % of connections per second, 0.3 KiB).
        let span =
            tracing::debug_span!("conn", client = %peer, upstream = %config.upstream.address);
        let served = connection::serve(
            stream,
            peer,
            config,
            metrics.clone(),
            self.budget.clone(),
            self.force_close.clone(),
        );
        self.tracker
            .spawn(supervise(served, metrics, peer, held).instrument(span));
    }

    /// Applies `listen.allow` and `listen.max_connections_per_client`. A refused client
    /// is reset at once and counted; an admitted one gets a slot it holds until it closes.
    fn admit(
        &self,
        config: &Config,
        allowed: &[IpNet],
        stream: &TcpStream,
        peer: SocketAddr,
    ) -> Option<ClientSlot> {
        let ip = canonical(peer.ip());
        if !allowed.is_empty() && !allowed.iter().any(|net| net.contains(&ip)) {
            self.metrics.rejected_not_allowed.increment(1);
            tracing::debug!(client = %peer, "client not in listen.allow; rejected");
            reset_on_close(SockRef::from(stream));
            return None;
        }
        let slot = self
            .per_client
            .take(ip, config.listen.max_connections_per_client);
        if slot.is_none() {
            self.metrics.rejected_per_client.increment(1);
            tracing::debug!(client = %peer, "listen.max_connections_per_client reached; rejected");
            reset_on_close(SockRef::from(stream));
        }
        slot
    }
}

/// Binds the client listener as `listen` says: SO_REUSEADDR (a restart need not wait
/// out TIME_WAIT), the `[socket]` client options set before listen() so accepted sockets
/// inherit them (buffer sizes from their first segment, nodelay, keepalive, and
/// notsent_lowat, which tests/socket_options.rs reads back on an accepted socket), and
/// the configured backlog. Call inside a tokio runtime.
pub fn bind(config: &Config) -> io::Result<TcpListener> {
    let addr: SocketAddr = config.listen.address.parse().map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, "listen.address is not ip:port")
    })?;
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_reuse_address(true)?;
    Tuning::client(&config.socket).apply(&SockRef::from(&sock))?;
    sock.bind(&addr.into())?;
    sock.listen(config.listen.backlog as i32)?;
    sock.set_nonblocking(true)?;
    TcpListener::from_std(sock.into())
}

/// Runs one connection's future; a panic in it is caught, logged and counted as a close
/// with reason `error`, and the process carries on. The guards inside the future have
/// returned their gauges while unwinding; `held` (the connection's permits) is released
/// when the future ends either way.
///
/// A plain combinator rather than an `async fn`: the connection's future is stored once in
/// the task, not copied into each layer of a state machine (that cost 2 KiB a connection).
pub fn supervise<F: Future<Output = CloseReason>, H>(
    served: F,
    metrics: Arc<Metrics>,
    client: SocketAddr,
    held: H,
) -> impl Future<Output = ()> {
    AssertUnwindSafe(served).catch_unwind().map(move |result| {
        drop(held);
        if let Err(panic) = result {
            metrics.panics.increment(1);
            metrics.closed(CloseReason::Error).increment(1);
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(%client, panic = %what, "connection task panicked; connection closed");
        }
    })
}

/// Descriptors left for connections: two each (client and upstream), after what the
/// process holds now and a reserve for scrapes and logs.
fn descriptor_cap() -> usize {
    /// Kept free for the metrics endpoint, resolver and log files.
    const RESERVE: u64 = 16;
    let max = crate::process_metrics::max_fds();
    let open = crate::process_metrics::open_fds() as u64;
    (max.saturating_sub(open + RESERVE) / 2).max(1) as usize
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, as servers that hold one descriptor
/// per client do. Returns the new soft limit.
pub fn raise_descriptor_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

/// An IPv4 client on a dual-stack socket arrives as `::ffff:a.b.c.d`; rules are written
/// for `a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// `listen.max_connections` as semaphore permits, resizable on reload.
struct Limit {
    permits: Arc<Semaphore>,
    size: usize,
}

impl Limit {
    fn new(size: usize) -> Limit {
        Limit {
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// Grows at once; shrinks by taking back free permits as connections end.
    fn resize(&mut self, size: usize) {
        if size > self.size {
            self.permits.add_permits(size - self.size);
            self.size = size;
        } else if size < self.size {
            let taken = self.permits.forget_permits(self.size - size);
            self.size -= taken;
        }
    }
}

/// Live connections per source address, for `listen.max_connections_per_client`.
#[derive(Default)]
struct PerClient {
    live: Mutex<HashMap<IpAddr, usize>>,
}

/// A client's place in [`PerClient`]; given back on drop.
struct ClientSlot {
    owner: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    /// A slot for `ip` unless it already has `max` (0: no limit).
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let n = live.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            if *n == 0 {
                live.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            owner: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut live = self.owner.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = live.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.ip);
            }
        }
    }
}

/// Accept errors: a growing pause between retries and a rate-limited warning.
#[derive(Default)]
struct AcceptErrors {
    backoff: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    fn record(&mut self, e: &io::Error) {
        self.backoff = (self.backoff * 2).clamp(Duration::from_millis(1), MAX_ACCEPT_BACKOFF);
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_ERROR_LOG_EVERY)
        {
            tracing::warn!(error = %e, suppressed = self.suppressed, retry_in_ms = self.backoff.as_millis() as u64, "accept failed; retrying");
            self.last_log = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::ActiveGuard;

    /// A panic inside a connection's task is caught and counted, and the gauges it had
    /// raised come back down.
    #[tokio::test]
    async fn a_panicking_connection_is_counted_and_returns_its_gauges() {
        let metrics = Metrics::new([1024, 1024]);
        let m = metrics.clone();
        let served = async move {
            let _active = ActiveGuard::new(&m);
            if m.now() >= 0.0 {
                panic!("injected");
            }
            CloseReason::Complete
        };
        supervise(served, metrics.clone(), "127.0.0.1:1".parse().unwrap(), ()).await;
        let text = metrics.render();
        let line = |series: &str| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(series)?
                        .strip_prefix(' ')?
                        .parse::<f64>()
                        .ok()
                })
                .unwrap()
        };
        assert_eq!(line("sluice_connection_panics_total"), 1.0);
        assert_eq!(
            line("sluice_connections_closed_total{reason=\"error\"}"),
            1.0
        );
        assert_eq!(line("sluice_connections_active"), 0.0);
    }

    #[test]
    fn per_client_slots_are_limited_and_given_back() {
        let pc = Arc::new(PerClient::default());
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let a = pc.take(ip, 2).unwrap();
        let _b = pc.take(ip, 2).unwrap();
        assert!(pc.take(ip, 2).is_none());
        assert!(pc.take("10.1.2.4".parse().unwrap(), 2).is_some());
        drop(a);
        assert!(pc.take(ip, 2).is_some());
        assert!(
            pc.live.lock().unwrap().len() <= 2,
            "addresses with no live connection are forgotten"
        );
    }

    #[test]
    fn mapped_ipv4_clients_match_ipv4_rules() {
        assert_eq!(
            canonical("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
