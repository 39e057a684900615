//! A sluice running inside the test's own process on `127.0.0.1:0`: the library's
//! `Server` on listeners bound first, as `main` does, with its metrics registry at hand.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice::{Config, Server};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::scrape::{LIVE_GAUGES, value};
use crate::wait::eventually;

/// A proxy running in this process.
pub struct Proxy {
    /// Its first service's address.
    pub addr: SocketAddr,
    pub server: Arc<Server>,
    /// Cancel to stop it (as SIGTERM would).
    pub stop: CancellationToken,
    pub task: JoinHandle<()>,
}

/// A valid configuration for tests: listen on a free port, relay to `upstream`.
pub fn config(upstream: &str) -> Config {
    let c = crate::config::relay_to(upstream);
    c.validate("test", None).expect("test config is valid");
    c
}

/// After `server` has shut down: its one live connection was closed by the shutdown
/// (counted with reason `shutdown`), and nothing is live any more.
pub fn assert_one_closed_by_shutdown(server: &Server) {
    let m = server.metrics().render();
    assert_eq!(
        value(&m, "sluice_connections_closed_total{reason=\"shutdown\"}"),
        1.0
    );
    assert_eq!(value(&m, "sluice_connections_active"), 0.0);
}

impl Proxy {
    /// Starts a proxy in front of `upstream` with `tweak` applied to the config.
    pub async fn start(upstream: SocketAddr, tweak: impl FnOnce(&mut Config)) -> Proxy {
        let mut c = config(&upstream.to_string());
        tweak(&mut c);
        Proxy::start_config(c).await
    }

    /// Starts a proxy on `c`; `addr` is its first service's address.
    pub async fn start_config(c: Config) -> Proxy {
        c.validate("test", None).expect("test config is valid");
        let listener = sluice::listener::bind(&c).unwrap();
        let addr = listener.addresses()[0].1;
        let server = Arc::new(Server::new(c));
        let stop = CancellationToken::new();
        let task = {
            let (server, stop) = (server.clone(), stop.clone());
            tokio::spawn(async move { server.run(listener, stop).await.unwrap() })
        };
        server.ready().await;
        Proxy {
            addr,
            server,
            stop,
            task,
        }
    }

    /// Its metrics as the endpoint would render them.
    pub fn metrics(&self) -> String {
        self.server.metrics().render()
    }

    /// Serves the proxy's admin endpoint (`/metrics`, `/connections`, `/healthz`,
    /// `/readyz`) on a free loopback port until the proxy stops.
    pub async fn serve_endpoint(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(sluice::admin::serve(
            listener,
            self.server.clone(),
            self.stop.clone(),
        ));
        addr
    }

    /// The address service `name` is bound to now.
    pub fn address(&self, name: &str) -> SocketAddr {
        self.server
            .addresses()
            .into_iter()
            .find_map(|(n, a)| (n == name).then_some(a))
            .unwrap_or_else(|| panic!("no service {name} running"))
    }

    /// The value of one series, e.g. `sluice_bytes_total{direction="client_to_upstream"}`.
    pub fn value(&self, series: &str) -> f64 {
        value(&self.metrics(), series)
    }

    pub fn queued(&self, direction: &str) -> f64 {
        self.value(&format!("sluice_queued_bytes{{direction=\"{direction}\"}}"))
    }

    pub fn closed(&self, reason: &str) -> f64 {
        self.value(&format!(
            "sluice_connections_closed_total{{reason=\"{reason}\"}}"
        ))
    }

    /// Waits until no connection is live and every gauge of live things is back to 0.
    pub async fn settled(&self) {
        eventually("gauges return to zero", Duration::from_secs(10), || {
            let m = self.metrics();
            LIVE_GAUGES.iter().all(|s| value(&m, s) == 0.0)
        })
        .await;
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("proxy stops")
            .unwrap();
    }
}
