//! The real `sluice` binary for tests: a [`ChildProcess`] on a config file written from a
//! [`Config`], with helpers that panic instead of returning errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use sluice::Config;

use crate::child::ChildProcess;
use crate::notify::{Notice, Ready};
use crate::scrape::{LIVE_GAUGES, Scrape};
use crate::wait::eventually;

/// How long a test's scrape may take: generous, a loaded machine is slow, never wrong.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(30);

/// The `sluice` binary, started on a config file, ready once it said so.
pub struct Daemon {
    pub process: ChildProcess,
    /// Its first service's address at start-up.
    pub addr: SocketAddr,
    /// Its admin endpoint.
    pub metrics_addr: SocketAddr,
    /// The file it reads (again on SIGHUP).
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Writes `config` to a temp file and starts sluice on it; returns once it is ready.
    pub fn start(config: &Config) -> Daemon {
        Daemon::start_with(config, |_| {})
    }

    /// As [`Daemon::start`], with `tweak` applied to the command first.
    pub fn start_with(config: &Config, tweak: impl FnOnce(&mut Command)) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("sluice.toml");
        std::fs::write(&config_path, crate::config::to_toml(config)).unwrap();
        let mut cmd = Command::new(crate::workspace_binary("sluice"));
        cmd.arg("--config").arg(&config_path);
        tweak(&mut cmd);
        let process = ChildProcess::spawn(cmd, "sluice", true, None)
            .unwrap_or_else(|e| panic!("sluice did not start: {e:#}"));
        Daemon {
            addr: process.listen_addr(),
            metrics_addr: process
                .metrics_addr()
                .expect("spawn checks the admin address"),
            process,
            config_path,
            _dir: dir,
        }
    }

    /// Replaces the config file (read at the next SIGHUP).
    pub fn write_config(&self, config: &Config) {
        std::fs::write(&self.config_path, crate::config::to_toml(config)).unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn signal(&self, sig: i32) {
        self.process.signal(sig).unwrap();
    }

    /// SIGHUP, and waits until sluice has taken or refused the file (`READY=1` again).
    pub fn reload(&mut self) -> Ready {
        self.process
            .reload()
            .unwrap_or_else(|e| panic!("{e:#}"))
            .clone()
    }

    /// Waits until sluice says `STOPPING=1` (a graceful shutdown began).
    pub fn stopping(&mut self) {
        self.process
            .wait_for("STOPPING=1", Duration::from_secs(10), |n| {
                matches!(n, Notice::Stopping)
            })
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// GET /metrics, parsed.
    pub fn scrape(&self) -> Scrape {
        crate::scrape::scrape(self.metrics_addr, SCRAPE_TIMEOUT)
            .unwrap_or_else(|e| panic!("scrape failed: {e:#}; log:\n{}", self.process.log_text()))
    }

    /// The value of one series (see [`Scrape::value`]).
    pub fn value(&self, series: &str) -> f64 {
        self.scrape().value(series)
    }

    /// Scrapes until `done` holds and returns that scrape; fails with the last scrape and
    /// the log after `limit`.
    pub fn poll(
        &self,
        what: &str,
        limit: Duration,
        mut done: impl FnMut(&Scrape) -> bool,
    ) -> Scrape {
        let deadline = Instant::now() + limit;
        loop {
            let scrape = self.scrape();
            if done(&scrape) {
                return scrape;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for: {what}\n--- last scrape ---\n{}\n--- sluice log ---\n{}",
                scrape.text(),
                self.process.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.process.wait(limit)
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.process.log_lines()
    }

    /// Sockets the daemon holds now.
    pub fn open_sockets(&self) -> usize {
        self.process.open_sockets()
    }

    /// Waits until no connection is live and every gauge of live things is back to 0.
    pub async fn settled(&self) {
        eventually("gauges return to zero", Duration::from_secs(10), || {
            let m = self.scrape();
            LIVE_GAUGES.iter().all(|s| m.value(s) == 0.0)
        })
        .await;
    }
}
