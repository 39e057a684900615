//! One client: connect to the upstream, run the relay, record why it ended.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::budget::Budget;
use crate::config::{Config, split_host_port};
use crate::metrics::{CloseReason, ConnectErrorKind, Metrics};
use crate::registry::Registered;
use crate::relay::{Ending, Relay, RelayConfig, Side};
use crate::socket::{Tuning, effective_buffers, reset_on_close};

/// Keeps `sluice_connections_active` true however the connection's task ends.
pub struct ActiveGuard<'a>(&'a Metrics);

impl<'a> ActiveGuard<'a> {
    pub fn new(metrics: &'a Metrics) -> ActiveGuard<'a> {
        metrics.active.increment(1.0);
        ActiveGuard(metrics)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.decrement(1.0);
    }
}

/// Serves one accepted client until it is done; `force_close` cuts it short at the
/// shutdown deadline. Returns why it closed (already counted).
pub async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    budget: Arc<Budget>,
    force_close: CancellationToken,
) -> CloseReason {
    let started = Instant::now();
    let _active = ActiveGuard::new(&metrics);
    // Dropped before `client` closes (locals drop before parameters), as it must be.
    let entry = metrics.connections.register(peer, client.as_raw_fd());
    let reason = serve_inner(
        &mut client,
        &entry,
        &config,
        &metrics,
        &budget,
        &force_close,
        started,
    )
    .await;
    metrics.closed(reason).increment(1);
    metrics
        .connection_duration
        .record(started.elapsed().as_secs_f64());
    reason
}

async fn serve_inner(
    client: &mut TcpStream,
    entry: &Registered<'_>,
    config: &Config,
    metrics: &Metrics,
    budget: &Arc<Budget>,
    force_close: &CancellationToken,
    started: Instant,
) -> CloseReason {
    // The client's socket options were inherited from the listener (see listener::bind).
    if tracing::enabled!(tracing::Level::DEBUG) {
        let (rcv, snd) = effective_buffers(SockRef::from(&*client));
        tracing::debug!(recv_buffer = rcv, send_buffer = snd, "client socket");
    }

    let _client_guard = ResetOnPanic::new(client);
    // Boxed: the connect's state (resolver, timeout, handshake: 456 bytes) is needed only
    // until the upstream answers; inline, it would size every connection's task for its
    // whole life.
    let upstream = tokio::select! {
        r = Box::pin(connect_upstream(config, metrics)) => r,
        _ = force_close.cancelled() => {
            // Cut off before any reply: a reset, not an empty stream that looks complete.
            reset_on_close(SockRef::from(&*client));
            return CloseReason::Shutdown;
        }
    };
    let (mut upstream, upstream_addr) = match upstream {
        Ok(u) => u,
        Err((kind, error)) => {
            metrics.connect_error(kind).increment(1);
            tracing::debug!(kind = kind.as_label(), error = %error, "upstream connect failed; closing client");
            // A clean FIN would look like an empty reply; a reset says the proxy failed.
            reset_on_close(SockRef::from(&*client));
            return CloseReason::UpstreamConnectFailed;
        }
    };

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
        Relay::new(client, &mut upstream, &relay_config, metrics, entry, budget)
    };
    let ending = relay.run(force_close).await;
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

/// Resolves the upstream name now (so DNS changes are followed) and connects to the
/// first address that answers, all within `connect_timeout`.
async fn connect_upstream(
    config: &Config,
    metrics: &Metrics,
) -> Result<(TcpStream, SocketAddr), (ConnectErrorKind, io::Error)> {
    let started = Instant::now();
    let timeout = config.upstream.connect_timeout;
    let result = tokio::time::timeout(timeout, async {
        let addrs = resolve(&config.upstream.address).await?;
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
