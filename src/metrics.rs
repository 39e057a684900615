//! Every metric sluice exports and its help text; [`crate::admin`] serves them at
//! `/metrics`.
//!
//! Each proxy instance owns its own Prometheus recorder (no global state), so tests can
//! run several proxies in one process and read each one's numbers. Handles are created
//! once here; the relay only touches atomics through them, never a name lookup.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Instant;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::budget::BudgetGauges;
use crate::pool::Pool;
use crate::registry::Registry;

/// The two directions of a connection, in label order.
pub const DIRECTIONS: [&str; 2] = ["client_to_upstream", "upstream_to_client"];

/// Why a client connection ended: the `reason` label of `sluice_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions finished with EOF and everything queued was delivered.
    Complete,
    /// The client reset the connection (or vanished mid-write).
    ClientReset,
    /// The upstream reset the connection.
    UpstreamReset,
    /// The upstream could not be reached; the client was closed at once.
    UpstreamConnectFailed,
    /// No byte in either direction for `timeouts.idle`.
    IdleTimeout,
    /// One direction finished and the other outlived `timeouts.half_close`.
    HalfCloseTimeout,
    /// Closed by sluice's own shutdown after `timeouts.shutdown_grace`.
    Shutdown,
    /// Anything else: an unexpected I/O error or a panic in the connection's task.
    Error,
}

impl CloseReason {
    pub const ALL: [CloseReason; 8] = [
        CloseReason::Complete,
        CloseReason::ClientReset,
        CloseReason::UpstreamReset,
        CloseReason::UpstreamConnectFailed,
        CloseReason::IdleTimeout,
        CloseReason::HalfCloseTimeout,
        CloseReason::Shutdown,
        CloseReason::Error,
    ];

    pub fn as_label(self) -> &'static str {
        match self {
            CloseReason::Complete => "complete",
            CloseReason::ClientReset => "client_reset",
            CloseReason::UpstreamReset => "upstream_reset",
            CloseReason::UpstreamConnectFailed => "upstream_connect_failed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::HalfCloseTimeout => "half_close_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Error => "error",
        }
    }
}

/// Why an upstream connect failed: the `kind` label of `sluice_upstream_connect_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectErrorKind {
    Refused,
    Timeout,
    Unreachable,
    Resolve,
    Other,
}

impl ConnectErrorKind {
    pub const ALL: [ConnectErrorKind; 5] = [
        ConnectErrorKind::Refused,
        ConnectErrorKind::Timeout,
        ConnectErrorKind::Unreachable,
        ConnectErrorKind::Resolve,
        ConnectErrorKind::Other,
    ];

    pub fn as_label(self) -> &'static str {
        match self {
            ConnectErrorKind::Refused => "refused",
            ConnectErrorKind::Timeout => "timeout",
            ConnectErrorKind::Unreachable => "unreachable",
            ConnectErrorKind::Resolve => "resolve",
            ConnectErrorKind::Other => "other",
        }
    }
}

/// The handles one direction of every connection updates.
pub struct DirectionMetrics {
    /// `sluice_bytes_total{direction}`: bytes written to the destination.
    pub bytes: Counter,
    /// `sluice_queued_bytes{direction}`: bytes held in sluice's buffers now.
    pub queued: Gauge,
    /// `sluice_pauses_total{direction}`.
    pub pauses: Counter,
    /// `sluice_drains_total{direction}`.
    pub drains: Counter,
    /// `sluice_buffer_limit_bytes{direction}`: the configured per-connection bound.
    pub limit: Gauge,
    /// `sluice_budget_waits_total{direction}`: times a direction waited in line for
    /// `buffer.total` to grant it a buffer.
    pub budget_waits: Counter,
    /// Paused count and paused time; rendered at each scrape so a pause that never ends
    /// still shows its time growing.
    pub paused: PauseClock,
}

/// All of one proxy's metrics: the process-wide series here, each service's in its
/// [`ServiceMetrics`].
pub struct Metrics {
    handle: PrometheusHandle,
    /// Kept to register the series of services added by a reload.
    recorder: metrics_exporter_prometheus::PrometheusRecorder,
    pub listener_paused: Counter,
    pub reloads_success: Counter,
    pub reloads_failure: Counter,
    pub panics: Counter,
    budget_limit: Gauge,
    budget_used: Gauge,
    /// Every service this process has run, in the order they started (a removed
    /// service stays: its counters keep their totals).
    services: Mutex<Vec<Arc<ServiceMetrics>>>,
    /// The live connections, asked at each scrape for the kernel's bytes.
    pub connections: Arc<Registry>,
}

/// One service's series (`service` label).
pub struct ServiceMetrics {
    pub name: Arc<str>,
    pub accepted: Counter,
    pub active: Gauge,
    closed: Vec<Counter>,
    pub connection_duration: Histogram,
    pub rejected_per_client: Counter,
    pub rejected_not_allowed: Counter,
    pub rejected_proxy_protocol: Counter,
    /// `sluice_upstream_retries_total`: connects tried again on another server.
    pub retries: Counter,
    pub directions: [DirectionMetrics; 2],
    /// Per-server handles, by address; kept across reloads.
    servers: Mutex<HashMap<String, Arc<ServerMetrics>>>,
    /// The service's servers as now configured, read at each scrape for the per-server
    /// gauges (up, connections, queued, paused).
    pool: Mutex<Option<Arc<Pool>>>,
}

/// One server's registered series (`service` and `server` labels); its gauges are
/// read from its [`Backend`](crate::pool::Backend) at each scrape.
pub struct ServerMetrics {
    connect_errors: Vec<Counter>,
    pub connect_duration: Histogram,
}

impl ServerMetrics {
    pub fn connect_error(&self, kind: ConnectErrorKind) -> &Counter {
        &self.connect_errors[kind as usize]
    }
}

/// Buckets for the upstream handshake: loopback is tens of microseconds, a far upstream
/// hundreds of milliseconds, a failing one runs into `connect_timeout`.
const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Buckets for connection lifetimes, from a single request to a long-lived stream.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

/// Seconds since the process's metrics clock started: the clock pause times are kept
/// in, so they can be summed as plain numbers.
pub fn now() -> f64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_secs_f64()
}

fn counter(r: &dyn Recorder, name: &'static str, labels: Vec<Label>) -> Counter {
    r.register_counter(&Key::from_parts(name, labels), &META)
}
fn gauge(r: &dyn Recorder, name: &'static str, labels: Vec<Label>) -> Gauge {
    r.register_gauge(&Key::from_parts(name, labels), &META)
}
fn histogram(r: &dyn Recorder, name: &'static str, labels: Vec<Label>) -> Histogram {
    r.register_histogram(&Key::from_parts(name, labels), &META)
}
fn label(k: &'static str, v: &str) -> Label {
    Label::new(k, v.to_string())
}

impl Metrics {
    /// A fresh recorder with the process-wide series registered at zero; each service
    /// registers its own with [`Metrics::service`].
    pub fn new() -> Arc<Metrics> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("sluice_upstream_connect_duration_seconds".into()),
                CONNECT_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("sluice_connection_duration_seconds".into()),
                    DURATION_BUCKETS,
                )
            })
            .expect("bucket lists are constant and non-empty")
            .build_recorder();
        let handle = recorder.handle();
        let r: &dyn Recorder = &recorder;
        for (name, kind, help) in DESCRIPTIONS {
            describe(r, name, kind, help);
        }
        let m = Metrics {
            listener_paused: counter(r, "sluice_listener_paused_total", vec![]),
            reloads_success: counter(
                r,
                "sluice_config_reloads_total",
                vec![label("result", "success")],
            ),
            reloads_failure: counter(
                r,
                "sluice_config_reloads_total",
                vec![label("result", "failure")],
            ),
            panics: counter(r, "sluice_connection_panics_total", vec![]),
            budget_limit: gauge(r, "sluice_budget_limit_bytes", vec![]),
            budget_used: gauge(r, "sluice_budget_used_bytes", vec![]),
            services: Mutex::new(Vec::new()),
            connections: Arc::default(),
            handle,
            recorder,
        };
        gauge(
            &m.recorder,
            "sluice_build_info",
            vec![label("version", env!("CARGO_PKG_VERSION"))],
        )
        .set(1.0);
        Arc::new(m)
    }

    /// The series of the service `name` (registered at zero the first time), with its
    /// bounds published (again after a reload).
    pub fn service(&self, name: &str, bounds: [usize; 2]) -> Arc<ServiceMetrics> {
        let mut services = self.services.lock().unwrap_or_else(|e| e.into_inner());
        let found = services.iter().find(|s| &*s.name == name).cloned();
        let service = found.unwrap_or_else(|| {
            let s = Arc::new(ServiceMetrics::register(&self.recorder, name));
            services.push(s.clone());
            s
        });
        for (d, b) in service.directions.iter().zip(bounds) {
            d.limit.set(b as f64);
        }
        service
    }

    /// The gauges a [`Budget`](crate::budget::Budget) keeps current.
    pub fn budget_gauges(&self) -> BudgetGauges {
        BudgetGauges {
            limit: self.budget_limit.clone(),
            used: self.budget_used.clone(),
        }
    }

    /// Seconds on the metrics clock (see [`now`]).
    pub fn now(&self) -> f64 {
        now()
    }

    /// The whole exposition: the recorder's series plus those computed at scrape time.
    pub fn render(&self) -> String {
        // Pauses first: a pause is counted before its clock starts, so the counters in
        // the render that follows never trail the paused gauge.
        let now = now();
        let services = self
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let snaps: Vec<_> = services
            .iter()
            .map(|s| s.directions.each_ref().map(|d| d.paused.snapshot(now)))
            .collect();
        let mut out = self.handle.render();
        let by_direction = |out: &mut String,
                            name: &str,
                            help: &str,
                            kind: &str,
                            value: &dyn Fn(usize, usize) -> String| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (i, s) in services.iter().enumerate() {
                for (d, dir) in DIRECTIONS.iter().enumerate() {
                    out.push_str(&format!(
                        "{name}{{service=\"{}\",direction=\"{dir}\"}} {}\n",
                        s.name,
                        value(i, d)
                    ));
                }
            }
        };
        by_direction(
            &mut out,
            "sluice_paused_connections",
            "Connection directions paused now, by service and direction.",
            "gauge",
            &|i, d| snaps[i][d].0.to_string(),
        );
        by_direction(
            &mut out,
            "sluice_paused_seconds_total",
            "Time spent paused, all connections, by service and direction.",
            "counter",
            &|i, d| snaps[i][d].1.to_string(),
        );
        let kernel = self.connections.kernel_queued();
        by_direction(
            &mut out,
            "sluice_kernel_queued_bytes",
            "Bytes the kernel holds for live connections, by service and direction: unread in the source sockets plus unacknowledged in the destination sockets (sampled every second).",
            "gauge",
            &|i, d| {
                kernel
                    .get(&*services[i].name)
                    .map_or(0, |k| k[d])
                    .to_string()
            },
        );
        render_servers(&mut out, &services);
        crate::process_metrics::render(&mut out);
        out
    }

    /// Folds histogram samples into their buckets; run it now and then so memory stays
    /// flat when nobody scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// The per-server gauges, read from each service's servers as now configured.
fn render_servers(out: &mut String, services: &[Arc<ServiceMetrics>]) {
    let pools: Vec<_> = services
        .iter()
        .filter_map(|s| Some((s.name.clone(), s.pool.lock().ok()?.clone()?)))
        .collect();
    let now = Instant::now();
    let each = |out: &mut String,
                name: &str,
                help: &str,
                kind: &str,
                value: &dyn Fn(&crate::pool::Backend) -> String| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (service, pool) in &pools {
            for b in pool.backends() {
                out.push_str(&format!(
                    "{name}{{service=\"{service}\",server=\"{}\"}} {}\n",
                    escape(&b.address),
                    value(b)
                ));
            }
        }
    };
    each(
        out,
        "sluice_server_up",
        "1 while the server is in rotation, 0 while it is ejected for failing connects.",
        "gauge",
        &|b| u8::from(b.is_up(now)).to_string(),
    );
    each(
        out,
        "sluice_server_connections",
        "Live connections to the server.",
        "gauge",
        &|b| b.connections().to_string(),
    );
    each(
        out,
        "sluice_server_ejections_total",
        "Times the server was taken out of rotation after health.max_failures failed connects in a row.",
        "counter",
        &|b| b.ejections().to_string(),
    );
    for (name, help, value) in [
        (
            "sluice_server_queued_bytes",
            "Bytes held in sluice's buffers for the server's live connections, by direction.",
            (|b: &crate::pool::Backend, d| b.queued(d)) as fn(&crate::pool::Backend, usize) -> u64,
        ),
        (
            "sluice_server_paused_connections",
            "The server's connection directions paused now, by direction.",
            |b, d| b.paused(d),
        ),
    ] {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for (service, pool) in &pools {
            for b in pool.backends() {
                for (d, dir) in DIRECTIONS.iter().enumerate() {
                    out.push_str(&format!(
                        "{name}{{service=\"{service}\",server=\"{}\",direction=\"{dir}\"}} {}\n",
                        escape(&b.address),
                        value(b, d)
                    ));
                }
            }
        }
    }
}

/// A label value as the exposition format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl ServiceMetrics {
    fn register(r: &dyn Recorder, name: &str) -> ServiceMetrics {
        let service = || label("service", name);
        let with = |k: &'static str, v: &str| vec![label("service", name), label(k, v)];
        let direction = |i: usize| {
            let labels = || with("direction", DIRECTIONS[i]);
            DirectionMetrics {
                bytes: counter(r, "sluice_bytes_total", labels()),
                queued: gauge(r, "sluice_queued_bytes", labels()),
                pauses: counter(r, "sluice_pauses_total", labels()),
                drains: counter(r, "sluice_drains_total", labels()),
                limit: gauge(r, "sluice_buffer_limit_bytes", labels()),
                budget_waits: counter(r, "sluice_budget_waits_total", labels()),
                paused: PauseClock::default(),
            }
        };
        ServiceMetrics {
            name: name.into(),
            accepted: counter(r, "sluice_connections_accepted_total", vec![service()]),
            active: gauge(r, "sluice_connections_active", vec![service()]),
            closed: CloseReason::ALL
                .iter()
                .map(|c| {
                    counter(
                        r,
                        "sluice_connections_closed_total",
                        with("reason", c.as_label()),
                    )
                })
                .collect(),
            connection_duration: histogram(
                r,
                "sluice_connection_duration_seconds",
                vec![service()],
            ),
            rejected_per_client: counter(
                r,
                "sluice_connections_rejected_total",
                with("reason", "max_per_client"),
            ),
            rejected_not_allowed: counter(
                r,
                "sluice_connections_rejected_total",
                with("reason", "not_allowed"),
            ),
            rejected_proxy_protocol: counter(
                r,
                "sluice_connections_rejected_total",
                with("reason", "proxy_protocol"),
            ),
            retries: counter(r, "sluice_upstream_retries_total", vec![service()]),
            directions: [direction(0), direction(1)],
            servers: Mutex::new(HashMap::new()),
            pool: Mutex::new(None),
        }
    }

    pub fn closed(&self, reason: CloseReason) -> &Counter {
        &self.closed[reason as usize]
    }

    /// The service was removed: its servers leave the per-server gauges (its counters
    /// keep their totals).
    pub fn retire(&self) {
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Puts `pool` in the per-server gauges and returns each of its servers' handles,
    /// in the pool's order (registered at zero for a server not seen before).
    pub fn servers(&self, recorder: &Metrics, pool: &Arc<Pool>) -> Vec<Arc<ServerMetrics>> {
        let r: &dyn Recorder = &recorder.recorder;
        let mut known = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        let handles = pool
            .backends()
            .iter()
            .map(|b| {
                known
                    .entry(b.address.clone())
                    .or_insert_with(|| {
                        let labels =
                            || vec![label("service", &self.name), label("server", &b.address)];
                        Arc::new(ServerMetrics {
                            connect_errors: ConnectErrorKind::ALL
                                .iter()
                                .map(|k| {
                                    let mut l = labels();
                                    l.push(label("kind", k.as_label()));
                                    counter(r, "sluice_upstream_connect_errors_total", l)
                                })
                                .collect(),
                            connect_duration: histogram(
                                r,
                                "sluice_upstream_connect_duration_seconds",
                                labels(),
                            ),
                        })
                    })
                    .clone()
            })
            .collect();
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) = Some(pool.clone());
        handles
    }
}

/// Every series the recorder renders: name, kind and help text, described once.
const DESCRIPTIONS: [(&str, Kind, &str); 20] = [
    (
        "sluice_connections_accepted_total",
        Kind::Counter,
        "Client connections accepted, by service.",
    ),
    (
        "sluice_connections_active",
        Kind::Gauge,
        "Client connections open now, by service.",
    ),
    (
        "sluice_connections_closed_total",
        Kind::Counter,
        "Client connections closed, by service and reason.",
    ),
    (
        "sluice_listener_paused_total",
        Kind::Counter,
        "Times accepting stopped because listen.max_connections was reached.",
    ),
    (
        "sluice_upstream_connect_errors_total",
        Kind::Counter,
        "Failed upstream connects, by service, server and kind.",
    ),
    (
        "sluice_upstream_connect_duration_seconds",
        Kind::Histogram,
        "Time to connect to a server, by service and server.",
    ),
    (
        "sluice_upstream_retries_total",
        Kind::Counter,
        "Connects tried again on another server after one failed, by service.",
    ),
    (
        "sluice_connection_duration_seconds",
        Kind::Histogram,
        "Client connection lifetime, by service.",
    ),
    (
        "sluice_bytes_total",
        Kind::Counter,
        "Bytes relayed, by service and direction.",
    ),
    (
        "sluice_queued_bytes",
        Kind::Gauge,
        "Bytes held in sluice's buffers now, all connections, by service and direction.",
    ),
    (
        "sluice_buffer_limit_bytes",
        Kind::Gauge,
        "The configured per-connection buffer bound, by service and direction.",
    ),
    (
        "sluice_budget_limit_bytes",
        Kind::Gauge,
        "buffer.total: the most buffer memory all connections together may hold; 0 when there is no such limit.",
    ),
    (
        "sluice_budget_used_bytes",
        Kind::Gauge,
        "Buffer memory granted by buffer.total now (a granted buffer counts whole).",
    ),
    (
        "sluice_budget_waits_total",
        Kind::Counter,
        "Times a direction waited in line for buffer.total to grant it a buffer.",
    ),
    (
        "sluice_pauses_total",
        Kind::Counter,
        "Times a buffer filled and reading from its source stopped.",
    ),
    (
        "sluice_drains_total",
        Kind::Counter,
        "Times a paused buffer drained to the resume mark and reading resumed.",
    ),
    (
        "sluice_connections_rejected_total",
        Kind::Counter,
        "Clients closed at once by an access rule or a bad PROXY header, by service and reason.",
    ),
    (
        "sluice_config_reloads_total",
        Kind::Counter,
        "Configuration reloads (SIGHUP), by result.",
    ),
    (
        "sluice_connection_panics_total",
        Kind::Counter,
        "Connection tasks that panicked (a bug; the process carries on).",
    ),
    (
        "sluice_build_info",
        Kind::Gauge,
        "Always 1; the version label says which sluice this is.",
    ),
];

static META: Metadata<'static> =
    Metadata::new("sluice", metrics::Level::INFO, Some("sluice::metrics"));

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Help text for a series; units stay out of the metadata (the names end in _bytes or
/// _seconds already).
fn describe(r: &dyn Recorder, name: &'static str, kind: Kind, help: &'static str) {
    let (name, help) = (
        metrics::KeyName::from_const_str(name),
        SharedString::const_str(help),
    );
    match kind {
        Kind::Counter => r.describe_counter(name, None, help),
        Kind::Gauge => r.describe_gauge(name, None, help),
        Kind::Histogram => r.describe_histogram(name, None, help),
    }
}

/// How many directions are paused and for how long, without a timer per pause.
///
/// Each pause adds its start time to `sum_starts`; at any instant the time spent in
/// pauses still running is `count × now − sum_starts`, so a scrape sees paused time grow
/// even for a reader that never reads. A mutex, not atomics, so the three numbers move
/// together; it is taken once per pause and once per drain, never per chunk.
#[derive(Default)]
pub struct PauseClock {
    inner: Mutex<PauseClockInner>,
}

#[derive(Default)]
struct PauseClockInner {
    count: u64,
    sum_starts: f64,
    finished: f64,
    /// Last value shown, so float rounding can never make the counter go backwards.
    last_total: f64,
}

impl PauseClock {
    /// A pause begins at `now` (seconds on the metrics clock).
    pub fn start(&self, now: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.count += 1;
        g.sum_starts += now;
    }

    /// The pause that began at `started` ends at `now`.
    pub fn stop(&self, started: f64, now: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        debug_assert!(g.count > 0, "a pause stopped that never started");
        g.count = g.count.saturating_sub(1);
        g.sum_starts -= started;
        g.finished += (now - started).max(0.0);
        if g.count == 0 {
            // No pause is running: clear the float residue of the running sum.
            g.sum_starts = 0.0;
        }
    }

    /// (paused now, total paused seconds) at `now`.
    fn snapshot(&self, now: f64) -> (u64, f64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let running = (g.count as f64 * now - g.sum_starts).max(0.0);
        let total = (g.finished + running).max(g.last_total);
        g.last_total = total;
        (g.count, total)
    }
}
