//! The splice relay's queue: a pipe holding a direction's bytes inside the kernel,
//! filled by splice(2) from the source socket and emptied by splice(2) into the
//! destination socket, so the bytes never enter sluice's memory.
//!
//! The pipe is sized to at least the bound, but the kernel rounds sizes up to a power of
//! two pages, so what keeps `queued ≤ bound` is the length of each splice in: never more
//! than the room left. The relay counts the bytes in the pipe itself (spliced in minus
//! spliced out); the pipe is never asked.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipes open in the process: in use by a direction or in a thread's stock.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Pipes held by a direction (open and not in a stock).
static IN_USE: AtomicUsize = AtomicUsize::new(0);
/// Whether the fall-back to copy has been logged; once per process is enough to tell the
/// operator, and a log line per connection would be a flood.
static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// Pipes open in this process (each is two descriptors), in use or in stock.
pub fn live_pipes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Pipes held by directions that have bytes queued or are reading; an idle connection
/// holds none.
pub fn pipes_in_use() -> usize {
    IN_USE.load(Ordering::Relaxed)
}

/// A pipe's two ends, and what it can hold.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A non-blocking pipe that holds at least `bound` bytes if the system allows it;
    /// if not (`fs.pipe-max-size`, or the user's pipe pages), a smaller one still keeps
    /// the bound, only with more splices per byte.
    fn new(bound: usize) -> io::Result<(Pipe, usize)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is two ints, as pipe2 requires.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors that we alone own.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        LIVE.fetch_add(1, Ordering::Relaxed);
        let size = pipe.resize(bound);
        Ok((pipe, size))
    }

    /// Asks for room for `bound` bytes (the kernel rounds up to a power of two pages) and
    /// returns what the pipe holds now. Over `fs.pipe-max-size`, or past the user's
    /// `fs.pipe-user-pages-soft` without CAP_SYS_RESOURCE, the kernel refuses and the
    /// pipe keeps its size.
    fn resize(&self, bound: usize) -> usize {
        let fd = self.write.as_raw_fd();
        let want = bound.min(i32::MAX as usize) as libc::c_int;
        // SAFETY: plain fcntl calls on a descriptor we own.
        let size = unsafe {
            let set = libc::fcntl(fd, libc::F_SETPIPE_SZ, want);
            if set >= 0 {
                set
            } else {
                tracing::debug!(bound, error = %io::Error::last_os_error(), "cannot size a pipe to the bound; using a smaller one");
                libc::fcntl(fd, libc::F_GETPIPE_SZ)
            }
        };
        size.max(0) as usize
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What one splice from the source did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SplicedIn {
    /// Moved this many bytes into the pipe; 0 is the source's EOF.
    Moved(usize),
    /// The source has bytes but the pipe has no slot for them: each slot holds one
    /// piece of a socket buffer, however small, so a pipe can run out of slots before it
    /// holds `bound` bytes. Draining makes room; the source's readiness is kept.
    PipeFull,
}

/// Why a direction cannot splice.
#[derive(Debug)]
pub(super) enum Unsupported {
    /// The kernel refused splice between this socket and a pipe (EINVAL, ENOSYS) before
    /// it ever worked: copy instead.
    Refused(io::Error),
    /// No pipe could be made (EMFILE, ENFILE, ENOMEM): copy instead.
    NoPipe(io::Error),
}

/// A direction's queue in splice mode: a pipe and the bytes in it. The pipe exists only
/// while something is queued or being read.
#[derive(Default)]
pub(super) struct PipeQueue {
    pipe: Option<(Pipe, usize)>,
    /// Bytes in the pipe: spliced in minus spliced out.
    len: usize,
    /// A splice in has worked, so a later EINVAL is an error, not a missing feature.
    proven: bool,
}

impl PipeQueue {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Whether the queue holds a pipe (bytes queued, or a read under way).
    pub(super) fn has_pipe(&self) -> bool {
        self.pipe.is_some()
    }

    /// Splices at most `max` bytes from `src` into the pipe (taking one from the stock
    /// first if there is none). `Pending` when the source has nothing, with its waker
    /// registered; `Ready(Err(..))` when splice cannot be used here at all.
    pub(super) fn poll_splice_in(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        bound: usize,
        max: usize,
    ) -> Poll<Result<io::Result<SplicedIn>, Unsupported>> {
        debug_assert!(max > 0 && self.len + max <= bound);
        if self.pipe.is_none() {
            let p = stock::take(bound).map_err(Unsupported::NoPipe)?;
            self.pipe = Some(p);
        }
        let Some((pipe, _)) = &self.pipe else {
            unreachable!("a pipe was just taken")
        };
        let (from, to) = (src.as_raw_fd(), pipe.write.as_raw_fd());
        let queued = self.len;
        let outcome = loop {
            if let Err(e) = ready!(src.poll_read_ready(cx)) {
                break Err(e);
            }
            // try_io clears the socket's readiness on WouldBlock, so the next
            // poll_read_ready registers the waker; a full pipe must not clear it.
            match src.try_io(Interest::READABLE, || splice_in(from, to, max, queued)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => break other,
            }
        };
        match outcome {
            Ok(SplicedIn::Moved(n)) => {
                self.proven = true;
                self.len += n;
                debug_assert!(self.len <= bound);
            }
            Err(e) if !self.proven && is_unsupported(&e) => {
                self.clear();
                return Poll::Ready(Err(Unsupported::Refused(e)));
            }
            _ => {}
        }
        Poll::Ready(Ok(outcome))
    }

    /// Splices queued bytes into `dst`. `Pending` when it takes nothing now, with its
    /// waker registered.
    pub(super) fn poll_splice_out(
        &mut self,
        cx: &mut Context<'_>,
        dst: &TcpStream,
    ) -> Poll<io::Result<usize>> {
        let Some((pipe, _)) = &self.pipe else {
            return Poll::Ready(Ok(0));
        };
        debug_assert!(self.len > 0);
        let (from, to) = (pipe.read.as_raw_fd(), dst.as_raw_fd());
        loop {
            ready!(dst.poll_write_ready(cx))?;
            // The pipe holds `len` bytes, so a would-block can only be the socket's.
            match dst.try_io(Interest::WRITABLE, || splice(from, to, self.len)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(n) => {
                    debug_assert!(n <= self.len);
                    self.len -= n;
                    return Poll::Ready(Ok(n));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Gives the pipe back to the stock if nothing is queued.
    pub(super) fn release_if_empty(&mut self) {
        if self.len == 0
            && let Some(p) = self.pipe.take()
        {
            stock::give(p);
        }
    }

    /// Drops whatever is queued: a pipe with bytes in it is closed, an empty one goes
    /// back to the stock.
    pub(super) fn clear(&mut self) {
        if self.len > 0 {
            if self.pipe.take().is_some() {
                IN_USE.fetch_sub(1, Ordering::Relaxed);
            }
            self.len = 0;
        }
        self.release_if_empty();
    }
}

impl Drop for PipeQueue {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Logs, once per process, that splice could not be used and copy is used instead.
pub(super) fn log_fallback(why: &Unsupported) {
    if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
        match why {
            Unsupported::Refused(e) => {
                tracing::warn!(error = %e, "the kernel refused splice() on a socket; connections where it does fall back to relay.mode = \"copy\" (logged once)")
            }
            Unsupported::NoPipe(e) => {
                tracing::warn!(error = %e, "cannot create a pipe for splice(); connections that cannot fall back to relay.mode = \"copy\" (logged once)")
            }
        }
    }
}

/// EINVAL or ENOSYS: this kernel or this socket cannot splice.
fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS))
}

/// One non-blocking splice(2) of at most `len` bytes.
///
/// A splice into a socket whose peer has gone raises SIGPIPE (the kernel sends without
/// MSG_NOSIGNAL); Rust programs ignore SIGPIPE from the start, so it comes back as EPIPE,
/// as a write's would.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; null offsets mean
    // "the current position", as pipes and sockets require.
    let n = unsafe {
        libc::splice(
            from,
            ptr::null_mut(),
            to,
            ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A splice from a socket into a pipe holding `queued` bytes. EAGAIN means either the
/// socket is empty or the pipe has no free slot; the second only when the pipe holds
/// bytes and the socket has some waiting (FIONREAD), and then the socket's readiness
/// must be kept.
fn splice_in(socket: RawFd, pipe: RawFd, len: usize, queued: usize) -> io::Result<SplicedIn> {
    match splice(socket, pipe, len) {
        Ok(n) => Ok(SplicedIn::Moved(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && queued > 0 => {
            // SAFETY: the caller's socket is open for the length of this call.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(socket) };
            if crate::socket::unread_bytes(&fd) > 0 {
                Ok(SplicedIn::PipeFull)
            } else {
                Err(e)
            }
        }
        Err(e) => Err(e),
    }
}

/// A small per-thread stock of empty pipes, so a connection that goes quiet and busy
/// again does not pay for pipe2 and fcntl each time, as the ring pool does for buffers.
mod stock {
    use super::*;

    /// Most pipes a thread keeps (two descriptors each); extras are closed.
    const STOCK_PIPES: usize = 32;

    thread_local! {
        static STOCK: RefCell<Vec<(Pipe, usize)>> = const { RefCell::new(Vec::new()) };
    }

    /// An empty pipe from the stock, one holding at least `bound` bytes if there is one
    /// (another is resized: an empty pipe resizes cheaply), else a new one.
    pub(super) fn take(bound: usize) -> io::Result<(Pipe, usize)> {
        let stocked = STOCK.with(|s| {
            let mut s = s.borrow_mut();
            let i = s.iter().rposition(|(_, size)| *size >= bound);
            i.map(|i| s.swap_remove(i)).or_else(|| s.pop())
        });
        let p = match stocked {
            Some((pipe, size)) if size < bound => {
                let size = pipe.resize(bound);
                (pipe, size)
            }
            Some(p) => p,
            None => Pipe::new(bound)?,
        };
        IN_USE.fetch_add(1, Ordering::Relaxed);
        Ok(p)
    }

    /// Takes back an empty pipe, or closes it if the stock is full.
    pub(super) fn give(p: (Pipe, usize)) {
        IN_USE.fetch_sub(1, Ordering::Relaxed);
        // During thread teardown the stock may be gone; the pipe is then just closed.
        let _ = STOCK.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < STOCK_PIPES {
                s.push(p);
            }
        });
    }
}
