//! sluice: a TCP proxy whose every connection holds at most a fixed number of bytes in
//! each direction, so memory stays flat however slow a reader or an upstream is.
//!
//! # Layout
//!
//! - [`budget`]: `buffer.total`, the buffer memory all connections share, granted fairly.
//! - [`config`]: the configuration file's schema, defaults and validation.
//! - [`cli`]: the command line, and how it overrides the file.
//! - [`listener`]: [`Server`], the services' listeners, the worker threads and their
//!   accept loops, limits, reloads (adding, changing and removing services) and graceful
//!   shutdown.
//! - [`service`]: a service at run time: its settings, servers, series and access rules.
//! - [`connection`]: one client: (read its PROXY header,) connect to a server of its
//!   service with retries, relay, record why it closed.
//! - [`pool`]: a service's servers, their health and load, and which gets the next client
//!   (`balance`, `[health]`).
//! - [`proxy_protocol`]: the PROXY protocol v1/v2 (`accept_proxy`, `send_proxy`).
//! - [`relay`]: the bounded duplex copy, where pauses and drains happen (its `pipe`
//!   submodule is the splice mode's queue; `tests` drive its states with scripted I/O).
//! - [`proxy_protocol`]: the PROXY protocol v1/v2 (parse and read a client's header, encode
//!   one for a server).
//! - [`socket`]: socket2 tuning (buffer sizes, nodelay, keepalive, resets).
//! - [`metrics`]: every series declared once (`metrics::SERIES`: name, kind, help, labels)
//!   with its name as a constant in [`metrics::names`], and the registry that records them.
//! - [`admin`]: the admin endpoint on `metrics.address` (`/metrics`, `/healthz`,
//!   `/readyz`, `/connections`): axum on hyper, its connections bounded and timed out.
//! - [`process_metrics`]: the `process_*` metrics from /proc.
//! - [`registry`]: the live connections, what each holds in sluice and in the kernel
//!   (`sluice_kernel_queued_bytes`, `GET /connections`).
//! - [`notify`]: the service manager's notify protocol (`READY=1`, `RELOADING=1`,
//!   `STOPPING=1`, `STATUS=`) on `NOTIFY_SOCKET`.
//! - [`shutdown`]: signals (SIGTERM/SIGINT to stop, SIGHUP to reload).
//! - [`logging`]: tracing subscriber set-up.
//!
//! Tests and embedders bind a listener themselves and hand it to [`Server::run`].

pub mod admin;
pub mod budget;
pub mod cli;
pub mod config;
pub mod connection;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod pool;
pub mod process_metrics;
pub mod proxy_protocol;
pub mod registry;
pub mod relay;
pub mod service;
pub mod shutdown;
pub mod socket;

pub use config::Config;
pub use listener::Server;
