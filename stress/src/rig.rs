//! The run rig: the one sequence demo, the scenarios and soak share, as named steps. [`Rig::start`] starts a workload's upstream, the proxy in front of it, and a sampler watching the proxy; [`Rig::run_clients`] runs the clients against the proxy with a progress line until they finish, the deadline passes or the proxy exits; [`Rig::stop`] stops everything in reverse and hands back what was seen.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Result, anyhow};

use crate::clients::{self, ClientRun, ClientSpec, Connections, LiveStats, RunningClients};
use crate::progress::{self, Watch, Watched};
use crate::proxy_process::{Metrics, ProxyConfig, ProxyProcess};
use crate::proxy_sampler::{KernelMemory, ProxySampler, Sample};
use crate::units::format_bytes;
use crate::upstream::{LocalUpstream, UpstreamMode, UpstreamSpec, UpstreamStats};

/// How long sluice may take to exit after SIGTERM (its generated shutdown_grace is 2 s).
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// The upstream and clients of a run, and a line that says what they do.
pub struct Workload {
    pub description: String,
    pub upstream: UpstreamSpec,
    pub clients: Vec<ClientSpec>,
}

/// An upstream in `mode` at full speed, with the kernel's socket buffers.
pub fn upstream_spec(mode: UpstreamMode) -> UpstreamSpec {
    UpstreamSpec {
        mode,
        rate: None,
        bytes: None,
        rcvbuf: None,
        sndbuf: None,
    }
}

/// Which proxy a run drives.
pub enum Proxy {
    /// sluice with a config generated from these settings; its upstream is the rig's first.
    Sluice(ProxyConfig),
    /// sluice with this config file, its listen, upstream and metrics addresses overridden
    /// with the rig's upstream and free loopback ports.
    SluiceFile(PathBuf),
    /// The relay without backpressure (`unbounded-relay`), which exits when its memory
    /// reaches `cap` bytes.
    Unbounded { cap: u64 },
}

/// What the rig does when the proxy exits while the clients run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyExit {
    /// Tell the clients to stop; the run ends as usual (the baseline at its cap).
    StopsTheClients,
    /// End the run with an error that quotes the proxy's log: "sluice exited during
    /// `during`".
    Fails { during: &'static str },
}

/// A running upstream, proxy and sampler.
pub struct Rig {
    /// "sluice" or "unbounded".
    name: &'static str,
    /// sluice's per-connection bounds (client → upstream, upstream → client), when the rig
    /// generated its config.
    bounds: Option<(u64, u64)>,
    upstreams: Vec<LocalUpstream>,
    proxy: ProxyProcess,
    sampler: ProxySampler,
}

/// What a stopped rig saw.
pub struct Stopped {
    /// "sluice" or "unbounded".
    pub name: &'static str,
    pub bounds: Option<(u64, u64)>,
    pub samples: Vec<Sample>,
    /// Scrapes and kernel readings that failed.
    pub sample_errors: usize,
    /// Each upstream's address and its counters.
    pub upstreams: Vec<(SocketAddr, Arc<UpstreamStats>)>,
    /// The proxy's /metrics once sampling had stopped (`None` without an endpoint, or gone).
    pub metrics: Option<Metrics>,
    pub exit: ExitStatus,
}

impl Rig {
    /// Steps 1–3: an upstream as `upstream` says, `proxy` in front of it, a sampler on the
    /// proxy. Call from the main thread (see proxy_process: the proxy dies with its
    /// parent thread).
    pub fn start(upstream: &UpstreamSpec, proxy: Proxy, kernel: KernelMemory) -> Result<Rig> {
        let upstream = LocalUpstream::start(Arc::new(upstream.clone()))?;
        Self::in_front_of(vec![upstream], proxy, kernel)
    }

    /// Steps 2–3 in front of upstreams already running (balance's three servers); a
    /// generated config's upstream is the first of them.
    pub fn in_front_of(
        upstreams: Vec<LocalUpstream>,
        proxy: Proxy,
        kernel: KernelMemory,
    ) -> Result<Rig> {
        let upstream = upstreams
            .first()
            .ok_or_else(|| anyhow!("a rig needs an upstream"))?
            .addr;
        let (name, bounds) = (proxy.name(), proxy.bounds());
        let proxy = proxy.spawn(upstream)?;
        let sampler = ProxySampler::start(&proxy, kernel)?;
        Ok(Rig {
            name,
            bounds,
            upstreams,
            proxy,
            sampler,
        })
    }

    /// "sluice" or "unbounded".
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn proxy(&self) -> &ProxyProcess {
        &self.proxy
    }

    pub fn proxy_mut(&mut self) -> &mut ProxyProcess {
        &mut self.proxy
    }

    /// The first upstream (the only one but in balance).
    pub fn upstream(&self) -> &LocalUpstream {
        &self.upstreams[0]
    }

    pub fn upstreams(&self) -> &[LocalUpstream] {
        &self.upstreams
    }

    pub fn sampler(&self) -> &ProxySampler {
        &self.sampler
    }

    /// Steps 4–5: a client per spec against the proxy, with `status` (of the latest sample
    /// and the clients' live counts) as the progress line, until they finish; they are told
    /// to stop at `watch`'s deadline or Ctrl-C, and when the proxy exits as `on_exit` says.
    pub async fn run_clients(
        &mut self,
        specs: Vec<ClientSpec>,
        connections: Connections,
        watch: &Watch,
        on_exit: ProxyExit,
        status: impl Fn(&Sample, &LiveStats) -> String,
    ) -> Result<Watched<ClientRun>> {
        let RunningClients { stop, live, task } =
            clients::start(self.proxy.listen_addr(), specs, connections);
        let (proxy, sampler, name) = (&mut self.proxy, &self.sampler, self.name);
        progress::watch(task, &stop, watch, || {
            if let Some(exit) = proxy.try_exited() {
                match on_exit {
                    ProxyExit::StopsTheClients => stop.cancel(),
                    ProxyExit::Fails { during } => {
                        return Err(anyhow!(
                            "{name} exited during {during} ({exit}); log:\n{}",
                            proxy.log_text()
                        ));
                    }
                }
            }
            Ok(status(&sampler.last(), &live))
        })
        .await
    }

    /// Steps 1–6 for a workload through `proxy` until `duration`, the kernel memory in the
    /// proxy's sockets sampled too; the progress line counts the clients active (or, when
    /// they churn, the connections so far).
    pub async fn run_workload(
        wl: &Workload,
        proxy: Proxy,
        connections: Connections,
        duration: Duration,
    ) -> Result<(Stopped, ClientRun)> {
        let mut rig = Rig::start(&wl.upstream, proxy, KernelMemory::Read)?;
        let name = rig.name();
        let watched = rig
            .run_clients(
                wl.clients.clone(),
                connections,
                &Watch::until(duration),
                ProxyExit::StopsTheClients,
                |last, live| {
                    let (count, what) = match connections {
                        Connections::Once => (&live.active, "clients active"),
                        Connections::Churn => (&live.connected, "connections so far"),
                    };
                    format!(
                        "{name}: RSS {}, queued {}, {} {what}, {} errors",
                        format_bytes(last.rss_bytes),
                        format_bytes(last.queued()),
                        count.load(Ordering::Relaxed),
                        live.errors.load(Ordering::Relaxed),
                    )
                },
            )
            .await?;
        Ok((rig.stop(STOP_GRACE).await?, watched.output))
    }

    /// Step 6: stops the sampler, reads /metrics a last time, stops the upstreams, then
    /// the proxy (SIGTERM, `grace` to exit).
    pub async fn stop(self, grace: Duration) -> Result<Stopped> {
        let (samples, sample_errors) = self.sampler.finish();
        let metrics = self.proxy.scrape().ok();
        let mut upstreams = Vec::with_capacity(self.upstreams.len());
        for upstream in self.upstreams {
            upstreams.push((upstream.addr, upstream.stats.clone()));
            upstream.stop().await;
        }
        let exit = self.proxy.stop(grace)?;
        Ok(Stopped {
            name: self.name,
            bounds: self.bounds,
            samples,
            sample_errors,
            upstreams,
            metrics,
            exit,
        })
    }
}

impl Proxy {
    /// "sluice" or "unbounded".
    fn name(&self) -> &'static str {
        match self {
            Proxy::Sluice(_) | Proxy::SluiceFile(_) => "sluice",
            Proxy::Unbounded { .. } => "unbounded",
        }
    }

    /// sluice's per-connection bounds, when the rig writes its config.
    fn bounds(&self) -> Option<(u64, u64)> {
        match self {
            Proxy::Sluice(config) => Some((config.client_to_upstream, config.upstream_to_client)),
            Proxy::SluiceFile(_) | Proxy::Unbounded { .. } => None,
        }
    }

    /// Starts the proxy in front of `upstream`.
    fn spawn(self, upstream: SocketAddr) -> Result<ProxyProcess> {
        match self {
            Proxy::Sluice(mut config) => {
                config.upstream = upstream;
                ProxyProcess::spawn_sluice(&config)
            }
            Proxy::SluiceFile(file) => {
                let overrides = [
                    "--listen",
                    "127.0.0.1:0",
                    "--upstream",
                    &upstream.to_string(),
                    "--metrics",
                    "127.0.0.1:0",
                ]
                .map(String::from);
                ProxyProcess::spawn_sluice_with_file(&file, &overrides)
            }
            Proxy::Unbounded { cap } => {
                let mut cmd = Command::new(std::env::current_exe()?);
                cmd.arg("unbounded-relay")
                    .arg("--upstream")
                    .arg(upstream.to_string())
                    .arg("--cap")
                    .arg(cap.to_string());
                ProxyProcess::spawn(cmd, "unbounded relay", true, None)
            }
        }
    }
}
