//! A service's servers: which are in rotation, the load each carries, which gets the next client.
//!
//! # Balancing
//!
//! [`Pool::pick`] chooses among the *candidates*: the servers in rotation ([`Backend::is_up`])
//! that have not yet been tried for this client. When no untried server is in rotation, every
//! untried server is a candidate: with all of them out, trying one beats refusing the client
//! (Envoy's panic mode). When every server has been tried, there is no pick and the client is
//! reset.
//!
//! Each policy scores the candidates; the pick is one of those with the best score. Equals
//! take turns: every pick takes the next value `c` of the pool's counter, and of the `k`
//! equally good candidates (in the order `servers` lists them) the pick is number `c mod k`
//! (counting from 0). So 3 equal servers get exactly a third of 300 picks each, whatever the others score.
//!
//! - `round_robin`: every candidate scores the same: the servers take turns. The turns of a
//!   server that is out are shared evenly by the others.
//! - `least_connections`: the fewest live connections.
//! - `least_queued`: the lowest *pressure*, compared in whole bytes, then the fewest live
//!   connections. A server's pressure is what its live connections tell about how fast it
//!   reads:
//!
//!   ```text
//!   pressure = queued + bound × P / τ
//!   ```
//!
//!   - `queued`: the bytes sluice holds now in the `client_to_upstream` directions of the
//!     server's live connections, waiting for the server to read them. The other direction's
//!     queue waits for the clients, so it says nothing about the server and does not count.
//!   - `bound`: the `client_to_upstream` buffer bound, the most one direction can hold.
//!   - `P`: the server's paused time, exponentially weighted with `τ` = 10 s. With n
//!     `client_to_upstream` directions paused (queue full, waiting for the server to read),
//!     `dP/dt = n − P/τ`; P is brought up to date exactly at every pause start and end and
//!     whenever it is read: `P ← P·e^(−Δ/τ) + n·τ·(1 − e^(−Δ/τ))` for the Δ seconds since.
//!
//!   So `P/τ` is the recent average number of paused directions: one direction paused for
//!   the last t seconds adds `bound × (1 − e^(−t/τ))` (63 % of a full buffer after 10 s,
//!   95 % after 30 s), and once it resumes its weight falls by `e^(−t/τ)` (37 % left 10 s
//!   later, 5 % after 30 s). A server whose connections keep filling their buffers stays
//!   avoided for a while after the queues drain, instead of being sent the next wave of
//!   clients as soon as they momentarily do.
//!
//! # Health
//!
//! Passive: connect failures are counted in a row ([`Backend::connect_failed`]). The
//! `max_failures`th takes the server out of rotation for `cooldown` (one ejection). When the
//! cooldown is over the server is in rotation again, half-open: its failures still stand, so
//! one more failure takes it straight out again (another ejection). A success
//! ([`Backend::connect_succeeded`]) forgets the failures and puts the server back in rotation at
//! once, cooldown or not. A failure while the server is already out counts, but neither
//! extends the cooldown nor counts as an ejection.
//!
//! Active ([`check_health`]): every `interval`, a TCP connect to each server within `timeout`;
//! its outcome counts exactly as a client's connect would.
//!
//! # Reloads
//!
//! A [`Pool`] is built once per configuration. On a reload the new pool keeps the [`Backend`]
//! of every server whose address it shares with the old one, so live connections, queued
//! bytes, pauses and health carry over; connections to a removed server keep their `Backend`
//! until they close.

use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::relay::CLIENT_TO_UPSTREAM;

/// τ, in seconds: how far back the paused time of a server's connections is remembered
/// (see the module docs).
pub const PAUSE_MEMORY: f64 = 10.0;

/// `balance` values: how a service picks the server for a new client (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Servers take turns.
    #[default]
    RoundRobin,
    /// The server with the fewest live connections.
    LeastConnections,
    /// The server whose connections hold the fewest bytes for it and paused least recently.
    LeastQueued,
}

impl Balance {
    /// The name the configuration file uses, for logs.
    pub fn as_label(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConnections => "least_connections",
            Balance::LeastQueued => "least_queued",
        }
    }
}

/// Passive health: `max_failures` connect failures in a row take a server out for `cooldown`.
#[derive(Debug, Clone, Copy)]
pub struct HealthRules {
    /// Connect failures in a row that take a server out of rotation; 0 counts as 1 (a server
    /// cannot be taken out before it has failed).
    pub max_failures: u32,
    /// How long a server stays out before it is tried again.
    pub cooldown: Duration,
}

/// One server of a pool (its `server` metric label is `address`). Shared by the pool and
/// every live connection to it.
#[derive(Debug)]
pub struct Backend {
    /// The address exactly as written in `servers`: what is connected to, and the `server`
    /// label.
    pub address: String,
    /// Live connections: [`Attached`] values not yet dropped.
    connections: AtomicUsize,
    /// Bytes queued in sluice on live connections, by direction. Signed like the deltas
    /// reported into it, so that a report that takes out more than went in shows (and trips
    /// a debug assertion) instead of wrapping round to 16 EiB.
    queued: [AtomicI64; 2],
    /// Directions paused now on live connections, by direction: read by the metrics without
    /// taking [`Backend::pauses`].
    paused: [AtomicU64; 2],
    /// The paused-time weight `P` of the `client_to_upstream` directions.
    pauses: Mutex<PauseWeight>,
    /// A [`Health`] as u8: lets [`Backend::is_up`] and [`Backend::connect_succeeded`] skip
    /// [`Backend::strikes`] while the server is healthy, which is nearly always.
    health: AtomicU8,
    /// The failures in a row and the ejection, which only change on a failure or on the
    /// first success after one.
    strikes: Mutex<Strikes>,
    /// Times a failure took the server out of rotation.
    ejections: AtomicU64,
}

/// Where a server stands, as [`Backend::health`] keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Health {
    /// No failure since the last success: in rotation, nothing to look up.
    Healthy = 0,
    /// Some failures in a row, not (yet) enough to take it out: in rotation.
    Failing = 1,
    /// Taken out, and no success since: in rotation again once its cooldown is over.
    Ejected = 2,
}

/// A server's failures, under [`Backend::strikes`].
#[derive(Debug, Default)]
struct Strikes {
    /// Connect failures since the last success.
    failures: u32,
    /// Set by the failure that took the server out (and left set after the cooldown, until
    /// a success): when it is in rotation again.
    out_until: Option<Instant>,
}

/// `P`, the exponentially weighted paused time of a server's `client_to_upstream`
/// directions, under [`Backend::pauses`].
#[derive(Debug, Default)]
struct PauseWeight {
    /// Directions paused now.
    paused: u32,
    /// `P` at `at`, in seconds.
    weight: f64,
    /// When `weight` was last brought up to date, on the metrics clock.
    at: f64,
}

impl PauseWeight {
    /// `P` at `clock`, with `paused` directions paused since `at`. A clock read on another
    /// thread a moment earlier may be behind `at`; no time has passed for it.
    fn weight_at(&self, clock: f64) -> f64 {
        let elapsed = (clock - self.at).max(0.0);
        let decay = (-elapsed / PAUSE_MEMORY).exp();
        // 1 − e^(−x) as −expm1(−x): exact for the small Δ between close events.
        let grown = -(-elapsed / PAUSE_MEMORY).exp_m1();
        self.weight * decay + f64::from(self.paused) * PAUSE_MEMORY * grown
    }

    /// Brings `P` up to `clock` and counts one more (`+1`) or one fewer (`-1`) paused
    /// direction from then on.
    fn change(&mut self, clock: f64, delta: i32) {
        self.weight = self.weight_at(clock);
        self.at = self.at.max(clock);
        self.paused = self.paused.saturating_add_signed(delta);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Backend {
    pub fn new(address: String) -> Arc<Backend> {
        Arc::new(Backend {
            address,
            connections: AtomicUsize::new(0),
            queued: Default::default(),
            paused: Default::default(),
            pauses: Mutex::default(),
            health: AtomicU8::new(Health::Healthy as u8),
            strikes: Mutex::default(),
            ejections: AtomicU64::new(0),
        })
    }

    /// A live connection to this server: counts in [`Backend::connections`] until dropped.
    pub fn attach(self: &Arc<Self>) -> Attached {
        self.connections.fetch_add(1, Relaxed);
        Attached {
            backend: Arc::clone(self),
        }
    }

    /// Live connections to this server.
    pub fn connections(&self) -> usize {
        self.connections.load(Relaxed)
    }

    fn health(&self) -> Health {
        match self.health.load(Relaxed) {
            0 => Health::Healthy,
            1 => Health::Failing,
            _ => Health::Ejected,
        }
    }

    /// In rotation at `now`: not taken out, or its cooldown is over.
    pub fn is_up(&self, now: Instant) -> bool {
        if self.health() != Health::Ejected {
            return true;
        }
        lock(&self.strikes)
            .out_until
            .is_none_or(|until| now >= until)
    }

    /// A connect (or active check) failed at `now`; true if this failure took the server out
    /// of rotation (counted in [`Backend::ejections`]).
    pub fn connect_failed(&self, rules: &HealthRules, now: Instant) -> bool {
        let mut s = lock(&self.strikes);
        s.failures = s.failures.saturating_add(1);
        let in_rotation = s.out_until.is_none_or(|until| now >= until);
        if in_rotation && s.failures >= rules.max_failures.max(1) {
            // A cooldown too long for the clock is as good as forever.
            let forever = Duration::from_secs(u64::from(u32::MAX));
            s.out_until = Some(now.checked_add(rules.cooldown).unwrap_or(now + forever));
            self.health.store(Health::Ejected as u8, Relaxed);
            self.ejections.fetch_add(1, Relaxed);
            return true;
        }
        if s.out_until.is_none() {
            self.health.store(Health::Failing as u8, Relaxed);
        }
        false
    }

    /// A connect or active check succeeded: the failures are forgotten and the server is
    /// back in rotation at once. True if it had been taken out (and not back since by a
    /// success), for whoever logs its return.
    pub fn connect_succeeded(&self) -> bool {
        if self.health() == Health::Healthy {
            return false;
        }
        let mut s = lock(&self.strikes);
        let was_out = s.out_until.is_some();
        *s = Strikes::default();
        self.health.store(Health::Healthy as u8, Relaxed);
        was_out
    }

    /// Times a failure took this server out of rotation.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Relaxed)
    }

    /// Bytes queued in sluice on live connections to this server, by direction
    /// ([`CLIENT_TO_UPSTREAM`] or [`UPSTREAM_TO_CLIENT`](crate::relay::UPSTREAM_TO_CLIENT)).
    pub fn queued(&self, direction: usize) -> u64 {
        self.queued[direction].load(Relaxed).max(0) as u64
    }

    /// Directions paused now on live connections to this server, by direction.
    pub fn paused(&self, direction: usize) -> u64 {
        self.paused[direction].load(Relaxed)
    }

    /// The `least_queued` pressure at `clock` (seconds on the metrics clock), in bytes:
    /// `queued(client_to_upstream) + bound_toward_server × P/τ` (see the module docs).
    pub fn pressure(&self, bound_toward_server: usize, clock: f64) -> f64 {
        let queued = self.queued(CLIENT_TO_UPSTREAM) as f64;
        let weight = lock(&self.pauses).weight_at(clock);
        queued + bound_toward_server as f64 * weight / PAUSE_MEMORY
    }
}

/// A connection's hooks into its server's load; the relay calls these from its report step.
/// Dropping it ends the connection's count in [`Backend::connections`].
#[derive(Debug)]
pub struct Attached {
    /// The server this connection went to.
    backend: Arc<Backend>,
}

impl Attached {
    /// The connection's queue in `direction` grew (or shrank, negative) by `delta` bytes.
    pub fn add_queued(&self, direction: usize, delta: i64) {
        let before = self.backend.queued[direction].fetch_add(delta, Relaxed);
        // Every connection's own share is never negative, and the adds to one atomic have
        // one order, so neither is the sum at any point in it.
        debug_assert!(
            before + delta >= 0,
            "a connection reported more bytes leaving its queue than entered it"
        );
    }

    /// The connection's `direction` paused at `clock` (seconds on the metrics clock).
    pub fn pause_started(&self, direction: usize, clock: f64) {
        self.pause_changed(direction, clock, 1);
    }

    /// The connection's `direction` resumed (or ended while paused) at `clock`.
    pub fn pause_ended(&self, direction: usize, clock: f64) {
        self.pause_changed(direction, clock, -1);
    }

    fn pause_changed(&self, direction: usize, clock: f64, delta: i32) {
        let b = &self.backend;
        // Only pauses toward the server weigh in its pressure; the other direction's count
        // is for the metrics alone and needs no lock.
        if direction == CLIENT_TO_UPSTREAM {
            lock(&b.pauses).change(clock, delta);
        }
        let before = if delta > 0 {
            b.paused[direction].fetch_add(1, Relaxed)
        } else {
            b.paused[direction].fetch_sub(1, Relaxed)
        };
        debug_assert!(delta > 0 || before > 0, "a pause ended that never began");
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let before = self.backend.connections.fetch_sub(1, Relaxed);
        debug_assert!(before > 0);
    }
}

/// A service's servers and how it balances over them.
#[derive(Debug)]
pub struct Pool {
    /// The servers, in the order `servers` lists them; indices into this are what
    /// [`Pool::pick`] returns and takes.
    backends: Vec<Arc<Backend>>,
    /// The policy [`Pool::pick`] applies.
    balance: Balance,
    /// Bumped by every pick: which of the equally good candidates it takes, so equals take
    /// turns.
    next: AtomicUsize,
    /// The `client_to_upstream` buffer bound: what a paused direction weighs in `least_queued`.
    bound_toward_server: usize,
}

impl Pool {
    /// The pool of `addresses`. `previous`: the pool this one replaces on a config reload; a
    /// server whose address is in both keeps its [`Backend`] (live connections, queued bytes,
    /// pauses and health carry over). An address listed twice is two servers (each reuses one
    /// of the previous pool's servers of that address, in order).
    pub fn new(
        addresses: &[String],
        balance: Balance,
        bound_toward_server: usize,
        previous: Option<&Pool>,
    ) -> Pool {
        let old = previous.map_or(&[][..], |p| &p.backends[..]);
        let mut reused = vec![false; old.len()];
        let backends = addresses
            .iter()
            .map(|address| {
                let same = (0..old.len()).find(|&i| !reused[i] && old[i].address == *address);
                match same {
                    Some(i) => {
                        reused[i] = true;
                        Arc::clone(&old[i])
                    }
                    None => Backend::new(address.clone()),
                }
            })
            .collect();
        Pool {
            backends,
            balance,
            next: AtomicUsize::new(0),
            bound_toward_server,
        }
    }

    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The server for a new client (its index in [`Pool::backends`]), skipping `tried`
    /// (indices already tried for this client), by the pool's [`Balance`] at `now` (health)
    /// and `clock` (pause weight, seconds on the metrics clock). None when every server has
    /// been tried. See the module docs for the candidates and each policy.
    pub fn pick(&self, tried: &[usize], now: Instant, clock: f64) -> Option<usize> {
        // Two small vectors of indices per client: nothing beside the connect that follows.
        let turn = self.next.fetch_add(1, Relaxed);
        let untried = |i: &usize| !tried.contains(i);
        let all = 0..self.backends.len();
        let up: Vec<usize> = all
            .clone()
            .filter(|i| untried(i) && self.backends[*i].is_up(now))
            .collect();
        let candidates = if up.is_empty() {
            all.filter(untried).collect()
        } else {
            up
        };
        self.best(&candidates, turn, clock)
    }

    /// The best of `candidates` by the policy; among equally good ones, the `turn`th (mod
    /// their number), so equals take turns.
    fn best(&self, candidates: &[usize], turn: usize, clock: f64) -> Option<usize> {
        let b = &self.backends;
        let score = |i: usize| match self.balance {
            Balance::RoundRobin => (0, 0),
            Balance::LeastConnections => (0, b[i].connections()),
            // Whole bytes: a few nanoseconds of decay must not break a tie.
            Balance::LeastQueued => (
                b[i].pressure(self.bound_toward_server, clock).round() as u64,
                b[i].connections(),
            ),
        };
        let scored: Vec<(usize, (u64, usize))> =
            candidates.iter().map(|&i| (i, score(i))).collect();
        let least = scored.iter().map(|&(_, s)| s).min()?;
        let equals = scored.iter().filter(|&&(_, s)| s == least);
        let k = equals.clone().count();
        equals.map(|&(i, _)| i).nth(turn % k)
    }
}

/// Active checks: every `interval`, a TCP connect to each of `backends`, all at once, each
/// within `timeout` (the address is resolved for each check, so a host name may move). A
/// success counts as [`Backend::connect_succeeded`], a failure or timeout as
/// [`Backend::connect_failed`] under `rules`. Logs when a check takes a server out or brings
/// it back. Runs until `stop` is cancelled; an `interval` of 0 (checks off) returns at once.
pub async fn check_health(
    backends: Vec<Arc<Backend>>,
    rules: HealthRules,
    interval: Duration,
    timeout: Duration,
    stop: CancellationToken,
) {
    if interval.is_zero() {
        return;
    }
    let mut ticks = tokio::time::interval(interval);
    // A round longer than the interval (a slow timeout) is followed by a full interval, not
    // by a burst of rounds to catch up.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let round = async {
        loop {
            ticks.tick().await;
            futures_util::future::join_all(backends.iter().map(|b| check_one(b, &rules, timeout)))
                .await;
        }
    };
    tokio::select! {
        () = round => {}
        () = stop.cancelled() => {}
    }
}

/// One active check of one server.
async fn check_one(backend: &Backend, rules: &HealthRules, timeout: Duration) {
    let outcome = tokio::time::timeout(timeout, TcpStream::connect(backend.address.as_str())).await;
    match outcome {
        Ok(Ok(_stream)) => {
            if backend.connect_succeeded() {
                tracing::info!(server = %backend.address, "server back in rotation: health check connected");
            }
        }
        Ok(Err(e)) => {
            if backend.connect_failed(rules, Instant::now()) {
                tracing::warn!(server = %backend.address, error = %e, cooldown = ?rules.cooldown, "server out of rotation: health check failed");
            }
        }
        Err(_) => {
            if backend.connect_failed(rules, Instant::now()) {
                tracing::warn!(server = %backend.address, ?timeout, cooldown = ?rules.cooldown, "server out of rotation: health check timed out");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::UPSTREAM_TO_CLIENT;

    const BOUND: usize = 64 * 1024;

    fn pool(n: usize, balance: Balance) -> Pool {
        let addresses: Vec<String> = (0..n).map(|i| format!("10.0.0.{i}:5000")).collect();
        Pool::new(&addresses, balance, BOUND, None)
    }

    /// How many of `picks` picks (nothing tried, all at one instant) each server got.
    fn shares(p: &Pool, picks: usize, now: Instant) -> Vec<usize> {
        let mut got = vec![0; p.backends().len()];
        for _ in 0..picks {
            got[p.pick(&[], now, 0.0).unwrap()] += 1;
        }
        got
    }

    const RULES: HealthRules = HealthRules {
        max_failures: 3,
        cooldown: Duration::from_secs(10),
    };

    #[test]
    fn balance_reads_as_written_in_the_config() {
        let b: Balance = serde_json::from_str("\"least_queued\"").unwrap();
        assert_eq!(b, Balance::LeastQueued);
        let b: Balance = serde_json::from_str("\"least_connections\"").unwrap();
        assert_eq!(b, Balance::LeastConnections);
        assert_eq!(Balance::default(), Balance::RoundRobin);
        assert_eq!(
            serde_json::to_string(&Balance::RoundRobin).unwrap(),
            "\"round_robin\""
        );
        assert!(serde_json::from_str::<Balance>("\"random\"").is_err());
    }

    #[test]
    fn round_robin_takes_turns_and_skips_a_server_that_is_out() {
        let p = pool(3, Balance::RoundRobin);
        let now = Instant::now();
        let order: Vec<usize> = (0..6).map(|_| p.pick(&[], now, 0.0).unwrap()).collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);

        for _ in 0..3 {
            p.backends()[1].connect_failed(&RULES, now);
        }
        // An ejected server gets no client; the others share its turns.
        assert_eq!(shares(&p, 300, now), [150, 0, 150]);
    }

    #[test]
    fn least_connections_picks_the_server_with_fewest_live_connections() {
        let p = pool(3, Balance::LeastConnections);
        let b = p.backends();
        let _held = [b[0].attach(), b[0].attach(), b[1].attach(), b[2].attach()];
        let now = Instant::now();
        // 1 and 2 hold one each: they take turns, 0 (two) never gets one.
        let got = shares(&p, 100, now);
        assert_eq!(got, [0, 50, 50]);

        // Picks that become connections even the load out.
        let mut live = Vec::new();
        for _ in 0..5 {
            let i = p.pick(&[], now, 0.0).unwrap();
            live.push(b[i].attach());
        }
        let counts: Vec<usize> = b.iter().map(|s| s.connections()).collect();
        assert_eq!(counts.iter().sum::<usize>(), 9);
        assert!(counts.iter().all(|&c| c == 3), "{counts:?}");
    }

    #[test]
    fn every_policy_spreads_ties_evenly() {
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConnections,
            Balance::LeastQueued,
        ] {
            let p = pool(3, balance);
            assert_eq!(
                shares(&p, 300, Instant::now()),
                [100, 100, 100],
                "{balance:?}"
            );
        }
    }

    #[test]
    fn least_queued_avoids_a_server_with_bytes_waiting_for_it() {
        let p = pool(3, Balance::LeastQueued);
        let b = p.backends();
        let slow = b[0].attach();
        slow.add_queued(CLIENT_TO_UPSTREAM, 50_000);
        let busy = b[1].attach();
        busy.add_queued(CLIENT_TO_UPSTREAM, 10);
        assert_eq!(shares(&p, 30, Instant::now()), [0, 0, 30]);

        // Bytes waiting for the client say nothing about the server.
        busy.add_queued(CLIENT_TO_UPSTREAM, -10);
        busy.add_queued(UPSTREAM_TO_CLIENT, 50_000);
        assert_eq!(b[1].queued(UPSTREAM_TO_CLIENT), 50_000);
        // 1 and 2 are at 0 bytes; 1 holds a connection, 2 none.
        assert_eq!(shares(&p, 30, Instant::now()), [0, 0, 30]);
        let _other = b[2].attach();
        assert_eq!(shares(&p, 30, Instant::now()), [0, 15, 15]);
        slow.add_queued(CLIENT_TO_UPSTREAM, -50_000);
        busy.add_queued(UPSTREAM_TO_CLIENT, -50_000);
    }

    #[test]
    fn least_queued_avoids_a_server_that_paused_recently_and_forgives_it_later() {
        let p = pool(2, Balance::LeastQueued);
        let b = p.backends();
        let now = Instant::now();
        let conn = b[0].attach();
        let _other = b[1].attach();
        // Paused through 20 s, then drained: its queue is empty again.
        conn.pause_started(CLIENT_TO_UPSTREAM, 100.0);
        assert_eq!(b[0].paused(CLIENT_TO_UPSTREAM), 1);
        let during = b[0].pressure(BOUND, 110.0) / BOUND as f64;
        assert!((during - (1.0 - (-1f64).exp())).abs() < 1e-9, "{during}");
        conn.pause_ended(CLIENT_TO_UPSTREAM, 120.0);
        assert_eq!(b[0].paused(CLIENT_TO_UPSTREAM), 0);
        assert_eq!(b[0].queued(CLIENT_TO_UPSTREAM), 0);

        let just_after = b[0].pressure(BOUND, 120.0) / BOUND as f64;
        assert!(just_after > 0.85, "{just_after}");
        for _ in 0..10 {
            assert_eq!(p.pick(&[], now, 120.0), Some(1));
        }
        // A server with bytes queued but no pause is still preferred over a buffer's
        // worth of recent pausing.
        let one = b[1].attach();
        one.add_queued(CLIENT_TO_UPSTREAM, 1000);
        assert_eq!(p.pick(&[], now, 121.0), Some(1));

        // 30 s without a pause: nearly forgotten (e^-3 of what it was).
        let later = b[0].pressure(BOUND, 150.0) / BOUND as f64;
        assert!((later - just_after * (-3f64).exp()).abs() < 1e-9, "{later}");
        assert!(later < 0.05, "{later}");
        // What is left of the pause (~2,800 bytes) now weighs less than 11,000 queued bytes.
        one.add_queued(CLIENT_TO_UPSTREAM, 10_000);
        assert_eq!(p.pick(&[], now, 150.0), Some(0));
        one.add_queued(CLIENT_TO_UPSTREAM, -11_000);
    }

    #[test]
    fn pauses_away_from_the_server_do_not_count_against_it() {
        let p = pool(2, Balance::LeastQueued);
        let b = p.backends();
        let conn = b[0].attach();
        conn.pause_started(UPSTREAM_TO_CLIENT, 0.0);
        assert_eq!(b[0].paused(UPSTREAM_TO_CLIENT), 1);
        assert_eq!(b[0].pressure(BOUND, 60.0), 0.0);
        conn.pause_ended(UPSTREAM_TO_CLIENT, 60.0);
        assert_eq!(b[0].paused(UPSTREAM_TO_CLIENT), 0);
    }

    #[test]
    fn two_paused_directions_weigh_two_buffers_in_the_long_run() {
        let p = pool(1, Balance::LeastQueued);
        let b = &p.backends()[0];
        let (x, y) = (b.attach(), b.attach());
        x.pause_started(CLIENT_TO_UPSTREAM, 0.0);
        y.pause_started(CLIENT_TO_UPSTREAM, 0.0);
        let settled = b.pressure(BOUND, 1000.0) / BOUND as f64;
        assert!((settled - 2.0).abs() < 1e-6, "{settled}");
        // Events a moment out of clock order neither panic nor run time backwards.
        y.pause_ended(CLIENT_TO_UPSTREAM, 1000.0);
        x.pause_ended(CLIENT_TO_UPSTREAM, 999.9);
        let after = b.pressure(BOUND, 1000.0) / BOUND as f64;
        assert!((after - 2.0).abs() < 1e-6, "{after}");
    }

    #[test]
    fn tried_servers_are_not_picked_again() {
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConnections,
            Balance::LeastQueued,
        ] {
            let p = pool(3, balance);
            let now = Instant::now();
            for _ in 0..10 {
                assert_eq!(p.pick(&[0, 2], now, 0.0), Some(1), "{balance:?}");
            }
            let first = p.pick(&[], now, 0.0).unwrap();
            let second = p.pick(&[first], now, 0.0).unwrap();
            let third = p.pick(&[first, second], now, 0.0).unwrap();
            let mut all = [first, second, third];
            all.sort();
            assert_eq!(all, [0, 1, 2], "{balance:?}");
            assert_eq!(p.pick(&[first, second, third], now, 0.0), None);
        }
        assert_eq!(
            pool(0, Balance::RoundRobin).pick(&[], Instant::now(), 0.0),
            None
        );
    }

    #[test]
    fn failures_in_a_row_take_a_server_out_until_its_cooldown_is_over() {
        let b = Backend::new("10.0.0.1:5000".into());
        let t0 = Instant::now();
        assert!(!b.connect_failed(&RULES, t0));
        assert!(!b.connect_failed(&RULES, t0));
        assert!(b.is_up(t0), "two failures of three: still in");
        assert!(b.connect_failed(&RULES, t0), "the third takes it out");
        assert_eq!(b.ejections(), 1);
        assert!(!b.is_up(t0));
        assert!(!b.is_up(t0 + Duration::from_secs(9)));
        // Failing while out changes nothing.
        assert!(!b.connect_failed(&RULES, t0 + Duration::from_secs(5)));
        assert!(!b.is_up(t0 + Duration::from_secs(9)));
        assert_eq!(b.ejections(), 1);

        let t1 = t0 + Duration::from_secs(10);
        assert!(b.is_up(t1), "back in rotation after the cooldown");
        assert!(
            b.connect_failed(&RULES, t1),
            "one more failure: straight out again"
        );
        assert_eq!(b.ejections(), 2);
        assert!(!b.is_up(t1 + Duration::from_secs(9)));
        assert!(b.is_up(t1 + Duration::from_secs(10)));
    }

    #[test]
    fn a_success_forgets_the_failures_and_brings_the_server_back_at_once() {
        let b = Backend::new("10.0.0.1:5000".into());
        let t0 = Instant::now();
        b.connect_failed(&RULES, t0);
        b.connect_failed(&RULES, t0);
        assert!(!b.connect_succeeded(), "it was never out");
        assert!(!b.connect_failed(&RULES, t0), "counting starts again");
        assert!(!b.connect_failed(&RULES, t0));
        assert!(b.connect_failed(&RULES, t0));
        assert!(!b.is_up(t0));
        assert!(b.connect_succeeded(), "back from an ejection");
        assert!(b.is_up(t0), "before the cooldown is over");
        assert!(
            !b.connect_failed(&RULES, t0),
            "a fresh start: one failure is not enough"
        );
        assert!(b.is_up(t0));
        assert_eq!(b.ejections(), 1);
    }

    #[test]
    fn max_failures_zero_still_needs_a_failure() {
        let rules = HealthRules {
            max_failures: 0,
            cooldown: Duration::from_secs(1),
        };
        let b = Backend::new("10.0.0.1:5000".into());
        let t0 = Instant::now();
        assert!(b.is_up(t0));
        assert!(b.connect_failed(&rules, t0));
        assert!(!b.is_up(t0));
    }

    #[test]
    fn when_every_server_is_out_one_is_tried_anyway() {
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConnections,
            Balance::LeastQueued,
        ] {
            let p = pool(3, balance);
            let now = Instant::now();
            for b in p.backends() {
                for _ in 0..3 {
                    b.connect_failed(&RULES, now);
                }
            }
            assert_eq!(shares(&p, 300, now), [100, 100, 100], "{balance:?}");
            assert_eq!(p.pick(&[0, 1], now, 0.0), Some(2));
            assert_eq!(p.pick(&[0, 1, 2], now, 0.0), None);
        }
    }

    #[test]
    fn an_out_server_is_tried_when_the_others_have_failed_this_client() {
        let p = pool(3, Balance::RoundRobin);
        let now = Instant::now();
        for _ in 0..3 {
            p.backends()[2].connect_failed(&RULES, now);
        }
        // 0 and 1 are up but failed this client: 2, out, is its last chance.
        assert_eq!(p.pick(&[0, 1], now, 0.0), Some(2));
        // While any untried server is up, the out one is not picked.
        for _ in 0..10 {
            assert_eq!(p.pick(&[0], now, 0.0), Some(1));
        }
    }

    #[test]
    fn a_reload_keeps_the_servers_it_shares_with_the_old_pool() {
        let addresses = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let old = Pool::new(
            &addresses(&["a:1", "b:1"]),
            Balance::RoundRobin,
            BOUND,
            None,
        );
        let now = Instant::now();
        let conn = old.backends()[1].attach();
        conn.add_queued(CLIENT_TO_UPSTREAM, 500);
        for _ in 0..3 {
            old.backends()[0].connect_failed(&RULES, now);
        }

        let new = Pool::new(
            &addresses(&["b:1", "c:1", "a:1"]),
            Balance::LeastQueued,
            BOUND * 2,
            Some(&old),
        );
        let b = new.backends();
        assert_eq!(
            b.iter().map(|s| s.address.as_str()).collect::<Vec<_>>(),
            ["b:1", "c:1", "a:1"]
        );
        assert!(Arc::ptr_eq(&b[0], &old.backends()[1]));
        assert!(Arc::ptr_eq(&b[2], &old.backends()[0]));
        assert_eq!(b[0].connections(), 1);
        assert_eq!(b[0].queued(CLIENT_TO_UPSTREAM), 500);
        assert!(!b[2].is_up(now), "still out after the reload");
        assert_eq!(b[2].ejections(), 1);
        assert_eq!(b[1].connections(), 0);
        assert_eq!(new.balance, Balance::LeastQueued);
        // The old connection's report lands on the server the new pool sees.
        conn.add_queued(CLIENT_TO_UPSTREAM, -500);
        drop(conn);
        assert_eq!(b[0].connections(), 0);
        assert_eq!(b[0].queued(CLIENT_TO_UPSTREAM), 0);
    }

    #[test]
    fn dropping_a_connection_takes_it_off_its_server() {
        let b = Backend::new("10.0.0.1:5000".into());
        let first = b.attach();
        let second = b.attach();
        assert!(Arc::ptr_eq(&first.backend, &b));
        assert_eq!(b.connections(), 2);
        drop(first);
        assert_eq!(b.connections(), 1);
        drop(second);
        assert_eq!(b.connections(), 0);
    }

    /// Polls `done` until it holds, failing after a deadline no healthy machine comes near.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn health_checks_take_a_dead_server_out_and_bring_it_back_when_it_listens() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            while let Ok((stream, _)) = live.accept().await {
                drop(stream);
            }
        });
        // Bound but not listening: connects are refused until it listens.
        let dead = tokio::net::TcpSocket::new_v4().unwrap();
        dead.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let dead_addr = dead.local_addr().unwrap();

        let p = Pool::new(
            &[live_addr.to_string(), dead_addr.to_string()],
            Balance::RoundRobin,
            BOUND,
            None,
        );
        let (up, down) = (Arc::clone(&p.backends()[0]), Arc::clone(&p.backends()[1]));
        // A cooldown far longer than the test: only a check can bring it back.
        let rules = HealthRules {
            max_failures: 2,
            cooldown: Duration::from_secs(3600),
        };
        let stop = CancellationToken::new();
        let checks = tokio::spawn(check_health(
            p.backends().to_vec(),
            rules,
            Duration::from_millis(10),
            Duration::from_secs(5),
            stop.clone(),
        ));

        eventually("the dead server is out", || !down.is_up(Instant::now())).await;
        assert_eq!(down.ejections(), 1);
        for _ in 0..10 {
            assert_eq!(p.pick(&[], Instant::now(), 0.0), Some(0));
        }

        let listening = dead.listen(16).unwrap();
        eventually("the server is back", || down.is_up(Instant::now())).await;
        assert_eq!(up.ejections(), 0);
        assert!(up.is_up(Instant::now()));
        assert_eq!(down.ejections(), 1);

        stop.cancel();
        checks.await.unwrap();
        drop(listening);
        accepting.abort();
    }

    #[tokio::test]
    async fn health_checks_off_return_at_once() {
        let b = Backend::new("127.0.0.1:9".into());
        check_health(
            vec![b],
            RULES,
            Duration::ZERO,
            Duration::from_secs(1),
            CancellationToken::new(),
        )
        .await;
    }
}
