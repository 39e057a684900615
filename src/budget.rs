//! `buffer.total`: the most buffer memory all connections together may hold.
//!
//! # How it is shared
//!
//! A direction needs a buffer only while it has bytes queued (an idle one holds none), and
//! with a budget it must be granted one before it reads. The budget is split in two pools:
//!
//! - **The queue**: `total − reserve`. A grant is a buffer of the direction's bound, or
//!   of its fair share when more directions want one than the pool holds bounds for:
//!   the pool divided by the directions holding or waiting for a grant, rounded down to a
//!   power of two, at least [`SMALL`]. (Whole bounds for 900 of 8,000 slow readers would
//!   leave the other 7,100 with nothing for as long as the 900 take to drain theirs.)
//!   When the pool cannot grant at once, the direction waits in one FIFO queue with every
//!   other direction that could not (tokio's fair [`Semaphore`]), so no one starves. A
//!   direction holding a grant while others wait gives it back as soon as its queue is
//!   empty (a paused one does not read again until then), and queues again behind them.
//! - **The reserve**: `total / 8`. A direction whose source has at most [`SMALL`] bytes
//!   waiting when the queue pool cannot grant takes a [`SMALL`] buffer from the reserve
//!   instead, ahead of the queue: a new interactive client's request goes through at once
//!   even when slow readers hold the rest.
//!
//! So at most `total` bytes of buffers are granted at any instant (after a reload lowers
//! the total, grants above it are taken back as they are returned).
//!
//! # What the metrics show
//!
//! `sluice_budget_used_bytes` is the size of the buffers granted now (a granted buffer
//! counts whole, however much of it is filled); `sluice_budget_waits_total{direction}`
//! counts the times a direction had to queue.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use metrics::Gauge;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{AcquireError, Notify, OwnedSemaphorePermit, Semaphore};

/// The buffer size a reserve grant gives, and the most bytes a source may have waiting
/// for its direction to be served from the reserve: a request, a command, a keystroke.
pub const SMALL: usize = 4096;
/// The reserve is `total / RESERVE_SHARE`.
pub const RESERVE_SHARE: usize = 8;

/// The process-wide budget; `limit` 0 means no budget (every direction has its own
/// buffer whatever the others hold).
pub struct Budget {
    /// Grants of a bound or a fair share, waited for in FIFO order.
    queue: Pool,
    /// Small grants for small reads, never waited for.
    reserve: Pool,
    limit: AtomicUsize,
    /// Directions waiting in the queue pool now: a direction holding a grant gives it
    /// back at its next empty queue only when someone waits.
    waiting: Arc<AtomicUsize>,
    /// Size of the grants held now.
    used: AtomicUsize,
    /// Wakes the directions in line at every resize: one that asked for more than the
    /// queue pool now holds asks again (it would wait forever), and with the budget
    /// off, none waits at all.
    resized: Arc<Notify>,
    /// Grants from the queue pool held now: with `waiting`, the directions sharing it.
    holders: AtomicUsize,
    gauges: BudgetGauges,
}

/// `sluice_budget_limit_bytes` and `sluice_budget_used_bytes`.
pub struct BudgetGauges {
    pub limit: Gauge,
    pub used: Gauge,
}

/// One pool's bytes: a semaphore of one permit per byte.
struct Pool {
    permits: Arc<Semaphore>,
    /// The pool's size and what it still owes after a shrink.
    size: Mutex<Size>,
    /// Set while the pool owes permits, so a release takes the mutex only then.
    owing: AtomicBool,
}

#[derive(Default)]
struct Size {
    bytes: usize,
    /// Permits a shrink could not take back at once (they were granted); withheld from
    /// releases until paid.
    debt: usize,
}

/// Which pool a grant came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    Queue,
    Reserve,
}

/// Buffer bytes a direction holds from the budget; given back with [`Budget::release`].
#[derive(Debug, PartialEq, Eq)]
pub struct Grant {
    pub bytes: usize,
    pub from: From,
}

/// A direction's place in the queue pool's line; dropping it leaves the line.
pub struct Waiting {
    acquire: Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>,
    bytes: usize,
    /// The direction's bound, to ask again with after a resize.
    bound: usize,
    /// Fires at the budget's next resize.
    resized: Pin<Box<OwnedNotified>>,
    /// The budget's count of directions in line.
    line: Arc<AtomicUsize>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.line.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What asking for a grant came to.
pub enum Asked {
    Granted(Grant),
    /// In line: poll [`Budget::poll_wait`] with this until it grants.
    Queued(Waiting),
}

impl Pool {
    fn new(bytes: usize) -> Pool {
        Pool {
            permits: Arc::new(Semaphore::new(bytes)),
            size: Mutex::new(Size { bytes, debt: 0 }),
            owing: AtomicBool::new(false),
        }
    }

    fn try_take(&self, bytes: usize) -> bool {
        match self.permits.try_acquire_many(bytes as u32) {
            Ok(p) => {
                p.forget();
                true
            }
            Err(_) => false,
        }
    }

    fn give_back(&self, bytes: usize) {
        let mut bytes = bytes;
        if self.owing.load(Ordering::Acquire) {
            let mut size = self.size.lock().unwrap_or_else(|e| e.into_inner());
            let paid = size.debt.min(bytes);
            size.debt -= paid;
            bytes -= paid;
            self.owing.store(size.debt > 0, Ordering::Release);
        }
        if bytes > 0 {
            self.permits.add_permits(bytes);
        }
    }

    /// Grows or shrinks the pool to `bytes`; what a shrink cannot take back now (it is
    /// granted) is withheld from later releases.
    fn resize(&self, bytes: usize) {
        let mut size = self.size.lock().unwrap_or_else(|e| e.into_inner());
        if bytes >= size.bytes {
            let mut more = bytes - size.bytes;
            let paid = size.debt.min(more);
            size.debt -= paid;
            more -= paid;
            self.permits.add_permits(more);
        } else {
            let fewer = size.bytes - bytes;
            let taken = self.permits.forget_permits(fewer);
            size.debt += fewer - taken;
        }
        size.bytes = bytes;
        self.owing.store(size.debt > 0, Ordering::Release);
    }
}

impl Budget {
    /// A budget of `limit` bytes (0: none), reporting to `gauges`.
    pub fn new(limit: usize, gauges: BudgetGauges) -> Budget {
        let (queue, reserve) = split(limit);
        gauges.limit.set(limit as f64);
        gauges.used.set(0.0);
        Budget {
            queue: Pool::new(queue),
            reserve: Pool::new(reserve),
            limit: AtomicUsize::new(limit),
            waiting: Arc::default(),
            used: AtomicUsize::new(0),
            resized: Arc::new(Notify::new()),
            holders: AtomicUsize::new(0),
            gauges,
        }
    }

    /// Whether directions must be granted their buffers.
    pub fn enabled(&self) -> bool {
        self.limit() > 0
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Size of the grants held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether some direction waits in line for a grant.
    pub fn contended(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Puts a new limit in force (a reload): grants held stay valid; a lower limit is
    /// reached as they are given back.
    pub fn resize(&self, limit: usize) {
        let (queue, reserve) = split(limit);
        self.queue.resize(queue);
        self.reserve.resize(reserve);
        self.limit.store(limit, Ordering::Relaxed);
        self.gauges.limit.set(limit as f64);
        self.resized.notify_waiters();
    }

    /// A future that fires at the next resize, armed now.
    fn next_resize(&self) -> Pin<Box<OwnedNotified>> {
        let mut resized = Box::pin(self.resized.clone().notified_owned());
        resized.as_mut().enable();
        resized
    }

    /// The buffer a direction with bound `bound` is granted from the queue pool now: the
    /// bound, or a fair share of the pool when more directions want one than it holds
    /// bounds for.
    pub fn share(&self, bound: usize) -> usize {
        let wanting =
            self.holders.load(Ordering::Relaxed) + self.waiting.load(Ordering::Relaxed) + 1;
        let (queue_pool, _) = split(self.limit());
        let fair = queue_pool / wanting;
        if fair >= bound {
            return bound;
        }
        let floor = SMALL.min(bound);
        if fair <= floor {
            return floor;
        }
        1 << fair.ilog2()
    }

    /// Asks for a buffer for a direction with bound `bound` whose source has `waiting()`
    /// bytes ready (`None`: unknown, so not small; asked only when the queue pool cannot
    /// grant): its [`share`](Budget::share) from the queue pool if the pool has it now,
    /// else a small buffer from the reserve for a small read, else in line.
    pub fn ask(&self, bound: usize, waiting: impl FnOnce() -> Option<usize>) -> Asked {
        let bytes = self.share(bound);
        // Not past anyone in line, even when the bytes free would do.
        if !self.contended() && self.queue.try_take(bytes) {
            return Asked::Granted(self.granted(bytes, From::Queue));
        }
        let small = SMALL.min(bytes);
        if waiting().is_some_and(|w| w <= small) && self.reserve.try_take(small) {
            return Asked::Granted(self.granted(small, From::Reserve));
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Asked::Queued(Waiting {
            acquire: Box::pin(self.queue.permits.clone().acquire_many_owned(bytes as u32)),
            bytes,
            bound,
            resized: self.next_resize(),
            line: self.waiting.clone(),
        })
    }

    /// Polls a direction's place in line (the first poll takes the place); `Ready` once
    /// its grant is there, after which the [`Waiting`] is dropped. `Ready(None)`: the
    /// budget was turned off while it waited, so it needs no grant.
    pub fn poll_wait(&self, cx: &mut Context<'_>, w: &mut Waiting) -> Poll<Option<Grant>> {
        loop {
            if let Poll::Ready(permit) = w.acquire.as_mut().poll(cx) {
                permit
                    .expect("the budget's semaphores are never closed")
                    .forget();
                return Poll::Ready(Some(self.granted(w.bytes, From::Queue)));
            }
            ready!(w.resized.as_mut().poll(cx));
            // A resize: keep the place in line if the pool can still grant what was
            // asked; else ask again, at the back, for what it can.
            w.resized = self.next_resize();
            if !self.enabled() {
                return Poll::Ready(None);
            }
            if w.bytes > split(self.limit()).0 {
                w.bytes = self.share(w.bound);
                w.acquire = Box::pin(
                    self.queue
                        .permits
                        .clone()
                        .acquire_many_owned(w.bytes as u32),
                );
            }
        }
    }

    fn granted(&self, bytes: usize, from: From) -> Grant {
        if from == From::Queue {
            self.holders.fetch_add(1, Ordering::Relaxed);
        }
        self.used.fetch_add(bytes, Ordering::Relaxed);
        self.gauges.used.increment(bytes as f64);
        Grant { bytes, from }
    }

    /// Gives a grant back.
    pub fn release(&self, grant: Grant) {
        self.used.fetch_sub(grant.bytes, Ordering::Relaxed);
        self.gauges.used.decrement(grant.bytes as f64);
        match grant.from {
            From::Queue => {
                self.holders.fetch_sub(1, Ordering::Relaxed);
                self.queue.give_back(grant.bytes)
            }
            From::Reserve => self.reserve.give_back(grant.bytes),
        }
    }
}

/// (queue pool, reserve) for a total.
fn split(limit: usize) -> (usize, usize) {
    let reserve = limit / RESERVE_SHARE;
    (limit - reserve, reserve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn budget(limit: usize) -> Budget {
        let gauges = BudgetGauges {
            limit: Gauge::noop(),
            used: Gauge::noop(),
        };
        Budget::new(limit, gauges)
    }

    fn granted(a: Asked) -> Grant {
        match a {
            Asked::Granted(g) => g,
            Asked::Queued(_) => panic!("queued, expected a grant"),
        }
    }

    fn queued(a: Asked) -> Waiting {
        match a {
            Asked::Granted(g) => panic!("granted {g:?}, expected to queue"),
            Asked::Queued(w) => w,
        }
    }

    fn poll(b: &Budget, w: &mut Waiting) -> Poll<Grant> {
        b.poll_wait(&mut Context::from_waker(Waker::noop()), w)
            .map(|g| g.expect("the budget is on"))
    }

    /// A reload that shrinks the pool below what a direction in line asked for, or
    /// turns the budget off, does not leave it (and everyone behind it) waiting forever.
    #[test]
    fn a_resize_lets_the_line_ask_again() {
        // 256 KiB: 224 KiB queue pool; one holder takes all of it.
        let b = budget(256 << 10);
        let held = granted(b.ask(224 << 10, || None));
        let mut w = queued(b.ask(128 << 10, || None));
        // The fair share of two: 112 KiB, rounded down to a power of two.
        assert_eq!(w.bytes, 64 << 10);
        assert!(poll(&b, &mut w).is_pending());
        // 64 KiB: a 56 KiB queue pool can never grant 64 KiB.
        b.resize(64 << 10);
        assert!(poll(&b, &mut w).is_pending());
        assert!(w.bytes <= 56 << 10, "asked again for {}", w.bytes);
        b.release(held);
        let Poll::Ready(g) = poll(&b, &mut w) else {
            panic!("the smaller request is granted once the holder gives back")
        };
        assert!(g.bytes <= 56 << 10);

        drop((w, g));

        // Turned off: whoever waits needs no grant any more.
        let b = budget(64 << 10);
        let _held = granted(b.ask(56 << 10, || None));
        let mut w = queued(b.ask(32 << 10, || None));
        assert!(poll(&b, &mut w).is_pending());
        b.resize(0);
        let r = b.poll_wait(&mut Context::from_waker(Waker::noop()), &mut w);
        assert!(matches!(r, Poll::Ready(None)));
    }

    #[test]
    fn grants_shrink_to_a_fair_share_and_the_line_is_served_in_order() {
        // 64 KiB: 56 KiB queue pool, 8 KiB reserve.
        let b = budget(64 << 10);
        let first = granted(b.ask(32 << 10, || None));
        assert_eq!(
            first,
            Grant {
                bytes: 32 << 10,
                from: From::Queue
            }
        );
        // Two want a buffer now: 28 KiB each would be fair, so 16 (a power of two).
        assert_eq!(b.share(32 << 10), 16 << 10);
        let second = granted(b.ask(32 << 10, || None));
        assert_eq!(second.bytes, 16 << 10);
        // 8 KiB left; the third's share is 16: it lines up.
        let mut third_in_line = queued(b.ask(32 << 10, || None));
        // The fourth's share (8 KiB) is free, but it may not pass the third.
        let mut fourth_in_line = queued(b.ask(32 << 10, || None));
        assert!(b.contended());
        assert!(poll(&b, &mut third_in_line).is_pending());
        assert!(poll(&b, &mut fourth_in_line).is_pending());
        b.release(first);
        let Poll::Ready(third) = poll(&b, &mut third_in_line) else {
            panic!("the first in line is served once bytes are back");
        };
        assert_eq!(third.bytes, 16 << 10);
        let Poll::Ready(fourth) = poll(&b, &mut fourth_in_line) else {
            panic!("then the next");
        };
        assert_eq!(fourth.bytes, 8 << 10);
        assert!(b.contended(), "in line until the place is dropped");
        drop((third_in_line, fourth_in_line));
        assert!(!b.contended());
        assert!(b.used() <= b.limit());
        for g in [second, third, fourth] {
            b.release(g);
        }
        assert_eq!(b.used(), 0);
        assert_eq!(b.share(32 << 10), 32 << 10, "alone again: the whole bound");
    }

    #[test]
    fn the_share_is_never_below_a_small_buffer_nor_above_the_bound() {
        let b = budget(64 << 10);
        assert_eq!(b.share(1000), 1000);
        let held: Vec<_> = (0..12).map(|_| b.ask(64 << 10, || None)).collect();
        assert_eq!(b.share(64 << 10), SMALL);
        drop(held);
    }

    #[test]
    fn a_small_read_takes_the_reserve_ahead_of_the_line() {
        let b = budget(64 << 10);
        let big = granted(b.ask(56 << 10, || None));
        let _line = queued(b.ask(56 << 10, || Some(100 << 10)));
        let small = granted(b.ask(56 << 10, || Some(64)));
        assert_eq!(
            small,
            Grant {
                bytes: SMALL,
                from: From::Reserve
            }
        );
        // Two reserve buffers fit in 8 KiB; the third small read queues.
        let small2 = granted(b.ask(56 << 10, || Some(SMALL)));
        let _third = queued(b.ask(56 << 10, || Some(64)));
        assert_eq!(b.used(), (56 << 10) + 2 * SMALL);
        assert!(b.used() <= b.limit());
        for g in [big, small, small2] {
            b.release(g);
        }
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_lower_limit_is_reached_as_grants_come_back() {
        let b = budget(64 << 10);
        let g = granted(b.ask(48 << 10, || None));
        b.resize(32 << 10);
        assert_eq!(b.limit(), 32 << 10);
        // The 48 KiB grant stays; nothing more fits until it is back.
        let mut w = queued(b.ask(4 << 10, || None));
        assert!(poll(&b, &mut w).is_pending());
        b.release(g);
        let Poll::Ready(small) = poll(&b, &mut w) else {
            panic!("served from what came back");
        };
        drop(w);
        b.release(small);
        // The queue pool is 28 KiB now: all of it, and nothing more.
        let all = granted(b.ask(28 << 10, || None));
        assert_eq!(all.bytes, 28 << 10);
        let mut w = queued(b.ask(4 << 10, || None));
        assert!(poll(&b, &mut w).is_pending());
        b.resize(128 << 10);
        assert!(poll(&b, &mut w).is_ready());
    }
}
