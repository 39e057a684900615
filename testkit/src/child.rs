//! A child process of ours (sluice, or a tool of the stress tool) started with
//! `NOTIFY_SOCKET` pointing at a socket the kit binds: ready when it says `READY=1`, its
//! addresses taken from that message, never from its log. Its stderr is kept as a tail
//! for failure messages. Signal it, wait for its next notice (a reload's `READY=1`,
//! `STOPPING=1`), stop it with SIGTERM.
//!
//! Everything here is blocking (std), so it can be used from a sampler thread.
//!
//! Spawn from a thread that outlives the child (the main thread, or the test's): the child
//! gets `PR_SET_PDEATHSIG`, which fires when the *spawning thread* exits.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use sluice::Config;

use crate::notify::{NOTIFY_SOCKET, Notice, NotifySocket, Ready};
use crate::scrape::Scrape;

/// How long a child may take to say it is ready (or to answer a reload) before we give up.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How many of the child's last log lines we keep for error messages.
const LOG_TAIL_LINES: usize = 1000;
/// Timeout for one metrics scrape; loopback answers in microseconds, a stuck proxy must not
/// stall a sampler.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a wait for a notice checks that the child is still alive.
const ALIVE_CHECK: Duration = Duration::from_millis(50);

/// A running child. Dropping it kills the child (SIGKILL); call [`ChildProcess::stop`] for
/// a graceful SIGTERM.
pub struct ChildProcess {
    /// What we call it in messages ("sluice", "unbounded relay").
    name: String,
    child: Child,
    /// What it said in its last `READY=1`.
    ready: Ready,
    /// Its notices after the first `READY=1`, in order, read by a thread of their own so
    /// the child never blocks on a full socket.
    notices: mpsc::Receiver<Notice>,
    /// Tells the notice reader to end.
    closed: Arc<AtomicBool>,
    /// The last lines the child wrote to stderr.
    log: Arc<Mutex<VecDeque<String>>>,
    /// Holds a generated config file alive for as long as the child runs.
    _dir: Option<tempfile::TempDir>,
}

impl ChildProcess {
    /// Starts `cmd` with `NOTIFY_SOCKET` set and waits for its `READY=1`, which must name at
    /// least one address (and the admin endpoint if `expect_admin`). `dir` is kept until
    /// the child is gone (its config file, say).
    pub fn spawn(
        mut cmd: Command,
        name: &str,
        expect_admin: bool,
        dir: Option<tempfile::TempDir>,
    ) -> Result<Self> {
        let socket = NotifySocket::bind().context("cannot bind a notify socket")?;
        cmd.env(NOTIFY_SOCKET, socket.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Plain log lines, whatever the logging library thinks of terminals.
            .env("NO_COLOR", "1")
            // Own process group: a terminal's Ctrl-C reaches only the parent, which then
            // stops the child itself and can still print its summary.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // Die with the parent, so a killed parent leaves no child behind.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        {
            let log = Arc::clone(&log);
            std::thread::Builder::new()
                .name(format!("{name}-stderr"))
                .spawn(move || keep_log_tail(stderr, &log))
                .context("cannot start the log reader thread")?;
        }
        let (tx, notices) = mpsc::channel();
        let closed = Arc::new(AtomicBool::new(false));
        {
            let closed = Arc::clone(&closed);
            std::thread::Builder::new()
                .name(format!("{name}-notify"))
                .spawn(move || read_notices(&socket, &tx, &closed))
                .context("cannot start the notice reader thread")?;
        }
        let mut proc = ChildProcess {
            name: name.to_string(),
            child,
            ready: Ready::default(),
            notices,
            closed,
            log,
            _dir: dir,
        };
        proc.wait_ready(STARTUP_TIMEOUT)?;
        if proc.ready.services.is_empty() || (expect_admin && proc.ready.admin.is_none()) {
            bail!(
                "{name} said READY=1 without the addresses expected ({:?}); log:\n{}",
                proc.ready,
                proc.log_text()
            );
        }
        Ok(proc)
    }

    /// The `sluice` binary: `$SLUICE_BIN` if set, else the one cargo built beside the
    /// running executable (built now if missing, when this is a source tree).
    pub fn sluice_binary() -> Result<PathBuf> {
        if let Some(path) = std::env::var_os("SLUICE_BIN") {
            return Ok(PathBuf::from(path));
        }
        let path = crate::binary_path("sluice")?;
        if !path.exists() {
            // `cargo run --bin sluice-stress` builds only that binary; build its sibling the
            // same way, so the demo works from a fresh clone with one command.
            build_sluice(&path)?;
        }
        if !path.exists() {
            bail!(
                "the sluice binary is not at {} (build it with `cargo build`, or set SLUICE_BIN)",
                path.display()
            );
        }
        Ok(path)
    }

    /// Writes `config` to a temporary file and starts [`sluice_binary`] on it.
    ///
    /// [`sluice_binary`]: ChildProcess::sluice_binary
    pub fn spawn_sluice(config: impl Into<Config>) -> Result<Self> {
        Self::spawn_sluice_from(&Self::sluice_binary()?, config)
    }

    /// Writes `config` to a temporary file and starts the sluice at `binary` on it.
    pub fn spawn_sluice_from(binary: &Path, config: impl Into<Config>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-kit-")
            .tempdir()
            .context("cannot create a temporary directory for the sluice config")?;
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, crate::config::to_toml(&config.into()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut cmd = Command::new(binary);
        cmd.arg("--config").arg(&path);
        Self::spawn(cmd, "sluice", true, Some(dir))
    }

    /// Starts sluice with an existing config file plus extra arguments (e.g. `--listen`
    /// overrides, as the demo does with the shipped `proxy.toml`).
    pub fn spawn_sluice_with_file(config: &Path, extra_args: &[String]) -> Result<Self> {
        let mut cmd = Command::new(Self::sluice_binary()?);
        cmd.arg("--config").arg(config).args(extra_args);
        Self::spawn(cmd, "sluice", true, None)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where clients connect: the first service it named.
    pub fn listen_addr(&self) -> SocketAddr {
        self.ready.services[0].1
    }

    /// Where clients of service `name` connect, as of its last `READY=1`.
    pub fn service_addr(&self, name: &str) -> Option<SocketAddr> {
        self.ready.service(name)
    }

    /// What its last `READY=1` said.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// Where `/metrics` is served, if the child has an admin endpoint.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.ready.admin
    }

    /// `http://ADDR/metrics`, for people to open while a run goes on.
    pub fn metrics_url(&self) -> Option<String> {
        self.ready.admin.map(|a| format!("http://{a}/metrics"))
    }

    /// The child's resident set size now.
    pub fn rss_bytes(&self) -> Result<u64> {
        crate::procfs::rss_of(self.pid())
    }

    /// How many sockets the child holds now.
    pub fn open_sockets(&self) -> usize {
        crate::procfs::open_sockets(self.pid())
    }

    /// Scrapes and parses `/metrics`.
    pub fn scrape(&self) -> Result<Scrape> {
        let addr = self
            .ready
            .admin
            .ok_or_else(|| anyhow!("{} has no metrics endpoint", self.name))?;
        crate::scrape::scrape(addr, SCRAPE_TIMEOUT)
    }

    /// The last lines of the child's stderr, oldest first.
    pub fn log_lines(&self) -> Vec<String> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().cloned().collect()
    }

    /// [`ChildProcess::log_lines`] as one text.
    pub fn log_text(&self) -> String {
        self.log_lines().join("\n")
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        signal(self.pid(), sig)
    }

    /// Waits (at most `limit`) for the next notice for which `wanted` holds, skipping the
    /// others; a `READY=1` on the way updates the addresses.
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        mut wanted: impl FnMut(&Notice) -> bool,
    ) -> Result<Notice> {
        let deadline = Instant::now() + limit;
        loop {
            match self.notices.recv_timeout(ALIVE_CHECK) {
                Ok(notice) => {
                    if let Notice::Ready(ready) = &notice {
                        self.ready = ready.clone();
                    }
                    if wanted(&notice) {
                        return Ok(notice);
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("{}'s notify socket failed", self.name)
                }
            }
            if let Some(status) = self.try_exited() {
                bail!(
                    "{} exited ({status}) before {what}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not say {what} within {limit:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
        }
    }

    /// Waits for the next `READY=1`.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<&Ready> {
        self.wait_for("READY=1", limit, |n| matches!(n, Notice::Ready(_)))?;
        Ok(&self.ready)
    }

    /// SIGHUP, then waits until the reload is done (`RELOADING=1`, then `READY=1`, which
    /// sluice says whether it took the new file or refused it).
    pub fn reload(&mut self) -> Result<&Ready> {
        self.signal(libc::SIGHUP)?;
        self.wait_for("RELOADING=1", STARTUP_TIMEOUT, |n| {
            matches!(n, Notice::Reloading)
        })?;
        self.wait_ready(STARTUP_TIMEOUT)
    }

    /// `Some(status)` once the child has exited.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the child to exit, at most `limit`; `None` if it is still running.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then wait up to `grace` for it to exit (SIGKILL after that, and an error).
    /// A child that has already exited (sluice died, the baseline at its cap) just gives
    /// its status.
    pub fn stop(mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_exited() {
            return Ok(status);
        }
        self.signal(libc::SIGTERM)?;
        if let Some(status) = self.wait(grace) {
            return Ok(status);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!(
            "{} did not exit within {grace:?} of SIGTERM; killed it. log:\n{}",
            self.name,
            self.log_text()
        )
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads the child's notices until the child is dropped, passing each on.
fn read_notices(socket: &NotifySocket, tx: &mpsc::Sender<Notice>, closed: &AtomicBool) {
    while !closed.load(Ordering::Relaxed) {
        match socket.recv(ALIVE_CHECK) {
            Ok(Some(notice)) => {
                if tx.send(notice).is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

/// Reads the child's stderr line by line, keeping the last [`LOG_TAIL_LINES`].
fn keep_log_tail(stderr: impl Read, log: &Mutex<VecDeque<String>>) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == LOG_TAIL_LINES {
            log.pop_front();
        }
        log.push_back(strip_ansi(&line));
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`), in case the child colours its log.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Sends `sig` to `pid`; a process that is already gone is not an error.
pub fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            return Err(err).with_context(|| format!("cannot signal process {pid}"));
        }
    }
    Ok(())
}

/// Runs `cargo build --bin sluice` for the profile `target` is in (target/release or
/// target/debug), in the source tree the kit was compiled from.
fn build_sluice(target: &Path) -> Result<()> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    if !manifest.exists() {
        return Ok(());
    }
    let release = target
        .parent()
        .and_then(|d| d.file_name())
        .is_some_and(|n| n == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build").arg("--manifest-path").arg(&manifest);
    if release {
        cmd.arg("--release");
    }
    cmd.args(["--bin", "sluice"]);
    eprintln!(
        "sluice-stress: the sluice binary is not built yet; running cargo build{} --bin sluice",
        if release { " --release" } else { "" }
    );
    let status = cmd.status().context("cannot run cargo to build sluice")?;
    if !status.success() {
        bail!("building sluice failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colour() {
        let coloured = "\u{1b}[32m INFO\u{1b}[0m sluice: shutdown \u{1b}[3mbegun\u{1b}[0m";
        assert_eq!(strip_ansi(coloured), " INFO sluice: shutdown begun");
    }
}
