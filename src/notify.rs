//! The service manager's notify protocol (`sd_notify(3)`): when `NOTIFY_SOCKET` names a
//! Unix datagram socket, sluice tells whoever listens there what it is doing.
//!
//! | when | message |
//! |---|---|
//! | every service accepts and the admin endpoint is bound | `READY=1`, `STATUS=`, addresses |
//! | SIGHUP, before the file is read | `RELOADING=1`, `MONOTONIC_USEC=` |
//! | the reload is done (taken or refused) | `READY=1`, `STATUS=`, addresses |
//! | SIGTERM or SIGINT | `STOPPING=1` |
//! | every [`STATUS_EVERY`] while the live count changes | `STATUS=` |
//!
//! The addresses are two variables of sluice's own (`X_` names, which systemd passes
//! over): `X_SLUICE_LISTEN=name=address ...` (every service, space-separated) and
//! `X_SLUICE_ADMIN=address`. So a supervisor, or the test kit, learns that sluice is up and
//! where, with `127.0.0.1:0` in the configuration, without reading its log.
//!
//! Without `NOTIFY_SOCKET` every call does nothing. Sending never blocks; a message that
//! cannot be sent is dropped (the first failure is logged at `warn`): a supervisor that
//! went away or stopped reading must not stop the proxy.

use std::io;
use std::net::SocketAddr;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often the live connection count is sent as `STATUS=` (when it has changed).
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The environment variable that names the socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// A handle on the notify socket, or nothing when sluice runs without one.
pub struct Notifier {
    target: Option<(UnixDatagram, UnixAddr)>,
    failed: AtomicBool,
}

impl Notifier {
    /// The socket `NOTIFY_SOCKET` names: a path, or `@name` in the abstract namespace.
    pub fn from_env() -> io::Result<Notifier> {
        let target = match std::env::var_os(NOTIFY_SOCKET) {
            Some(name) if !name.is_empty() => {
                let addr = unix_address(&name.to_string_lossy())?;
                // Never blocks: a supervisor that stops reading costs messages, not the
                // task that sends them.
                let socket = UnixDatagram::unbound()?;
                socket.set_nonblocking(true)?;
                Some((socket, addr))
            }
            _ => None,
        };
        Ok(Notifier {
            target,
            failed: AtomicBool::new(false),
        })
    }

    /// A notifier that sends nothing.
    pub fn none() -> Notifier {
        Notifier {
            target: None,
            failed: AtomicBool::new(false),
        }
    }

    /// `READY=1` with the live count and every address: sent at start-up and after each
    /// reload.
    pub fn ready(&self, services: &[(String, SocketAddr)], admin: SocketAddr, live: usize) {
        self.send(&format!(
            "READY=1\n{}\n{}",
            status(services.len(), live),
            addresses(services, admin)
        ));
    }

    /// `RELOADING=1`: a reload begins (systemd wants the monotonic clock with it).
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// `STOPPING=1`: a graceful shutdown begins.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining");
    }

    /// `STATUS=` with how many connections are live.
    pub fn status(&self, services: usize, live: usize) {
        self.send(&status(services, live));
    }

    /// Whether a socket was named.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    fn send(&self, message: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr)
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET); further failures are not logged");
        }
    }
}

/// `STATUS=` for `services` services and `live` live connections.
fn status(services: usize, live: usize) -> String {
    let s = if services == 1 { "" } else { "s" };
    format!("STATUS={services} service{s}, {live} live connections")
}

/// `X_SLUICE_LISTEN=` and `X_SLUICE_ADMIN=`.
fn addresses(services: &[(String, SocketAddr)], admin: SocketAddr) -> String {
    let listen: Vec<String> = services.iter().map(|(n, a)| format!("{n}={a}")).collect();
    format!(
        "X_SLUICE_LISTEN={}\nX_SLUICE_ADMIN={admin}",
        listen.join(" ")
    )
}

/// `NOTIFY_SOCKET`'s value as an address: `@name` is abstract, anything else a path.
fn unix_address(name: &str) -> io::Result<UnixAddr> {
    match name.strip_prefix('@') {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            UnixAddr::from_abstract_name(abstract_name.as_bytes())
        }
        None => UnixAddr::from_pathname(name),
    }
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the one we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_every_service_and_the_admin_address() {
        let services = vec![
            ("default".to_string(), "127.0.0.1:4000".parse().unwrap()),
            ("db".to_string(), "127.0.0.1:4001".parse().unwrap()),
        ];
        assert_eq!(
            addresses(&services, "127.0.0.1:9000".parse().unwrap()),
            "X_SLUICE_LISTEN=default=127.0.0.1:4000 db=127.0.0.1:4001\nX_SLUICE_ADMIN=127.0.0.1:9000"
        );
        assert_eq!(status(1, 3), "STATUS=1 service, 3 live connections");
    }

    #[test]
    fn a_path_and_an_abstract_name_are_both_addresses() {
        let dir = tempfile_path();
        let socket = UnixDatagram::bind(&dir).unwrap();
        let notifier = Notifier {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                unix_address(dir.to_str().unwrap()).unwrap(),
            )),
            failed: AtomicBool::new(false),
        };
        notifier.stopping();
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\nSTATUS=draining");
        std::fs::remove_file(&dir).unwrap();
        assert!(unix_address("@sluice-test").is_ok());
    }

    fn tempfile_path() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("sluice-notify-{}.sock", std::process::id()))
    }
}
