//! `sluice-stress scenario NAME ...`: the command line, and each scenario's defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::proxy_process::ProxyConfig;
use crate::units::{KIB, Rate, parse_duration, parse_rate, parse_size};

/// The built-in workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioName {
    /// A fast source upstream; clients read at 16 KiB/s each with a 4 KiB SO_RCVBUF.
    SlowReaders,
    /// Clients write as fast as they can; the upstream sink reads 64 KiB/s per connection.
    SlowUpstream,
    /// An echo upstream; a third of the clients write fast but read at 16 KiB/s (both
    /// directions fill), a third trickle at 16 KiB/s, a third stream at 1 MiB/s.
    Mixed,
    /// Load: every connection echoes for the whole run (try --conns 8000); 3/4 at 2 KiB/s,
    /// 1/4 fill both bounds. Reports sluice's RSS against conns × both bounds.
    ManyConns,
    /// Soak: --conns slots churn echo connections of 256 KiB for --duration (try 2m); RSS
    /// after the first quarter (warm-up) must not grow.
    Soak,
    /// buffer.total (--total, default 64MiB) shared by --conns (default 8000) slow readers
    /// at 4 KiB/s of a fast source: RSS against the budget, used ≤ limit at every sample, a
    /// new client's ping-pong latency loaded vs unloaded, /metrics latency (default 30s).
    Budget,
    /// One service, three servers: two fast sinks and one reading 64 KiB/s per connection;
    /// --conns clients (default 300) arrive over --duration (default 20s), each uploads
    /// --upload and waits for the server to close. Run once per --policy: each server's
    /// share of new connections and the clients' completion times.
    Balance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Baseline {
    /// A relay that reads everything into an unbounded queue (no backpressure).
    Unbounded,
}

/// `sluice-stress scenario NAME ...`
#[derive(Debug, Clone, Args)]
pub struct ScenarioArgs {
    /// Which built-in workload to run.
    #[arg(value_enum)]
    pub name: ScenarioName,
    /// Concurrent client connections [default: 200; budget: 8000; balance: 300].
    #[arg(long)]
    pub conns: Option<usize>,
    /// How long the clients run [default: 10s; budget: 30s; balance: 20s].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Directory for report.json and report.svg (created if missing).
    #[arg(long, default_value = "target/stress-report")]
    pub out: PathBuf,
    /// Run the same workload a second time through a relay without backpressure.
    #[arg(long, value_enum)]
    pub baseline: Option<Baseline>,
    /// Memory cap of the baseline relay (it exits when its RSS or queue reaches it).
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    pub baseline_cap: u64,
    /// sluice's per-connection bound for each direction.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub bound: u64,
    /// SO_RCVBUF/SO_SNDBUF on all of sluice's sockets (small, so backpressure reaches sluice
    /// quickly instead of being absorbed by the kernel) [default: 16KiB; budget: sluice's
    /// own default].
    #[arg(long, value_parser = parse_size)]
    pub socket_buffer: Option<u64>,
    /// sluice's buffer.total, the buffer memory all connections share [default: none;
    /// budget: 64MiB].
    #[arg(long, value_parser = parse_size)]
    pub total: Option<u64>,
    /// balance: the bytes each client uploads before it half-closes.
    #[arg(long, default_value = "512KiB", value_parser = parse_size)]
    pub upload: u64,
    /// balance: each client's upload pace (e.g. 128KiB/s) [default: as fast as it can].
    #[arg(long, value_parser = parse_rate)]
    pub upload_rate: Option<Rate>,
    /// balance: the seed of the clients' arrival times (the same for every policy).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// balance: a policy to run (repeat for more) [default: round_robin and least_queued].
    #[arg(long, value_enum)]
    pub policy: Vec<Policy>,
}

impl ScenarioName {
    /// The name as typed on the command line (`slow-readers`).
    pub fn slug(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

impl ScenarioArgs {
    /// --conns, or the scenario's default.
    pub fn conns(&self) -> usize {
        self.conns.unwrap_or(match self.name {
            ScenarioName::Budget => 8000,
            ScenarioName::Balance => 300,
            _ => 200,
        })
    }

    /// --duration, or the scenario's default.
    pub fn duration(&self) -> Duration {
        self.duration.unwrap_or(match self.name {
            ScenarioName::Budget => Duration::from_secs(30),
            ScenarioName::Balance => Duration::from_secs(20),
            _ => Duration::from_secs(10),
        })
    }

    /// --socket-buffer, or the scenario's default (`None`: sluice's own).
    pub fn socket_buffer(&self) -> Option<u64> {
        match (self.socket_buffer, self.name) {
            (Some(n), _) => Some(n),
            (None, ScenarioName::Budget) => None,
            (None, _) => Some(16 * KIB),
        }
    }

    /// --total, or the scenario's default (`None`: no total).
    pub fn total(&self) -> Option<u64> {
        match (self.total, self.name) {
            (Some(n), _) => Some(n),
            (None, ScenarioName::Budget) => Some(64 * 1024 * KIB),
            (None, _) => None,
        }
    }

    /// sluice's config for this run; its upstream is the rig's (see [`crate::rig::Proxy::Sluice`]).
    pub fn proxy_config(&self) -> ProxyConfig {
        let mut config = ProxyConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        config.client_to_upstream = self.bound;
        config.upstream_to_client = self.bound;
        config.socket_buffer = self.socket_buffer();
        config.total = self.total();
        config
    }
}

/// A `balance` policy of a `[[service]]`, named as in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    #[value(name = "round_robin")]
    RoundRobin,
    #[value(name = "least_connections")]
    LeastConnections,
    #[value(name = "least_queued")]
    LeastQueued,
}

impl Policy {
    /// The config file's value.
    pub fn as_config(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::LeastConnections => "least_connections",
            Policy::LeastQueued => "least_queued",
        }
    }
}
