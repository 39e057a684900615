//! sluice's test kit: what the tests, the stress tool and the benchmark share. Children
//! that say when they are ready, one Prometheus parser and scrape, stand-in upstreams and
//! faults, /proc readers, configs built from `sluice::Config`, and an in-process proxy.
//!
//! # Layout
//! - `child.rs`: a child process of ours started with `NOTIFY_SOCKET`, ready at its
//!   `READY=1`, addresses from that message; stderr tail, signals, reload, stop.
//! - `notify.rs`: both ends of the notify protocol: the socket the kit binds, and the
//!   `READY=1` our own tools send.
//! - `daemon.rs`: the `sluice` binary for tests (a `ChildProcess` on a `Config`, helpers that
//!   panic).
//! - `in_process.rs`: `Proxy`, sluice's `Server` in the test's own process.
//! - `config.rs`: configs built as `Config` values and the TOML written from them.
//! - `scrape.rs`: the Prometheus text parser and `GET /metrics`.
//! - `http.rs`: one small HTTP GET. `admin.rs`: the admin endpoint as async tests call it.
//! - `procfs.rs`: RSS and open descriptors from /proc.
//! - `upstream.rs`: stand-in upstreams (source, sink, echo, per-connection; a closure per
//!   connection). `chaos.rs`: the faults (resets, early closes, stalls, refusals...).
//! - `pattern.rs`: the verifiable byte stream. `units.rs`: sizes, rates and durations as
//!   typed and printed. `pacing.rs`: the token bucket that paces a connection.
//! - `transfer.rs`: test data, hashes, chunked writes, slow reads. `addresses.rs`: loopback
//!   addresses that refuse, blackhole, or stay reserved. `wait.rs`: `eventually`.

pub mod addresses;
pub mod admin;
pub mod chaos;
pub mod child;
pub mod config;
pub mod daemon;
pub mod http;
pub mod in_process;
pub mod notify;
pub mod pacing;
pub mod pattern;
pub mod procfs;
pub mod scrape;
pub mod transfer;
pub mod units;
pub mod upstream;
pub mod wait;

use std::path::PathBuf;

// What the tests use most, at the top, for `use sluice_testkit::*`.
pub use addresses::{blackhole, refusing_address, reserved_address};
pub use admin::{connections, get, poll_connections};
pub use child::ChildProcess;
pub use daemon::Daemon;
pub use in_process::{Proxy, assert_one_closed_by_shutdown, config};
pub use scrape::{LIVE_GAUGES, Scrape, value};
pub use transfer::{connect_small_rcvbuf, data, read_hash, read_slowly, sha, write_chunked};
pub use upstream::{echo_upstream, upstream, upstream_with_rcvbuf};
pub use wait::eventually;

/// Where cargo puts binary `name` of this workspace: beside the running test or tool
/// (`target/<profile>/NAME`; tests run from `target/<profile>/deps`).
pub fn binary_path(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no directory", exe.display()))?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir.join(name))
}

/// A binary of this workspace (`sluice`, `sluice-stress`), which must be built: `cargo
/// test` at the top builds every member's binaries before it runs any test.
pub fn workspace_binary(name: &str) -> PathBuf {
    let path = binary_path(name).expect("the running executable's path");
    assert!(
        path.exists(),
        "{} is not built (run `cargo build --workspace`)",
        path.display()
    );
    path
}
