//! A service at run time: its effective settings, its servers, its series, and the
//! access rules every client of it passes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::metrics::{Metrics, ServerMetrics, ServiceMetrics};
use crate::pool::{HealthRules, Pool};
use crate::socket::reset_on_close;

/// What a service's accept loops and connections run with. A reload that changes the
/// service puts a new one in force for new clients; live ones keep theirs.
pub struct Service {
    pub config: config::Service,
    /// The servers and their load; a reload's new pool keeps the servers it shares
    /// with this one.
    pub pool: Arc<Pool>,
    /// Each server's series, in the pool's order.
    pub servers: Vec<Arc<ServerMetrics>>,
    pub metrics: Arc<ServiceMetrics>,
    /// Live connections per client address, shared across reloads of the service.
    pub per_client: Arc<PerClient>,
    /// Cuts the service's live connections short: at the end of the shutdown grace, or
    /// of the grace a removed service's connections get.
    pub force_close: CancellationToken,
}

impl Service {
    /// The service `config` describes; `previous` is the one it replaces on a reload.
    pub fn new(
        config: config::Service,
        metrics: &Metrics,
        previous: Option<&Service>,
        force_close: CancellationToken,
    ) -> Service {
        let bounds = config.bounds();
        let pool = Arc::new(Pool::new(
            &config.servers,
            config.balance,
            bounds[0],
            previous.map(|p| &*p.pool),
        ));
        let service_metrics = metrics.service(&config.name, bounds);
        let servers = service_metrics.servers(metrics, &pool);
        Service {
            pool,
            servers,
            metrics: service_metrics,
            per_client: previous.map_or_else(Arc::default, |p| p.per_client.clone()),
            force_close,
            config,
        }
    }

    /// The passive health rules.
    pub fn health_rules(&self) -> HealthRules {
        HealthRules {
            max_failures: self.config.health.max_failures,
            cooldown: self.config.health.cooldown,
        }
    }

    /// Applies `allow` and `max_connections_per_client` to a client whose address is
    /// `client`. A refused client is reset at once and counted; an admitted one gets a
    /// slot it holds until it closes.
    pub fn admit(&self, stream: &TcpStream, client: SocketAddr) -> Option<ClientSlot> {
        let ip = canonical(client.ip());
        let allow = &self.config.allow;
        if !allow.is_empty() && !allow.iter().any(|net| net.contains(&ip)) {
            self.metrics.rejected_not_allowed.increment(1);
            tracing::debug!(%client, "client not in allow; rejected");
            reset_on_close(SockRef::from(stream));
            return None;
        }
        let slot = self
            .per_client
            .take(ip, self.config.max_connections_per_client);
        if slot.is_none() {
            self.metrics.rejected_per_client.increment(1);
            tracing::debug!(%client, "max_connections_per_client reached; rejected");
            reset_on_close(SockRef::from(stream));
        }
        slot
    }
}

/// An IPv4 client on a dual-stack socket arrives as `::ffff:a.b.c.d`; rules are written
/// for `a.b.c.d`.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Live connections per source address, for `max_connections_per_client`.
#[derive(Default)]
pub struct PerClient {
    live: Mutex<HashMap<IpAddr, usize>>,
}

/// A client's place in [`PerClient`]; given back on drop.
pub struct ClientSlot {
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

#[cfg(test)]
mod tests {
    use super::*;

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
