//! Both ends of the service manager's notify protocol (`sd_notify(3)`) as sluice speaks it
//! (src/notify.rs): the socket the kit binds to learn that a child is ready and where it
//! listens, and the `READY=1` our own tools (stand-in upstreams, the baseline relay) send,
//! so that every child of ours starts the same way.
//!
//! A message is a datagram of `KEY=value` lines. The kit reads `READY=1` with sluice's
//! address variables (`X_SLUICE_LISTEN=name=address ...`, `X_SLUICE_ADMIN=address`),
//! `RELOADING=1`, `STOPPING=1` and `STATUS=...`.

use std::io;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The environment variable that names the socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// Every service's address: `name=address` pairs, space-separated.
pub const LISTEN_VAR: &str = "X_SLUICE_LISTEN";
/// The admin (metrics) endpoint's address.
pub const ADMIN_VAR: &str = "X_SLUICE_ADMIN";
/// The largest message the kit reads; sluice's are a few hundred bytes.
const MAX_MESSAGE: usize = 64 * 1024;

/// What a child said on the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// `READY=1`: it serves (at start-up, and after each reload, taken or refused).
    Ready(Ready),
    /// `RELOADING=1`: it re-reads its configuration.
    Reloading,
    /// `STOPPING=1`: a graceful shutdown began.
    Stopping,
    /// Only `STATUS=`: what it is doing, in words.
    Status(String),
}

/// The addresses a `READY=1` names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ready {
    /// Every service, in the order the child named them.
    pub services: Vec<(String, SocketAddr)>,
    /// The admin endpoint, for children that have one.
    pub admin: Option<SocketAddr>,
}

impl Ready {
    /// The address of service `name`.
    pub fn service(&self, name: &str) -> Option<SocketAddr> {
        self.services
            .iter()
            .find_map(|(n, a)| (n == name).then_some(*a))
    }
}

impl Notice {
    /// Reads one datagram; `None` for one that is none of the four.
    pub fn parse(message: &str) -> Option<Notice> {
        let field = |key: &str| {
            message
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        };
        if field("READY") == Some("1") {
            let services = field(LISTEN_VAR)
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|pair| {
                    let (name, addr) = pair.split_once('=')?;
                    Some((name.to_string(), addr.parse().ok()?))
                })
                .collect();
            let admin = field(ADMIN_VAR).and_then(|a| a.parse().ok());
            return Some(Notice::Ready(Ready { services, admin }));
        }
        if field("RELOADING") == Some("1") {
            return Some(Notice::Reloading);
        }
        if field("STOPPING") == Some("1") {
            return Some(Notice::Stopping);
        }
        field("STATUS").map(|s| Notice::Status(s.to_string()))
    }
}

/// A socket bound in a temporary directory for one child's messages: pass [`path`] as
/// its `NOTIFY_SOCKET`.
///
/// [`path`]: NotifySocket::path
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    /// Removed (with the socket file) when this is dropped.
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    pub fn bind() -> io::Result<NotifySocket> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-notify-")
            .tempdir()?;
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path)?;
        Ok(NotifySocket {
            socket,
            path,
            _dir: dir,
        })
    }

    /// What `NOTIFY_SOCKET` should say.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next message that arrives within `timeout`; `Ok(None)` if none does (or one
    /// arrives that the kit does not know).
    pub fn recv(&self, timeout: Duration) -> io::Result<Option<Notice>> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        match self.socket.recv(&mut buf) {
            Ok(n) => Ok(Notice::parse(&String::from_utf8_lossy(&buf[..n]))),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// Tells whoever started this process (its `NOTIFY_SOCKET`) that it is ready: `READY=1`,
/// each of `services` in `X_SLUICE_LISTEN`, and `admin` in `X_SLUICE_ADMIN`, as sluice
/// says it. Does nothing without `NOTIFY_SOCKET`; a supervisor that cannot be reached is
/// said once on stderr and otherwise ignored, as sluice does.
pub fn ready(services: &[(&str, SocketAddr)], admin: Option<SocketAddr>) {
    let listen: Vec<String> = services.iter().map(|(n, a)| format!("{n}={a}")).collect();
    let mut message = format!("READY=1\n{LISTEN_VAR}={}", listen.join(" "));
    if let Some(admin) = admin {
        message.push_str(&format!("\n{ADMIN_VAR}={admin}"));
    }
    send(&message);
}

/// `STATUS=status`: what this process is doing now, for whoever started it.
pub fn status(status: &str) {
    send(&format!("STATUS={status}"));
}

fn send(message: &str) {
    let Some(name) = std::env::var_os(NOTIFY_SOCKET).filter(|n| !n.is_empty()) else {
        return;
    };
    if let Err(e) = send_to(&name.to_string_lossy(), message) {
        eprintln!(
            "cannot notify {NOTIFY_SOCKET} ({}): {e}",
            name.to_string_lossy()
        );
    }
}

/// Sends one datagram to `name`: a path, or `@name` in the abstract namespace.
fn send_to(name: &str, message: &str) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    match name.strip_prefix('@') {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            socket.send_to_addr(message.as_bytes(), &addr)?;
        }
        None => {
            socket.send_to(message.as_bytes(), name)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_sluice_sends() {
        let ready = Notice::parse(
            "READY=1\nSTATUS=2 services, 0 live connections\n\
             X_SLUICE_LISTEN=default=127.0.0.1:4000 db=127.0.0.1:4001\nX_SLUICE_ADMIN=127.0.0.1:9000",
        );
        let Some(Notice::Ready(ready)) = ready else {
            panic!("not ready: {ready:?}");
        };
        assert_eq!(ready.service("db"), Some("127.0.0.1:4001".parse().unwrap()));
        assert_eq!(ready.services.len(), 2);
        assert_eq!(ready.admin, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(
            Notice::parse("RELOADING=1\nMONOTONIC_USEC=12"),
            Some(Notice::Reloading)
        );
        assert_eq!(
            Notice::parse("STOPPING=1\nSTATUS=draining"),
            Some(Notice::Stopping)
        );
        assert_eq!(
            Notice::parse("STATUS=3 live"),
            Some(Notice::Status("3 live".into()))
        );
        assert_eq!(Notice::parse("WATCHDOG=1"), None);
    }

    #[test]
    fn a_ready_sent_here_arrives_there() {
        let socket = NotifySocket::bind().unwrap();
        let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let message = format!("READY=1\n{LISTEN_VAR}=upstream={addr}");
        send_to(socket.path().to_str().unwrap(), &message).unwrap();
        let want = Ready {
            services: vec![("upstream".into(), addr)],
            admin: None,
        };
        let got = socket.recv(Duration::from_secs(5)).unwrap();
        assert_eq!(got, Some(Notice::Ready(want)));
        assert_eq!(socket.recv(Duration::from_millis(10)).unwrap(), None);
    }
}
