//! The bounded duplex copy: two directions, each with a buffer that is never fuller than
//! its bound, relayed by one task.
//!
//! # States of a direction
//!
//! ```text
//!            queue full and the destination         queue fell to resume_at × bound
//!            would block                            (a "drain")
//!  Streaming ───────────────────────────► Paused ──────────────────────────────► Streaming
//!      │        (a "pause")                  │
//!      │ source sent EOF                     │ source cannot send EOF while we do not read
//!      ▼                                     ▼
//!  Flushing ── queue empty: shutdown(SHUT_WR) on the destination ──► Done
//! ```
//!
//! A direction reads only in `Streaming`, and never more than the room left, so
//! `queued ≤ bound` holds at every instant. Its buffer is a ring of exactly `bound` bytes
//! taken from a small per-thread pool when the source has data, and given back as soon
//! as it is empty and the source has nothing more, so an idle connection holds no buffer
//! at all. Being a ring, a partial write never makes the relay move queued bytes about.
//!
//! # One poll of a direction
//!
//! [`Direction::poll_transfer`] repeats two named steps until neither makes progress:
//! [`Direction::poll_fill`] (read from the source into the room left: [`Filled`]) and
//! [`Direction::poll_drain`] (write queued bytes to the destination: [`Drained`]). The
//! only fairness budget is tokio's cooperative one, which every socket poll spends; when
//! it runs out the sockets say `Pending` and wake the task again.
//!
//! # Counting a byte once
//!
//! A byte is counted in `sluice_queued_bytes` from the read that brought it in until the
//! write that handed it to the destination's kernel; `sluice_bytes_total` counts it at
//! that write. The relay keeps its own tallies and [`Direction::report`] hands the
//! differences to the metrics once per poll, not per syscall; pauses and drains are
//! reported there too, from the transitions the poll recorded.
//!
//! # Copy or splice
//!
//! With `relay.mode = "splice"` the queue is a pipe instead of a ring ([`pipe`]): fill
//! splices from the source socket into it, drain splices from it into the destination.
//! Everything else (states, the bound, when a byte is counted) is the same code. A
//! direction holds a pipe (two descriptors) only while it holds bytes, as with the ring.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::budget::{self, Budget, Grant, Waiting};
pub use crate::config::RelayMode;
use crate::metrics::{DirectionMetrics, ServiceMetrics};
use crate::pool::Attached;
use crate::registry::{DirectionFigures, Entry};
use std::sync::atomic::Ordering::Relaxed;

pub mod pipe;
use pipe::{PipeQueue, SplicedIn};

/// Which end of the connection an event happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// Index of the client→upstream direction in per-direction arrays.
pub const CLIENT_TO_UPSTREAM: usize = 0;
/// Index of the upstream→client direction in per-direction arrays.
pub const UPSTREAM_TO_CLIENT: usize = 1;

/// Where one direction's figures go each time it reports.
#[derive(Clone, Copy)]
pub struct Reports<'a> {
    /// The service's series.
    pub metrics: &'a DirectionMetrics,
    /// The connection's entry in the registry.
    pub live: &'a DirectionFigures,
    /// The server's load (with this direction's index), which balancing reads; `None`
    /// where no server is attached (unit tests).
    pub server: Option<(&'a Attached, usize)>,
}

/// The per-connection settings the relay needs.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// Per-direction bounds, client→upstream first.
    pub bounds: [usize; 2],
    /// Fraction of the bound at which a paused direction reads again.
    pub resume_at: f64,
    /// No byte in either direction this long ends the connection; zero disables.
    pub idle: Duration,
    /// One direction done and the other still open this long ends it; zero disables.
    pub half_close: Duration,
    /// Whether bytes go through a ring (copy) or a pipe (splice).
    pub mode: RelayMode,
}

/// How the relay ended.
#[derive(Debug)]
pub enum Ending {
    /// Both directions reached EOF and delivered everything.
    Complete,
    /// A socket failed; `reset` when the peer reset (or vanished) rather than some
    /// other error.
    Failed {
        side: Side,
        reset: bool,
        error: io::Error,
    },
    /// Nothing moved for `idle`.
    IdleTimeout,
    /// One direction finished and the other did not within `half_close`.
    HalfCloseTimeout,
    /// The proxy's shutdown deadline passed.
    Shutdown,
}

/// What the relay did, for the close log line and the caller's accounting.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Bytes delivered per direction.
    pub bytes: [u64; 2],
    /// Pauses per direction.
    pub pauses: [u64; 2],
    /// Bytes still queued per direction when the relay ended (discarded).
    pub queued: [usize; 2],
    /// Whether each direction passed its EOF on (its stream ended cleanly).
    pub finished: [bool; 2],
}

/// Where a direction stands; see the diagram at the top of this file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading from the source while there is room; writing what is queued.
    Streaming,
    /// The queue filled and the destination would not take more: no reading until the
    /// queue falls to the resume mark.
    Paused,
    /// The source sent EOF; writing out what is queued before passing the EOF on.
    Flushing,
    /// EOF passed on (or never will be): nothing more to do.
    Done,
}

/// What [`Direction::poll_fill`] did.
#[derive(Debug, PartialEq, Eq)]
enum Filled {
    /// Read this many bytes into the queue.
    Read(usize),
    /// The source sent EOF.
    Eof,
    /// The source has nothing now (its waker is registered).
    WouldBlock,
    /// No room: the queue holds `bound` bytes.
    Full,
    /// Waiting in line for the budget to grant a buffer (its waker is registered).
    NoBudget,
}

/// What [`Direction::poll_drain`] did.
#[derive(Debug, PartialEq, Eq)]
enum Drained {
    /// Wrote this many queued bytes to the destination.
    Wrote(usize),
    /// Nothing is queued.
    Empty,
    /// The destination takes nothing now (its waker is registered).
    WouldBlock,
}

/// Which of a direction's two sockets failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Source,
    Destination,
}

/// A socket error, with the socket it came from.
#[derive(Debug)]
struct Failure {
    end: End,
    error: io::Error,
}

impl Failure {
    fn source(error: io::Error) -> Failure {
        Failure {
            end: End::Source,
            error,
        }
    }
    fn destination(error: io::Error) -> Failure {
        Failure {
            end: End::Destination,
            error,
        }
    }
}

/// A source a direction can wait on before it takes a buffer, so an idle direction
/// holds no memory while it waits.
pub trait Source: AsyncRead + Unpin {
    /// Ready when a read would not block (data, EOF or an error is there).
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// The socket underneath, for splice; `None` where there is none (test doubles).
    fn socket(&self) -> Option<&TcpStream> {
        None
    }
}

impl Source for ReadHalf<'_> {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_read_ready(cx)
    }

    fn socket(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

/// A destination a direction writes to, which may be a socket splice can write to.
pub trait Sink: AsyncWrite + Unpin {
    /// The socket underneath, for splice; `None` where there is none (test doubles).
    fn socket(&self) -> Option<&TcpStream> {
        None
    }
}

impl Sink for WriteHalf<'_> {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

/// A direction's queue: a ring of `bound` bytes holding `len` bytes from `head` on,
/// wrapping at the end. The ring exists only while something is queued or being read.
///
/// The ring is not zeroed: only bytes a read has written are ever handed out, so a
/// fresh ring costs no time zeroing and no memory for the pages no read reaches.
#[derive(Default)]
struct Ring {
    data: Option<Box<[MaybeUninit<u8>]>>,
    /// 32 bits: bounds are at most 1 GiB, and every byte of a connection counts.
    head: u32,
    len: u32,
}

impl Ring {
    fn len(&self) -> usize {
        self.len as usize
    }

    /// The free bytes after the queued ones, up to the end of the ring or the start of
    /// the queued bytes, whichever comes first; takes a ring of `capacity` from the pool
    /// if there is none. Empty when the ring is full.
    fn free(&mut self, capacity: usize) -> &mut [MaybeUninit<u8>] {
        let data = self.data.get_or_insert_with(|| pool::take(capacity));
        let (head, len, cap) = (self.head as usize, self.len as usize, data.len());
        let tail = (head + len) % cap.max(1);
        let end = if tail >= head && len < cap { cap } else { head };
        // When nothing is queued, `head` was reset to 0, so the whole ring is one run.
        &mut data[tail..end.max(tail)]
    }

    /// `n` bytes were written into the start of [`Ring::free`].
    fn commit(&mut self, n: usize) {
        self.len += n as u32;
        debug_assert!(self.len() <= self.data.as_ref().map_or(0, |d| d.len()));
    }

    /// The queued bytes, in order, as at most two runs (the second after a wrap).
    fn queued(&self) -> (&[u8], &[u8]) {
        let Some(data) = &self.data else {
            return (&[], &[]);
        };
        let (head, len, cap) = (self.head as usize, self.len as usize, data.len());
        let first_end = (head + len).min(cap);
        let first = &data[head..first_end];
        let second = &data[..len - first.len()];
        // SAFETY: the queued bytes are exactly those reads wrote (`commit` counts only
        // what a read filled in), so they are initialised.
        unsafe { (assume_init(first), assume_init(second)) }
    }

    /// `n` queued bytes were written out.
    fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.len -= n as u32;
        if self.len == 0 {
            // Start over at the front: the next read gets the whole ring as one run.
            self.head = 0;
        } else {
            let cap = self.data.as_ref().map_or(1, |d| d.len());
            self.head = ((self.head as usize + n) % cap) as u32;
        }
    }

    /// Gives the ring back if nothing is queued.
    fn release_if_empty(&mut self) {
        if self.len == 0
            && let Some(d) = self.data.take()
        {
            pool::give(d);
        }
    }

    /// Drops whatever is queued and gives the ring back.
    fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
        self.release_if_empty();
    }
}

/// The bytes of `run`, which the caller knows to be initialised.
///
/// # Safety
/// Every byte of `run` must have been written.
unsafe fn assume_init(run: &[MaybeUninit<u8>]) -> &[u8] {
    // SAFETY: MaybeUninit<u8> has u8's layout; the caller vouches for initialisation.
    unsafe { &*(run as *const [MaybeUninit<u8>] as *const [u8]) }
}

/// What changed in a direction since the metrics were last told.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Transitions {
    /// A pause ended (a drain).
    resumed: bool,
    /// A pause began.
    paused: bool,
    /// The direction joined the budget's line.
    waited: bool,
}

/// One direction: a source, a bounded queue, a destination.
struct Direction {
    state: State,
    queue: Ring,
    /// The queue in splice mode, used instead of `queue`; at most one holds bytes.
    /// `None` is copy mode (also after splice fell back to copying). Boxed: a copying
    /// connection does not carry its room.
    pipe: Option<Box<PipeQueue>>,
    /// Most bytes this direction may hold.
    bound: usize,
    /// A paused direction reads again at or below this many queued bytes.
    resume: usize,
    /// Bytes read from the source.
    received: u64,
    /// Bytes delivered to the destination.
    delivered: u64,
    pauses: u64,
    /// Pauses and drains since the last report.
    transitions: Transitions,
    /// `buffer.total`, shared by every connection; `None` in tests of a lone direction.
    budget: Option<Arc<Budget>>,
    /// The buffer the budget granted, held while the direction holds bytes.
    grant: Option<Grant>,
    /// The direction's place in the budget's line while it waits for a grant (boxed: a
    /// direction that never waits does not carry it).
    in_line: Option<Box<Waiting>>,
    /// When the running pause began, on the metrics clock; set by [`Direction::report`].
    paused_since: Option<f64>,
    /// What the metrics have been told so far, so updates can be batched per poll.
    reported_queued: usize,
    reported_delivered: u64,
}

impl Direction {
    fn new(bound: usize, resume_at: f64) -> Direction {
        let resume = ((bound as f64 * resume_at) as usize).min(bound.saturating_sub(1));
        Direction {
            state: State::Streaming,
            queue: Ring::default(),
            pipe: None,
            bound,
            resume,
            received: 0,
            delivered: 0,
            pauses: 0,
            transitions: Transitions::default(),
            budget: None,
            grant: None,
            in_line: None,
            paused_since: None,
            reported_queued: 0,
            reported_delivered: 0,
        }
    }

    /// The same direction moving its bytes the `mode` way.
    fn with_mode(mut self, mode: RelayMode) -> Direction {
        self.pipe = (mode == RelayMode::Splice).then(Box::default);
        self
    }

    /// The same direction, sharing `budget` with every other connection.
    fn with_budget(mut self, budget: Arc<Budget>) -> Direction {
        self.budget = Some(budget);
        self
    }

    /// Bytes queued, in whichever queue holds them.
    fn queued(&self) -> usize {
        self.queue.len() + self.pipe.as_ref().map_or(0, |p| p.len())
    }

    /// Most bytes the queue may hold now: the granted buffer's size, or the bound.
    fn capacity(&self) -> usize {
        self.grant.as_ref().map_or(self.bound, |g| g.bytes)
    }

    /// Whether this direction holds a whole buffer from the budget while others wait
    /// in line for one: then it does not read again until its queue is empty, and
    /// gives the buffer back there.
    fn owes_a_turn(&self) -> bool {
        self.grant
            .as_ref()
            .is_some_and(|g| g.from == budget::From::Queue)
            && self.budget.as_ref().is_some_and(|b| b.contended())
    }

    /// Gives the ring or the pipe back if nothing is queued, and with it the grant.
    fn release_if_empty(&mut self) {
        self.queue.release_if_empty();
        if let Some(pipe) = &mut self.pipe {
            pipe.release_if_empty();
        }
        if self.queued() == 0
            && let Some(grant) = self.grant.take()
            && let Some(budget) = &self.budget
        {
            budget.release(grant);
        }
    }

    /// Gets a buffer granted by the budget: at once, or after waiting in line.
    /// `Pending` while in line (the waker is registered).
    fn poll_grant<S: Source>(&mut self, cx: &mut Context<'_>, src: &S) -> Poll<()> {
        let Some(budget) = self.budget.clone() else {
            return Poll::Ready(());
        };
        if self.in_line.is_none() {
            // Whatever is left of the last buffer is empty: drop it, so the next one is
            // taken at the granted size.
            self.release_if_empty();
            let waiting = || src.socket().map(crate::socket::unread_bytes);
            match budget.ask(self.bound, waiting) {
                budget::Asked::Granted(g) => {
                    self.grant = Some(g);
                    return Poll::Ready(());
                }
                budget::Asked::Queued(w) => {
                    self.in_line = Some(Box::new(w));
                    self.transitions.waited = true;
                }
            }
        }
        let w = self.in_line.as_mut().expect("in line");
        let grant = ready!(budget.poll_wait(cx, w));
        self.in_line = None;
        self.grant = grant;
        Poll::Ready(())
    }

    /// Moves bytes from `src` to `dst` until both would block (`Pending`), or until the
    /// direction has passed its EOF on (`Ready(Ok)`).
    fn poll_transfer<S: Source, D: Sink>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
        dst: &mut D,
    ) -> Poll<Result<(), Failure>> {
        loop {
            match self.state {
                State::Streaming | State::Paused => {
                    let filled = match self.state {
                        State::Streaming => self.poll_fill(cx, src)?,
                        _ => Filled::Full,
                    };
                    if filled == Filled::Eof {
                        self.state = State::Flushing;
                        continue;
                    }
                    let drained = self.poll_drain(cx, dst)?;
                    if let Drained::Wrote(_) = drained {
                        self.resume_if_drained();
                    }
                    let progress =
                        matches!(filled, Filled::Read(_)) || matches!(drained, Drained::Wrote(_));
                    if !progress {
                        self.pause_if_stuck(&filled, &drained);
                        self.release_if_empty();
                        return Poll::Pending;
                    }
                }
                State::Flushing => match self.poll_drain(cx, dst)? {
                    Drained::Wrote(_) => {}
                    Drained::WouldBlock => return Poll::Pending,
                    Drained::Empty => {
                        self.release_if_empty();
                        ready!(Pin::new(&mut *dst).poll_shutdown(cx))
                            .map_err(Failure::destination)?;
                        self.state = State::Done;
                    }
                },
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }

    /// Reads from the source into the room left, never more.
    fn poll_fill<S: Source>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
    ) -> Result<Filled, Failure> {
        if self.queued() == 0 && self.owes_a_turn() {
            // Others wait for a buffer: this one goes back, and this direction lines up
            // behind them.
            self.release_if_empty();
        }
        // Without a buffer, wait for the source to have something before taking one, so
        // an idle direction holds no memory (and no pipe, and no grant).
        let needs_grant = self.grant.is_none()
            && self.queued() == 0
            && self.budget.as_ref().is_some_and(|b| b.enabled());
        if needs_grant
            || (self.queue.data.is_none() && !self.pipe.as_ref().is_some_and(|p| p.has_pipe()))
        {
            match src.poll_readable(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Err(Failure::source(e)),
                Poll::Pending => return Ok(Filled::WouldBlock),
            }
        }
        if needs_grant && self.poll_grant(cx, src).is_pending() {
            return Ok(Filled::NoBudget);
        }
        let capacity = self.capacity();
        let room = capacity - self.queued();
        if room == 0 {
            return Ok(Filled::Full);
        }
        // A small grant from the budget's reserve is copied through a small ring.
        let small_grant = self
            .grant
            .as_ref()
            .is_some_and(|g| g.from == budget::From::Reserve);
        if let Some(pipe) = self.pipe.as_mut().filter(|_| !small_grant)
            && let Some(socket) = src.socket()
        {
            match pipe.poll_splice_in(cx, socket, capacity, room) {
                Poll::Ready(Ok(spliced)) => return self.spliced_in(spliced),
                Poll::Pending => return Ok(Filled::WouldBlock),
                Poll::Ready(Err(unsupported)) => {
                    // Nothing was queued yet: go on as a copying direction.
                    pipe::log_fallback(&unsupported);
                    tracing::debug!(?unsupported, "splice unusable; copying instead");
                    self.pipe = None;
                }
            }
        }
        let free = self.queue.free(capacity);
        debug_assert!(!free.is_empty() && free.len() <= room);
        let mut buf = ReadBuf::uninit(free);
        // tokio's poll_read clears readiness after a short read, which saves the read
        // that would only say "would block".
        match Pin::new(src).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n == 0 {
                    return Ok(Filled::Eof);
                }
                self.queue.commit(n);
                self.received += n as u64;
                debug_assert!(self.queue.len() <= self.capacity());
                Ok(Filled::Read(n))
            }
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => Ok(Filled::Read(0)),
            Poll::Ready(Err(e)) => Err(Failure::source(e)),
            Poll::Pending => Ok(Filled::WouldBlock),
        }
    }

    /// What a splice into the pipe came to, as a fill.
    fn spliced_in(&mut self, spliced: io::Result<SplicedIn>) -> Result<Filled, Failure> {
        match spliced {
            Ok(SplicedIn::Moved(0)) => Ok(Filled::Eof),
            Ok(SplicedIn::Moved(n)) => {
                self.received += n as u64;
                debug_assert!(self.queued() <= self.bound);
                Ok(Filled::Read(n))
            }
            // Not a full queue (that is `bound` bytes): no pause, the drain makes room.
            Ok(SplicedIn::PipeFull) => Ok(Filled::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Filled::Read(0)),
            Err(e) => Err(Failure::source(e)),
        }
    }

    /// Writes queued bytes to the destination: from the pipe by splice, or from the
    /// ring by one write of the first run, or one vectored write of both when it wraps.
    fn poll_drain<D: Sink>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut D,
    ) -> Result<Drained, Failure> {
        if let Some(pipe) = self.pipe.as_mut()
            && pipe.len() > 0
        {
            let socket = dst
                .socket()
                .expect("bytes are spliced only between two sockets");
            let written = pipe.poll_splice_out(cx, socket);
            return self.wrote(written);
        }
        let (first, second) = self.queue.queued();
        if first.is_empty() {
            return Ok(Drained::Empty);
        }
        let dst = Pin::new(dst);
        // A plain write where it will do: tokio clears readiness after a short plain
        // write (saving a write that would only say "would block"), not after a short
        // vectored one.
        let written = if second.is_empty() {
            dst.poll_write(cx, first)
        } else {
            dst.poll_write_vectored(cx, &[IoSlice::new(first), IoSlice::new(second)])
        };
        if let Poll::Ready(Ok(n)) = written {
            self.queue.consume(n);
        }
        self.wrote(written)
    }

    /// What a write (or splice) of queued bytes came to, as a drain; the queue has
    /// already given up the bytes written.
    fn wrote(&mut self, written: Poll<io::Result<usize>>) -> Result<Drained, Failure> {
        match written {
            Poll::Ready(Ok(0)) => Err(Failure::destination(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                self.delivered += n as u64;
                Ok(Drained::Wrote(n))
            }
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => Ok(Drained::Wrote(0)),
            Poll::Ready(Err(e)) => Err(Failure::destination(e)),
            Poll::Pending => Ok(Drained::WouldBlock),
        }
    }

    /// Bytes that have moved through this direction either way (read or written), so a
    /// change means the connection was not idle.
    fn moved(&self) -> u64 {
        self.received + self.delivered
    }

    /// A paused direction that has drained to the resume mark reads again.
    fn resume_if_drained(&mut self) {
        if self.state != State::Paused {
            return;
        }
        // With a buffer smaller than the bound (a fair share of the budget), the mark
        // is the same fraction of it.
        let mark = if self.owes_a_turn() {
            0
        } else {
            self.resume * self.capacity() / self.bound
        };
        if self.queued() <= mark {
            self.state = State::Streaming;
            self.transitions.resumed = true;
        }
    }

    /// A streaming direction whose queue is full and whose destination would block
    /// pauses. A destination that said `Pending` only because the task's cooperative
    /// budget ran out is a yield, not a pause.
    fn pause_if_stuck(&mut self, filled: &Filled, drained: &Drained) {
        if self.state == State::Streaming
            && *filled == Filled::Full
            && *drained == Drained::WouldBlock
            && tokio::task::coop::has_budget_remaining()
        {
            self.state = State::Paused;
            self.pauses += 1;
            self.transitions.paused = true;
        }
    }

    /// Tells the metrics, the connection's entry in the registry and its server's load
    /// what changed since the last report.
    fn report(&mut self, to: Reports<'_>) {
        let Reports {
            metrics: m,
            live,
            server,
        } = to;
        let queued = self.queued();
        if queued != self.reported_queued {
            let delta = queued as i64 - self.reported_queued as i64;
            m.queued.increment(delta as f64);
            live.queued.store(queued as u64, Relaxed);
            if let Some((server, i)) = server {
                server.add_queued(i, delta);
            }
            self.reported_queued = queued;
        }
        if self.delivered != self.reported_delivered {
            m.bytes.increment(self.delivered - self.reported_delivered);
            live.delivered.store(self.delivered, Relaxed);
            self.reported_delivered = self.delivered;
        }
        let t = std::mem::take(&mut self.transitions);
        if t == Transitions::default() {
            return;
        }
        if t.waited {
            m.budget_waits.increment(1);
        }
        let now = crate::metrics::now();
        // A drain ends the pause that was running before this poll; a pause that began
        // in this poll starts after it.
        if t.resumed
            && let Some(since) = self.paused_since.take()
        {
            m.drains.increment(1);
            m.paused.stop(since, now);
            live.set_paused(None);
            if let Some((server, i)) = server {
                server.pause_ended(i, now);
            }
        }
        if t.paused {
            m.pauses.increment(1);
            m.paused.start(now);
            self.paused_since = Some(now);
            live.set_paused(Some(now));
            if let Some((server, i)) = server {
                server.pause_started(i, now);
            }
        }
    }

    /// Ends the direction for good: reports, ends a running pause, drops the queue.
    fn finish(&mut self, to: Reports<'_>) {
        self.report(to);
        let Reports {
            metrics: m,
            live,
            server,
        } = to;
        live.queued.store(0, Relaxed);
        live.set_paused(None);
        if let Some(since) = self.paused_since.take() {
            let now = crate::metrics::now();
            m.paused.stop(since, now);
            if let Some((server, i)) = server {
                server.pause_ended(i, now);
            }
        }
        if self.state != State::Done {
            self.state = State::Done;
        }
        if self.reported_queued > 0 {
            m.queued.decrement(self.reported_queued as f64);
            if let Some((server, i)) = server {
                server.add_queued(i, -(self.reported_queued as i64));
            }
            self.reported_queued = 0;
        }
        self.queue.clear();
        if let Some(pipe) = &mut self.pipe {
            pipe.clear();
        }
        self.in_line = None;
        self.release_if_empty();
    }
}

/// Both directions of one connection, with the metrics they report to.
///
/// Dropping it (an early return, a panic, a cancelled task) still returns every gauge
/// it raised: queued bytes and running pauses.
pub struct Relay<'a> {
    client: (ReadHalf<'a>, WriteHalf<'a>),
    upstream: (ReadHalf<'a>, WriteHalf<'a>),
    metrics: &'a ServiceMetrics,
    /// The connection's entry in the registry, kept current with the metrics.
    entry: &'a Entry,
    /// The connection's place in its server's load.
    server: &'a Attached,
    dirs: [Direction; 2],
    /// Whether each direction passed its EOF on, so a done direction is not polled.
    done: [bool; 2],
    /// When a byte last moved either way, for the idle timeout.
    last_moved: Instant,
    /// Whether the caller has been told that one direction finished.
    half_reported: bool,
    /// Timeouts the run enforces.
    idle: Duration,
    half_close: Duration,
}

/// What one poll of both directions came to.
enum Event {
    /// Both directions passed their EOF on.
    Finished,
    /// One direction passed its EOF on; the other goes on.
    HalfClosed,
    Failed(Ending),
}

impl<'a> Relay<'a> {
    pub fn new(
        client: &'a mut TcpStream,
        upstream: &'a mut TcpStream,
        config: &RelayConfig,
        metrics: &'a ServiceMetrics,
        entry: &'a Entry,
        server: &'a Attached,
        budget: &Arc<Budget>,
    ) -> Relay<'a> {
        Relay {
            client: client.split(),
            upstream: upstream.split(),
            metrics,
            entry,
            server,
            dirs: [
                Direction::new(config.bounds[0], config.resume_at)
                    .with_mode(config.mode)
                    .with_budget(budget.clone()),
                Direction::new(config.bounds[1], config.resume_at)
                    .with_mode(config.mode)
                    .with_budget(budget.clone()),
            ],
            done: [false; 2],
            last_moved: Instant::now(),
            half_reported: false,
            idle: config.idle,
            half_close: config.half_close,
        }
    }

    /// Runs until both directions are done, a socket fails, a timeout fires, or
    /// `shutdown` is cancelled.
    ///
    /// One timer serves both timeouts: it is set for the earlier of the idle deadline
    /// and the half-close deadline, and on firing the relay checks which one passed
    /// (the idle deadline moves with every byte without touching the timer). A second
    /// timer would cost every connection 112 bytes.
    pub async fn run(&mut self, shutdown: &CancellationToken) -> Ending {
        let timer = sleep_until(self.next_deadline(None));
        let cancelled = shutdown.cancelled();
        tokio::pin!(timer, cancelled);
        let mut half_closed_at: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                event = poll_fn(|cx| self.poll_step(cx)) => match event {
                    Event::Finished => return Ending::Complete,
                    Event::Failed(ending) => return ending,
                    Event::HalfClosed => {
                        if half_closed_at.is_none() && !self.half_close.is_zero() {
                            half_closed_at = Some(Instant::now());
                            timer.as_mut().reset(self.next_deadline(half_closed_at));
                        }
                    }
                },
                _ = &mut timer => {
                    let now = Instant::now();
                    if !self.idle.is_zero() && self.last_moved + self.idle <= now {
                        return Ending::IdleTimeout;
                    }
                    if half_closed_at.is_some_and(|t| t + self.half_close <= now) {
                        return Ending::HalfCloseTimeout;
                    }
                    // Bytes moved since the timer was set: the idle deadline moved on.
                    timer.as_mut().reset(self.next_deadline(half_closed_at));
                }
                _ = &mut cancelled => return Ending::Shutdown,
            }
        }
    }

    /// The earlier of the idle deadline and (once half-closed at `half_closed_at`) the
    /// half-close deadline; far in the future when both timeouts are off.
    fn next_deadline(&self, half_closed_at: Option<Instant>) -> Instant {
        let idle = (!self.idle.is_zero()).then(|| self.last_moved + self.idle);
        let half = half_closed_at.map(|t| t + self.half_close);
        match (idle, half) {
            (Some(i), Some(h)) => i.min(h),
            (Some(d), None) | (None, Some(d)) => d,
            (None, None) => Instant::now() + Duration::from_secs(86400 * 365),
        }
    }

    /// Polls both directions once; reports to the metrics before returning.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let before = self.dirs.each_ref().map(Direction::moved);
        let mut failed = None;
        for i in [CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT] {
            if self.done[i] {
                continue;
            }
            let (src, dst) = if i == CLIENT_TO_UPSTREAM {
                (&mut self.client.0, &mut self.upstream.1)
            } else {
                (&mut self.upstream.0, &mut self.client.1)
            };
            let step = self.dirs[i].poll_transfer(cx, src, dst);
            let to = self.reports(i);
            self.dirs[i].report(to);
            match step {
                Poll::Ready(Ok(())) => self.done[i] = true,
                Poll::Pending => {}
                Poll::Ready(Err(failure)) => {
                    failed = Some((i, failure));
                    break;
                }
            }
        }
        let after = self.dirs.each_ref().map(Direction::moved);
        if before != after {
            self.last_moved = Instant::now();
        }
        if let Some((i, Failure { end, error })) = failed {
            // Direction 0 reads the client; direction 1 reads the upstream.
            let side = match (i, end) {
                (CLIENT_TO_UPSTREAM, End::Source) | (UPSTREAM_TO_CLIENT, End::Destination) => {
                    Side::Client
                }
                _ => Side::Upstream,
            };
            let reset = is_reset(&error);
            return Poll::Ready(Event::Failed(Ending::Failed { side, reset, error }));
        }
        match self.done {
            [true, true] => Poll::Ready(Event::Finished),
            [true, false] | [false, true] if !self.half_reported => {
                self.half_reported = true;
                Poll::Ready(Event::HalfClosed)
            }
            _ => Poll::Pending,
        }
    }

    /// Where direction `i` reports.
    fn reports(&self, i: usize) -> Reports<'a> {
        Reports {
            metrics: &self.metrics.directions[i],
            live: &self.entry.directions[i],
            server: Some((self.server, i)),
        }
    }

    /// What the relay did; call after [`Relay::run`].
    pub fn totals(&self) -> Totals {
        Totals {
            bytes: self.dirs.each_ref().map(|d| d.delivered),
            pauses: self.dirs.each_ref().map(|d| d.pauses),
            queued: self.dirs.each_ref().map(Direction::queued),
            finished: self.dirs.each_ref().map(|d| d.state == State::Done),
        }
    }
}

impl Drop for Relay<'_> {
    fn drop(&mut self) {
        for i in [CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT] {
            let to = self.reports(i);
            self.dirs[i].finish(to);
        }
    }
}

/// Errors that mean the peer reset the connection or is gone.
fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
    )
}

/// A small per-thread stock of buffers, so a connection that goes quiet and busy again
/// does not pay for an allocation each time.
mod pool {
    use super::*;

    /// Most bytes a thread keeps in stock: a fixed cost, not a per-connection one. A
    /// ring is given back within the poll that emptied it, so a request/response
    /// workload needs one or two per thread at a time, and rings are not zeroed, so a
    /// miss costs an allocation only.
    const STOCK_BYTES: usize = 256 << 10;

    thread_local! {
        static STOCK: RefCell<Vec<Box<[MaybeUninit<u8>]>>> = const { RefCell::new(Vec::new()) };
    }

    pub fn take(capacity: usize) -> Box<[MaybeUninit<u8>]> {
        STOCK
            .with(|s| {
                let mut s = s.borrow_mut();
                let i = s.iter().rposition(|b| b.len() == capacity)?;
                Some(s.swap_remove(i))
            })
            .unwrap_or_else(|| Box::new_uninit_slice(capacity))
    }

    pub fn give(buf: Box<[MaybeUninit<u8>]>) {
        STOCK.with(|s| {
            let mut s = s.borrow_mut();
            let held: usize = s.iter().map(|b| b.len()).sum();
            if held + buf.len() <= STOCK_BYTES {
                s.push(buf);
            }
        });
    }
}

#[cfg(test)]
mod tests;
