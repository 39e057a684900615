//! sluice configurations built as [`sluice::Config`] values (so a test or the stress tool
//! sets fields, not TOML text) and the TOML file the daemon reads, written from them.

use std::net::SocketAddr;

use sluice::Config;
use sluice::config::{
    Buffer, Health, Listen, Log, Metrics, Relay, Runtime, ServiceSpec, SocketOptions, Timeouts,
    Upstream,
};
use toml::Value;

/// Every listener and the admin endpoint of a test configuration: a free loopback port,
/// learnt from the daemon's readiness message (or the in-process server) afterwards.
pub const ANY_PORT: &str = "127.0.0.1:0";

/// A configuration with only the admin endpoint on [`ANY_PORT`] and every other key at
/// its default: no default service, so add `[[service]]`s (see [`service`]).
pub fn without_services() -> Config {
    Config {
        listen: Listen::default(),
        upstream: Upstream::default(),
        buffer: Buffer::default(),
        relay: Relay::default(),
        socket: SocketOptions::default(),
        timeouts: Timeouts::default(),
        metrics: Metrics {
            address: ANY_PORT.into(),
        },
        log: Log::default(),
        runtime: Runtime::default(),
        health: Health::default(),
        services: Vec::new(),
    }
}

/// A configuration of `services` alone (no default service), the admin endpoint on
/// [`ANY_PORT`].
pub fn with_services(services: Vec<ServiceSpec>) -> Config {
    Config {
        services,
        ..without_services()
    }
}

/// The default service listening on [`ANY_PORT`] and relaying to `upstream`, the admin
/// endpoint on [`ANY_PORT`], every other key at its default.
pub fn relay_to(upstream: impl ToString) -> Config {
    let mut config = without_services();
    config.listen.address = ANY_PORT.into();
    config.upstream.address = upstream.to_string();
    config
}

/// A `[[service]]` named `name` listening on [`ANY_PORT`] in front of `servers`, with the
/// default balance and no overlays.
pub fn service(name: &str, servers: &[SocketAddr]) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        listen: ANY_PORT.into(),
        servers: servers.iter().map(SocketAddr::to_string).collect(),
        balance: Default::default(),
        send_proxy: None,
        accept_proxy: false,
        allow: None,
        max_connections_per_client: None,
        buffer: None,
        socket: None,
        timeouts: None,
        upstream: None,
        health: None,
    }
}

/// An overlay table (`[service.upstream]` and the like) from `key = value` pairs.
pub fn table<const N: usize>(pairs: [(&str, Value); N]) -> toml::Table {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// `config` as the TOML file sluice reads (sizes exactly, as `Config::to_toml` writes them).
pub fn to_toml(config: &Config) -> String {
    config.to_toml()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytesize::ByteSize;
    use std::time::Duration;

    #[test]
    fn a_written_config_reads_back_the_same() {
        let mut c = relay_to("127.0.0.1:5000");
        c.buffer.client_to_upstream = ByteSize::b(100_000);
        c.buffer.total = ByteSize::mib(3);
        c.socket.client_recv_buffer = ByteSize::b(4095);
        c.timeouts.idle = Duration::from_millis(1500);
        let mut s = service("db", &["127.0.0.1:6000".parse().unwrap()]);
        s.upstream = Some(table([("retries", 1.into())]));
        c.services.push(s);
        let text = to_toml(&c);
        let back = Config::parse(&text, "written").unwrap();
        assert_eq!(back, c, "{text}");
        back.validate("written", Some(&text)).unwrap();
    }
}
