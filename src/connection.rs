//! One client: connect to the upstream, run the relay, record why it ended.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::budget::Budget;
use crate::config::{self, split_host_port};
use crate::metrics::{CloseReason, ConnectErrorKind, Metrics, ServerMetrics, ServiceMetrics};
use crate::pool::Attached;
use crate::proxy_protocol;
use crate::registry::Registered;
use crate::relay::{Ending, Relay, RelayConfig, Side};
use crate::service::{ClientSlot, Service};
use crate::socket::{Tuning, effective_buffers, reset_on_close};

/// Keeps `sluice_connections_active` true however the connection's task ends.
pub struct ActiveGuard<'a>(&'a ServiceMetrics);

impl<'a> ActiveGuard<'a> {
    pub fn new(metrics: &'a ServiceMetrics) -> ActiveGuard<'a> {
        metrics.active.increment(1.0);
        ActiveGuard(metrics)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.decrement(1.0);
    }
}

/// How long a client of an `accept_proxy` service has to send its PROXY header: a load
/// balancer sends it with its first segment, so only a client that is not one waits;
/// the specification asks a receiver for "at least 3 seconds to cover a TCP
/// retransmit".
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one accepted client of `service` until it is done. `slot` is the client's
/// admission (its per-client slot), or `None` for an `accept_proxy` service, whose
/// clients are admitted here once their header says who they are. The service's
/// `force_close` cuts the connection short at the shutdown deadline. Returns why it
/// closed (already counted), or `None` for a client refused before being served.
pub async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    service: Arc<Service>,
    metrics: Arc<Metrics>,
    budget: Arc<Budget>,
    slot: Option<ClientSlot>,
) -> Option<CloseReason> {
    let started = Instant::now();
    let (addresses, _slot) = match slot {
        Some(slot) => (Addresses::of(peer), slot),
        None => admit_by_header(&mut client, peer, &service).await?,
    };
    let sm = &service.metrics;
    let _active = ActiveGuard::new(sm);
    // Dropped before `client` closes (locals drop before parameters), as it must be.
    let entry = metrics
        .connections
        .register(sm.name.clone(), addresses.client, client.as_raw_fd());
    let reason = serve_inner(&mut client, &entry, &service, &addresses, &budget, started).await;
    sm.closed(reason).increment(1);
    sm.connection_duration
        .record(started.elapsed().as_secs_f64());
    Some(reason)
}

/// Who the client is and what it connected to, as a PROXY header said; without one,
/// the socket's peer, and its local address (asked only if `send_proxy` needs it).
struct Addresses {
    client: SocketAddr,
    destination: Option<SocketAddr>,
}

impl Addresses {
    fn of(peer: SocketAddr) -> Addresses {
        Addresses {
            client: peer,
            destination: None,
        }
    }
}

/// Reads an `accept_proxy` client's header and applies the service's access rules to
/// the address it gives. A missing, malformed or late header resets the client and is
/// counted (`reason="proxy_protocol"`); a client the rules refuse is reset and counted
/// as they count it (`not_allowed`, `max_per_client`).
async fn admit_by_header(
    client: &mut TcpStream,
    peer: SocketAddr,
    service: &Service,
) -> Option<(Addresses, ClientSlot)> {
    let read = tokio::select! {
        r = proxy_protocol::read_header(client, PROXY_HEADER_TIMEOUT) => r,
        _ = service.force_close.cancelled() => {
            reset_on_close(SockRef::from(&*client));
            return None;
        }
    };
    let addresses = match read {
        Ok(Some(header)) => Addresses {
            client: header.source,
            destination: Some(header.destination),
        },
        // LOCAL or UNKNOWN: the sender speaks for itself (a health check).
        Ok(None) => Addresses::of(peer),
        Err(e) => {
            service.metrics.rejected_proxy_protocol.increment(1);
            tracing::debug!(client = %peer, kind = e.as_label(), error = %e, "bad or missing PROXY header; rejected");
            reset_on_close(SockRef::from(&*client));
            return None;
        }
    };
    let slot = service.admit(client, addresses.client)?;
    service.metrics.accepted.increment(1);
    Some((addresses, slot))
}

async fn serve_inner(
    client: &mut TcpStream,
    entry: &Registered<'_>,
    service: &Service,
    addresses: &Addresses,
    budget: &Arc<Budget>,
    started: Instant,
) -> CloseReason {
    // The client's socket options were inherited from the listener (see listener::bind_service).
    if tracing::enabled!(tracing::Level::DEBUG) {
        let (rcv, snd) = effective_buffers(SockRef::from(&*client));
        tracing::debug!(recv_buffer = rcv, send_buffer = snd, "client socket");
    }
    let config = &service.config;

    let _client_guard = ResetOnPanic::new(client);
    // Boxed: the connect's state (resolver, timeout, handshake: 456 bytes) is needed only
    // until the upstream answers; inline, it would size every connection's task for its
    // whole life.
    let upstream = tokio::select! {
        r = Box::pin(connect_to_pool(service)) => r,
        _ = service.force_close.cancelled() => {
            // Cut off before any reply: a reset, not an empty stream that looks complete.
            reset_on_close(SockRef::from(&*client));
            return CloseReason::Shutdown;
        }
    };
    let (mut upstream, upstream_addr, attached) = match upstream {
        Ok(u) => u,
        Err(error) => {
            tracing::debug!(error = %error, "no server answered; closing client");
            // A clean FIN would look like an empty reply; a reset says the proxy failed.
            reset_on_close(SockRef::from(&*client));
            return CloseReason::UpstreamConnectFailed;
        }
    };
    if let Some(version) = config.send_proxy {
        let destination = addresses
            .destination
            .or_else(|| client.local_addr().ok())
            .unwrap_or(addresses.client);
        let sent =
            proxy_protocol::write_header(&mut upstream, version, addresses.client, destination);
        if let Err(e) = sent.await {
            tracing::debug!(error = %e, "cannot send the PROXY header; closing client");
            reset_on_close(SockRef::from(&*client));
            reset_on_close(SockRef::from(&upstream));
            return CloseReason::Error;
        }
    }

    let _upstream_guard = ResetOnPanic::new(&upstream);
    // Off the registry's entry before the socket closes (declared after it).
    let _listed = entry.connected(upstream_addr, upstream.as_raw_fd());
    // In a block, so the settings are not kept in the task across the await: the relay
    // has copied what it needs.
    let mut relay = {
        let relay_config = RelayConfig {
            bounds: config.bounds(),
            resume_at: config.buffer.resume_at,
            idle: config.timeouts.idle,
            half_close: config.timeouts.half_close,
            mode: config.relay.mode,
        };
        Relay::new(
            client,
            &mut upstream,
            &relay_config,
            &service.metrics,
            entry,
            &attached,
            budget,
        )
    };
    let ending = relay.run(&service.force_close).await;
    let totals = relay.totals();
    drop(relay);
    // What the kernel still held when the relay ended, for the close log line.
    let kernel = tracing::enabled!(tracing::Level::DEBUG).then(|| entry.kernel_bytes());

    let reason = match &ending {
        Ending::Complete => CloseReason::Complete,
        Ending::Failed {
            side: Side::Client,
            reset: true,
            ..
        } => CloseReason::ClientReset,
        Ending::Failed {
            side: Side::Upstream,
            reset: true,
            ..
        } => CloseReason::UpstreamReset,
        Ending::Failed { .. } => CloseReason::Error,
        Ending::IdleTimeout => CloseReason::IdleTimeout,
        Ending::HalfCloseTimeout => CloseReason::HalfCloseTimeout,
        Ending::Shutdown => CloseReason::Shutdown,
    };
    // Whoever did not get a clean end of its stream is told with a reset, so a cut
    // stream never looks complete: after a failure on the other side; after a shutdown
    // or half-close timeout, the side whose incoming stream had not finished; after an
    // idle timeout (a conventional close), only if queued bytes are thrown away.
    let [to_upstream_cut, to_client_cut] = totals.finished.map(|f| !f);
    let (reset_client, reset_upstream) = match &ending {
        Ending::Complete => (false, false),
        Ending::Failed {
            side: Side::Client, ..
        } => (false, true),
        Ending::Failed {
            side: Side::Upstream,
            ..
        } => (true, false),
        Ending::Shutdown | Ending::HalfCloseTimeout => (to_client_cut, to_upstream_cut),
        Ending::IdleTimeout => (totals.queued[1] > 0, totals.queued[0] > 0),
    };
    if reset_client {
        reset_on_close(SockRef::from(&*client));
    }
    if reset_upstream {
        reset_on_close(SockRef::from(&upstream));
    }
    let error = match &ending {
        Ending::Failed { error, .. } => Some(error.to_string()),
        _ => None,
    };
    tracing::debug!(
        reason = reason.as_label(),
        bytes_client_to_upstream = totals.bytes[0],
        bytes_upstream_to_client = totals.bytes[1],
        pauses_client_to_upstream = totals.pauses[0],
        pauses_upstream_to_client = totals.pauses[1],
        kernel_client_to_upstream = kernel.map(|k| k[0].total()),
        kernel_upstream_to_client = kernel.map(|k| k[1].total()),
        duration_ms = started.elapsed().as_millis() as u64,
        error,
        "connection closed"
    );
    reason
}

/// Resets its socket if the task panics, so a peer mid-stream sees a failure rather than
/// a clean end when the stream is dropped during unwinding.
///
/// Holds the raw descriptor, not a borrow, so the relay can borrow the stream mutably;
/// it must be declared after the stream it guards, so it is dropped first.
struct ResetOnPanic(RawFd);

impl ResetOnPanic {
    fn new(stream: &TcpStream) -> ResetOnPanic {
        ResetOnPanic(stream.as_raw_fd())
    }
}

impl Drop for ResetOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: the guarded stream is declared before this guard in the same scope
            // and so is still open while the guard drops.
            let fd = unsafe { BorrowedFd::borrow_raw(self.0) };
            reset_on_close(SockRef::from(&fd));
        }
    }
}

/// Why no server took the client.
#[derive(Debug, thiserror::Error)]
#[error("{tried} server(s) tried; the last, {server}, failed: {error}")]
struct NoServer {
    tried: usize,
    server: String,
    error: io::Error,
}

/// Connects to a server of the service's pool as its `balance` picks them, trying
/// another (untried) one after a failure up to `upstream.retries` times. Each failure
/// counts against the server's health; nothing has been written to a server whose
/// connect failed, so a retry never sends a byte twice.
async fn connect_to_pool(service: &Service) -> Result<(TcpStream, SocketAddr, Attached), NoServer> {
    let config = &service.config;
    let rules = service.health_rules();
    let mut tried: Vec<usize> = Vec::new();
    let mut last = None;
    while tried.len() <= config.upstream.retries as usize {
        let Some(i) = service
            .pool
            .pick(&tried, std::time::Instant::now(), crate::metrics::now())
        else {
            break;
        };
        if !tried.is_empty() {
            service.metrics.retries.increment(1);
        }
        tried.push(i);
        let backend = &service.pool.backends()[i];
        // Attached before the connect, so clients picked meanwhile see it counted.
        let attached = backend.attach();
        match connect_upstream(&backend.address, config, &service.servers[i]).await {
            Ok((stream, addr)) => {
                if backend.connect_succeeded() {
                    tracing::info!(service = %config.name, server = %backend.address, "server back in rotation");
                }
                return Ok((stream, addr, attached));
            }
            Err((kind, error)) => {
                service.servers[i].connect_error(kind).increment(1);
                tracing::debug!(server = %backend.address, kind = kind.as_label(), error = %error, "connect failed");
                if backend.connect_failed(&rules, std::time::Instant::now()) {
                    tracing::warn!(
                        service = %config.name,
                        server = %backend.address,
                        failures = rules.max_failures,
                        cooldown = %humantime::format_duration(rules.cooldown),
                        "server taken out of rotation after failed connects in a row"
                    );
                }
                last = Some((backend.address.clone(), error));
            }
        }
    }
    let (server, error) = last.unwrap_or_else(|| {
        let e = io::Error::new(io::ErrorKind::NotFound, "the service has no server");
        (String::new(), e)
    });
    Err(NoServer {
        tried: tried.len(),
        server,
        error,
    })
}

/// Resolves `address` now (so DNS changes are followed) and connects to the first of
/// its addresses that answers, all within `connect_timeout`.
async fn connect_upstream(
    address: &str,
    config: &config::Service,
    metrics: &ServerMetrics,
) -> Result<(TcpStream, SocketAddr), (ConnectErrorKind, io::Error)> {
    let started = Instant::now();
    let timeout = config.upstream.connect_timeout;
    let result = tokio::time::timeout(timeout, async {
        let addrs = resolve(address).await?;
        let tuning = Tuning::upstream(&config.socket);
        let mut last = None;
        for addr in addrs {
            match connect_one(addr, &tuning).await {
                Ok(s) => return Ok((s, addr)),
                Err(e) => last = Some((classify(&e), e)),
            }
        }
        Err(last.unwrap_or_else(|| {
            let e = io::Error::new(io::ErrorKind::NotFound, "name resolved to no address");
            (ConnectErrorKind::Resolve, e)
        }))
    })
    .await;
    let result = result.unwrap_or_else(|_| {
        let e = io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {}", humantime::format_duration(timeout)),
        );
        Err((ConnectErrorKind::Timeout, e))
    });
    if result.is_ok() {
        metrics
            .connect_duration
            .record(started.elapsed().as_secs_f64());
    }
    result
}

async fn resolve(address: &str) -> Result<Vec<SocketAddr>, (ConnectErrorKind, io::Error)> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let (host, port) = split_host_port(address).ok_or_else(|| {
        let e = io::Error::new(io::ErrorKind::InvalidInput, "not a host:port address");
        (ConnectErrorKind::Resolve, e)
    })?;
    match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => Ok(addrs.collect()),
        Err(e) => Err((ConnectErrorKind::Resolve, e)),
    }
}

/// Connects to one address with the upstream options set before connect(), as
/// SO_RCVBUF must be to take effect on the window.
async fn connect_one(addr: SocketAddr, tuning: &Tuning) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    tuning.apply(&SockRef::from(&socket))?;
    let stream = socket.connect(addr).await?;
    if tracing::enabled!(tracing::Level::DEBUG) {
        let (rcv, snd) = effective_buffers(SockRef::from(&stream));
        tracing::debug!(upstream = %addr, recv_buffer = rcv, send_buffer = snd, "upstream connected");
    }
    Ok(stream)
}

/// The `kind` label for a failed connect.
fn classify(e: &io::Error) -> ConnectErrorKind {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ConnectErrorKind::Refused,
        io::ErrorKind::TimedOut => ConnectErrorKind::Timeout,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            ConnectErrorKind::Unreachable
        }
        _ => match e.raw_os_error() {
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EADDRNOTAVAIL) => {
                ConnectErrorKind::Unreachable
            }
            _ => ConnectErrorKind::Other,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A stream dropped while its task unwinds resets the peer instead of ending cleanly.
    #[tokio::test]
    async fn a_panic_resets_the_guarded_stream() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        let task = tokio::spawn(async move {
            let stream = ours;
            let _guard = ResetOnPanic::new(&stream);
            if stream.peer_addr().is_ok() {
                panic!("injected");
            }
        });
        assert!(task.await.is_err(), "the task panicked");
        let mut rest = Vec::new();
        let r = peer.read_to_end(&mut rest).await.map_err(|e| e.kind());
        assert_eq!(r, Err(io::ErrorKind::ConnectionReset));
    }
}
