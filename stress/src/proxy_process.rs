//! A proxy under test as a child process: the test kit's `ChildProcess` (spawn, ready by
//! `NOTIFY_SOCKET`, RSS, /metrics, SIGTERM) and the config the stress tool generates for
//! sluice, built as a `sluice::Config`.
//!
//! Used for the real `sluice` binary and for the unbounded baseline relay, so both are
//! measured the same way: a separate process whose memory is nobody else's.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use bytesize::ByteSize;
use serde::de::DeserializeOwned;
use sluice::Config;
use sluice_testkit::config;

pub use sluice_testkit::child::{ChildProcess as ProxyProcess, signal};
pub use sluice_testkit::procfs::{own_rss, rss_of};
pub use sluice_testkit::scrape::Scrape as Metrics;

/// Timeout for one metrics scrape; loopback answers in microseconds, a stuck proxy must not stall a sampler.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The two directions, as they appear in the `direction` label of sluice's metrics.
pub const DIRECTIONS: [&str; 2] = ["client_to_upstream", "upstream_to_client"];

/// The settings of a generated sluice config. Listen and metrics addresses are always
/// `127.0.0.1:0`; the real ports come from sluice's readiness message.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where sluice connects for every accepted client.
    pub upstream: SocketAddr,
    /// Per-connection bound, client → upstream direction, in bytes.
    pub client_to_upstream: u64,
    /// Per-connection bound, upstream → client direction, in bytes.
    pub upstream_to_client: u64,
    /// Fraction of the bound at which a paused direction reads again.
    pub resume_at: f64,
    /// `[buffer] total`, the buffer memory all connections share; `None` leaves it at the
    /// daemon's default (no such limit).
    pub total: Option<u64>,
    /// SO_RCVBUF/SO_SNDBUF on both sides of sluice. Small kernel buffers make backpressure
    /// reach sluice's own buffers quickly instead of hiding megabytes in the kernel. `None`
    /// leaves them at sluice's shipped default (what a user gets).
    pub socket_buffer: Option<u64>,
    /// `[listen] max_connections`; high enough for any scenario.
    pub max_connections: u64,
    /// `[log] level`.
    pub log_level: String,
    /// `[relay] mode`: `copy` (the default) or `splice`.
    pub relay_mode: &'static str,
    /// `[runtime] scheduler`: `stealing` (the default) or `pinned`.
    pub scheduler: &'static str,
    /// `[[service]]` sections. With any, the config has no `[listen]` / `[upstream]`
    /// address (so no `default` service, and `upstream` is not used), and clients connect
    /// to the first service.
    pub services: Vec<ServiceConfig>,
}

/// One `[[service]]` of a generated config: a listener on `127.0.0.1:0` in front of a pool.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The service's name, its metrics' `service` label.
    pub name: String,
    /// Its servers, in the order `round_robin` takes them.
    pub servers: Vec<SocketAddr>,
    /// `balance`: `round_robin`, `least_connections` or `least_queued`.
    pub balance: &'static str,
}

impl ProxyConfig {
    /// 64 KiB bounds (the shipped default) and 16 KiB kernel buffers on every socket.
    pub fn new(upstream: SocketAddr) -> Self {
        ProxyConfig {
            upstream,
            client_to_upstream: 64 * 1024,
            upstream_to_client: 64 * 1024,
            resume_at: 0.5,
            total: None,
            socket_buffer: Some(16 * 1024),
            max_connections: 100_000,
            log_level: "info".to_string(),
            relay_mode: "copy",
            scheduler: "stealing",
            services: Vec::new(),
        }
    }

    /// The configuration sluice runs with.
    pub fn to_config(&self) -> Config {
        let mut c = if self.services.is_empty() {
            config::relay_to(self.upstream)
        } else {
            config::without_services()
        };
        c.listen.max_connections = Some(self.max_connections as usize);
        c.upstream.connect_timeout = Duration::from_secs(5);
        c.buffer.client_to_upstream = ByteSize::b(self.client_to_upstream);
        c.buffer.upstream_to_client = ByteSize::b(self.upstream_to_client);
        c.buffer.resume_at = self.resume_at;
        if let Some(total) = self.total {
            c.buffer.total = ByteSize::b(total);
        }
        c.relay.mode = label(self.relay_mode);
        c.runtime.scheduler = label(self.scheduler);
        if let Some(sb) = self.socket_buffer.map(ByteSize::b) {
            c.socket.client_recv_buffer = sb;
            c.socket.client_send_buffer = sb;
            c.socket.upstream_recv_buffer = sb;
            c.socket.upstream_send_buffer = sb;
        }
        c.socket.nodelay = true;
        c.socket.keepalive = Duration::from_secs(60);
        c.timeouts.idle = Duration::from_secs(600);
        c.timeouts.half_close = Duration::from_secs(60);
        c.timeouts.shutdown_grace = Duration::from_secs(2);
        c.log.level = self.log_level.clone();
        c.services = self
            .services
            .iter()
            .map(|s| {
                let mut spec = config::service(&s.name, &s.servers);
                spec.balance = label(s.balance);
                spec
            })
            .collect();
        c
    }
}

impl From<&ProxyConfig> for Config {
    fn from(p: &ProxyConfig) -> Config {
        p.to_config()
    }
}

/// A setting's value as the config file writes it (`"splice"`, `"least_queued"`), read
/// into its type; the stress tool only names values sluice has.
fn label<T: DeserializeOwned>(name: &str) -> T {
    T::deserialize(toml::Value::String(name.into()))
        .unwrap_or_else(|e| panic!("`{name}` is not a value sluice knows: {e}"))
}

/// `GET path` from `addr`, which must answer 200: the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    sluice_testkit::http::get_ok(addr, path, SCRAPE_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_config_is_valid_and_says_what_was_asked() {
        let mut p = ProxyConfig::new("127.0.0.1:5000".parse().unwrap());
        p.total = Some(1_000_001);
        p.relay_mode = "splice";
        p.scheduler = "pinned";
        let text = sluice_testkit::config::to_toml(&p.to_config());
        let c = Config::parse(&text, "generated").unwrap();
        c.validate("generated", Some(&text)).unwrap();
        assert_eq!(c.buffer.total.as_u64(), 1_000_001);
        assert_eq!(c.socket.upstream_send_buffer.as_u64(), 16 * 1024);
        assert_eq!(c.relay.mode, sluice::config::RelayMode::Splice);
        p.services = vec![ServiceConfig {
            name: "pool".into(),
            servers: vec!["127.0.0.1:5001".parse().unwrap()],
            balance: "least_queued",
        }];
        let c = p.to_config();
        assert!(c.listen.address.is_empty());
        assert_eq!(c.services[0].balance, sluice::pool::Balance::LeastQueued);
        c.validate("generated", None).unwrap();
    }
}
