//! `upstream --fault F`: an upstream that misbehaves on purpose (resets, closes early, stalls, closes slowly, refuses, blackholes, trickles), so a proxy's answer to each fault can be tested.
//!
//! # What a fault applies to
//!
//! The first `--healthy N` connections the upstream accepts are served normally (by the
//! same code as an upstream without `--fault`); every later one gets the fault. A test
//! opens its healthy connection first, waits until bytes flow, then opens the faulty ones,
//! so it can check that a healthy transfer beside the faults is untouched.
//!
//! Two faults are about the listener, not a connection: `refuse` and `blackhole`. They
//! take effect once `N` connections have been accepted (at once when `N` is 0); the
//! upstream prints `chaos: now refusing` / `chaos: now blackholing` at that moment, and
//! connections accepted before keep being served.
//!
//! # Counting bytes
//!
//! `reset-after=N` and `close-after=N` count the bytes of the mode's main direction:
//! written (`source`), read (`sink`), or echoed back (`echo`). A connection whose stream
//! ends before `N` bytes ends normally, without the fault.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::notify;
use crate::pacing::TokenBucket;
use crate::pattern::Pattern;
use crate::units::{parse_duration, parse_size};
use crate::upstream::{self, IO_CHUNK, UpstreamMode, UpstreamSpec, UpstreamStats};

/// `trickle` without a value: one byte every 10 ms.
const DEFAULT_TRICKLE: Duration = Duration::from_millis(10);
/// How long a connect to our own blackhole listener may take before we take its queue as
/// full: loopback handshakes complete in microseconds.
const FILL_PROBE: Duration = Duration::from_millis(200);
/// Most connections used to fill a blackhole's accept queue (backlog 0 holds one).
const MAX_FILLERS: usize = 64;

/// One fault, as given to `--fault`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// After N bytes of the main direction, close with SO_LINGER 0: the peer gets a RST.
    ResetAfter(u64),
    /// After N bytes of the main direction, send FIN (shutdown write), then read and
    /// discard until the peer's EOF.
    CloseAfter(u64),
    /// Accept, then never read or write; hold the connection until the upstream stops.
    Stall,
    /// Serve normally, but wait this long between the end of the transfer and the FIN.
    SlowClose(Duration),
    /// No listener: connects are refused (the port stays bound, so nobody else takes it).
    Refuse,
    /// A listener with backlog 0 whose accept queue we fill and never accept from:
    /// handshakes never complete. (The backlog is 0 from the start, so `--healthy`
    /// connections arriving in a burst may wait for a SYN retry.)
    Blackhole,
    /// Move the main direction one byte at a time, this long apart.
    Trickle(Duration),
}

impl Fault {
    /// Whether the fault is the listener's (all connects from then on) rather than a
    /// connection's.
    fn is_listener_fault(self) -> bool {
        matches!(self, Fault::Refuse | Fault::Blackhole)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = |d: &Duration| humantime::format_duration(*d).to_string();
        match self {
            Fault::ResetAfter(n) => write!(f, "reset-after={n}"),
            Fault::CloseAfter(n) => write!(f, "close-after={n}"),
            Fault::Stall => f.write_str("stall"),
            Fault::SlowClose(t) => write!(f, "slow-close={}", d(t)),
            Fault::Refuse => f.write_str("refuse"),
            Fault::Blackhole => f.write_str("blackhole"),
            Fault::Trickle(t) => write!(f, "trickle={}", d(t)),
        }
    }
}

/// The forms `--fault` accepts, for error messages and help.
pub const FAULT_FORMS: &str = "reset-after=BYTES, close-after=BYTES, stall, slow-close=DURATION, refuse, blackhole, trickle[=DURATION]";

/// Parses `--fault`: `reset-after=64KiB`, `close-after=1000`, `stall`, `slow-close=2s`,
/// `refuse`, `blackhole`, `trickle` or `trickle=5ms`.
pub fn parse_fault(s: &str) -> Result<Fault, String> {
    let (name, value) = match s.split_once('=') {
        Some((n, v)) => (n.trim(), Some(v.trim())),
        None => (s.trim(), None),
    };
    let need = |what: &str| {
        value
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("fault '{name}' needs a value: {name}={what}"))
    };
    let none = |fault: Fault| match value {
        None => Ok(fault),
        Some(_) => Err(format!("fault '{name}' takes no value")),
    };
    let duration = |v: &str| -> Result<Duration, String> {
        let d = parse_duration(v)?;
        if d.is_zero() {
            return Err(format!(
                "fault '{name}' needs a duration above 0, got '{v}'"
            ));
        }
        Ok(d)
    };
    match name {
        "reset-after" => Ok(Fault::ResetAfter(parse_size(need("BYTES")?)?)),
        "close-after" => Ok(Fault::CloseAfter(parse_size(need("BYTES")?)?)),
        "stall" => none(Fault::Stall),
        "slow-close" => Ok(Fault::SlowClose(duration(need("DURATION")?)?)),
        "refuse" => none(Fault::Refuse),
        "blackhole" => none(Fault::Blackhole),
        "trickle" => match value {
            None => Ok(Fault::Trickle(DEFAULT_TRICKLE)),
            Some(v) => Ok(Fault::Trickle(duration(v)?)),
        },
        _ => Err(format!(
            "unknown fault '{name}'; expected one of {FAULT_FORMS}"
        )),
    }
}

/// What one chaos upstream does.
#[derive(Debug, Clone, Copy)]
pub struct Chaos {
    pub fault: Fault,
    /// Connections served normally before the fault starts.
    pub healthy: u64,
}

/// Counters of the chaos layer, beside the ordinary [`UpstreamStats`].
#[derive(Debug, Default)]
pub struct ChaosStats {
    /// Connections that got the fault.
    pub faulty: AtomicU64,
}

/// Checks combinations a command line cannot: a fault that needs the stream to end
/// needs an end, and `per-connection` has no faulty variant. The error is for the user.
pub fn check(spec: &UpstreamSpec, fault: Fault) -> Result<(), String> {
    if spec.mode == UpstreamMode::PerConnection {
        return Err(
            "--fault needs --mode source, sink or echo (per-connection has no faulty variant)"
                .into(),
        );
    }
    if let Fault::SlowClose(_) = fault
        && spec.mode == UpstreamMode::Source
        && spec.bytes.is_none()
    {
        return Err(
            "--fault slow-close with --mode source needs --bytes (an endless source never closes)"
                .into(),
        );
    }
    Ok(())
}

/// Binds the listener: as the healthy upstream does, except that a blackhole listens
/// with backlog 0 so its accept queue can be filled.
pub fn bind(addr: SocketAddr, spec: &UpstreamSpec, fault: Fault) -> Result<TcpListener> {
    if fault != Fault::Blackhole {
        return upstream::bind(addr, spec);
    }
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    if let Some(n) = spec.rcvbuf {
        sock.set_recv_buffer_size(n as usize)?;
    }
    if let Some(n) = spec.sndbuf {
        sock.set_send_buffer_size(n as usize)?;
    }
    sock.bind(&addr.into())
        .with_context(|| format!("cannot bind the upstream to {addr}"))?;
    sock.listen(0)?;
    sock.set_nonblocking(true)?;
    Ok(TcpListener::from_std(sock.into())?)
}

/// What a listener fault keeps alive so the port stays refusing or blackholed.
enum Held {
    /// Bound, never listening: connects to the port are refused.
    Refusing { _port: Socket },
    /// The listener (never accepted from again) and the connections filling its queue.
    Blackholed {
        _listener: TcpListener,
        _fillers: Vec<TcpStream>,
    },
}

/// Turns the listener faulty: closes it (refuse) or fills its accept queue (blackhole).
async fn turn(listener: TcpListener, fault: Fault) -> Result<Held> {
    let addr = listener.local_addr()?;
    match fault {
        Fault::Refuse => {
            drop(listener);
            // Keep the port: bound but not listening, so connects get a RST (refused).
            let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            sock.set_reuse_address(true)?;
            sock.bind(&addr.into())
                .with_context(|| format!("cannot keep {addr} bound after closing it"))?;
            Ok(Held::Refusing { _port: sock })
        }
        Fault::Blackhole => {
            let target = match addr {
                SocketAddr::V4(a) if a.ip().is_unspecified() => {
                    SocketAddr::from((Ipv4Addr::LOCALHOST, a.port()))
                }
                SocketAddr::V6(a) if a.ip().is_unspecified() => {
                    SocketAddr::from((Ipv6Addr::LOCALHOST, a.port()))
                }
                a => a,
            };
            let mut fillers = Vec::new();
            // Connect to ourselves until a handshake stops completing: the queue is full.
            while fillers.len() < MAX_FILLERS {
                match tokio::time::timeout(FILL_PROBE, TcpStream::connect(target)).await {
                    Ok(Ok(s)) => fillers.push(s),
                    Ok(Err(e)) => return Err(e).context("filling the blackhole's accept queue"),
                    Err(_) => {
                        return Ok(Held::Blackholed {
                            _listener: listener,
                            _fillers: fillers,
                        });
                    }
                }
            }
            anyhow::bail!(
                "could not fill the accept queue of {addr} with {MAX_FILLERS} connections"
            )
        }
        _ => unreachable!("only listener faults turn the listener"),
    }
}

fn now_what(fault: Fault) -> &'static str {
    match fault {
        Fault::Refuse => "refusing",
        _ => "blackholing",
    }
}

/// Accepts and serves connections until `shutdown` fires: the first `healthy` normally,
/// the rest with the fault (or, for listener faults, turns the listener faulty).
pub async fn serve(
    listener: TcpListener,
    spec: Arc<UpstreamSpec>,
    chaos: Chaos,
    stats: Arc<UpstreamStats>,
    chaos_stats: Arc<ChaosStats>,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut accepted = 0u64;
    let held = loop {
        if chaos.fault.is_listener_fault() && accepted >= chaos.healthy {
            let held = turn(listener, chaos.fault).await?;
            let now = now_what(chaos.fault);
            eprintln!("chaos: {accepted} healthy connection(s) accepted; now {now}");
            // Whoever started this upstream may wait for the turn without reading its log.
            notify::status(&format!("chaos: now {now}"));
            break held;
        }
        let Some(stream) = upstream::accept(&listener, &shutdown).await else {
            return Ok(());
        };
        let faulty = accepted >= chaos.healthy;
        accepted += 1;
        if faulty {
            chaos_stats.faulty.fetch_add(1, Ordering::Relaxed);
        }
        let spec = spec.clone();
        let label = format!("upstream {:?} ({})", spec.mode, chaos.fault);
        upstream::spawn_connection(&stats, &shutdown, label, move |stats| async move {
            if faulty {
                handle_faulty(stream, &spec, chaos.fault, &stats).await
            } else {
                upstream::handle(stream, &spec, &stats).await
            }
        });
    };
    // Keep the port refusing / blackholed until we stop.
    shutdown.cancelled().await;
    drop(held);
    Ok(())
}

/// How a limited transfer ended.
#[derive(Debug, PartialEq, Eq)]
enum Moved {
    /// The byte limit was reached; the stream is still open both ways.
    Limit,
    /// The transfer ended by itself: the peer's EOF (sink, echo) or --bytes written (source).
    Ended,
}

/// Serves one connection with the fault.
async fn handle_faulty(
    mut stream: TcpStream,
    spec: &UpstreamSpec,
    fault: Fault,
    stats: &UpstreamStats,
) -> io::Result<()> {
    match fault {
        Fault::ResetAfter(n) => {
            if transfer(&mut stream, spec, Some(n), None, stats).await? == Moved::Limit {
                // SO_LINGER 0: close() sends RST and drops whatever is unsent.
                SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
                drop(stream);
                stats.completed.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        Fault::CloseAfter(n) => {
            transfer(&mut stream, spec, Some(n), None, stats).await?;
        }
        Fault::Stall => std::future::pending::<()>().await,
        Fault::SlowClose(delay) => {
            transfer(&mut stream, spec, None, None, stats).await?;
            tokio::time::sleep(delay).await;
        }
        Fault::Trickle(every) => {
            transfer(&mut stream, spec, None, Some(every), stats).await?;
        }
        Fault::Refuse | Fault::Blackhole => {
            // Not reached: a listener fault turns the listener before it would accept a
            // faulty connection. Serve it normally rather than invent a fault.
            return upstream::handle(stream, spec, stats).await;
        }
    }
    close(stream, stats).await?;
    stats.completed.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// FIN, then read and discard until the peer's EOF (at most a linger time), then close.
async fn close(mut stream: TcpStream, stats: &UpstreamStats) -> io::Result<()> {
    stream.shutdown().await?;
    let mut buf = vec![0u8; IO_CHUNK];
    upstream::linger(&mut stream, &mut buf, stats).await
}

/// Runs the mode's transfer until `limit` bytes of its main direction have moved or the
/// stream ends. `trickle`: one byte per I/O call, this long apart (instead of --rate).
async fn transfer(
    stream: &mut TcpStream,
    spec: &UpstreamSpec,
    limit: Option<u64>,
    trickle: Option<Duration>,
    stats: &UpstreamStats,
) -> io::Result<Moved> {
    let mut bucket = match trickle {
        Some(_) => None,
        None => spec.rate.map(TokenBucket::new),
    };
    let chunk = match (trickle, &bucket) {
        (Some(_), _) => 1,
        (None, Some(b)) => b.chunk(),
        (None, None) => IO_CHUNK,
    };
    let limit = limit.unwrap_or(u64::MAX);
    let mut moved = 0u64;
    let mut buf = vec![0u8; chunk.max(IO_CHUNK)];
    match spec.mode {
        UpstreamMode::Source => {
            let pattern = Pattern::random();
            let end = spec.bytes.unwrap_or(u64::MAX);
            while moved < end {
                if moved >= limit {
                    return Ok(Moved::Limit);
                }
                let n = (chunk as u64).min(limit - moved).min(end - moved) as usize;
                pattern.fill(moved, &mut buf[..n]);
                stream.write_all(&buf[..n]).await?;
                moved += n as u64;
                stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                pace(trickle, &mut bucket, n).await;
            }
            // --bytes written; a limit of exactly --bytes still counts as reached.
            Ok(if moved >= limit {
                Moved::Limit
            } else {
                Moved::Ended
            })
        }
        UpstreamMode::Sink | UpstreamMode::Echo => {
            let echo = spec.mode == UpstreamMode::Echo;
            loop {
                if moved >= limit {
                    return Ok(Moved::Limit);
                }
                let want = (chunk as u64).min(limit - moved) as usize;
                let n = stream.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Ok(Moved::Ended);
                }
                stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                if echo {
                    stream.write_all(&buf[..n]).await?;
                    stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                }
                moved += n as u64;
                pace(trickle, &mut bucket, n).await;
            }
        }
        UpstreamMode::PerConnection => unreachable!("validate refuses per-connection faults"),
    }
}

/// Waits between I/O calls: the trickle delay, or what --rate asks for.
async fn pace(trickle: Option<Duration>, bucket: &mut Option<TokenBucket>, n: usize) {
    if let Some(d) = trickle {
        tokio::time::sleep(d).await;
    } else if let Some(b) = bucket.as_mut() {
        b.take(n).await;
    }
}

/// The totals line `sluice-stress upstream --fault` prints every few seconds.
pub fn stats_line(s: &UpstreamStats, c: &ChaosStats) -> String {
    format!(
        "{}, {} faulty",
        upstream::stats_line(s),
        c.faulty.load(Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_fault() {
        assert_eq!(
            parse_fault("reset-after=64KiB"),
            Ok(Fault::ResetAfter(65536))
        );
        assert_eq!(parse_fault("reset-after=0"), Ok(Fault::ResetAfter(0)));
        assert_eq!(parse_fault("close-after=1000"), Ok(Fault::CloseAfter(1000)));
        assert_eq!(parse_fault("stall"), Ok(Fault::Stall));
        assert_eq!(
            parse_fault("slow-close=2s"),
            Ok(Fault::SlowClose(Duration::from_secs(2)))
        );
        assert_eq!(parse_fault("refuse"), Ok(Fault::Refuse));
        assert_eq!(parse_fault("blackhole"), Ok(Fault::Blackhole));
        assert_eq!(parse_fault("trickle"), Ok(Fault::Trickle(DEFAULT_TRICKLE)));
        assert_eq!(
            parse_fault("trickle=5ms"),
            Ok(Fault::Trickle(Duration::from_millis(5)))
        );
        for f in ["reset-after=65536", "stall", "slow-close=2s", "trickle=5ms"] {
            assert_eq!(parse_fault(f).unwrap().to_string(), f);
        }
    }

    #[test]
    fn rejects_bad_faults_with_a_reason() {
        for (bad, says) in [
            ("explode", "unknown fault"),
            ("reset-after", "needs a value"),
            ("reset-after=", "needs a value"),
            ("reset-after=lots", ""),
            ("stall=1s", "takes no value"),
            ("slow-close", "needs a value"),
            ("slow-close=0s", "0s"),
            ("trickle=0ms", "0ms"),
            ("refuse=yes", "takes no value"),
        ] {
            let e = parse_fault(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
