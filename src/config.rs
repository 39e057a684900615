//! The configuration file: its schema, defaults, parsing and validation.
//!
//! Every key but the two addresses has a default. Errors name the file, the key and,
//! where the TOML parser knows it, the line, so a bad file costs one glance to fix.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bytesize::ByteSize;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::pool::Balance;
pub use crate::proxy_protocol::Version as ProxyVersion;

/// Default per-connection bound for each direction.
pub const DEFAULT_BUFFER: u64 = 64 * 1024;
/// Default fraction of the bound at which a paused direction reads again.
pub const DEFAULT_RESUME_AT: f64 = 0.5;
/// Default cap on concurrent client connections (lowered, without a warning, to what the
/// descriptor limit leaves room for).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default listen backlog: room for clients to wait while sluice is at its limit.
pub const DEFAULT_BACKLOG: u32 = 1024;
/// Default time allowed for the upstream handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time without a byte in either direction before both sides are closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default time a connection may stay half-closed (HAProxy's `timeout client-fin`).
pub const DEFAULT_HALF_CLOSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time live connections get to finish after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default TCP_NOTSENT_LOWAT on both sockets. Measured on a 2-core loopback host
/// (1,000 readers of 32 KiB/s with a 4 KiB SO_RCVBUF; one iperf3 stream): off, sluice's
/// two sockets held 0.8–2.9 MiB per slow reader; 64 KiB holds them to 230–240 KiB
/// and keeps iperf3's throughput (medians 0.98–1.17 × off), while 16–48 KiB held less
/// (110–200 KiB) but cost 6–19 % of it.
pub const DEFAULT_NOTSENT_LOWAT: u64 = 64 * 1024;
/// Default TCP keepalive idle time on both sockets.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(60);
/// Default metrics endpoint: loopback only, so it is never exposed by accident.
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9090";
/// Default connect retries on another server: with three servers, a client is reset
/// only when all three refuse.
pub const DEFAULT_RETRIES: u32 = 2;
/// Default connect failures in a row that take a server out of rotation.
pub const DEFAULT_MAX_FAILURES: u32 = 3;
/// Default time an ejected server stays out before it is tried again.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(10);
/// The name of the service made of `[listen]` and `[upstream]`.
pub const DEFAULT_SERVICE: &str = "default";

/// The whole configuration, as read from the file and overridden by the command line.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub upstream: Upstream,
    #[serde(default)]
    pub buffer: Buffer,
    #[serde(default)]
    pub relay: Relay,
    #[serde(default)]
    pub socket: SocketOptions,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default)]
    pub health: Health,
    /// `[[service]]` tables: listeners of their own with servers of their own.
    #[serde(default, rename = "service", skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSpec>,
}

/// A `[[service]]` table as written: its own keys, and overlays (`[service.buffer]` and
/// the like) whose keys replace the top-level section's, key by key.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// The `service` label: `[a-z0-9_-]+`, unique in the file.
    pub name: String,
    /// Address the service accepts clients on (`ip:port`).
    #[serde(default)]
    pub listen: String,
    /// The servers clients are relayed to (`host:port` each).
    #[serde(default)]
    pub servers: Vec<String>,
    /// Which server gets the next client.
    #[serde(default)]
    pub balance: Balance,
    /// Write a PROXY protocol header of this version to each server before any client byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_proxy: Option<ProxyVersion>,
    /// Read a PROXY protocol header (v1 or v2) from each client first and treat its
    /// source as the client's address.
    #[serde(default)]
    pub accept_proxy: bool,
    /// Overrides `listen.allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// Overrides `listen.max_connections_per_client`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_client: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<toml::Table>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<toml::Table>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<toml::Table>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<toml::Table>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<toml::Table>,
}

/// One service's effective settings: its own keys, the overlays applied, the top-level
/// sections' values elsewhere. What a connection of the service runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub listen: SocketAddr,
    pub servers: Vec<String>,
    pub balance: Balance,
    pub send_proxy: Option<ProxyVersion>,
    pub accept_proxy: bool,
    /// `allow`, parsed; empty allows everyone.
    pub allow: Vec<IpNet>,
    pub max_connections_per_client: usize,
    /// Process-wide (`listen.backlog`), copied here for the bind.
    pub backlog: u32,
    pub buffer: Buffer,
    pub socket: SocketOptions,
    pub timeouts: Timeouts,
    pub upstream: Upstream,
    pub health: Health,
    /// Process-wide (`[relay]`), copied here for the relay.
    pub relay: Relay,
}

impl Service {
    /// The per-direction bounds in bytes, client→upstream first.
    pub fn bounds(&self) -> [usize; 2] {
        [
            self.buffer.client_to_upstream.as_u64() as usize,
            self.buffer.upstream_to_client.as_u64() as usize,
        ]
    }
}

/// When a server is taken out of rotation and how it comes back.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Connect failures in a row (clients' or active checks') that take a server out.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// How long an ejected server stays out before clients try it again.
    #[serde(with = "humantime_serde", default = "default_cooldown")]
    pub cooldown: Duration,
    /// Every this long, a TCP connect to each server (within `upstream.connect_timeout`):
    /// a failure counts like a client's, a success brings the server back at once.
    /// "0s" turns active checks off.
    #[serde(with = "humantime_serde", default)]
    pub interval: Duration,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            max_failures: DEFAULT_MAX_FAILURES,
            cooldown: DEFAULT_COOLDOWN,
            interval: Duration::ZERO,
        }
    }
}

/// How the work is spread over threads.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// Worker threads that run the connections; 0 means one per core the process may
    /// run on.
    #[serde(default)]
    pub workers: usize,
    /// How connections are placed on the workers.
    #[serde(default)]
    pub scheduler: Scheduler,
}

/// How connections are placed on the worker threads.
///
/// The default is the one `sluice-stress bench` measured ahead on more figures on the
/// hosts it ran on (2 cores shared with the load generators): see README, Benchmarks.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// One work-stealing pool (tokio's multi-thread runtime): a connection's task runs on
    /// whichever worker is free, so a worker whose core is busy with something else does
    /// not hold its connections back, at the price of wake-ups that cross threads.
    #[default]
    Stealing,
    /// Each worker is an event loop of its own; a connection is placed on the worker
    /// with the fewest live connections and stays there (HAProxy's and nginx's shape):
    /// its wake-ups never cross threads.
    Pinned,
}

impl Runtime {
    /// The number of worker threads to start: `workers`, or one per available core.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Where clients connect and how many may be served at once.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Address the proxy accepts clients on (`ip:port`).
    #[serde(default)]
    pub address: String,
    /// At this many live connections sluice stops accepting and leaves new clients in the
    /// kernel backlog, so the limit costs nothing and loses nobody. Unset: 10,000, or as
    /// many as the descriptor limit leaves room for if that is fewer (a value set here
    /// and above what the limit allows is warned about instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Length of the kernel's queue of handshaken clients not yet accepted: where
    /// clients wait while sluice is at `max_connections` (capped by net.core.somaxconn).
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    /// Most live connections from one source IP address; 0 means no per-client limit.
    #[serde(default)]
    pub max_connections_per_client: usize,
    /// Networks (CIDR, or single addresses) clients may connect from; empty allows all.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// The server every client is relayed to.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `host:port`; a host name is resolved at each connect, so DNS changes are followed.
    #[serde(default)]
    pub address: String,
    /// A handshake that takes longer than this fails the attempt.
    #[serde(with = "humantime_serde", default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// A failed connect is tried again on another server of the service, up to this
    /// many times, before the client is reset. Nothing was sent to a server whose
    /// connect failed, so a retry never sends a byte twice.
    #[serde(default = "default_retries")]
    pub retries: u32,
}

/// The per-connection bounds that make the backpressure.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Buffer {
    /// Most bytes held for one connection on their way from the client to the upstream.
    #[serde(
        default = "default_buffer",
        deserialize_with = "size",
        serialize_with = "write_size"
    )]
    pub client_to_upstream: ByteSize,
    /// Most bytes held for one connection on their way from the upstream to the client.
    #[serde(
        default = "default_buffer",
        deserialize_with = "size",
        serialize_with = "write_size"
    )]
    pub upstream_to_client: ByteSize,
    /// A paused direction reads again once its queue has fallen to this fraction of the
    /// bound: the hysteresis keeps a slow reader from costing a wake-up per segment.
    #[serde(default = "default_resume_at")]
    pub resume_at: f64,
    /// Most buffer memory all connections together may hold (see `budget.rs`); 0 means
    /// no such limit, only the per-connection bounds.
    #[serde(default, deserialize_with = "size", serialize_with = "write_size")]
    pub total: ByteSize,
}

/// How the relay moves bytes.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    /// `copy` through a ring in user space, or `splice` through a pipe in the kernel.
    #[serde(default)]
    pub mode: RelayMode,
}

/// How a direction moves bytes from its source to its destination; the bound, the
/// states and the metrics are the same in both.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// read() into a ring of `bound` bytes, write() out of it.
    #[default]
    Copy,
    /// splice() into a pipe holding at most `bound` bytes, splice() out of it: the bytes
    /// never enter user space. Costs two descriptors per direction with bytes queued.
    Splice,
}

/// Socket tuning applied to accepted sockets and, before connect(), to upstream sockets.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SocketOptions {
    /// SO_RCVBUF on client sockets; 0 keeps the kernel's autotuning.
    #[serde(default, deserialize_with = "size", serialize_with = "write_size")]
    pub client_recv_buffer: ByteSize,
    /// SO_SNDBUF on client sockets; 0 keeps the kernel's autotuning.
    #[serde(default, deserialize_with = "size", serialize_with = "write_size")]
    pub client_send_buffer: ByteSize,
    /// SO_RCVBUF on upstream sockets; 0 keeps the kernel's autotuning.
    #[serde(default, deserialize_with = "size", serialize_with = "write_size")]
    pub upstream_recv_buffer: ByteSize,
    /// SO_SNDBUF on upstream sockets; 0 keeps the kernel's autotuning.
    #[serde(default, deserialize_with = "size", serialize_with = "write_size")]
    pub upstream_send_buffer: ByteSize,
    /// TCP_NOTSENT_LOWAT on both sockets: a socket takes more bytes from sluice only
    /// while fewer than this are waiting unsent in its kernel send queue, so that queue
    /// stays small even where autotuning grew the send buffer to megabytes. 0 leaves the
    /// system default (`net.ipv4.tcp_notsent_lowat`, unlimited unless changed).
    #[serde(
        default = "default_notsent_lowat",
        deserialize_with = "size",
        serialize_with = "write_size"
    )]
    pub notsent_lowat: ByteSize,
    /// TCP_NODELAY on both sockets: a proxy should not add Nagle's delay to small writes.
    #[serde(default = "default_true")]
    pub nodelay: bool,
    /// TCP keepalive idle time on both sockets; "0s" turns keepalive off.
    #[serde(with = "humantime_serde", default = "default_keepalive")]
    pub keepalive: Duration,
}

/// How long a connection may sit in each kind of waiting.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// No byte in either direction for this long closes both sides; "0s" disables.
    #[serde(with = "humantime_serde", default = "default_idle")]
    pub idle: Duration,
    /// A connection with one direction finished is closed after this long; "0s" disables.
    #[serde(with = "humantime_serde", default = "default_half_close")]
    pub half_close: Duration,
    /// After SIGTERM/SIGINT, live connections get this long to finish before being closed.
    #[serde(with = "humantime_serde", default = "default_shutdown_grace")]
    pub shutdown_grace: Duration,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Address `/metrics` is served on; loopback by default.
    #[serde(default = "default_metrics_address")]
    pub address: String,
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// A tracing filter: a level (`info`, `debug`, ...) or directives (`sluice=debug`).
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `text` for people, `json` for log pipelines.
    #[serde(default)]
    pub format: LogFormat,
}

/// The log line format.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A size written exactly, so that it reads back the same (`ByteSize`'s own form rounds
/// 100000 bytes to "97.7 KiB"): "1MiB" or "64KiB" where it is a whole number of those,
/// else a number of bytes. Used by `--check-config` and by service overlays, which write
/// the top-level sections out and read them back.
fn write_size<S: serde::Serializer>(size: &ByteSize, s: S) -> Result<S::Ok, S::Error> {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    match size.as_u64() {
        n if n >= MIB && n % MIB == 0 => s.serialize_str(&format!("{}MiB", n / MIB)),
        n if n >= KIB && n % KIB == 0 => s.serialize_str(&format!("{}KiB", n / KIB)),
        n => s.serialize_u64(n),
    }
}

/// A size as "64KiB", "1MiB", "65536" or 65536, with an error that says so.
fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(i64),
        Text(String),
    }
    let raw = Raw::deserialize(d).map_err(|_| {
        serde::de::Error::custom("expected a size such as \"64KiB\" or a number of bytes")
    })?;
    match raw {
        Raw::Bytes(n) => u64::try_from(n)
            .map(ByteSize::b)
            .map_err(|_| serde::de::Error::custom(format!("{n} is negative: sizes are bytes"))),
        Raw::Text(t) => t.trim().parse::<ByteSize>().map_err(|_| {
            serde::de::Error::custom(format!(
                "`{t}` is not a size: write e.g. \"64KiB\", \"1MiB\" or a number of bytes"
            ))
        }),
    }
}

fn default_backlog() -> u32 {
    DEFAULT_BACKLOG
}
fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_retries() -> u32 {
    DEFAULT_RETRIES
}
fn default_max_failures() -> u32 {
    DEFAULT_MAX_FAILURES
}
fn default_cooldown() -> Duration {
    DEFAULT_COOLDOWN
}
fn default_buffer() -> ByteSize {
    ByteSize::b(DEFAULT_BUFFER)
}
fn default_resume_at() -> f64 {
    DEFAULT_RESUME_AT
}
fn default_notsent_lowat() -> ByteSize {
    ByteSize::b(DEFAULT_NOTSENT_LOWAT)
}
fn default_true() -> bool {
    true
}
fn default_keepalive() -> Duration {
    DEFAULT_KEEPALIVE
}
fn default_idle() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
fn default_half_close() -> Duration {
    DEFAULT_HALF_CLOSE_TIMEOUT
}
fn default_shutdown_grace() -> Duration {
    DEFAULT_SHUTDOWN_GRACE
}
fn default_metrics_address() -> String {
    DEFAULT_METRICS_ADDRESS.to_string()
}
fn default_log_level() -> String {
    "info".to_string()
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            address: String::new(),
            max_connections: None,
            backlog: DEFAULT_BACKLOG,
            max_connections_per_client: 0,
            allow: Vec::new(),
        }
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            address: String::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retries: DEFAULT_RETRIES,
        }
    }
}

impl Default for Buffer {
    fn default() -> Self {
        Buffer {
            client_to_upstream: default_buffer(),
            upstream_to_client: default_buffer(),
            resume_at: DEFAULT_RESUME_AT,
            total: ByteSize::b(0),
        }
    }
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            client_recv_buffer: ByteSize::b(0),
            client_send_buffer: ByteSize::b(0),
            upstream_recv_buffer: ByteSize::b(0),
            upstream_send_buffer: ByteSize::b(0),
            notsent_lowat: default_notsent_lowat(),
            nodelay: true,
            keepalive: DEFAULT_KEEPALIVE,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            idle: DEFAULT_IDLE_TIMEOUT,
            half_close: DEFAULT_HALF_CLOSE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            address: default_metrics_address(),
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

/// A configuration problem, worded for the person who has to fix the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in (or `command line`).
    pub source: String,
    /// The dotted key, e.g. `buffer.resume_at`, when one is to blame.
    pub key: Option<String>,
    /// 1-based line, where the parser gives it.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and parses `path`; call [`Config::validate`] once the command line is applied.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&Config::read(path)?, &path.display().to_string())
    }

    /// The file's text, or an error naming the file.
    pub fn read(path: &Path) -> Result<String, ConfigError> {
        std::fs::read_to_string(path).map_err(|e| ConfigError {
            source: path.display().to_string(),
            key: None,
            line: None,
            message: format!("cannot read the file: {e}"),
        })
    }

    /// Parses TOML text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        let err = |key: Option<String>, line: Option<usize>, message: String| ConfigError {
            source: source.to_string(),
            key,
            line,
            message,
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| err(None, line_of(text, e.span()), one_line(e.message())))?;
        serde_path_to_error::deserialize::<_, Config>(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let key = (path != "." && !path.is_empty()).then_some(path);
            err(key, line_of(text, inner.span()), one_line(inner.message()))
        })
    }

    /// Checks what the types alone cannot: addresses parse, fractions are fractions,
    /// bounds are usable, services are whole and distinct. `source` names the file in
    /// errors; `text` (if any) lets the error point at the line the key is on.
    pub fn validate(&self, source: &str, text: Option<&str>) -> Result<(), ConfigError> {
        self.resolve(source, text).map(|_| ())
    }

    /// The services this configuration describes, with their effective settings: the
    /// `[listen]` + `[upstream]` one (named `default`) first, if the file has it, then
    /// each `[[service]]` in file order.
    pub fn services(&self) -> Result<Vec<Service>, ConfigError> {
        self.resolve("configuration", None)
    }

    fn resolve(&self, source: &str, text: Option<&str>) -> Result<Vec<Service>, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            source: source.to_string(),
            key: Some(key.to_string()),
            line: text.and_then(|t| line_of_key(t, key)),
            message,
        };
        let plain = |(key, message): Bad| err(&key, message);
        if self.listen.backlog == 0 || self.listen.backlog > i32::MAX as u32 {
            return Err(err("listen.backlog", "must be at least 1".into()));
        }
        if self.listen.max_connections == Some(0) {
            return Err(err("listen.max_connections", "must be at least 1".into()));
        }
        let allow = allow_list(&self.listen.allow).map_err(|bad| {
            err(
                "listen.allow",
                format!("`{bad}` is not a network (e.g. 10.0.0.0/8)"),
            )
        })?;
        check_sections(&self.buffer, &self.socket, &self.upstream, &self.health).map_err(plain)?;
        self.check_process_wide().map_err(plain)?;

        let mut services = Vec::with_capacity(self.services.len() + 1);
        let has_default = !self.listen.address.is_empty()
            || !self.upstream.address.is_empty()
            || self.services.is_empty();
        if has_default {
            services.push(self.default_service(allow.clone()).map_err(plain)?);
        }
        for (i, spec) in self.services.iter().enumerate() {
            let service = self
                .resolve_service(spec, &allow)
                .map_err(|(key, message)| {
                    let prefix = if valid_name(&spec.name) {
                        format!("service.{}", spec.name)
                    } else {
                        "service".to_string()
                    };
                    ConfigError {
                        source: source.to_string(),
                        key: Some(if key.is_empty() {
                            prefix
                        } else {
                            format!("{prefix}.{key}")
                        }),
                        line: text.and_then(|t| line_of_service(t, i)),
                        message,
                    }
                })?;
            services.push(service);
        }
        check_distinct(&services).map_err(plain)?;

        let total = self.buffer.total.as_u64();
        let largest = services.iter().flat_map(Service::bounds).max().unwrap_or(0) as u64;
        if total > 0 && total < 2 * largest {
            return Err(err(
                "buffer.total",
                format!(
                    "{} is less than twice the larger per-direction bound ({}): set it higher, or 0 for no total",
                    self.buffer.total,
                    ByteSize::b(largest)
                ),
            ));
        }
        Ok(services)
    }

    /// Keys that hold for the whole process.
    fn check_process_wide(&self) -> Result<(), Bad> {
        let bad = |key: &str, message: &str| Err((key.to_string(), message.to_string()));
        if self.buffer.total.as_u64() > usize::MAX as u64 >> 4 {
            return bad("buffer.total", "is larger than this machine can address");
        }
        if self.timeouts.shutdown_grace > Duration::from_secs(24 * 3600) {
            return bad("timeouts.shutdown_grace", "must be at most 24h");
        }
        if self.metrics.address.parse::<SocketAddr>().is_err() {
            return Err((
                "metrics.address".into(),
                format!("`{}` is not an ip:port address", self.metrics.address),
            ));
        }
        if self.runtime.workers > MAX_WORKERS {
            return Err((
                "runtime.workers".into(),
                format!("must be at most {MAX_WORKERS} (0 = one per core)"),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err((
                "log.level".into(),
                format!(
                    "`{}` is not a level (error, warn, info, debug, trace)",
                    self.log.level
                ),
            ));
        }
        Ok(())
    }

    /// The service made of `[listen]` and `[upstream]`.
    fn default_service(&self, allow: Vec<IpNet>) -> Result<Service, Bad> {
        if self.listen.address.is_empty() {
            return Err((
                "listen.address".into(),
                "missing: the address to accept clients on".into(),
            ));
        }
        let listen = self.listen.address.parse::<SocketAddr>().map_err(|_| {
            (
                "listen.address".to_string(),
                format!("`{}` is not an ip:port address", self.listen.address),
            )
        })?;
        if self.upstream.address.is_empty() {
            return Err((
                "upstream.address".into(),
                "missing: the host:port to relay to".into(),
            ));
        }
        if split_host_port(&self.upstream.address).is_none() {
            return Err((
                "upstream.address".into(),
                format!("`{}` is not a host:port address", self.upstream.address),
            ));
        }
        Ok(Service {
            name: DEFAULT_SERVICE.to_string(),
            listen,
            servers: vec![self.upstream.address.clone()],
            balance: Balance::default(),
            send_proxy: None,
            accept_proxy: false,
            allow,
            max_connections_per_client: self.listen.max_connections_per_client,
            backlog: self.listen.backlog,
            buffer: self.buffer.clone(),
            socket: self.socket.clone(),
            timeouts: self.timeouts.clone(),
            upstream: Upstream {
                address: String::new(),
                ..self.upstream.clone()
            },
            health: self.health.clone(),
            relay: self.relay.clone(),
        })
    }

    /// One `[[service]]` with its overlays applied; errors carry keys relative to the
    /// service (`listen`, `buffer.resume_at`).
    fn resolve_service(&self, spec: &ServiceSpec, top_allow: &[IpNet]) -> Result<Service, Bad> {
        if !valid_name(&spec.name) {
            return Err((
                "name".into(),
                format!(
                    "`{}` is not a service name: use lower-case letters, digits, _ and -",
                    spec.name
                ),
            ));
        }
        if spec.listen.is_empty() {
            return Err((
                "listen".into(),
                "missing: the address to accept clients on".into(),
            ));
        }
        let listen = spec.listen.parse::<SocketAddr>().map_err(|_| {
            (
                "listen".to_string(),
                format!("`{}` is not an ip:port address", spec.listen),
            )
        })?;
        if spec.servers.is_empty() {
            return Err((
                "servers".into(),
                "missing: at least one host:port to relay to".into(),
            ));
        }
        if let Some(bad) = spec.servers.iter().find(|s| split_host_port(s).is_none()) {
            return Err((
                "servers".into(),
                format!("`{bad}` is not a host:port address"),
            ));
        }
        if let Some(twice) = spec
            .servers
            .iter()
            .enumerate()
            .find_map(|(i, s)| spec.servers[..i].contains(s).then_some(s))
        {
            return Err(("servers".into(), format!("`{twice}` is listed twice")));
        }
        let allow = match &spec.allow {
            Some(list) => allow_list(list).map_err(|bad| {
                (
                    "allow".to_string(),
                    format!("`{bad}` is not a network (e.g. 10.0.0.0/8)"),
                )
            })?,
            None => top_allow.to_vec(),
        };
        let buffer = overlay(&self.buffer, &spec.buffer, "buffer")?;
        let socket = overlay(&self.socket, &spec.socket, "socket")?;
        let timeouts = overlay(&self.timeouts, &spec.timeouts, "timeouts")?;
        let upstream = overlay(&self.upstream, &spec.upstream, "upstream")?;
        let health = overlay(&self.health, &spec.health, "health")?;
        check_sections(&buffer, &socket, &upstream, &health)?;
        Ok(Service {
            name: spec.name.clone(),
            listen,
            servers: spec.servers.clone(),
            balance: spec.balance,
            send_proxy: spec.send_proxy,
            accept_proxy: spec.accept_proxy,
            allow,
            max_connections_per_client: spec
                .max_connections_per_client
                .unwrap_or(self.listen.max_connections_per_client),
            backlog: self.listen.backlog,
            buffer,
            socket,
            timeouts,
            upstream: Upstream {
                address: String::new(),
                ..upstream
            },
            health,
            relay: self.relay.clone(),
        })
    }

    /// The effective configuration as TOML, for `--check-config`: every service spelled
    /// out as a `[[service]]` with all of its sections, the `[listen]` + `[upstream]`
    /// one included (named `default`). Parsing it again gives the same services.
    pub fn to_effective_toml(&self) -> Result<String, ConfigError> {
        let services = self.services()?;
        let mut flat = self.clone();
        flat.listen.address.clear();
        flat.upstream.address.clear();
        flat.services = services.iter().map(ServiceSpec::spelled_out).collect();
        Ok(flat.to_toml())
    }

    /// The per-direction bounds in bytes, client→upstream first.
    pub fn bounds(&self) -> [usize; 2] {
        [
            self.buffer.client_to_upstream.as_u64() as usize,
            self.buffer.upstream_to_client.as_u64() as usize,
        ]
    }

    /// The effective configuration as TOML, for `--check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

/// A check's complaint: the key (relative to where it was checked) and what is wrong.
type Bad = (String, String);

/// Checks the sections a service may override, as in force for one service or as
/// written at the top level.
fn check_sections(
    buffer: &Buffer,
    socket: &SocketOptions,
    upstream: &Upstream,
    health: &Health,
) -> Result<(), Bad> {
    let bad = |key: &str, message: String| Err((key.to_string(), message));
    if upstream.connect_timeout.is_zero() {
        return bad("upstream.connect_timeout", "must be more than 0s".into());
    }
    if upstream.retries > MAX_RETRIES {
        return bad("upstream.retries", format!("must be at most {MAX_RETRIES}"));
    }
    if health.max_failures == 0 {
        return bad("health.max_failures", "must be at least 1".into());
    }
    for (key, size) in [
        ("buffer.client_to_upstream", buffer.client_to_upstream),
        ("buffer.upstream_to_client", buffer.upstream_to_client),
    ] {
        if size.as_u64() == 0 {
            return bad(key, "must be at least 1 byte".into());
        }
        if size.as_u64() > MAX_BUFFER {
            return bad(key, format!("must be at most {}", ByteSize::b(MAX_BUFFER)));
        }
    }
    let r = buffer.resume_at;
    if !(r > 0.0 && r < 1.0) {
        return bad("buffer.resume_at", format!("{r} is outside (0, 1)"));
    }
    for (key, size) in [
        ("socket.client_recv_buffer", socket.client_recv_buffer),
        ("socket.client_send_buffer", socket.client_send_buffer),
        ("socket.upstream_recv_buffer", socket.upstream_recv_buffer),
        ("socket.upstream_send_buffer", socket.upstream_send_buffer),
    ] {
        if size.as_u64() > i32::MAX as u64 / 2 {
            return bad(key, "is larger than the kernel accepts".into());
        }
    }
    if socket.notsent_lowat.as_u64() > i32::MAX as u64 {
        return bad(
            "socket.notsent_lowat",
            "is larger than the kernel accepts".into(),
        );
    }
    Ok(())
}

/// Two services may not share a name or a listen address (port 0 aside: each bind
/// gets a port of its own).
fn check_distinct(services: &[Service]) -> Result<(), Bad> {
    for (i, s) in services.iter().enumerate() {
        for earlier in &services[..i] {
            if earlier.name == s.name {
                let why = if s.name == DEFAULT_SERVICE {
                    "`default` is the name of the [listen] + [upstream] service; pick another"
                        .to_string()
                } else {
                    format!("`{}` names two services", s.name)
                };
                return Err((format!("service.{}.name", s.name), why));
            }
            if earlier.listen == s.listen && s.listen.port() != 0 {
                return Err((
                    format!("service.{}.listen", s.name),
                    format!("{} is service `{}`'s address too", s.listen, earlier.name),
                ));
            }
        }
    }
    Ok(())
}

/// `[a-z0-9_-]+`: safe as a label value and in a file name.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A section's value with a service's overlay applied key by key.
fn overlay<T>(base: &T, over: &Option<toml::Table>, section: &str) -> Result<T, Bad>
where
    T: Serialize + serde::de::DeserializeOwned + Clone,
{
    let Some(over) = over else {
        return Ok(base.clone());
    };
    if let Some((key, why)) = not_per_service(section).find(|(key, _)| over.contains_key(*key)) {
        return Err((format!("{section}.{key}"), why.to_string()));
    }
    let mut table = as_table(base);
    table.extend(over.clone());
    serde_path_to_error::deserialize::<_, T>(table).map_err(|e| {
        let path = e.path().to_string();
        let message = one_line(&e.into_inner().to_string());
        let key = if path == "." || path.is_empty() {
            section.to_string()
        } else {
            format!("{section}.{path}")
        };
        (key, message)
    })
}

/// Keys of the sections a service may override that no service may set: they hold
/// for the whole process (or, `upstream.address`, name the `default` service's server).
/// An overlay that sets one is an error; a spelled-out service leaves them out.
const NOT_PER_SERVICE: [(&str, &str, &str); 3] = [
    ("buffer", "total", "is process-wide: set it in [buffer]"),
    (
        "timeouts",
        "shutdown_grace",
        "is process-wide: set it in [timeouts]",
    ),
    (
        "upstream",
        "address",
        "a service lists its servers in `servers`",
    ),
];

/// The keys of `section` no service may set, with why.
fn not_per_service(section: &str) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
    NOT_PER_SERVICE
        .iter()
        .filter(move |(s, _, _)| *s == section)
        .map(|(_, key, why)| (*key, *why))
}

/// A section as a TOML table.
fn as_table<T: Serialize>(section: &T) -> toml::Table {
    toml::Table::try_from(section).expect("a section serializes to a table")
}

/// A service's section written out in full, without the keys no service may set.
fn section_in_full<T: Serialize>(value: &T, section: &str) -> Option<toml::Table> {
    let mut table = as_table(value);
    for (key, _) in not_per_service(section) {
        table.remove(key);
    }
    Some(table)
}

/// An `allow` list parsed; a bare address is a one-address network. Errs with the first
/// entry that is neither.
pub fn allow_list(list: &[String]) -> Result<Vec<IpNet>, String> {
    list.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| s.clone())
        })
        .collect()
}

impl ServiceSpec {
    /// This service as a `[[service]]` table with every section written out.
    fn spelled_out(s: &Service) -> ServiceSpec {
        ServiceSpec {
            name: s.name.clone(),
            listen: s.listen.to_string(),
            servers: s.servers.clone(),
            balance: s.balance,
            send_proxy: s.send_proxy,
            accept_proxy: s.accept_proxy,
            allow: Some(s.allow.iter().map(IpNet::to_string).collect()),
            max_connections_per_client: Some(s.max_connections_per_client),
            buffer: section_in_full(&s.buffer, "buffer"),
            socket: section_in_full(&s.socket, "socket"),
            timeouts: section_in_full(&s.timeouts, "timeouts"),
            upstream: section_in_full(&s.upstream, "upstream"),
            health: section_in_full(&s.health, "health"),
        }
    }
}

/// The 1-based line of the `n`th (0-based) `[[service]]` header.
fn line_of_service(text: &str, n: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim().replace(' ', "") == "[[service]]")
        .nth(n)
        .map(|(i, _)| i + 1)
}

/// Most connect retries: each waits up to `connect_timeout`.
pub const MAX_RETRIES: u32 = 16;

/// Most worker threads: past the number of cores, more only adds switching.
pub const MAX_WORKERS: usize = 1024;

/// Largest accepted per-direction bound: beyond this a "bounded" buffer stops meaning much.
pub const MAX_BUFFER: u64 = 1 << 30;

/// Splits `host:port` (with `[v6]:port`), without resolving the host.
pub fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host, port))
}

/// The 1-based line of byte offset `span.start` in `text`.
fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> Option<usize> {
    let start = span?.start.min(text.len());
    Some(text[..start].matches('\n').count() + 1)
}

/// The line where `section.key = ...` is written, found by a plain scan of the text.
fn line_of_key(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = dotted.split_once('.')?;
    let mut current = "";
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = name.trim();
        } else if current == section
            && line.split('=').next().map(str::trim) == Some(key)
            && line.contains('=')
        {
            return Some(i + 1);
        }
    }
    None
}

/// Parser messages can span lines; errors here are one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "[listen]\naddress = \"127.0.0.1:1\"\n[upstream]\naddress = \"localhost:2\"\n";

    #[test]
    fn minimal_file_gets_defaults() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        c.validate("t.toml", Some(MINIMAL)).unwrap();
        assert_eq!(c.bounds(), [65536, 65536]);
        assert_eq!(c.buffer.resume_at, 0.5);
        assert!(c.socket.nodelay);
        assert_eq!(c.metrics.address, "127.0.0.1:9090");
    }

    #[test]
    fn sizes_accept_units_and_plain_numbers() {
        let text = format!(
            "{MINIMAL}[buffer]\nclient_to_upstream = \"16KiB\"\nupstream_to_client = 1000\n"
        );
        let c = Config::parse(&text, "t.toml").unwrap();
        assert_eq!(c.bounds(), [16384, 1000]);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = format!("{MINIMAL}[buffer]\nclient_to_upstreem = \"16KiB\"\n");
        let e = Config::parse(&text, "t.toml").unwrap_err();
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.to_string().contains("client_to_upstreem"), "{e}");
    }

    #[test]
    fn resume_at_out_of_range_points_at_its_line() {
        let text = format!("{MINIMAL}[buffer]\nresume_at = 1.5\n");
        let c = Config::parse(&text, "t.toml").unwrap();
        let e = c.validate("t.toml", Some(&text)).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("buffer.resume_at"));
        assert_eq!(e.line, Some(6));
    }

    #[test]
    fn relay_mode_defaults_to_copy_and_parses_splice() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.relay.mode, RelayMode::Copy);
        let text = format!("{MINIMAL}[relay]\nmode = \"splice\"\n");
        let c = Config::parse(&text, "t.toml").unwrap();
        assert_eq!(c.relay.mode, RelayMode::Splice);
        assert!(c.to_toml().contains("mode = \"splice\""), "{}", c.to_toml());
    }

    #[test]
    fn bad_relay_mode_names_the_key() {
        let text = format!("{MINIMAL}[relay]\nmode = \"zerocopy\"\n");
        let e = Config::parse(&text, "t.toml").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("relay.mode"), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.to_string().contains("splice"), "{e}");
    }

    #[test]
    fn notsent_lowat_has_a_default_and_takes_sizes() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.socket.notsent_lowat.as_u64(), DEFAULT_NOTSENT_LOWAT);
        for (value, bytes) in [("\"16KiB\"", 16384), ("0", 0)] {
            let text = format!("{MINIMAL}[socket]\nnotsent_lowat = {value}\n");
            let c = Config::parse(&text, "t.toml").unwrap();
            c.validate("t.toml", Some(&text)).unwrap();
            assert_eq!(c.socket.notsent_lowat.as_u64(), bytes, "{value}");
        }
    }

    #[test]
    fn bad_notsent_lowat_names_the_key_and_line() {
        let text = format!("{MINIMAL}[socket]\nnotsent_lowat = \"plenty\"\n");
        let e = Config::parse(&text, "t.toml").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("socket.notsent_lowat"), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.to_string().contains("is not a size"), "{e}");

        let text = format!("{MINIMAL}[socket]\nnotsent_lowat = \"4GiB\"\n");
        let c = Config::parse(&text, "t.toml").unwrap();
        let e = c.validate("t.toml", Some(&text)).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("socket.notsent_lowat"), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
    }

    #[test]
    fn the_listen_upstream_form_is_one_service_named_default() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        let services = c.services().unwrap();
        assert_eq!(services.len(), 1);
        let s = &services[0];
        assert_eq!(s.name, DEFAULT_SERVICE);
        assert_eq!(s.listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(s.servers, ["localhost:2"]);
        assert_eq!(s.balance, Balance::RoundRobin);
        assert_eq!(s.upstream.retries, DEFAULT_RETRIES);
        assert_eq!(s.health, Health::default());
    }

    #[test]
    fn a_service_takes_the_top_level_values_it_does_not_override() {
        let text = r#"
[listen]
allow = ["10.0.0.0/8"]
max_connections_per_client = 5
[upstream]
retries = 1
[health]
cooldown = "30s"
[timeouts]
idle = "1m"
[[service]]
name = "a"
listen = "127.0.0.1:4001"
servers = ["127.0.0.1:5000"]
[[service]]
name = "b"
listen = "127.0.0.1:4002"
servers = ["127.0.0.1:5001", "127.0.0.1:5002"]
allow = []
max_connections_per_client = 0
accept_proxy = true
[service.upstream]
retries = 0
[service.health]
max_failures = 1
[service.timeouts]
idle = "5s"
"#;
        let c = Config::parse(text, "t.toml").unwrap();
        c.validate("t.toml", Some(text)).unwrap();
        let [a, b] = &c.services().unwrap()[..] else {
            panic!("two services, no default")
        };
        assert_eq!(a.allow, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert_eq!(a.max_connections_per_client, 5);
        assert_eq!(a.upstream.retries, 1);
        assert_eq!(a.health.cooldown, Duration::from_secs(30));
        assert_eq!(a.timeouts.idle, Duration::from_secs(60));
        assert!(!a.accept_proxy);
        assert!(b.allow.is_empty());
        assert_eq!(b.max_connections_per_client, 0);
        assert_eq!(b.upstream.retries, 0);
        assert_eq!(b.upstream.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(b.health.max_failures, 1);
        assert_eq!(b.health.cooldown, Duration::from_secs(30));
        assert_eq!(b.timeouts.idle, Duration::from_secs(5));
        assert!(b.accept_proxy);
    }

    /// A size that is no whole number of KiB keeps its exact value through an overlay
    /// (which writes the top-level section out and reads it back) and through
    /// `--check-config`'s output: `ByteSize`'s own form would round 100000 to "97.7 KiB".
    #[test]
    fn sizes_survive_overlays_and_the_effective_config_exactly() {
        let text = "[buffer]\nclient_to_upstream = 100000\nupstream_to_client = \"96KiB\"\n[socket]\nclient_recv_buffer = \"3MiB\"\n[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:4001\"\nservers = [\"h:1\"]\n[service.buffer]\nresume_at = 0.25\n";
        let c = Config::parse(text, "t.toml").unwrap();
        c.validate("t.toml", Some(text)).unwrap();
        let [a] = &c.services().unwrap()[..] else {
            panic!("one service")
        };
        assert_eq!(a.buffer.client_to_upstream.as_u64(), 100_000);
        assert_eq!(a.buffer.upstream_to_client.as_u64(), 96 * 1024);
        assert_eq!(a.socket.client_recv_buffer.as_u64(), 3 << 20);
        let effective = c.to_effective_toml().unwrap();
        assert!(
            effective.contains("client_to_upstream = 100000"),
            "{effective}"
        );
        assert!(
            effective.contains("upstream_to_client = \"96KiB\""),
            "{effective}"
        );
        let again = Config::parse(&effective, "effective").unwrap();
        assert_eq!(again.services().unwrap(), c.services().unwrap());
    }

    #[test]
    fn a_service_error_points_at_its_table() {
        let text = "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nservers = [\"h:1\"]\n\n[[service]]\nname = \"b\"\nlisten = \"nowhere\"\nservers = [\"h:2\"]\n";
        let c = Config::parse(text, "t.toml").unwrap();
        let e = c.validate("t.toml", Some(text)).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("service.b.listen"), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
    }

    #[test]
    fn services_on_port_0_may_share_the_address() {
        let text = "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nservers = [\"h:1\"]\n[[service]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\nservers = [\"h:2\"]\n";
        Config::parse(text, "t.toml")
            .unwrap()
            .validate("t.toml", Some(text))
            .unwrap();
    }

    #[test]
    fn host_port_splitting() {
        assert_eq!(
            split_host_port("db.internal:5432"),
            Some(("db.internal", 5432))
        );
        assert_eq!(split_host_port("[::1]:80"), Some(("::1", 80)));
        assert_eq!(split_host_port("nohost"), None);
        assert_eq!(split_host_port("h:0"), None);
    }
}
