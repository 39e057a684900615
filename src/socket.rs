//! Socket tuning through socket2: buffer sizes, TCP_NODELAY, TCP_NOTSENT_LOWAT,
//! keepalive, and resets.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

use crate::config::SocketOptions;

/// The options for one side of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// SO_RCVBUF; 0 keeps the kernel's autotuning.
    pub recv_buffer: usize,
    /// SO_SNDBUF; 0 keeps the kernel's autotuning.
    pub send_buffer: usize,
    /// TCP_NOTSENT_LOWAT: most unsent bytes the kernel queues before the socket stops
    /// taking writes; 0 is the system default (unlimited unless changed). The bytes a
    /// slow reader has not yet acknowledged stay bounded by its window; this bounds
    /// the rest, which autotuning would otherwise let grow to the send buffer's size.
    pub notsent_lowat: u32,
    pub nodelay: bool,
    /// Keepalive idle time; zero turns keepalive off.
    pub keepalive: Duration,
}

impl Tuning {
    pub fn client(o: &SocketOptions) -> Tuning {
        Tuning {
            recv_buffer: o.client_recv_buffer.as_u64() as usize,
            send_buffer: o.client_send_buffer.as_u64() as usize,
            notsent_lowat: o.notsent_lowat.as_u64() as u32,
            nodelay: o.nodelay,
            keepalive: o.keepalive,
        }
    }

    pub fn upstream(o: &SocketOptions) -> Tuning {
        Tuning {
            recv_buffer: o.upstream_recv_buffer.as_u64() as usize,
            send_buffer: o.upstream_send_buffer.as_u64() as usize,
            notsent_lowat: o.notsent_lowat.as_u64() as u32,
            nodelay: o.nodelay,
            keepalive: o.keepalive,
        }
    }

    /// Sets the buffer sizes only: what a listening socket passes on to accepted ones
    /// (the receive buffer must be set before the handshake to size the window scale).
    fn apply_buffers(&self, sock: &SockRef<'_>) -> io::Result<()> {
        if self.recv_buffer > 0 {
            sock.set_recv_buffer_size(self.recv_buffer)?;
        }
        if self.send_buffer > 0 {
            sock.set_send_buffer_size(self.send_buffer)?;
        }
        Ok(())
    }

    /// Sets every option on a connected (or about-to-connect) socket, or on a listener,
    /// whose accepted sockets inherit all of them.
    pub fn apply(&self, sock: &SockRef<'_>) -> io::Result<()> {
        self.apply_buffers(sock)?;
        // Set even when 0, so a reload to 0 gives new clients the system default back.
        sock.set_tcp_notsent_lowat(self.notsent_lowat)?;
        sock.set_tcp_nodelay(self.nodelay)?;
        if self.keepalive.is_zero() {
            sock.set_keepalive(false)?;
        } else {
            let ka = TcpKeepalive::new()
                .with_time(self.keepalive)
                .with_interval(self.keepalive);
            sock.set_tcp_keepalive(&ka)?;
        }
        Ok(())
    }
}

/// The sizes the kernel actually chose (it doubles what it is given), for the debug log.
pub fn effective_buffers(sock: SockRef<'_>) -> (usize, usize) {
    (
        sock.recv_buffer_size().unwrap_or(0),
        sock.send_buffer_size().unwrap_or(0),
    )
}

/// Makes the next close send RST instead of FIN, so the peer sees a failure rather than
/// a clean end of stream it could mistake for a complete reply.
pub fn reset_on_close(sock: SockRef<'_>) {
    let _ = sock.set_linger(Some(Duration::ZERO));
}

/// Bytes received and not yet read on a socket (`SIOCINQ`); 0 if it cannot be asked.
pub fn unread_bytes(sock: &impl AsRawFd) -> usize {
    ioctl_count(sock.as_raw_fd(), libc::FIONREAD as _)
}

/// Bytes written and not yet acknowledged by the peer, sent or not (`SIOCOUTQ`); 0 if it
/// cannot be asked.
pub fn unacked_bytes(sock: &impl AsRawFd) -> usize {
    ioctl_count(sock.as_raw_fd(), libc::TIOCOUTQ as _)
}

fn ioctl_count(fd: RawFd, request: libc::Ioctl) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: both requests write one int through the pointer; a descriptor that is not
    // an open socket makes the call fail, which reads as 0.
    let r = unsafe { libc::ioctl(fd, request, &mut n) };
    if r < 0 { 0 } else { n.max(0) as usize }
}
