//! The services' listeners and accept loops: starting, reloading and stopping
//! services, the connection limit, accept-error backoff, and graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::budget::Budget;
use crate::config::{self, Config, DEFAULT_MAX_CONNECTIONS, Scheduler};
use crate::connection;
use crate::metrics::{CloseReason, Metrics, ServiceMetrics};
use crate::pool;
use crate::service::{ClientSlot, Service};
use crate::socket::{Tuning, reset_on_close};

/// Longest wait between accept retries after an error such as EMFILE: short enough that
/// a freed descriptor is used soon, long enough that a full fd table does not spin a core.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one accept-error log line per this interval; the rest are counted into it.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(1);

/// A proxy instance: its services (replaceable while running) and its metrics.
pub struct Server {
    metrics: Arc<Metrics>,
    /// `buffer.total`, shared by every connection of every service.
    budget: Arc<Budget>,
    /// The configuration in force and the services running it.
    state: Mutex<State>,
    /// The worker threads, once [`Server::run`] has started them.
    workers: OnceLock<Arc<Workers>>,
    /// Fired once every service accepts clients.
    ready: CancellationToken,
    /// The token [`Server::run`] stops on, kept so that [`Server::readiness`] says
    /// "draining" from the moment it fires.
    stopping: OnceLock<CancellationToken>,
}

/// Whether the services accept clients, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// [`Server::run`] has not bound every service yet.
    Starting,
    /// Every service accepts clients.
    Accepting,
    /// A graceful shutdown has begun: the services accept no more clients and the live
    /// connections drain.
    Draining,
}

/// What a reload replaces.
struct State {
    config: Arc<Config>,
    /// In the configuration's order.
    running: Vec<Running>,
}

/// One service with its accept loops running.
struct Running {
    /// The address it is bound to (its configured one may have port 0).
    local: SocketAddr,
    /// The settings new clients get; its accept loops follow it.
    current: watch::Sender<Arc<Service>>,
    /// Ends this service's accept loops (on removal or a new address); a child of the
    /// shutdown token.
    stop: CancellationToken,
    /// Ends its active health checks.
    checks: CancellationToken,
}

impl Running {
    fn service(&self) -> Arc<Service> {
        self.current.borrow().clone()
    }
}

/// Why a reload was refused; the running configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0} cannot change on reload; restart sluice to change it")]
    Fixed(&'static str),
    #[error("service {service}: cannot listen on {address}: {error}")]
    Bind {
        service: String,
        address: SocketAddr,
        error: io::Error,
    },
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    #[error("sluice is not running yet")]
    NotRunning,
}

/// The services' listening sockets, bound before [`Server::run`] starts serving them.
pub struct Listeners {
    bound: Vec<(String, std::net::TcpListener)>,
}

impl Listeners {
    /// The address service `name` is bound to.
    pub fn address(&self, name: &str) -> Option<SocketAddr> {
        let (_, l) = self.bound.iter().find(|(n, _)| n == name)?;
        l.local_addr().ok()
    }

    /// Every service's name and bound address, in the configuration's order.
    pub fn addresses(&self) -> Vec<(String, SocketAddr)> {
        self.bound
            .iter()
            .filter_map(|(n, l)| Some((n.clone(), l.local_addr().ok()?)))
            .collect()
    }

    fn take(&mut self, name: &str) -> Option<std::net::TcpListener> {
        let i = self.bound.iter().position(|(n, _)| n == name)?;
        Some(self.bound.remove(i).1)
    }
}

/// Binds every service's listener (see [`bind_service`]); an error names the service
/// and its address.
pub fn bind(config: &Config) -> anyhow::Result<Listeners> {
    use anyhow::Context;
    let services = config.services()?;
    let mut bound = Vec::with_capacity(services.len());
    for s in &services {
        let l = bind_service(s)
            .with_context(|| format!("service {}: cannot listen on {}", s.name, s.listen))?;
        bound.push((s.name.clone(), l));
    }
    Ok(Listeners { bound })
}

/// Binds a service's listener: SO_REUSEADDR (a restart need not wait out TIME_WAIT),
/// SO_REUSEPORT (a new sluice can bind the same address while this one drains, so an
/// upgrade refuses no one), the `[socket]` client options set before listen() so
/// accepted sockets inherit them (buffer sizes from their first segment, nodelay,
/// keepalive, and notsent_lowat, which tests/socket_options.rs reads back on an
/// accepted socket), and the configured backlog.
pub fn bind_service(service: &config::Service) -> io::Result<std::net::TcpListener> {
    let addr = service.listen;
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    Tuning::client(&service.socket).apply(&SockRef::from(&sock))?;
    sock.bind(&addr.into())?;
    sock.listen(service.backlog as i32)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// The worker threads' runtimes, and what every accept loop shares.
struct Workers {
    /// One per accept-loop slot: each pinned worker's runtime, or the one stealing
    /// runtime.
    handles: Vec<Handle>,
    /// Each slot's inbox, for clients another slot accepted and handed over.
    inboxes: Arc<[mpsc::UnboundedSender<Handoff>]>,
    shared: Arc<Accepting>,
    /// Every accept loop of every service.
    accepting: TaskTracker,
    /// A worker's accept loop that failed to start, reported when `run` returns.
    failed: Mutex<Option<io::Error>>,
}

impl Server {
    /// A server for a validated configuration.
    pub fn new(config: Config) -> Server {
        let metrics = Metrics::new();
        let budget = Budget::new(
            config.buffer.total.as_u64() as usize,
            metrics.budget_gauges(),
        );
        Server {
            metrics,
            budget: Arc::new(budget),
            state: Mutex::new(State {
                config: Arc::new(config),
                running: Vec::new(),
            }),
            workers: OnceLock::new(),
            ready: CancellationToken::new(),
            stopping: OnceLock::new(),
        }
    }

    /// Returns once [`Server::run`] has every service accepting clients (and reloads
    /// can be taken).
    pub async fn ready(&self) {
        self.ready.cancelled().await
    }

    /// Starting until every service accepts, draining from the moment the shutdown token
    /// given to [`Server::run`] fires.
    pub fn readiness(&self) -> Readiness {
        if self.stopping.get().is_some_and(|s| s.is_cancelled()) {
            Readiness::Draining
        } else if self.ready.is_cancelled() {
            Readiness::Accepting
        } else {
            Readiness::Starting
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Live connections on each worker thread (empty before [`Server::run`] starts
    /// them): how evenly the connections are spread.
    pub fn worker_connections(&self) -> Vec<usize> {
        self.workers.get().map_or_else(Vec::new, |w| {
            w.shared
                .live
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect()
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.lock().config.clone()
    }

    /// Each running service's name and bound address.
    pub fn addresses(&self) -> Vec<(String, SocketAddr)> {
        self.lock()
            .running
            .iter()
            .map(|r| (r.service().config.name.clone(), r.local))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a validated configuration in force. Services new in it are bound and
    /// started; removed ones stop accepting, and their live connections get
    /// `timeouts.shutdown_grace` to finish; changed ones give new clients the new
    /// settings (a new listen address is bound before the old one closes), while live
    /// connections keep the settings they started with. Nothing changes if any new
    /// address cannot be bound.
    pub fn reload(&self, new: Config) -> Result<(), ReloadError> {
        let workers = self.workers.get().ok_or(ReloadError::NotRunning)?;
        let mut state = self.lock();
        let old = state.config.clone();
        if new.metrics.address != old.metrics.address {
            return Err(ReloadError::Fixed("metrics.address"));
        }
        if new.runtime.worker_count() != old.runtime.worker_count() {
            return Err(ReloadError::Fixed("runtime.workers"));
        }
        if new.runtime.scheduler != old.runtime.scheduler {
            return Err(ReloadError::Fixed("runtime.scheduler"));
        }
        let services = new.services()?;
        // Bind first: a failure leaves everything as it was.
        let mut fresh = Vec::new();
        for s in &services {
            let same = state.running.iter().any(|r| {
                let running = r.service();
                running.config.name == s.name && running.config.listen == s.listen
            });
            if !same {
                let l = bind_service(s).map_err(|error| ReloadError::Bind {
                    service: s.name.clone(),
                    address: s.listen,
                    error,
                })?;
                fresh.push((s.name.clone(), l));
            }
        }
        let mut fresh = Listeners { bound: fresh };
        workers
            .shared
            .set_max_connections(new.listen.max_connections);
        self.budget.resize(new.buffer.total.as_u64() as usize);

        let mut previous = std::mem::take(&mut state.running);
        for s in services {
            let at = previous
                .iter()
                .position(|r| r.service().config.name == s.name);
            let before = at.map(|i| previous.remove(i));
            let running = match (before, fresh.take(&s.name)) {
                (Some(r), None) => {
                    // Same name, same address: new settings for new clients.
                    r.checks.cancel();
                    let old = r.service();
                    let service = Arc::new(Service::new(
                        s,
                        &self.metrics,
                        Some(&old),
                        old.force_close.clone(),
                    ));
                    let checks = start_checks(workers, &service);
                    r.current.send_replace(service);
                    Running { checks, ..r }
                }
                (before, Some(listener)) => {
                    // New, or at a new address: the old address stops accepting.
                    let old = before.map(|r| {
                        r.stop.cancel();
                        r.checks.cancel();
                        r.service()
                    });
                    let force_close = old.as_ref().map_or_else(
                        || workers.shared.force_close.child_token(),
                        |o| o.force_close.clone(),
                    );
                    let service = Service::new(s, &self.metrics, old.as_deref(), force_close);
                    start_service(workers, service, listener)
                }
                (None, None) => unreachable!("a service without a running one was bound"),
            };
            state.running.push(running);
        }
        for gone in previous {
            let service = gone.service();
            tracing::info!(service = %service.config.name, "service removed; it accepts no more clients");
            gone.stop.cancel();
            gone.checks.cancel();
            service.metrics.retire();
            // Its live connections get the shutdown grace, then are closed.
            let grace = new.timeouts.shutdown_grace;
            let force_close = service.force_close.clone();
            workers.handles[0].spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(grace) => force_close.cancel(),
                    _ = force_close.cancelled() => {}
                }
            });
        }
        state.config = Arc::new(new);
        Ok(())
    }

    /// Serves every service of the configuration on `listeners` until `shutdown`
    /// fires, then lets live connections finish for up to `timeouts.shutdown_grace`
    /// and closes the rest.
    ///
    /// The work is done by `runtime.workers` threads. With `runtime.scheduler =
    /// "pinned"` each runs its own single-threaded tokio runtime and one accept loop per
    /// service on the shared listening sockets, and a connection stays on one of them
    /// (the least busy) for its whole life, so its wake-ups never cross threads
    /// (HAProxy's and nginx's shape). With `"stealing"` one accept loop per service
    /// runs on one work-stealing runtime of that many threads. Either way the limits,
    /// the drain and the metrics are shared, so they stay process-wide and exact.
    pub async fn run(
        &self,
        mut listeners: Listeners,
        shutdown: CancellationToken,
    ) -> io::Result<()> {
        let _ = self.stopping.set(shutdown.clone());
        let config = self.config();
        let services = config
            .services()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let workers = self.start_workers(&config, &shutdown)?;
        {
            let mut state = self.lock();
            for s in services {
                let listener = listeners.take(&s.name).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("no listener bound for service {}", s.name),
                    )
                })?;
                let service = Service::new(
                    s,
                    &self.metrics,
                    None,
                    workers.shared.force_close.child_token(),
                );
                state
                    .running
                    .push(start_service(&workers, service, listener));
            }
        }
        let threads = config.runtime.worker_count();
        tracing::info!(services = self.lock().running.len(), workers = threads, scheduler = ?config.runtime.scheduler, "sluice ready");
        self.ready.cancel();

        shutdown.cancelled().await;
        // Every accept loop and health check ends on `shutdown` (their tokens are its
        // children); once the accept loops have, nothing is handed over any more and
        // every listening socket is closed.
        workers.accepting.close();
        workers.accepting.wait().await;
        workers.shared.accept_ended.cancel();
        let result = workers
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map_or(Ok(()), Err);

        let tracker = &workers.shared.tracker;
        tracker.close();
        let grace = self.config().timeouts.shutdown_grace;
        tracing::info!(live = tracker.len(), grace = %humantime::format_duration(grace), "shutdown begun");
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::info!(
                live = tracker.len(),
                "shutdown grace over; closing live connections"
            );
            workers.shared.force_close.cancel();
            tracker.wait().await;
        }
        tracing::info!("shutdown finished");
        result
    }

    /// Builds the runtimes and starts a thread for each; every runtime is built before
    /// any thread starts, so a failure leaves nothing behind. Sockets and timers only:
    /// signals are the control thread's, and a signal driver per runtime would cost a
    /// descriptor each.
    fn start_workers(
        &self,
        config: &Config,
        shutdown: &CancellationToken,
    ) -> io::Result<Arc<Workers>> {
        let threads = config.runtime.worker_count();
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
        // One accept loop per service (and one balancing slot) per runtime.
        let slots = runtimes.len();
        let fd_cap = descriptor_cap();
        let shared = Arc::new(Accepting {
            metrics: self.metrics.clone(),
            budget: self.budget.clone(),
            tracker: TaskTracker::new(),
            force_close: CancellationToken::new(),
            shutdown: shutdown.clone(),
            accept_ended: CancellationToken::new(),
            max_connections: AtomicUsize::new(0),
            max_connections_set: AtomicBool::new(false),
            limit: Mutex::new(Limit::new(0)),
            fd_cap,
            warned_fd_cap: AtomicBool::new(false),
            live: (0..slots).map(|_| AtomicUsize::new(0)).collect(),
        });
        shared.set_max_connections(config.listen.max_connections);
        let (inboxes, inbox_rxs): (Vec<_>, Vec<_>) =
            (0..slots).map(|_| mpsc::unbounded_channel()).unzip();
        let handles = runtimes.iter().map(|r| r.handle().clone()).collect();
        for (i, (runtime, inbox)) in runtimes.into_iter().zip(inbox_rxs).enumerate() {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("sluice-worker-{i}"))
                .spawn(move || runtime.block_on(worker(shared, inbox)))?;
        }
        let workers = Arc::new(Workers {
            handles,
            inboxes: inboxes.into(),
            shared,
            accepting: TaskTracker::new(),
            failed: Mutex::new(None),
        });
        self.workers
            .set(workers.clone())
            .map_err(|_| io::Error::other("Server::run was called twice"))?;
        Ok(workers)
    }
}

/// Starts `service`'s accept loops on `listener`, one per slot, and its active health
/// checks.
fn start_service(
    workers: &Arc<Workers>,
    service: Service,
    listener: std::net::TcpListener,
) -> Running {
    let service = Arc::new(service);
    let local = listener.local_addr().unwrap_or(service.config.listen);
    let config = &service.config;
    let stop = workers.shared.shutdown.child_token();
    let (current, _) = watch::channel(service.clone());
    for (slot, handle) in workers.handles.iter().enumerate() {
        let listener = match listener.try_clone() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(service = %config.name, error = %e, "cannot share the listening socket with a worker");
                continue;
            }
        };
        let (workers2, rx, stop) = (workers.clone(), current.subscribe(), stop.clone());
        workers.accepting.spawn_on(
            async move {
                if let Err(e) = accept_loop(&workers2, slot, listener, rx, stop).await {
                    tracing::error!(error = %e, "an accept loop could not start");
                    *workers2.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                }
            },
            handle,
        );
    }
    // Every accept loop holds its own handle now: the descriptor count is what it will
    // stay at before "listening" is said (tests compare it after their clients).
    drop(listener);
    tracing::info!(address = %local, service = %config.name, servers = ?config.servers, balance = config.balance.as_label(), "sluice listening");
    Running {
        local,
        checks: start_checks(workers, &service),
        current,
        stop,
    }
}

/// Starts the service's active health checks, if `health.interval` asks for them.
fn start_checks(workers: &Workers, service: &Service) -> CancellationToken {
    let stop = workers.shared.shutdown.child_token();
    let interval = service.config.health.interval;
    if !interval.is_zero() {
        let checks = pool::check_health(
            service.pool.backends().to_vec(),
            service.health_rules(),
            interval,
            service.config.upstream.connect_timeout,
            stop.clone(),
        );
        // Its lines name the service, as a client's ejection line does.
        let span = tracing::info_span!("health", service = %service.config.name);
        workers.handles[0].spawn(checks.instrument(span));
    }
    stop
}

/// A worker thread's main task: takes over clients other slots hand it until every
/// accept loop has ended, then keeps the runtime turning until every connection of
/// every worker has ended (this thread's connections live on its runtime).
async fn worker(shared: Arc<Accepting>, mut inbox: mpsc::UnboundedReceiver<Handoff>) {
    loop {
        tokio::select! {
            h = inbox.recv() => match h {
                Some(h) => shared.take_over(h),
                None => break,
            },
            _ = shared.accept_ended.cancelled() => {
                while let Ok(h) = inbox.try_recv() {
                    shared.take_over(h);
                }
                break;
            }
        }
    }
    shared.tracker.wait().await;
}

/// What the workers' accept loops share: one limit, one drain, one set of metrics.
struct Accepting {
    metrics: Arc<Metrics>,
    budget: Arc<Budget>,
    /// Every connection task, whichever worker runs it, for the drain at shutdown.
    tracker: TaskTracker,
    /// Cut live connections short: fired when the shutdown grace is over. Each
    /// service's token is a child of it.
    force_close: CancellationToken,
    /// Stop accepting.
    shutdown: CancellationToken,
    /// Fired once every accept loop has ended: no client is handed over any more.
    accept_ended: CancellationToken,
    /// `listen.max_connections` as now configured ([`DEFAULT_MAX_CONNECTIONS`] unset).
    max_connections: AtomicUsize,
    /// Whether the configuration sets it: only a value the user chose is warned about
    /// when the descriptor limit cannot cover it; the default quietly fits the limit.
    max_connections_set: AtomicBool,
    /// `listen.max_connections` as permits, resized by whichever loop first sees a
    /// reload.
    limit: Mutex<Limit>,
    /// Connections the descriptor limit leaves room for.
    fd_cap: usize,
    /// The descriptor warning is given once per process, not once per worker.
    warned_fd_cap: AtomicBool,
    /// Live connections on each slot, for balancing.
    live: Arc<[AtomicUsize]>,
}

/// A client accepted by one slot and handed to another, less busy one.
struct Handoff {
    /// Deregistered from the accepting worker's event loop; registered again on arrival.
    stream: std::net::TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    /// Its admission, or `None` where the PROXY header decides it.
    slot: Option<ClientSlot>,
    held: Held,
}

/// What an accepted connection holds until it ends: its `max_connections` permit and
/// its place in its worker's live count.
type Held = (OwnedSemaphorePermit, LiveOn);

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

/// One slot's accept loop for one service: runs until the service stops (removal,
/// shutdown), then serves the clients already waiting in the backlog before its handle
/// on the listening socket closes.
async fn accept_loop(
    workers: &Workers,
    me: usize,
    listener: std::net::TcpListener,
    mut service: watch::Receiver<Arc<Service>>,
    stop: CancellationToken,
) -> io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let shared = &workers.shared;
    let mut errors = AcceptErrors::default();
    let mut tuned = service.borrow_and_update().clone();
    loop {
        let Some(permit) = shared.permit(&stop).await else {
            break;
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => break,
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
                    _ = stop.cancelled() => break,
                }
            }
        };
        // The client gets the settings in force when it was accepted.
        let current = follow(&mut service, &mut tuned, &listener);
        shared.admit_and_place(me, stream, peer, current, permit, &workers.inboxes);
    }
    // Clients that finished their handshake before the loop stopped are served, not
    // reset when the socket closes. (With net.ipv4.tcp_migrate_req = 1 the kernel
    // also hands those that arrive later to another sluice bound to the address.)
    let current = follow(&mut service, &mut tuned, &listener);
    let listener = listener.into_std()?;
    while let Ok((stream, peer)) = listener.accept() {
        let Ok(stream) = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream))
        else {
            continue;
        };
        match shared.limit_permits().try_acquire_owned() {
            Ok(permit) => {
                shared.admit_and_place(me, stream, peer, current.clone(), permit, &workers.inboxes)
            }
            Err(_) => reset_on_close(SockRef::from(&stream)),
        }
    }
    Ok(())
}

/// The service's settings in force now. After a reload, new clients get the new socket
/// options (set on `listener`, which accepted sockets inherit) and access rules.
fn follow(
    rx: &mut watch::Receiver<Arc<Service>>,
    tuned: &mut Arc<Service>,
    listener: &TcpListener,
) -> Arc<Service> {
    let current = rx.borrow_and_update().clone();
    if !Arc::ptr_eq(&current, tuned) {
        if current.config.socket != tuned.config.socket
            && let Err(e) = Tuning::client(&current.config.socket).apply(&SockRef::from(listener))
        {
            tracing::warn!(service = %current.config.name, error = %e, "cannot apply the reloaded [socket] options to the listener");
        }
        *tuned = current.clone();
    }
    current
}

impl Accepting {
    /// Live connections on all workers.
    fn live_total(&self) -> usize {
        self.live.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// Takes a (re)loaded `listen.max_connections`; the permits follow at the next accept.
    fn set_max_connections(&self, configured: Option<usize>) {
        self.max_connections_set
            .store(configured.is_some(), Ordering::Relaxed);
        self.max_connections.store(
            configured.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            Ordering::Relaxed,
        );
    }

    /// The permits for `listen.max_connections`, resized to the configured value first.
    fn limit_permits(&self) -> Arc<Semaphore> {
        let max = self.max_connections.load(Ordering::Relaxed);
        if max > self.fd_cap
            && self.max_connections_set.load(Ordering::Relaxed)
            && !self.warned_fd_cap.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                max_connections = max,
                serving_at_most = self.fd_cap,
                max_fds = crate::process_metrics::max_fds(),
                "too few file descriptors for listen.max_connections (two per connection); raise the limit (ulimit -n, LimitNOFILE=) to serve more"
            );
        }
        let mut limit = self.limit.lock().unwrap_or_else(|e| e.into_inner());
        limit.resize(max.min(self.fd_cap));
        limit.permits.clone()
    }

    /// A `max_connections` permit for the next client, waiting while the limit is
    /// reached; `None` once `stop` fires.
    async fn permit(&self, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        let permits = self.limit_permits();
        if let Ok(p) = permits.clone().try_acquire_owned() {
            return Some(p);
        }
        // Other accept loops each hold a permit while they wait for a client: only a
        // limit reached by live connections is a pause.
        let size = self.limit.lock().unwrap_or_else(|e| e.into_inner()).size;
        if self.live_total() >= size {
            self.metrics.listener_paused.increment(1);
            tracing::debug!(max = size, "connection limit reached; accepting paused");
        }
        tokio::select! {
            p = permits.acquire_owned() => p.ok(),
            _ = stop.cancelled() => None,
        }
    }

    /// Applies the service's access rules (unless a PROXY header must say who the
    /// client is first) and places an admitted client.
    fn admit_and_place(
        &self,
        me: usize,
        stream: TcpStream,
        peer: SocketAddr,
        service: Arc<Service>,
        permit: OwnedSemaphorePermit,
        inboxes: &[mpsc::UnboundedSender<Handoff>],
    ) {
        let slot = if service.config.accept_proxy {
            None
        } else {
            let Some(slot) = service.admit(&stream, peer) else {
                return;
            };
            service.metrics.accepted.increment(1);
            Some(slot)
        };
        self.place(me, stream, peer, service, slot, permit, inboxes);
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
    #[allow(clippy::too_many_arguments)]
    fn place(
        &self,
        me: usize,
        stream: TcpStream,
        peer: SocketAddr,
        service: Arc<Service>,
        slot: Option<ClientSlot>,
        permit: OwnedSemaphorePermit,
        inboxes: &[mpsc::UnboundedSender<Handoff>],
    ) {
        let target = self.least_busy(me);
        let held = (permit, LiveOn::new(self.live.clone(), target));
        if target == me {
            self.spawn(stream, peer, service, slot, held);
            return;
        }
        let handoff = stream.into_std().map(|stream| Handoff {
            stream,
            peer,
            service,
            slot,
            held,
        });
        match handoff {
            Ok(h) => {
                if let Err(mpsc::error::SendError(h)) = inboxes[target].send(h) {
                    // That worker has stopped (shutdown): serve the client here.
                    self.take_over(h);
                }
            }
            Err(e) => tracing::warn!(client = %peer, error = %e, "cannot hand a client over"),
        }
    }

    /// Serves a client another slot handed over.
    fn take_over(&self, h: Handoff) {
        match TcpStream::from_std(h.stream) {
            Ok(stream) => self.spawn(stream, h.peer, h.service, h.slot, h.held),
            Err(e) => {
                // The client's socket is closed as `h` drops; nothing was relayed yet.
                tracing::warn!(client = %h.peer, error = %e, "cannot take over a handed-over client");
            }
        }
    }

    /// Spawns a client's connection on the current worker. The live count travels in
    /// `held`, not in a wrapping future: a wrapper would store the connection's future
    /// again (see `supervise`).
    fn spawn(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        service: Arc<Service>,
        slot: Option<ClientSlot>,
        held: Held,
    ) {
        // A debug span: connection-level events are debug, and an info span would cost
        // every connection a formatted record (7 % of connections per second, 0.3 KiB).
        let span = tracing::debug_span!("conn", service = %service.config.name, client = %peer);
        let service_metrics = service.metrics.clone();
        let served = connection::serve(
            stream,
            peer,
            service,
            self.metrics.clone(),
            self.budget.clone(),
            slot,
        );
        self.tracker.spawn(
            supervise(served, self.metrics.clone(), service_metrics, peer, held).instrument(span),
        );
    }
}

/// Runs one connection's future; a panic in it is caught, logged and counted as a close
/// with reason `error`, and the process carries on. The guards inside the future have
/// returned their gauges while unwinding; `held` (the connection's permits) is released
/// when the future ends either way.
///
/// A plain combinator rather than an `async fn`: the connection's future is stored once in
/// the task, not copied into each layer of a state machine (that cost 2 KiB a connection).
pub fn supervise<F: Future, H>(
    served: F,
    metrics: Arc<Metrics>,
    service: Arc<ServiceMetrics>,
    client: SocketAddr,
    held: H,
) -> impl Future<Output = ()> {
    AssertUnwindSafe(served).catch_unwind().map(move |result| {
        drop(held);
        if let Err(panic) = result {
            metrics.panics.increment(1);
            service.closed(CloseReason::Error).increment(1);
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
    use crate::metrics::names;

    /// A panic inside a connection's task is caught and counted, and the gauges it had
    /// raised come back down.
    #[tokio::test]
    async fn a_panicking_connection_is_counted_and_returns_its_gauges() {
        let metrics = Metrics::new();
        let service = metrics.service("default", [1024, 1024]);
        let s = service.clone();
        let served = async move {
            let _active = ActiveGuard::new(&s);
            if crate::metrics::now() >= 0.0 {
                panic!("injected");
            }
            CloseReason::Complete
        };
        supervise(
            served,
            metrics.clone(),
            service,
            "127.0.0.1:1".parse().unwrap(),
            (),
        )
        .await;
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
        assert_eq!(line(names::CONNECTION_PANICS_TOTAL), 1.0);
        let closed = format!(
            "{}{{service=\"default\",reason=\"error\"}}",
            names::CONNECTIONS_CLOSED_TOTAL
        );
        assert_eq!(line(&closed), 1.0);
        let active = format!("{}{{service=\"default\"}}", names::CONNECTIONS_ACTIVE);
        assert_eq!(line(&active), 0.0);
    }
}
