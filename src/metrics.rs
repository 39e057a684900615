//! Every metric sluice exports and its help text; [`crate::admin`] serves them at
//! `/metrics`.
//!
//! Each proxy instance owns its own Prometheus recorder (no global state), so tests can
//! run several proxies in one process and read each one's numbers. Handles are created
//! once here; the relay only touches atomics through them, never a name lookup.

pub mod names;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt::Write as _;
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

/// The handle of the counter `name` with the label `values`, given in the order
/// [`SERIES`] declares its labels; [`gauge`] and [`histogram`] do the same for theirs.
fn counter(r: &dyn Recorder, name: &'static str, values: &[&str]) -> Counter {
    let series = Series::of(name);
    debug_assert!(matches!(series.kind, Kind::Counter), "{name} is no counter");
    r.register_counter(&series.key(values), &META)
}
fn gauge(r: &dyn Recorder, name: &'static str, values: &[&str]) -> Gauge {
    let series = Series::of(name);
    debug_assert!(matches!(series.kind, Kind::Gauge), "{name} is no gauge");
    r.register_gauge(&series.key(values), &META)
}
fn histogram(r: &dyn Recorder, name: &'static str, values: &[&str]) -> Histogram {
    let series = Series::of(name);
    debug_assert!(
        matches!(series.kind, Kind::Histogram(_)),
        "{name} is no histogram"
    );
    r.register_histogram(&series.key(values), &META)
}

impl Metrics {
    /// A fresh recorder with the process-wide series registered at zero; each service
    /// registers its own with [`Metrics::service`].
    pub fn new() -> Arc<Metrics> {
        let recorder = described_recorder();
        let r: &dyn Recorder = &recorder;
        let m = Metrics {
            listener_paused: counter(r, names::LISTENER_PAUSED_TOTAL, &[]),
            reloads_success: counter(r, names::CONFIG_RELOADS_TOTAL, &["success"]),
            reloads_failure: counter(r, names::CONFIG_RELOADS_TOTAL, &["failure"]),
            panics: counter(r, names::CONNECTION_PANICS_TOTAL, &[]),
            budget_limit: gauge(r, names::BUDGET_LIMIT_BYTES, &[]),
            budget_used: gauge(r, names::BUDGET_USED_BYTES, &[]),
            services: Mutex::new(Vec::new()),
            connections: Arc::default(),
            handle: recorder.handle(),
            recorder,
        };
        gauge(&m.recorder, names::BUILD_INFO, &[env!("CARGO_PKG_VERSION")]).set(1.0);
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
        let services = self
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Pauses first: a pause is counted before its clock starts, so the counters in
        // the render that follows never trail the paused gauge.
        let pauses = pause_snapshots(&services);
        let mut out = self.handle.render();
        let each = ByDirection(&services);
        each.render(&mut out, names::PAUSED_CONNECTIONS, |s, d| pauses[s][d].0);
        each.render(&mut out, names::PAUSED_SECONDS_TOTAL, |s, d| pauses[s][d].1);
        let kernel = self.connections.kernel_queued();
        each.render(&mut out, names::KERNEL_QUEUED_BYTES, |s, d| {
            kernel.get(&*services[s].name).map_or(0, |k| k[d])
        });
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

/// A recorder that knows every recorder-kept series of [`SERIES`]: its help text, and a
/// histogram's buckets.
fn described_recorder() -> metrics_exporter_prometheus::PrometheusRecorder {
    let mut builder = PrometheusBuilder::new();
    for series in &SERIES {
        if let Kind::Histogram(buckets) = series.kind {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(series.name.into()), buckets)
                .expect("bucket lists are constant and non-empty");
        }
    }
    let recorder = builder.build_recorder();
    for series in SERIES.iter().filter(|s| s.source == Source::Recorder) {
        series.describe(&recorder);
    }
    recorder
}

/// Every service's (paused directions, paused seconds) now, by direction.
fn pause_snapshots(services: &[Arc<ServiceMetrics>]) -> Vec<[(u64, f64); 2]> {
    let now = now();
    services
        .iter()
        .map(|s| s.directions.each_ref().map(|d| d.paused.snapshot(now)))
        .collect()
}

/// Writes a scrape-time series of every service in every direction.
struct ByDirection<'a>(&'a [Arc<ServiceMetrics>]);

impl ByDirection<'_> {
    /// The series `name`, its value for (service index, direction index) from `value`.
    fn render<V: std::fmt::Display>(
        &self,
        out: &mut String,
        name: &str,
        value: impl Fn(usize, usize) -> V,
    ) {
        let series = Series::of(name);
        series.write_header(out);
        for (s, service) in self.0.iter().enumerate() {
            for (d, dir) in DIRECTIONS.iter().enumerate() {
                series.write_sample(out, &[&service.name, dir], value(s, d));
            }
        }
    }
}

/// A per-server series' value at a scrape (at `now`).
type ServerValue = fn(&crate::pool::Backend, Instant) -> u64;
/// A per-server series' value in one direction.
type ServerDirectionValue = fn(&crate::pool::Backend, usize) -> u64;

/// The per-server gauges, read from each service's servers as now configured.
fn render_servers(out: &mut String, services: &[Arc<ServiceMetrics>]) {
    use crate::pool::Backend;
    let pools: Vec<_> = services
        .iter()
        .filter_map(|s| Some((s.name.clone(), s.pool.lock().ok()?.clone()?)))
        .collect();
    let servers = || {
        pools
            .iter()
            .flat_map(|(service, pool)| pool.backends().iter().map(move |b| (&**service, b)))
    };
    let now = Instant::now();
    let whole: [(&str, ServerValue); 3] = [
        (names::SERVER_UP, |b, now| u64::from(b.is_up(now))),
        (names::SERVER_CONNECTIONS, |b, _| b.connections() as u64),
        (names::SERVER_EJECTIONS_TOTAL, |b, _| b.ejections()),
    ];
    for (name, value) in whole {
        let series = Series::of(name);
        series.write_header(out);
        for (service, b) in servers() {
            series.write_sample(out, &[service, &b.address], value(b, now));
        }
    }
    let by_direction: [(&str, ServerDirectionValue); 2] = [
        (names::SERVER_QUEUED_BYTES, Backend::queued),
        (names::SERVER_PAUSED_CONNECTIONS, Backend::paused),
    ];
    for (name, value) in by_direction {
        let series = Series::of(name);
        series.write_header(out);
        for (service, b) in servers() {
            for (d, dir) in DIRECTIONS.iter().enumerate() {
                series.write_sample(out, &[service, &b.address, dir], value(b, d));
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

impl DirectionMetrics {
    fn register(r: &dyn Recorder, service: &str, direction: &str) -> DirectionMetrics {
        let labels = [service, direction];
        DirectionMetrics {
            bytes: counter(r, names::BYTES_TOTAL, &labels),
            queued: gauge(r, names::QUEUED_BYTES, &labels),
            pauses: counter(r, names::PAUSES_TOTAL, &labels),
            drains: counter(r, names::DRAINS_TOTAL, &labels),
            limit: gauge(r, names::BUFFER_LIMIT_BYTES, &labels),
            budget_waits: counter(r, names::BUDGET_WAITS_TOTAL, &labels),
            paused: PauseClock::default(),
        }
    }
}

impl ServiceMetrics {
    fn register(r: &dyn Recorder, name: &str) -> ServiceMetrics {
        let rejected = |reason| counter(r, names::CONNECTIONS_REJECTED_TOTAL, &[name, reason]);
        ServiceMetrics {
            name: name.into(),
            accepted: counter(r, names::CONNECTIONS_ACCEPTED_TOTAL, &[name]),
            active: gauge(r, names::CONNECTIONS_ACTIVE, &[name]),
            closed: CloseReason::ALL
                .iter()
                .map(|c| counter(r, names::CONNECTIONS_CLOSED_TOTAL, &[name, c.as_label()]))
                .collect(),
            connection_duration: histogram(r, names::CONNECTION_DURATION_SECONDS, &[name]),
            rejected_per_client: rejected("max_per_client"),
            rejected_not_allowed: rejected("not_allowed"),
            rejected_proxy_protocol: rejected("proxy_protocol"),
            retries: counter(r, names::UPSTREAM_RETRIES_TOTAL, &[name]),
            directions: DIRECTIONS.map(|d| DirectionMetrics::register(r, name, d)),
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
                let found = known.entry(b.address.clone());
                let server = found.or_insert_with(|| {
                    Arc::new(ServerMetrics::register(r, &self.name, &b.address))
                });
                server.clone()
            })
            .collect();
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) = Some(pool.clone());
        handles
    }
}

impl ServerMetrics {
    fn register(r: &dyn Recorder, service: &str, server: &str) -> ServerMetrics {
        ServerMetrics {
            connect_errors: ConnectErrorKind::ALL
                .iter()
                .map(|k| {
                    let labels = [service, server, k.as_label()];
                    counter(r, names::UPSTREAM_CONNECT_ERRORS_TOTAL, &labels)
                })
                .collect(),
            connect_duration: histogram(
                r,
                names::UPSTREAM_CONNECT_DURATION_SECONDS,
                &[service, server],
            ),
        }
    }
}

/// One series sluice exports: a row of [`SERIES`].
#[derive(Debug)]
pub struct Series {
    pub name: &'static str,
    pub kind: Kind,
    /// The `# HELP` text. Units stay out of the metadata: the names end in _bytes or
    /// _seconds already.
    pub help: &'static str,
    /// Its label names, in the order its samples carry them.
    pub labels: &'static [&'static str],
    pub source: Source,
}

/// What a series is, as its `# TYPE` line says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    /// With the upper bounds of its buckets.
    Histogram(&'static [f64]),
}

/// Where a series' numbers are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// In the recorder: a handle is registered once and updated in place.
    Recorder,
    /// Read from the services, their servers and the live connections at each scrape
    /// (what would be a gauge per connection, or is a sum over a clock).
    Scrape,
}

// The label sets of SERIES, named for the labels in their order.
const SERVICE: &[&str] = &["service"];
const SERVICE_REASON: &[&str] = &["service", "reason"];
const SERVICE_DIRECTION: &[&str] = &["service", "direction"];
const SERVICE_SERVER: &[&str] = &["service", "server"];
const SERVICE_SERVER_KIND: &[&str] = &["service", "server", "kind"];
const SERVICE_SERVER_DIRECTION: &[&str] = &["service", "server", "direction"];

/// Every series sluice exports (less the `process_*` ones), declared once: the recorder
/// is described from this table, handles are registered and scrape-time series written
/// by name through it.
#[rustfmt::skip]
pub const SERIES: [Series; 28] = [
    Series::recorder(names::CONNECTIONS_ACCEPTED_TOTAL, Kind::Counter, SERVICE,
        "Client connections accepted, by service."),
    Series::recorder(names::CONNECTIONS_ACTIVE, Kind::Gauge, SERVICE,
        "Client connections open now, by service."),
    Series::recorder(names::CONNECTIONS_CLOSED_TOTAL, Kind::Counter, SERVICE_REASON,
        "Client connections closed, by service and reason."),
    Series::recorder(names::LISTENER_PAUSED_TOTAL, Kind::Counter, &[],
        "Times accepting stopped because listen.max_connections was reached."),
    Series::recorder(names::UPSTREAM_CONNECT_ERRORS_TOTAL, Kind::Counter, SERVICE_SERVER_KIND,
        "Failed upstream connects, by service, server and kind."),
    Series::recorder(names::UPSTREAM_CONNECT_DURATION_SECONDS, Kind::Histogram(CONNECT_BUCKETS), SERVICE_SERVER,
        "Time to connect to a server, by service and server."),
    Series::recorder(names::UPSTREAM_RETRIES_TOTAL, Kind::Counter, SERVICE,
        "Connects tried again on another server after one failed, by service."),
    Series::recorder(names::CONNECTION_DURATION_SECONDS, Kind::Histogram(DURATION_BUCKETS), SERVICE,
        "Client connection lifetime, by service."),
    Series::recorder(names::BYTES_TOTAL, Kind::Counter, SERVICE_DIRECTION,
        "Bytes relayed, by service and direction."),
    Series::recorder(names::QUEUED_BYTES, Kind::Gauge, SERVICE_DIRECTION,
        "Bytes held in sluice's buffers now, all connections, by service and direction."),
    Series::recorder(names::BUFFER_LIMIT_BYTES, Kind::Gauge, SERVICE_DIRECTION,
        "The configured per-connection buffer bound, by service and direction."),
    Series::recorder(names::BUDGET_LIMIT_BYTES, Kind::Gauge, &[],
        "buffer.total: the most buffer memory all connections together may hold; 0 when there is no such limit."),
    Series::recorder(names::BUDGET_USED_BYTES, Kind::Gauge, &[],
        "Buffer memory granted by buffer.total now (a granted buffer counts whole)."),
    Series::recorder(names::BUDGET_WAITS_TOTAL, Kind::Counter, SERVICE_DIRECTION,
        "Times a direction waited in line for buffer.total to grant it a buffer."),
    Series::recorder(names::PAUSES_TOTAL, Kind::Counter, SERVICE_DIRECTION,
        "Times a buffer filled and reading from its source stopped."),
    Series::recorder(names::DRAINS_TOTAL, Kind::Counter, SERVICE_DIRECTION,
        "Times a paused buffer drained to the resume mark and reading resumed."),
    Series::recorder(names::CONNECTIONS_REJECTED_TOTAL, Kind::Counter, SERVICE_REASON,
        "Clients closed at once by an access rule or a bad PROXY header, by service and reason."),
    Series::recorder(names::CONFIG_RELOADS_TOTAL, Kind::Counter, &["result"],
        "Configuration reloads (SIGHUP), by result."),
    Series::recorder(names::CONNECTION_PANICS_TOTAL, Kind::Counter, &[],
        "Connection tasks that panicked (a bug; the process carries on)."),
    Series::recorder(names::BUILD_INFO, Kind::Gauge, &["version"],
        "Always 1; the version label says which sluice this is."),
    Series::scrape(names::PAUSED_CONNECTIONS, Kind::Gauge, SERVICE_DIRECTION,
        "Connection directions paused now, by service and direction."),
    Series::scrape(names::PAUSED_SECONDS_TOTAL, Kind::Counter, SERVICE_DIRECTION,
        "Time spent paused, all connections, by service and direction."),
    Series::scrape(names::KERNEL_QUEUED_BYTES, Kind::Gauge, SERVICE_DIRECTION,
        "Bytes the kernel holds for live connections, by service and direction: unread in the source sockets plus unacknowledged in the destination sockets (sampled every second)."),
    Series::scrape(names::SERVER_UP, Kind::Gauge, SERVICE_SERVER,
        "1 while the server is in rotation, 0 while it is ejected for failing connects."),
    Series::scrape(names::SERVER_CONNECTIONS, Kind::Gauge, SERVICE_SERVER,
        "Live connections to the server."),
    Series::scrape(names::SERVER_EJECTIONS_TOTAL, Kind::Counter, SERVICE_SERVER,
        "Times the server was taken out of rotation after health.max_failures failed connects in a row."),
    Series::scrape(names::SERVER_QUEUED_BYTES, Kind::Gauge, SERVICE_SERVER_DIRECTION,
        "Bytes held in sluice's buffers for the server's live connections, by direction."),
    Series::scrape(names::SERVER_PAUSED_CONNECTIONS, Kind::Gauge, SERVICE_SERVER_DIRECTION,
        "The server's connection directions paused now, by direction."),
];

static META: Metadata<'static> =
    Metadata::new("sluice", metrics::Level::INFO, Some("sluice::metrics"));

impl Series {
    /// A row for a series the recorder keeps.
    const fn recorder(
        name: &'static str,
        kind: Kind,
        labels: &'static [&'static str],
        help: &'static str,
    ) -> Series {
        Series {
            name,
            kind,
            help,
            labels,
            source: Source::Recorder,
        }
    }

    /// A row for a series computed at each scrape.
    const fn scrape(
        name: &'static str,
        kind: Kind,
        labels: &'static [&'static str],
        help: &'static str,
    ) -> Series {
        Series {
            source: Source::Scrape,
            ..Series::recorder(name, kind, labels, help)
        }
    }

    /// The row of [`SERIES`] for `name`; a name not declared there is a bug.
    pub fn of(name: &str) -> &'static Series {
        SERIES
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} is not declared in metrics::SERIES"))
    }

    /// The word its `# TYPE` line gives.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        }
    }

    /// Its help text, told to the recorder.
    fn describe(&self, r: &dyn Recorder) {
        let (name, help) = (
            metrics::KeyName::from_const_str(self.name),
            SharedString::const_str(self.help),
        );
        match self.kind {
            Kind::Counter => r.describe_counter(name, None, help),
            Kind::Gauge => r.describe_gauge(name, None, help),
            Kind::Histogram(_) => r.describe_histogram(name, None, help),
        }
    }

    /// The recorder's key for the sample with label `values`, one for each of its labels.
    fn key(&self, values: &[&str]) -> Key {
        assert_eq!(
            values.len(),
            self.labels.len(),
            "{} is labelled by {:?}",
            self.name,
            self.labels
        );
        let labels: Vec<Label> = self
            .labels
            .iter()
            .zip(values)
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        Key::from_parts(self.name, labels)
    }

    /// The `# HELP` and `# TYPE` lines of a scrape-time series.
    fn write_header(&self, out: &mut String) {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n",
            name = self.name,
            help = self.help,
            kind = self.type_name()
        );
    }

    /// One sample line of a scrape-time series, with label `values` in declared order.
    fn write_sample(&self, out: &mut String, values: &[&str], value: impl std::fmt::Display) {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        out.push_str(self.name);
        for (i, (k, v)) in self.labels.iter().zip(values).enumerate() {
            let open = if i == 0 { '{' } else { ',' };
            let _ = write!(out, "{open}{k}=\"{}\"", escape(v));
        }
        if !self.labels.is_empty() {
            out.push('}');
        }
        let _ = writeln!(out, " {value}");
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
