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

/// Default per-connection bound for each direction.
pub const DEFAULT_BUFFER: u64 = 64 * 1024;
/// Default fraction of the bound at which a paused direction reads again.
pub const DEFAULT_RESUME_AT: f64 = 0.5;
/// Default cap on concurrent client connections.
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
    /// kernel backlog, so the limit costs nothing and loses nobody.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
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
    /// A handshake that takes longer than this fails the client at once.
    #[serde(with = "humantime_serde", default = "default_connect_timeout")]
    pub connect_timeout: Duration,
}

/// The per-connection bounds that make the backpressure.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Buffer {
    /// Most bytes held for one connection on their way from the client to the upstream.
    #[serde(default = "default_buffer", deserialize_with = "size")]
    pub client_to_upstream: ByteSize,
    /// Most bytes held for one connection on their way from the upstream to the client.
    #[serde(default = "default_buffer", deserialize_with = "size")]
    pub upstream_to_client: ByteSize,
    /// A paused direction reads again once its queue has fallen to this fraction of the
    /// bound: the hysteresis keeps a slow reader from costing a wake-up per segment.
    #[serde(default = "default_resume_at")]
    pub resume_at: f64,
    /// Most buffer memory all connections together may hold (see `budget.rs`); 0 means
    /// no such limit, only the per-connection bounds.
    #[serde(default, deserialize_with = "size")]
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
    #[serde(default, deserialize_with = "size")]
    pub client_recv_buffer: ByteSize,
    /// SO_SNDBUF on client sockets; 0 keeps the kernel's autotuning.
    #[serde(default, deserialize_with = "size")]
    pub client_send_buffer: ByteSize,
    /// SO_RCVBUF on upstream sockets; 0 keeps the kernel's autotuning.
    #[serde(default, deserialize_with = "size")]
    pub upstream_recv_buffer: ByteSize,
    /// SO_SNDBUF on upstream sockets; 0 keeps the kernel's autotuning.
    #[serde(default, deserialize_with = "size")]
    pub upstream_send_buffer: ByteSize,
    /// TCP_NOTSENT_LOWAT on both sockets: a socket takes more bytes from sluice only
    /// while fewer than this are waiting unsent in its kernel send queue, so that queue
    /// stays small even where autotuning grew the send buffer to megabytes. 0 leaves the
    /// system default (`net.ipv4.tcp_notsent_lowat`, unlimited unless changed).
    #[serde(default = "default_notsent_lowat", deserialize_with = "size")]
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

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_backlog() -> u32 {
    DEFAULT_BACKLOG
}
fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
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
            max_connections: DEFAULT_MAX_CONNECTIONS,
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
    /// bounds are usable. `source` names the file in errors; `text` (if any) lets the
    /// error point at the line the key is on.
    pub fn validate(&self, source: &str, text: Option<&str>) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            source: source.to_string(),
            key: Some(key.to_string()),
            line: text.and_then(|t| line_of_key(t, key)),
            message,
        };
        if self.listen.address.is_empty() {
            return Err(err(
                "listen.address",
                "missing: the address to accept clients on".into(),
            ));
        }
        if self.listen.address.parse::<SocketAddr>().is_err() {
            return Err(err(
                "listen.address",
                format!("`{}` is not an ip:port address", self.listen.address),
            ));
        }
        if self.listen.backlog == 0 || self.listen.backlog > i32::MAX as u32 {
            return Err(err("listen.backlog", "must be at least 1".into()));
        }
        if self.listen.max_connections == 0 {
            return Err(err("listen.max_connections", "must be at least 1".into()));
        }
        if let Err(bad) = self.allow_list() {
            return Err(err(
                "listen.allow",
                format!("`{bad}` is not a network (e.g. 10.0.0.0/8)"),
            ));
        }
        if self.upstream.address.is_empty() {
            return Err(err(
                "upstream.address",
                "missing: the host:port to relay to".into(),
            ));
        }
        if split_host_port(&self.upstream.address).is_none() {
            return Err(err(
                "upstream.address",
                format!("`{}` is not a host:port address", self.upstream.address),
            ));
        }
        if self.upstream.connect_timeout.is_zero() {
            return Err(err(
                "upstream.connect_timeout",
                "must be more than 0s".into(),
            ));
        }
        for (key, size) in [
            ("buffer.client_to_upstream", self.buffer.client_to_upstream),
            ("buffer.upstream_to_client", self.buffer.upstream_to_client),
        ] {
            if size.as_u64() == 0 {
                return Err(err(key, "must be at least 1 byte".into()));
            }
            if size.as_u64() > MAX_BUFFER {
                return Err(err(
                    key,
                    format!("must be at most {}", ByteSize::b(MAX_BUFFER)),
                ));
            }
        }
        let total = self.buffer.total.as_u64();
        let largest = self.bounds().into_iter().max().unwrap_or(0) as u64;
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
        if total > usize::MAX as u64 >> 4 {
            return Err(err(
                "buffer.total",
                "is larger than this machine can address".into(),
            ));
        }
        let r = self.buffer.resume_at;
        if !(r > 0.0 && r < 1.0) {
            return Err(err("buffer.resume_at", format!("{r} is outside (0, 1)")));
        }
        for (key, size) in [
            ("socket.client_recv_buffer", self.socket.client_recv_buffer),
            ("socket.client_send_buffer", self.socket.client_send_buffer),
            (
                "socket.upstream_recv_buffer",
                self.socket.upstream_recv_buffer,
            ),
            (
                "socket.upstream_send_buffer",
                self.socket.upstream_send_buffer,
            ),
        ] {
            if size.as_u64() > i32::MAX as u64 / 2 {
                return Err(err(key, "is larger than the kernel accepts".into()));
            }
        }
        if self.socket.notsent_lowat.as_u64() > i32::MAX as u64 {
            return Err(err(
                "socket.notsent_lowat",
                "is larger than the kernel accepts".into(),
            ));
        }
        if self.timeouts.shutdown_grace > Duration::from_secs(24 * 3600) {
            return Err(err("timeouts.shutdown_grace", "must be at most 24h".into()));
        }
        if self.metrics.address.parse::<SocketAddr>().is_err() {
            return Err(err(
                "metrics.address",
                format!("`{}` is not an ip:port address", self.metrics.address),
            ));
        }
        if self.runtime.workers > MAX_WORKERS {
            return Err(err(
                "runtime.workers",
                format!("must be at most {MAX_WORKERS} (0 = one per core)"),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(err(
                "log.level",
                format!(
                    "`{}` is not a level (error, warn, info, debug, trace)",
                    self.log.level
                ),
            ));
        }
        Ok(())
    }

    /// `listen.allow` parsed; a bare address is a one-address network. Errs with the
    /// first entry that is neither.
    pub fn allow_list(&self) -> Result<Vec<IpNet>, String> {
        self.listen
            .allow
            .iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| s.clone())
            })
            .collect()
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
