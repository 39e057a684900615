//! Unit tests of a direction's states with in-memory I/O.
//!
//! A [`Direction`] is driven by hand, one `poll_transfer` at a time, between a scripted
//! source and a scripted sink: the test decides what the source has, how much the sink
//! takes, and when either ends or fails. No sockets, no sleeps, no timing. The tests run
//! outside a runtime, where tokio's cooperative budget is unconstrained, so every
//! `Pending` comes from the scripted I/O; the one test about the budget runs inside one.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::Waker;

use super::*;
use crate::metrics::{DIRECTIONS, names};

/// Bound used by most tests: small, so wrap-around and full queues are a few bytes away.
const BOUND: usize = 8;
/// With [`BOUND`], a paused direction reads again at 4 queued bytes.
const RESUME_AT: f64 = 0.5;

/// A source whose data arrives in chunks the test pushes.
#[derive(Default)]
struct ScriptedSource {
    chunks: VecDeque<Vec<u8>>,
    /// The test closed it: once the chunks are read, reads return EOF.
    closed: bool,
    /// The next poll (readiness or read) fails with this.
    error: Option<io::ErrorKind>,
    /// Calls to `poll_read`.
    reads: usize,
    /// Calls to `poll_readable`.
    readiness_polls: usize,
    /// The room each `poll_read` was offered (`ReadBuf::remaining`), whether or not it
    /// found data.
    offered: Vec<usize>,
    /// Bytes handed out so far.
    handed_out: u64,
    /// Shared with a sink to check every read against the room left; see [`linked`].
    room_check: Option<(usize, Rc<Cell<u64>>)>,
    waker: Option<Waker>,
}

impl ScriptedSource {
    fn push(&mut self, bytes: &[u8]) {
        self.chunks.push_back(bytes.to_vec());
    }

    fn close(&mut self) {
        self.closed = true;
    }

    fn fail(&mut self, kind: io::ErrorKind) {
        self.error = Some(kind);
    }

    fn pending_bytes(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }
}

impl AsyncRead for ScriptedSource {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.reads += 1;
        this.offered.push(buf.remaining());
        // A zero-length read would come back empty, which looks like EOF.
        assert!(buf.remaining() > 0, "read offered no room");
        if let Some((bound, delivered)) = &this.room_check {
            let queued = (this.handed_out - delivered.get()) as usize;
            assert!(
                buf.remaining() <= bound - queued,
                "read offered {} bytes with {queued} of {bound} queued",
                buf.remaining()
            );
        }
        if let Some(kind) = this.error {
            return Poll::Ready(Err(kind.into()));
        }
        if let Some(chunk) = this.chunks.front_mut() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                this.chunks.pop_front();
            }
            this.handed_out += n as u64;
            return Poll::Ready(Ok(()));
        }
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        this.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Source for ScriptedSource {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.readiness_polls += 1;
        if let Some(kind) = self.error {
            return Poll::Ready(Err(kind.into()));
        }
        if !self.chunks.is_empty() || self.closed {
            return Poll::Ready(Ok(()));
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A sink that takes at most the room the test gives it, and records what it got.
#[derive(Default)]
struct ScriptedSink {
    written: Vec<u8>,
    /// Bytes it will still take; `Pending` at zero.
    room: usize,
    /// Most bytes one write takes, to force partial writes with room to spare.
    max_write: Option<usize>,
    /// The next write or shutdown fails with this.
    error: Option<io::ErrorKind>,
    /// The next write returns `Ok(0)`.
    write_zero: bool,
    /// Each write spends tokio's cooperative budget, as a socket's does.
    spend_budget: bool,
    /// Calls to `poll_write` and `poll_write_vectored`.
    writes: usize,
    /// For each `poll_write_vectored` that took bytes, the lengths of the slices offered.
    vectored: Vec<Vec<usize>>,
    shutdowns: usize,
    /// Shared with a source; see [`linked`].
    delivered: Rc<Cell<u64>>,
    waker: Option<Waker>,
}

impl ScriptedSink {
    fn give(&mut self, room: usize) {
        self.room += room;
    }

    fn fail(&mut self, kind: io::ErrorKind) {
        self.error = Some(kind);
    }

    fn take(&mut self, cx: &mut Context<'_>, bufs: &[&[u8]]) -> Poll<io::Result<usize>> {
        self.writes += 1;
        let coop = match self.spend_budget {
            true => Some(ready!(tokio::task::coop::poll_proceed(cx))),
            false => None,
        };
        if let Some(kind) = self.error {
            return Poll::Ready(Err(kind.into()));
        }
        if self.write_zero {
            return Poll::Ready(Ok(0));
        }
        if self.room == 0 {
            self.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut left = self.room.min(self.max_write.unwrap_or(usize::MAX));
        let mut n = 0;
        for buf in bufs {
            let k = buf.len().min(left);
            self.written.extend_from_slice(&buf[..k]);
            left -= k;
            n += k;
        }
        self.room -= n;
        self.delivered.set(self.delivered.get() + n as u64);
        if let Some(coop) = coop {
            coop.made_progress();
        }
        Poll::Ready(Ok(n))
    }
}

/// No socket underneath: a scripted direction always copies.
impl Sink for ScriptedSink {}

impl AsyncWrite for ScriptedSink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.take(cx, &[buf])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let lens = bufs.iter().map(|b| b.len()).collect();
        let bufs: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
        let took = self.take(cx, &bufs);
        if matches!(took, Poll::Ready(Ok(n)) if n > 0) {
            self.vectored.push(lens);
        }
        took
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shutdowns += 1;
        match self.error {
            Some(kind) => Poll::Ready(Err(kind.into())),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// A source and a sink that share the count of delivered bytes, so the source can check
/// every read it is offered against the room the direction has left.
fn linked(bound: usize) -> (ScriptedSource, ScriptedSink) {
    let delivered = Rc::new(Cell::new(0));
    let src = ScriptedSource {
        room_check: Some((bound, delivered.clone())),
        ..Default::default()
    };
    let dst = ScriptedSink {
        delivered,
        ..Default::default()
    };
    (src, dst)
}

/// One `poll_transfer` with a no-op waker; checks the bound and the byte accounting.
fn poll(
    dir: &mut Direction,
    src: &mut ScriptedSource,
    dst: &mut ScriptedSink,
) -> Poll<Result<(), Failure>> {
    let mut cx = Context::from_waker(Waker::noop());
    let step = dir.poll_transfer(&mut cx, src, dst);
    assert!(
        dir.queue.len() <= dir.bound,
        "{} bytes queued over a bound of {}",
        dir.queue.len(),
        dir.bound
    );
    assert_eq!(
        dir.received, src.handed_out,
        "received = bytes the source gave"
    );
    assert_eq!(
        dir.delivered,
        dst.written.len() as u64,
        "delivered = bytes written"
    );
    assert_eq!(
        dir.received - dir.delivered,
        dir.queue.len() as u64,
        "queued = received - delivered"
    );
    step
}

fn expect_pending(step: Poll<Result<(), Failure>>) {
    match step {
        Poll::Pending => {}
        Poll::Ready(r) => panic!("expected Pending, got Ready({r:?})"),
    }
}

fn expect_failure(step: Poll<Result<(), Failure>>) -> Failure {
    match step {
        Poll::Ready(Err(f)) => f,
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// `len` bytes of a pattern that does not repeat with the ring's period.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// A direction paused on a full queue: `BOUND` bytes queued, the sink blocked, the
/// source empty and still open.
fn paused() -> (Direction, ScriptedSource, ScriptedSink) {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    src.push(&pattern(BOUND));
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(dir.state, State::Paused);
    (dir, src, dst)
}

// --- Ring ------------------------------------------------------------------------------

/// Writes `bytes` at the start of a free run, as a read would.
fn write(free: &mut [MaybeUninit<u8>], bytes: &[u8]) {
    assert!(bytes.len() <= free.len(), "more bytes than room");
    for (slot, b) in free.iter_mut().zip(bytes) {
        slot.write(*b);
    }
}

#[test]
fn ring_without_buffer_is_empty() {
    let mut ring = Ring::default();
    assert_eq!(ring.len(), 0);
    assert_eq!(ring.queued(), (&[][..], &[][..]));
    ring.release_if_empty();
    assert!(ring.data.is_none());
}

#[test]
fn ring_fills_wraps_and_empties() {
    let mut ring = Ring::default();
    // Empty: the whole ring is one free run.
    let free = ring.free(8);
    assert_eq!(free.len(), 8);
    write(free, b"abcdefgh");
    ring.commit(8);
    // Full: no room at all, everything queued in one run.
    assert_eq!(ring.free(8).len(), 0);
    assert_eq!(ring.queued(), (&b"abcdefgh"[..], &[][..]));

    // Five written out: the free run is the front of the ring, up to the queued bytes.
    ring.consume(5);
    assert_eq!(ring.len(), 3);
    assert_eq!(ring.queued(), (&b"fgh"[..], &[][..]));
    let free = ring.free(8);
    assert_eq!(free.len(), 5);
    write(free, b"ijkl");
    ring.commit(4);
    // Wrapped: two runs, in order, and one free byte before the queued ones.
    assert_eq!(ring.queued(), (&b"fgh"[..], &b"ijkl"[..]));
    let free = ring.free(8);
    assert_eq!(free.len(), 1);
    write(free, b"m");
    ring.commit(1);
    // Full and wrapped.
    assert_eq!(ring.len(), 8);
    assert_eq!(ring.free(8).len(), 0);
    assert_eq!(ring.queued(), (&b"fgh"[..], &b"ijklm"[..]));

    // Consuming the first run exactly leaves the second as the only one.
    ring.consume(3);
    assert_eq!(ring.queued(), (&b"ijklm"[..], &[][..]));
    // The free run after the queued bytes goes to the end of the ring.
    let free = ring.free(8);
    assert_eq!(free.len(), 3);
    write(free, b"nop");
    ring.commit(3);
    ring.consume(6);
    assert_eq!(ring.queued(), (&b"op"[..], &[][..]));

    // Empty again: back to the front, the whole ring free in one run.
    ring.consume(2);
    assert_eq!(ring.len(), 0);
    assert_eq!(ring.queued(), (&[][..], &[][..]));
    assert_eq!(ring.free(8).len(), 8);
    ring.release_if_empty();
    assert!(ring.data.is_none());
}

#[test]
fn ring_keeps_its_buffer_while_bytes_are_queued() {
    let mut ring = Ring::default();
    write(ring.free(8), b"xyz");
    ring.commit(3);
    ring.release_if_empty();
    assert!(ring.data.is_some());
    assert_eq!(ring.queued(), (&b"xyz"[..], &[][..]));
    ring.clear();
    assert!(ring.data.is_none());
    assert_eq!(ring.len(), 0);
    assert_eq!(ring.queued(), (&[][..], &[][..]));
}

#[test]
fn ring_wrapped_free_run_stops_at_the_queued_bytes() {
    let mut ring = Ring::default();
    write(ring.free(8), b"01234567");
    ring.commit(8);
    ring.consume(6);
    // head 6, two queued; the tail is at the ring's end, so the free run is 0..6.
    let free = ring.free(8);
    assert_eq!(free.len(), 6);
    write(free, b"89");
    ring.commit(2);
    // head 6, four queued, wrapped: the free run is 2..6.
    assert_eq!(ring.free(8).len(), 4);
    assert_eq!(ring.queued(), (&b"67"[..], &b"89"[..]));
}

// --- Bytes in order --------------------------------------------------------------------

#[test]
fn bytes_arrive_intact_across_many_chunks_and_wraps() {
    let bound = 16;
    let mut dir = Direction::new(bound, RESUME_AT);
    let (mut src, mut dst) = linked(bound);
    let data = pattern(5000);
    // A fixed pseudo-random script: chunk sizes and sink room vary, so the queue fills,
    // empties partly and wraps in every position.
    let mut seed: u32 = 0x2545_f491;
    let mut next = |n: usize| {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 16) as usize % n
    };
    let mut sent = 0;
    while sent < data.len() {
        let chunk = (1 + next(23)).min(data.len() - sent);
        src.push(&data[sent..sent + chunk]);
        sent += chunk;
        dst.give(next(20));
        expect_pending(poll(&mut dir, &mut src, &mut dst));
    }
    src.close();
    let mut polls = 0;
    loop {
        dst.give(1 + next(20));
        if let Poll::Ready(r) = poll(&mut dir, &mut src, &mut dst) {
            r.expect("no failure");
            break;
        }
        polls += 1;
        assert!(polls < 10_000, "never finished");
    }
    assert_eq!(dst.written, data);
    assert_eq!(dst.shutdowns, 1);
    assert!(
        dst.vectored.iter().any(|v| v.len() == 2),
        "the script never wrapped the queue"
    );
    assert!(dir.pauses > 0, "the script never filled the queue");
}

#[test]
fn wrapped_queue_goes_out_in_one_vectored_write() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    src.push(b"abcdef");
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    // Four written (a plain write: nothing wraps yet); "ef" left at 4..6.
    dst.give(4);
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(dst.written, b"abcd");
    assert!(dst.vectored.is_empty());
    // Four more arrive: two fill 6..8, two wrap to 0..2.
    src.push(b"ghij");
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(dir.queue.queued(), (&b"efgh"[..], &b"ij"[..]));
    dst.give(100);
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(dst.written, b"abcdefghij");
    assert_eq!(dst.vectored, vec![vec![4, 2]]);
    assert_eq!(dir.state, State::Streaming);
}

#[test]
fn partial_writes_deliver_every_byte_in_order() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    // Plenty of room, but at most three bytes per write.
    dst.max_write = Some(3);
    dst.give(1000);
    let data = pattern(100);
    for chunk in data.chunks(7) {
        src.push(chunk);
    }
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(dst.written, data);
    assert!(dst.writes >= 100 / 3);
    assert_eq!(dir.pauses, 0);
    // Then a sink that takes one byte per poll.
    dst.max_write = None;
    dst.room = 0;
    let more = pattern(30);
    src.push(&more);
    src.close();
    let mut polls = 0;
    while poll(&mut dir, &mut src, &mut dst).is_pending() {
        dst.give(1);
        polls += 1;
        assert!(polls < 1000, "never finished");
    }
    assert_eq!(&dst.written[data.len()..], &more[..]);
}

// --- The bound -------------------------------------------------------------------------

#[test]
fn source_is_offered_only_the_room_left() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    src.push(b"12345");
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    // The whole ring for the first read; the room left (3) for the one that found the
    // source empty.
    assert_eq!(src.offered, vec![BOUND, 3]);
    src.push(b"6789abcdef");
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    // Still three bytes of room, three offered; the rest waits in the source.
    assert_eq!(src.offered, vec![BOUND, 3, 3]);
    assert_eq!(dir.queue.len(), BOUND);
    assert_eq!(src.pending_bytes(), 7);
}

#[test]
fn full_queue_never_reads() {
    let (mut dir, mut src, mut dst) = paused();
    let reads = src.reads;
    src.push(b"more data");
    for _ in 0..3 {
        expect_pending(poll(&mut dir, &mut src, &mut dst));
    }
    assert_eq!(src.reads, reads, "a full queue asked the source for more");
    assert_eq!(
        src.readiness_polls, 1,
        "only the first read waited for readiness"
    );
    assert_eq!(src.pending_bytes(), 9);
}

// --- Pauses ----------------------------------------------------------------------------

#[test]
fn full_queue_with_a_sink_that_takes_it_does_not_pause() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    dst.give(1000);
    // Each chunk fills the queue at once.
    for _ in 0..5 {
        src.push(&pattern(BOUND));
    }
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert!(src.offered.iter().all(|&n| n == BOUND));
    assert_eq!(dst.written.len(), 5 * BOUND);
    assert_eq!(dir.state, State::Streaming);
    assert_eq!(dir.pauses, 0);
    assert_eq!(dir.transitions, Transitions::default());
}

#[test]
fn blocked_sink_with_room_left_does_not_pause() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    src.push(&pattern(BOUND - 1));
    for _ in 0..3 {
        expect_pending(poll(&mut dir, &mut src, &mut dst));
    }
    assert_eq!(dir.queue.len(), BOUND - 1);
    assert_eq!(dir.state, State::Streaming);
    assert_eq!(dir.pauses, 0);
    assert_eq!(dir.transitions, Transitions::default());
}

#[test]
fn full_queue_and_blocked_sink_pause_once() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    assert!(tokio::task::coop::has_budget_remaining());
    src.push(&pattern(3 * BOUND));
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(dir.state, State::Paused);
    assert_eq!(dir.pauses, 1);
    assert_eq!(
        dir.transitions,
        Transitions {
            paused: true,
            resumed: false,
            waited: false
        }
    );
    let reads = src.reads;
    for _ in 0..3 {
        expect_pending(poll(&mut dir, &mut src, &mut dst));
    }
    assert_eq!(dir.state, State::Paused);
    assert_eq!(dir.pauses, 1, "a pause that goes on is still one pause");
    assert_eq!(src.reads, reads, "a paused direction read");
    assert_eq!(src.pending_bytes(), 2 * BOUND);
}

/// Inside a runtime: a sink that says `Pending` only because the task's budget ran out
/// is a yield, not a pause; with budget left, the same full queue pauses.
#[tokio::test(flavor = "current_thread")]
async fn spent_budget_is_a_yield_not_a_pause() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    dst.spend_budget = true;
    dst.max_write = Some(1);
    dst.give(1_000_000);
    src.push(&pattern(10_000));
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert!(!tokio::task::coop::has_budget_remaining());
    assert_eq!(dir.queue.len(), BOUND);
    assert_eq!(dir.state, State::Streaming);
    assert_eq!(dir.pauses, 0);
    assert_eq!(dir.transitions, Transitions::default());

    // A fresh budget, and a sink that is really full.
    tokio::task::yield_now().await;
    assert!(tokio::task::coop::has_budget_remaining());
    dst.room = 0;
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(dir.state, State::Paused);
    assert_eq!(dir.pauses, 1);
}

#[test]
fn drains_only_at_the_resume_mark() {
    let (mut dir, mut src, mut dst) = paused();
    assert_eq!(dir.resume, 4);
    dir.transitions = Transitions::default();
    let reads = src.reads;
    // 8 → 7 → 5: above the mark, still paused, nothing read.
    for (room, left) in [(1, 7), (2, 5)] {
        dst.give(room);
        expect_pending(poll(&mut dir, &mut src, &mut dst));
        assert_eq!(dir.queue.len(), left);
        assert_eq!(dir.state, State::Paused);
        assert!(!dir.transitions.resumed);
        assert_eq!(src.reads, reads);
    }
    // 5 → 4: at the mark, streaming again, and reading (the source has nothing).
    dst.give(1);
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(dir.queue.len(), 4);
    assert_eq!(dir.state, State::Streaming);
    assert_eq!(
        dir.transitions,
        Transitions {
            resumed: true,
            paused: false,
            waited: false
        }
    );
    assert_eq!(dir.pauses, 1);
    assert_eq!(src.reads, reads + 1);
}

#[test]
fn drain_in_one_write_below_the_mark_then_refill_pauses_again() {
    let (mut dir, mut src, mut dst) = paused();
    dir.transitions = Transitions::default();
    src.push(&pattern(20));
    // 8 → 2: the drain reads again, into the room left (6 bytes, wrapping), fills the
    // queue, and the sink is blocked again: a second pause.
    dst.give(6);
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(dir.state, State::Paused);
    assert_eq!(dir.pauses, 2);
    assert_eq!(
        dir.transitions,
        Transitions {
            resumed: true,
            paused: true,
            waited: false
        }
    );
    assert_eq!(dir.queue.len(), BOUND);
    assert_eq!(src.pending_bytes(), 14);
    assert_eq!(src.offered[1..], [6]);
}

// --- EOF -------------------------------------------------------------------------------

#[test]
fn eof_on_an_empty_queue_shuts_the_sink_down() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    src.close();
    assert!(matches!(
        poll(&mut dir, &mut src, &mut dst),
        Poll::Ready(Ok(()))
    ));
    assert_eq!(dir.state, State::Done);
    assert_eq!(dst.shutdowns, 1);
    assert!(dst.written.is_empty());
    assert!(dir.queue.data.is_none());
    // Done stays done, without touching either end again.
    let (reads, writes) = (src.reads, dst.writes);
    assert!(poll(&mut dir, &mut src, &mut dst).is_ready());
    assert_eq!((src.reads, dst.writes, dst.shutdowns), (reads, writes, 1));
}

#[test]
fn eof_is_passed_on_only_after_a_slow_sink_took_everything() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    let data = b"hello, world";
    src.push(data);
    src.close();
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(dst.shutdowns, 0);
    let mut polls = 0;
    loop {
        dst.give(1);
        match poll(&mut dir, &mut src, &mut dst) {
            Poll::Ready(r) => {
                r.expect("no failure");
                break;
            }
            Poll::Pending => {
                assert_eq!(dst.shutdowns, 0, "shut down with bytes still queued");
                assert_ne!(dir.state, State::Done);
            }
        }
        polls += 1;
        assert!(polls < 100, "never finished");
    }
    assert_eq!(dst.written, data);
    assert_eq!(dst.shutdowns, 1);
    assert_eq!(dir.state, State::Done);
    assert!(dir.queue.data.is_none());
}

#[test]
fn eof_with_bytes_queued_and_a_blocked_sink_is_flushing() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    src.push(b"abc");
    src.close();
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(dir.state, State::Flushing);
    assert_eq!(dst.shutdowns, 0);
    let reads = src.reads;
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(src.reads, reads, "read again after EOF");
    dst.give(3);
    assert!(matches!(
        poll(&mut dir, &mut src, &mut dst),
        Poll::Ready(Ok(()))
    ));
    assert_eq!(dst.written, b"abc");
    assert_eq!(dst.shutdowns, 1);
}

// --- Errors ----------------------------------------------------------------------------

#[test]
fn idle_source_error_is_the_source_end() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    src.fail(io::ErrorKind::ConnectionReset);
    let f = expect_failure(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(f.end, End::Source);
    assert_eq!(f.error.kind(), io::ErrorKind::ConnectionReset);
}

#[test]
fn read_error_with_bytes_queued_is_the_source_end() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    src.push(b"abc");
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    src.fail(io::ErrorKind::ConnectionAborted);
    let f = expect_failure(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(f.end, End::Source);
    assert_eq!(f.error.kind(), io::ErrorKind::ConnectionAborted);
    assert_eq!(
        src.readiness_polls, 1,
        "the error came from the read itself"
    );
}

#[test]
fn write_error_is_the_destination_end() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    src.push(b"abc");
    dst.fail(io::ErrorKind::BrokenPipe);
    let f = expect_failure(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(f.end, End::Destination);
    assert_eq!(f.error.kind(), io::ErrorKind::BrokenPipe);
}

#[test]
fn write_of_zero_bytes_is_the_destination_end() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    src.push(b"abc");
    dst.write_zero = true;
    let f = expect_failure(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(f.end, End::Destination);
    assert_eq!(f.error.kind(), io::ErrorKind::WriteZero);
}

#[test]
fn shutdown_error_is_the_destination_end() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    src.push(b"abc");
    dst.give(3);
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    dst.fail(io::ErrorKind::NotConnected);
    src.close();
    let f = expect_failure(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(f.end, End::Destination);
    assert_eq!(f.error.kind(), io::ErrorKind::NotConnected);
    assert_eq!(dst.shutdowns, 1);
    assert_eq!(dst.written, b"abc");
}

// --- Memory ----------------------------------------------------------------------------

#[test]
fn idle_direction_holds_no_buffer() {
    let mut dir = Direction::new(BOUND, RESUME_AT);
    let (mut src, mut dst) = linked(BOUND);
    for _ in 0..3 {
        expect_pending(poll(&mut dir, &mut src, &mut dst));
        assert!(dir.queue.data.is_none());
    }
    assert_eq!(src.reads, 0, "read without the source being readable");
    assert_eq!(src.readiness_polls, 3);

    // Data that goes straight through: the buffer goes back in the same poll.
    src.push(b"abc");
    dst.give(3);
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(dst.written, b"abc");
    assert!(dir.queue.data.is_none());

    // Data the sink cannot take yet: the buffer stays while it is queued...
    src.push(b"def");
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert!(dir.queue.data.is_some());
    // ...and goes back once the queue empties and the source has nothing more.
    dst.give(3);
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    assert_eq!(dst.written, b"abcdef");
    assert!(dir.queue.data.is_none());
}

// --- Metrics ---------------------------------------------------------------------------

/// The value of `name{direction="..."}` in a Prometheus text exposition.
fn sample(text: &str, name: &str, direction: usize) -> f64 {
    let prefix = format!(
        "{name}{{service=\"test\",direction=\"{}\"}} ",
        DIRECTIONS[direction]
    );
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in\n{text}"));
    line[prefix.len()..].trim().parse().expect("a number")
}

/// Pauses, drains, queued bytes, paused directions and bytes delivered, in that order.
fn numbers(m: &Fixture, direction: usize) -> [f64; 5] {
    let text = m.render();
    [
        names::PAUSES_TOTAL,
        names::DRAINS_TOTAL,
        names::QUEUED_BYTES,
        names::PAUSED_CONNECTIONS,
        names::BYTES_TOTAL,
    ]
    .map(|name| sample(&text, name, direction))
}

/// A registry entry for a connection with no real sockets (nothing asks the kernel).
fn entry(m: &Fixture) -> crate::registry::Registered<'_> {
    m.all
        .connections
        .register("test".into(), "127.0.0.1:1".parse().unwrap(), -1)
}

/// A process's metrics with one service, `test`, whose series the tests read.
struct Fixture {
    all: Arc<crate::metrics::Metrics>,
    service: Arc<ServiceMetrics>,
}

impl Fixture {
    fn new() -> Fixture {
        let all = crate::metrics::Metrics::new();
        let service = all.service("test", [BOUND, BOUND]);
        Fixture { all, service }
    }

    fn render(&self) -> String {
        self.all.render()
    }
}

impl std::ops::Deref for Fixture {
    type Target = ServiceMetrics;
    fn deref(&self) -> &ServiceMetrics {
        &self.service
    }
}

/// Where a direction with no server attached reports.
fn to<'a>(metrics: &'a DirectionMetrics, live: &'a DirectionFigures) -> Reports<'a> {
    Reports {
        metrics,
        live,
        server: None,
    }
}

/// (queued, delivered, paused) as the connection's registry entry shows them.
fn entry_figures(e: &Entry, direction: usize) -> (u64, u64, bool) {
    let queued = e.directions[direction].queued.load(Relaxed);
    let delivered = e.directions[direction].delivered.load(Relaxed);
    (queued, delivered, e.directions[direction].is_paused())
}

#[test]
fn report_counts_a_pause_and_its_drain() {
    let m = Fixture::new();
    let e = entry(&m);
    let live = &e.directions[CLIENT_TO_UPSTREAM];
    let dm = &m.directions[CLIENT_TO_UPSTREAM];
    let (mut dir, mut src, mut dst) = paused();
    dir.report(to(dm, live));
    assert_eq!(numbers(&m, CLIENT_TO_UPSTREAM), [1.0, 0.0, 8.0, 1.0, 0.0]);
    assert_eq!(entry_figures(&e, CLIENT_TO_UPSTREAM), (8, 0, true));
    assert_eq!(dir.transitions, Transitions::default(), "report takes them");

    // Still paused: nothing new.
    dst.give(2);
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    dir.report(to(dm, live));
    assert_eq!(numbers(&m, CLIENT_TO_UPSTREAM), [1.0, 0.0, 6.0, 1.0, 2.0]);
    assert_eq!(entry_figures(&e, CLIENT_TO_UPSTREAM), (6, 2, true));

    // At the mark: a drain ends the pause.
    dst.give(2);
    expect_pending(poll(&mut dir, &mut src, &mut dst));
    dir.report(to(dm, live));
    assert_eq!(numbers(&m, CLIENT_TO_UPSTREAM), [1.0, 1.0, 4.0, 0.0, 4.0]);
    assert_eq!(entry_figures(&e, CLIENT_TO_UPSTREAM), (4, 4, false));
    // The other direction saw none of it.
    assert_eq!(numbers(&m, UPSTREAM_TO_CLIENT), [0.0; 5]);
    assert_eq!(entry_figures(&e, UPSTREAM_TO_CLIENT), (0, 0, false));

    // A report with nothing new changes nothing.
    dir.report(to(dm, live));
    assert_eq!(numbers(&m, CLIENT_TO_UPSTREAM), [1.0, 1.0, 4.0, 0.0, 4.0]);
}

#[test]
fn finish_returns_the_queued_gauge_and_ends_a_running_pause() {
    let m = Fixture::new();
    let e = entry(&m);
    let live = &e.directions[UPSTREAM_TO_CLIENT];
    let dm = &m.directions[UPSTREAM_TO_CLIENT];
    let (mut dir, _src, _dst) = paused();
    dir.report(to(dm, live));
    assert_eq!(numbers(&m, UPSTREAM_TO_CLIENT), [1.0, 0.0, 8.0, 1.0, 0.0]);
    dir.finish(to(dm, live));
    // The pause is counted, not drained; nothing is queued or paused any more.
    assert_eq!(numbers(&m, UPSTREAM_TO_CLIENT), [1.0, 0.0, 0.0, 0.0, 0.0]);
    assert_eq!(dir.state, State::Done);
    assert!(dir.queue.data.is_none());
    assert_eq!(dir.queue.len(), 0);
}

#[test]
fn finish_reports_what_no_report_has_seen_yet() {
    let m = Fixture::new();
    let e = entry(&m);
    let live = &e.directions[CLIENT_TO_UPSTREAM];
    let dm = &m.directions[CLIENT_TO_UPSTREAM];
    // Paused, never reported: finish counts the pause and still leaves no gauge raised.
    let (mut dir, _src, _dst) = paused();
    dir.finish(to(dm, live));
    assert_eq!(numbers(&m, CLIENT_TO_UPSTREAM), [1.0, 0.0, 0.0, 0.0, 0.0]);
    // Finishing twice (Drop after an explicit finish) changes nothing.
    dir.finish(to(dm, live));
    assert_eq!(numbers(&m, CLIENT_TO_UPSTREAM), [1.0, 0.0, 0.0, 0.0, 0.0]);
}

/// A budget whose queue pool holds exactly one `BOUND` buffer (16 bytes: 14 queue, 2
/// reserve, too little for a small buffer).
fn one_buffer_budget() -> Arc<Budget> {
    let gauges = crate::budget::BudgetGauges {
        limit: metrics::Gauge::noop(),
        used: metrics::Gauge::noop(),
    };
    Arc::new(Budget::new(2 * BOUND, gauges))
}

#[test]
fn a_direction_waits_in_line_for_the_budget_and_is_served_when_the_holder_empties() {
    let budget = one_buffer_budget();
    let mut a = Direction::new(BOUND, RESUME_AT).with_budget(budget.clone());
    let mut b = Direction::new(BOUND, RESUME_AT).with_budget(budget.clone());
    let (mut a_src, mut a_dst) = linked(BOUND);
    let (mut b_src, mut b_dst) = linked(BOUND);

    // A takes the one buffer and pauses on a blocked sink with more to read.
    a_src.push(&pattern(3 * BOUND));
    expect_pending(poll(&mut a, &mut a_src, &mut a_dst));
    assert_eq!(a.state, State::Paused);
    assert_eq!(budget.used(), BOUND);

    // B has bytes too, but the budget is spent: it lines up, neither reading nor pausing.
    b_src.push(b"hello");
    expect_pending(poll(&mut b, &mut b_src, &mut b_dst));
    assert_eq!((b.received, b.pauses), (0, 0));
    assert!(b.transitions.waited);
    assert!(b.queue.data.is_none(), "no buffer without a grant");
    assert!(budget.contended());

    // A's reader takes half: with someone in line, A does not read again at the resume
    // mark (as it would alone), only once it is empty.
    a_dst.give(BOUND / 2);
    expect_pending(poll(&mut a, &mut a_src, &mut a_dst));
    assert_eq!(a.state, State::Paused);
    assert_eq!(a.received, BOUND as u64);

    // Empty: A gives its buffer back and lines up behind B.
    a_dst.give(BOUND / 2);
    expect_pending(poll(&mut a, &mut a_src, &mut a_dst));
    assert_eq!(a.delivered, BOUND as u64);
    assert_eq!(a.received, BOUND as u64, "A waits for its next turn");
    assert!(a.grant.is_none() && a.in_line.is_some());
    assert!(budget.used() <= budget.limit());

    // B is served, reads and delivers.
    b_dst.give(64);
    expect_pending(poll(&mut b, &mut b_src, &mut b_dst));
    assert_eq!(b_dst.written, b"hello");
    // Empty and idle: B's buffer goes back at once and A's turn comes.
    assert!(b.grant.is_none());
    a_dst.give(64);
    expect_pending(poll(&mut a, &mut a_src, &mut a_dst));
    assert!(a.received > BOUND as u64, "A reads again");
    assert!(budget.used() <= budget.limit());
}

#[test]
fn finishing_a_direction_gives_its_grant_back_and_leaves_the_line() {
    let budget = one_buffer_budget();
    let m = Fixture::new();
    let e = entry(&m);
    let dm = &m.directions[CLIENT_TO_UPSTREAM];
    let mut a = Direction::new(BOUND, RESUME_AT).with_budget(budget.clone());
    let mut b = Direction::new(BOUND, RESUME_AT).with_budget(budget.clone());
    let (mut a_src, mut a_dst) = linked(BOUND);
    let (mut b_src, mut b_dst) = linked(BOUND);
    a_src.push(&pattern(BOUND));
    expect_pending(poll(&mut a, &mut a_src, &mut a_dst));
    b_src.push(b"x");
    expect_pending(poll(&mut b, &mut b_src, &mut b_dst));
    assert!(budget.contended());
    b.finish(to(dm, &e.directions[CLIENT_TO_UPSTREAM]));
    assert!(!budget.contended(), "a closed connection leaves the line");
    assert_eq!(
        sample(&m.render(), names::BUDGET_WAITS_TOTAL, CLIENT_TO_UPSTREAM),
        1.0
    );
    a.finish(to(dm, &e.directions[CLIENT_TO_UPSTREAM]));
    assert_eq!(budget.used(), 0, "bytes thrown away give their grant back");
}

#[test]
fn without_a_budget_in_force_a_direction_uses_its_own_bound() {
    let budget = one_buffer_budget();
    budget.resize(0);
    let mut a = Direction::new(BOUND, RESUME_AT).with_budget(budget.clone());
    let mut b = Direction::new(BOUND, RESUME_AT).with_budget(budget.clone());
    for dir in [&mut a, &mut b] {
        let (mut src, mut dst) = linked(BOUND);
        src.push(&pattern(BOUND));
        expect_pending(poll(dir, &mut src, &mut dst));
        assert_eq!(dir.state, State::Paused);
    }
    assert_eq!(budget.used(), 0);
}
