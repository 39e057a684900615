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
//! `queued ≤ bound` holds at every instant. Its buffer is taken from a small per-thread
//! pool when the source has data and given back as soon as it is empty and the source
//! has nothing more, so an idle connection holds no buffer at all.
//!
//! # Counting a byte once
//!
//! A byte is counted in `sluice_queued_bytes` from the read that brought it in until the
//! write that handed it to the destination's kernel; `sluice_bytes_total` counts it at
//! that write. The relay batches both per poll, not per syscall.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::task::{Context, Poll};
use std::time::Duration;

use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::metrics::{DirectionMetrics, Metrics};

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

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Reading from the source while there is room; writing what is queued.
    Streaming,
    /// The queue filled and the destination would not take more: no reading until the
    /// queue falls to the resume mark. `since` is on the metrics clock.
    Paused { since: f64 },
    /// The source sent EOF; writing out what is queued before passing the EOF on.
    Flushing,
    /// EOF passed on (or never will be): nothing more to do.
    Done,
}

/// A direction's queue: `data[head..tail]` is queued. `data` exists only while
/// something is queued or being read.
#[derive(Default)]
struct Queue {
    data: Option<Box<[u8]>>,
    head: usize,
    tail: usize,
}

impl Queue {
    fn len(&self) -> usize {
        self.tail - self.head
    }

    /// Room to read into, at most `room` bytes, taking a buffer of `capacity` from the
    /// pool if there is none and moving queued bytes to the front if they are in the way.
    fn spare(&mut self, capacity: usize, room: usize) -> &mut [u8] {
        let data = self.data.get_or_insert_with(|| pool::take(capacity));
        if self.head > 0 {
            data.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        let end = (self.tail + room).min(data.len());
        &mut data[self.tail..end]
    }

    fn queued(&self) -> &[u8] {
        match &self.data {
            Some(d) => &d[self.head..self.tail],
            None => &[],
        }
    }

    fn consume(&mut self, n: usize) {
        self.head += n;
        debug_assert!(self.head <= self.tail);
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        }
    }

    /// Gives the buffer back if nothing is queued.
    fn release_if_empty(&mut self) {
        if self.len() == 0
            && let Some(d) = self.data.take()
        {
            pool::give(d);
        }
    }
}

/// One direction: a source, a bounded queue, a destination.
struct Direction {
    state: State,
    queue: Queue,
    /// Most bytes this direction may hold.
    bound: usize,
    /// A paused direction reads again at or below this many queued bytes.
    resume: usize,
    /// Bytes delivered to the destination.
    delivered: u64,
    pauses: u64,
    /// What the metrics have been told so far, so updates can be batched per poll.
    reported_queued: usize,
    reported_delivered: u64,
}

/// Progress one poll of a direction made.
enum Step {
    /// Nothing more can happen until a waker fires.
    Blocked,
    /// The direction passed its EOF on and is finished.
    Done,
}

impl Direction {
    fn new(bound: usize, resume_at: f64) -> Direction {
        let resume = ((bound as f64 * resume_at) as usize).min(bound.saturating_sub(1));
        Direction {
            state: State::Streaming,
            queue: Queue::default(),
            bound,
            resume,
            delivered: 0,
            pauses: 0,
            reported_queued: 0,
            reported_delivered: 0,
        }
    }

    /// Moves bytes from `src` to `dst` until both would block.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut ReadHalf<'_>,
        dst: &mut WriteHalf<'_>,
        m: &DirectionMetrics,
        clock: &Metrics,
        moved: &mut bool,
    ) -> Result<Step, (bool, io::Error)> {
        // Bounded so one busy connection cannot starve the others on this worker.
        for _ in 0..32 {
            if self.state == State::Done {
                return Ok(Step::Done);
            }
            let mut progress = false;

            if self.state == State::Streaming && self.queue.len() < self.bound {
                // Without a buffer, wait for the source to have something before taking
                // one, so an idle direction holds no memory.
                let ready = self.queue.data.is_some()
                    || match src.as_ref().poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => true,
                        Poll::Ready(Err(e)) => return Err((true, e)),
                        Poll::Pending => false,
                    };
                if ready {
                    let room = self.bound - self.queue.len();
                    let mut buf = ReadBuf::new(self.queue.spare(self.bound, room));
                    // tokio's poll_read clears readiness after a short read, which saves
                    // the read that would only say "would block".
                    match Pin::new(&mut *src).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) => {
                            let n = buf.filled().len();
                            if n == 0 {
                                self.state = State::Flushing;
                            } else {
                                self.queue.tail += n;
                                debug_assert!(self.queue.len() <= self.bound);
                                *moved = true;
                            }
                            progress = true;
                        }
                        Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {
                            progress = true
                        }
                        Poll::Ready(Err(e)) => return Err((true, e)),
                        Poll::Pending => {}
                    }
                }
            }

            if self.queue.len() > 0 {
                match Pin::new(&mut *dst).poll_write(cx, self.queue.queued()) {
                    Poll::Ready(Ok(0)) => return Err((false, io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.queue.consume(n);
                        self.delivered += n as u64;
                        *moved = true;
                        progress = true;
                        if let State::Paused { since } = self.state
                            && self.queue.len() <= self.resume
                        {
                            self.state = State::Streaming;
                            m.drains.increment(1);
                            m.paused.stop(since, clock.now());
                        }
                    }
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {
                        progress = true
                    }
                    Poll::Ready(Err(e)) => return Err((false, e)),
                    Poll::Pending => {}
                }
            }

            if self.state == State::Flushing && self.queue.len() == 0 {
                self.queue.release_if_empty();
                self.state = State::Done;
                let shut = socket2::SockRef::from(dst.as_ref()).shutdown(std::net::Shutdown::Write);
                return match shut {
                    Ok(()) => Ok(Step::Done),
                    Err(e) => Err((false, e)),
                };
            }

            if !progress {
                if self.state == State::Streaming && self.queue.len() >= self.bound {
                    let now = clock.now();
                    self.state = State::Paused { since: now };
                    self.pauses += 1;
                    m.pauses.increment(1);
                    m.paused.start(now);
                }
                self.queue.release_if_empty();
                return Ok(Step::Blocked);
            }
        }
        // Budget spent with work left: yield, and come back at once.
        cx.waker().wake_by_ref();
        Ok(Step::Blocked)
    }

    /// Tells the metrics what changed since the last report.
    fn report(&mut self, m: &DirectionMetrics) {
        let queued = self.queue.len();
        if queued != self.reported_queued {
            m.queued
                .increment(queued as f64 - self.reported_queued as f64);
            self.reported_queued = queued;
        }
        if self.delivered != self.reported_delivered {
            m.bytes.increment(self.delivered - self.reported_delivered);
            self.reported_delivered = self.delivered;
        }
    }

    /// Ends the direction for good: reports, ends a running pause, drops the queue.
    fn finish(&mut self, m: &DirectionMetrics, clock: &Metrics) {
        self.report(m);
        if let State::Paused { since } = self.state {
            m.paused.stop(since, clock.now());
        }
        self.state = State::Done;
        if self.reported_queued > 0 {
            m.queued.decrement(self.reported_queued as f64);
            self.reported_queued = 0;
        }
        self.queue.head = 0;
        self.queue.tail = 0;
        self.queue.release_if_empty();
    }
}

/// Both directions of one connection, with the metrics they report to.
///
/// Dropping it (an early return, a panic, a cancelled task) still returns every gauge
/// it raised: queued bytes and running pauses.
pub struct Relay<'a> {
    client: (ReadHalf<'a>, WriteHalf<'a>),
    upstream: (ReadHalf<'a>, WriteHalf<'a>),
    metrics: &'a Metrics,
    dirs: [Direction; 2],
    /// When a byte last moved either way, for the idle timeout.
    last_moved: Instant,
    /// Whether the caller has been told that one direction finished.
    half_reported: bool,
    /// Timeouts the run enforces.
    idle: Duration,
    half_close: Duration,
}

impl<'a> Relay<'a> {
    pub fn new(
        client: &'a mut TcpStream,
        upstream: &'a mut TcpStream,
        config: &RelayConfig,
        metrics: &'a Metrics,
    ) -> Relay<'a> {
        Relay {
            client: client.split(),
            upstream: upstream.split(),
            metrics,
            dirs: [
                Direction::new(config.bounds[0], config.resume_at),
                Direction::new(config.bounds[1], config.resume_at),
            ],
            last_moved: Instant::now(),
            half_reported: false,
            idle: config.idle,
            half_close: config.half_close,
        }
    }

    /// Runs until both directions are done, a socket fails, a timeout fires, or
    /// `shutdown` is cancelled.
    pub async fn run(&mut self, shutdown: &CancellationToken) -> Ending {
        let far = Duration::from_secs(86400 * 365);
        let idle = if self.idle.is_zero() { far } else { self.idle };
        let idle_timer = sleep_until(self.last_moved + idle);
        let half_timer = sleep_until(self.last_moved + far);
        tokio::pin!(idle_timer, half_timer);
        let mut half_closed = false;
        loop {
            let event = tokio::select! {
                biased;
                e = poll_fn(|cx| self.poll_step(cx)) => e,
                _ = &mut idle_timer => {
                    // The timer is not moved per byte; on firing, see whether bytes moved since.
                    let quiet_until = self.last_moved + idle;
                    if quiet_until <= Instant::now() {
                        return Ending::IdleTimeout;
                    }
                    idle_timer.as_mut().reset(quiet_until);
                    continue;
                }
                _ = &mut half_timer, if half_closed => return Ending::HalfCloseTimeout,
                _ = shutdown.cancelled() => return Ending::Shutdown,
            };
            match event {
                Event::Finished => return Ending::Complete,
                Event::Failed(ending) => return ending,
                Event::HalfClosed => {
                    if !half_closed && !self.half_close.is_zero() {
                        half_closed = true;
                        half_timer.as_mut().reset(Instant::now() + self.half_close);
                    }
                }
            }
        }
    }

    /// Polls both directions once; reports to the metrics before returning.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let m = self.metrics;
        let mut moved = false;
        let mut done = [false; 2];
        for i in [CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT] {
            let (src, dst) = if i == CLIENT_TO_UPSTREAM {
                (&mut self.client.0, &mut self.upstream.1)
            } else {
                (&mut self.upstream.0, &mut self.client.1)
            };
            let dm = &m.directions[i];
            let step = self.dirs[i].poll(cx, src, dst, dm, m, &mut moved);
            self.dirs[i].report(dm);
            match step {
                Ok(Step::Done) => done[i] = true,
                Ok(Step::Blocked) => {}
                Err((on_source, error)) => {
                    // Direction 0 reads the client; direction 1 reads the upstream.
                    let side = match (i, on_source) {
                        (CLIENT_TO_UPSTREAM, true) | (UPSTREAM_TO_CLIENT, false) => Side::Client,
                        _ => Side::Upstream,
                    };
                    let reset = is_reset(&error);
                    return Poll::Ready(Event::Failed(Ending::Failed { side, reset, error }));
                }
            }
        }
        if moved {
            self.last_moved = Instant::now();
        }
        match done {
            [true, true] => Poll::Ready(Event::Finished),
            [true, false] | [false, true] if !self.half_reported => {
                self.half_reported = true;
                Poll::Ready(Event::HalfClosed)
            }
            _ => Poll::Pending,
        }
    }

    /// What the relay did; call after [`Relay::run`].
    pub fn totals(&self) -> Totals {
        Totals {
            bytes: [self.dirs[0].delivered, self.dirs[1].delivered],
            pauses: [self.dirs[0].pauses, self.dirs[1].pauses],
            queued: [self.dirs[0].queue.len(), self.dirs[1].queue.len()],
            finished: [
                self.dirs[0].state == State::Done,
                self.dirs[1].state == State::Done,
            ],
        }
    }
}

enum Event {
    Finished,
    HalfClosed,
    Failed(Ending),
}

impl Drop for Relay<'_> {
    fn drop(&mut self) {
        for (d, dm) in self.dirs.iter_mut().zip(&self.metrics.directions) {
            d.finish(dm, self.metrics);
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
/// does not pay for an allocation (and its zeroing) each time.
mod pool {
    use super::*;

    /// Most bytes a thread keeps in stock: a fixed cost, not a per-connection one.
    const STOCK_BYTES: usize = 1 << 20;

    thread_local! {
        static STOCK: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    }

    pub fn take(capacity: usize) -> Box<[u8]> {
        STOCK
            .with(|s| {
                let mut s = s.borrow_mut();
                let i = s.iter().rposition(|b| b.len() == capacity)?;
                Some(s.swap_remove(i))
            })
            .unwrap_or_else(|| vec![0u8; capacity].into_boxed_slice())
    }

    pub fn give(buf: Box<[u8]>) {
        STOCK.with(|s| {
            let mut s = s.borrow_mut();
            let held: usize = s.iter().map(|b| b.len()).sum();
            if held + buf.len() <= STOCK_BYTES {
                s.push(buf);
            }
        });
    }
}
