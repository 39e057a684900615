//! The subjects measured by `bench`: a direct connection, sluice, tokio's copy_bidirectional,
//! HAProxy and nginx; how each is configured, started on a free loopback port, watched and stopped.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;

use super::cpu::CpuMeter;
use crate::proxy_process::{self, ProxyConfig, ProxyProcess};

/// How long a subject may take to start listening before we give up on it.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a subject may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// The per-direction buffer every proxy gets in the memory tests, so that the figures compare
/// like with like (HAProxy's and nginx's default, and the bound the issue names).
pub const MEMORY_BUFFER: usize = 16 * 1024;

/// Connection limit given to the competitors, well above the idle test's connection count
/// (HAProxy needs about two descriptors per connection under the 20,000 fd limit here).
const COMPETITOR_MAXCONN: usize = 8000;

/// Which subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SubjectKind {
    /// Client straight to the upstream: the physical limit, no proxy.
    Direct,
    /// The real sluice binary with a generated config.
    Sluice,
    /// The same, with `relay.mode = "splice"`.
    #[value(name = "sluice_splice")]
    SluiceSplice,
    /// The same, with `runtime.scheduler = "pinned"`.
    #[value(name = "sluice_pinned")]
    SluicePinned,
    /// tokio's `copy_bidirectional`, the naive Rust relay, in its own child process.
    CopyBidirectional,
    /// HAProxy in `mode tcp`, 2 threads, no splice.
    Haproxy,
    /// nginx `stream` module, 2 workers, `proxy_half_close on`.
    Nginx,
}

impl SubjectKind {
    pub const ALL: [SubjectKind; 7] = [
        SubjectKind::Direct,
        SubjectKind::Sluice,
        SubjectKind::SluiceSplice,
        SubjectKind::SluicePinned,
        SubjectKind::CopyBidirectional,
        SubjectKind::Haproxy,
        SubjectKind::Nginx,
    ];

    /// Stable identifier used in JSON.
    pub fn id(self) -> &'static str {
        match self {
            SubjectKind::Direct => "direct",
            SubjectKind::Sluice => "sluice",
            SubjectKind::SluiceSplice => "sluice_splice",
            SubjectKind::SluicePinned => "sluice_pinned",
            SubjectKind::CopyBidirectional => "copy_bidirectional",
            SubjectKind::Haproxy => "haproxy",
            SubjectKind::Nginx => "nginx",
        }
    }

    /// Whether memory figures mean anything (a direct connection has no proxy process).
    pub fn has_process(self) -> bool {
        self != SubjectKind::Direct
    }
}

/// Which configuration to start a subject with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Each subject's defaults (speed tests).
    Defaults,
    /// 16 KiB per direction everywhere (memory tests).
    Memory,
    /// Each subject as a user gets it (what a slow reader costs): as `Defaults`, except that
    /// sluice's generated config leaves its socket buffer keys out, so they are the daemon's
    /// shipped defaults rather than 0 (the kernel's autotuning, as every competitor has).
    Shipped,
}

/// A subject found on this machine and ready to be started.
#[derive(Clone, Debug)]
pub struct Subject {
    pub kind: SubjectKind,
    /// Program to run (unused for `Direct`).
    exe: PathBuf,
    /// nginx's stream module, when it is built as a dynamic module.
    nginx_module: Option<PathBuf>,
    /// Version string for the report.
    pub version: String,
}

/// A subject that could not be measured, and why.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Skipped {
    pub id: &'static str,
    pub reason: String,
}

impl Subject {
    /// Human-readable name and configuration for the report.
    pub fn label(&self) -> String {
        match self.kind {
            SubjectKind::Direct => "direct connection (the limit)".into(),
            SubjectKind::Sluice => format!("sluice {}", self.version),
            SubjectKind::SluiceSplice => format!("sluice (splice) {}", self.version),
            SubjectKind::SluicePinned => format!("sluice (pinned) {}", self.version),
            SubjectKind::CopyBidirectional => "tokio copy_bidirectional".into(),
            SubjectKind::Haproxy => format!("HAProxy {}, mode tcp, 2 threads", self.version),
            SubjectKind::Nginx => format!("nginx {} stream, 2 workers", self.version),
        }
    }

    /// What was configured, in words, for the report.
    pub fn config_note(&self) -> &'static str {
        match self.kind {
            SubjectKind::Direct => "client connects straight to the upstream",
            SubjectKind::Sluice => {
                "generated config (default relay.mode and runtime.scheduler); speed: default 64 KiB bounds; memory: 16 KiB bounds each way; slow-reader cost: default 64 KiB bounds and default socket buffers (no [socket] *_buffer keys)"
            }
            SubjectKind::SluiceSplice => {
                "as sluice, with relay.mode = \"splice\" (a pipe per direction with bytes queued)"
            }
            SubjectKind::SluicePinned => {
                "as sluice, with runtime.scheduler = \"pinned\" (a connection stays on one worker's event loop)"
            }
            SubjectKind::CopyBidirectional => {
                "tokio::io::copy_bidirectional in a child process, 2 worker threads; \
                 speed and slow-reader cost: 8 KiB buffers (default); memory: 16 KiB each way (_with_sizes)"
            }
            SubjectKind::Haproxy => {
                "nbthread 2, mode tcp, no splice, tune.bufsize 16384 (default), client-fin/server-fin 60s"
            }
            SubjectKind::Nginx => {
                "worker_processes 2, proxy_half_close on, proxy_buffer_size 16k (default)"
            }
        }
    }

    /// Start the subject in front of `upstream`. For `Direct` nothing is started.
    pub fn launch(&self, upstream: SocketAddr, profile: Profile) -> Result<Running> {
        match self.kind {
            SubjectKind::Direct => Ok(Running::direct(upstream)),
            SubjectKind::Sluice => self.launch_sluice(upstream, profile, "copy", "stealing"),
            SubjectKind::SluiceSplice => {
                self.launch_sluice(upstream, profile, "splice", "stealing")
            }
            SubjectKind::SluicePinned => self.launch_sluice(upstream, profile, "copy", "pinned"),
            SubjectKind::CopyBidirectional => self.launch_copy_bidirectional(upstream, profile),
            SubjectKind::Haproxy => self.launch_haproxy(upstream),
            SubjectKind::Nginx => self.launch_nginx(upstream),
        }
        .with_context(|| format!("starting {}", self.kind.id()))
    }

    fn launch_sluice(
        &self,
        upstream: SocketAddr,
        profile: Profile,
        relay_mode: &'static str,
        scheduler: &'static str,
    ) -> Result<Running> {
        // The stress tool's generated config with the bounds of the profile and the socket
        // buffers at 0, the kernel's autotuning, as every other subject has them; as shipped,
        // whatever the daemon's own default is.
        let mut config = ProxyConfig::new(upstream);
        config.socket_buffer = match profile {
            Profile::Shipped => None,
            Profile::Defaults | Profile::Memory => Some(0),
        };
        config.relay_mode = relay_mode;
        config.scheduler = scheduler;
        if profile == Profile::Memory {
            config.client_to_upstream = MEMORY_BUFFER as u64;
            config.upstream_to_client = MEMORY_BUFFER as u64;
        }
        let proxy = ProxyProcess::spawn_sluice_from(&self.exe, &config)?;
        Ok(Running::ours(proxy))
    }

    fn launch_copy_bidirectional(&self, upstream: SocketAddr, profile: Profile) -> Result<Running> {
        let buffer = match profile {
            Profile::Defaults | Profile::Shipped => super::copy_bidirectional::TOKIO_DEFAULT_BUFFER,
            Profile::Memory => MEMORY_BUFFER,
        };
        let mut command = Command::new(&self.exe);
        command
            .args(["bench", "--serve-copy-bidirectional"])
            .arg(upstream.to_string())
            .arg("--relay-buffer")
            .arg(buffer.to_string());
        let relay = ProxyProcess::spawn(command, "copy_bidirectional", false, None)?;
        Ok(Running::ours(relay))
    }

    fn launch_haproxy(&self, upstream: SocketAddr) -> Result<Running> {
        let dir = tempdir("haproxy")?;
        let port = free_port()?;
        // No `option splice-*`: the issue compares against HAProxy copying through its own
        // buffers, as sluice does.
        let config = format!(
            "global\n    nbthread 2\n    maxconn {COMPETITOR_MAXCONN}\n    tune.bufsize {MEMORY_BUFFER}\n\
             defaults\n    mode tcp\n    maxconn {COMPETITOR_MAXCONN}\n    timeout connect 5s\n\
             \x20   timeout client 10m\n    timeout server 10m\n    timeout client-fin 60s\n\
             \x20   timeout server-fin 60s\n\
             listen bench\n    bind 127.0.0.1:{port}\n    server upstream {upstream}\n"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let log = dir.path().join("haproxy.log");
        let log_file = std::fs::File::create(&log)?;
        let child = die_with_parent(Command::new(&self.exe))
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("running {}", self.exe.display()))?;
        let mut running = Running::process(child, Some(dir), 1);
        running.wait_listening(port, &log)?;
        running.ready(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    fn launch_nginx(&self, upstream: SocketAddr) -> Result<Running> {
        let dir = tempdir("nginx")?;
        let port = free_port()?;
        let mut config = String::new();
        if let Some(module) = &self.nginx_module {
            writeln!(config, "load_module {};", module.display())?;
        }
        let d = dir.path().display();
        write!(
            config,
            "daemon off;\nmaster_process on;\nworker_processes 2;\nworker_rlimit_nofile 16384;\n\
             pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections {COMPETITOR_MAXCONN}; }}\n\
             stream {{\n    server {{\n        listen 127.0.0.1:{port};\n\
             \x20       proxy_pass {upstream};\n        proxy_half_close on;\n\
             \x20       proxy_buffer_size 16k;\n        proxy_timeout 10m;\n    }}\n}}\n"
        )?;
        let (child, log) = spawn_nginx(&self.exe, dir.path(), &config)?;
        // The master and its two workers.
        let mut running = Running::process(child, Some(dir), 3);
        running.wait_listening(port, &log)?;
        running.ready(SocketAddr::from(([127, 0, 0, 1], port)))
    }
}

/// Find every subject this machine can run; the ones it cannot come back as `Skipped`.
pub fn discover(
    sluice: Option<&Path>,
    only: &[SubjectKind],
) -> Result<(Vec<Subject>, Vec<Skipped>)> {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for kind in SubjectKind::ALL {
        if !only.is_empty() && !only.contains(&kind) {
            continue;
        }
        let subject = match kind {
            SubjectKind::Direct => Ok(Subject {
                kind,
                exe: PathBuf::new(),
                nginx_module: None,
                version: String::new(),
            }),
            SubjectKind::Sluice => Ok(find_sluice(sluice)?),
            SubjectKind::SluiceSplice | SubjectKind::SluicePinned => Ok(Subject {
                kind,
                ..find_sluice(sluice)?
            }),
            SubjectKind::CopyBidirectional => Ok(Subject {
                kind,
                exe: std::env::current_exe().context("finding sluice-stress itself")?,
                nginx_module: None,
                version: "tokio 1.x".into(),
            }),
            SubjectKind::Haproxy => find_haproxy(),
            SubjectKind::Nginx => find_nginx(),
        };
        match subject {
            Ok(subject) => found.push(subject),
            Err(reason) => skipped.push(Skipped {
                id: kind.id(),
                reason,
            }),
        }
    }
    Ok((found, skipped))
}

fn find_sluice(explicit: Option<&Path>) -> Result<Subject> {
    let exe = match explicit {
        Some(path) => path.to_path_buf(),
        None => {
            let me = std::env::current_exe().context("finding sluice-stress itself")?;
            let sibling = me.with_file_name("sluice");
            if sibling.is_file() {
                sibling
            } else {
                which("sluice").ok_or_else(|| {
                    anyhow!(
                        "no sluice binary next to {} or on PATH (build it with \
                         `cargo build --release`, or pass --sluice PATH)",
                        me.display()
                    )
                })?
            }
        }
    };
    let output = Command::new(&exe)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", exe.display()))?;
    let version = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .last()
        .unwrap_or("?")
        .to_string();
    Ok(Subject {
        kind: SubjectKind::Sluice,
        exe,
        nginx_module: None,
        version,
    })
}

fn find_haproxy() -> Result<Subject, String> {
    let exe = which("haproxy").ok_or("haproxy is not installed (apt install haproxy)")?;
    let output = Command::new(&exe)
        .arg("-v")
        .output()
        .map_err(|e| format!("haproxy -v: {e}"))?;
    // "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.split('-').next())
        .unwrap_or("?")
        .to_string();
    Ok(Subject {
        kind: SubjectKind::Haproxy,
        exe,
        nginx_module: None,
        version,
    })
}

fn find_nginx() -> Result<Subject, String> {
    let exe = which("nginx").ok_or("nginx is not installed (apt install nginx)")?;
    let output = Command::new(&exe)
        .arg("-V")
        .output()
        .map_err(|e| format!("nginx -V: {e}"))?;
    // nginx prints its version and build options on stderr.
    let text = String::from_utf8_lossy(&output.stderr);
    let version = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix("nginx/"))
        .unwrap_or("?")
        .to_string();
    let nginx_module =
        if text.contains("--with-stream=dynamic") {
            let candidates = [
                "/usr/lib/nginx/modules/ngx_stream_module.so",
                "/usr/lib64/nginx/modules/ngx_stream_module.so",
                "/usr/share/nginx/modules/ngx_stream_module.so",
            ];
            let found = candidates.iter().map(PathBuf::from).find(|p| p.is_file());
            Some(found.ok_or(
                "nginx's stream module is not installed (apt install libnginx-mod-stream)",
            )?)
        } else if text.contains("--with-stream") {
            None
        } else {
            return Err("nginx was built without the stream module".into());
        };
    Ok(Subject {
        kind: SubjectKind::Nginx,
        exe,
        nginx_module,
        version,
    })
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A started subject: where to connect, and the process (tree) to measure and stop.
pub struct Running {
    pub addr: SocketAddr,
    process: Process,
    /// Processes the subject runs once it is ready (nginx: master and workers).
    processes: usize,
    /// Holds the generated config until the subject is stopped.
    _dir: Option<TempDir>,
}

/// The process behind a subject.
enum Process {
    /// A direct connection has none.
    None,
    /// sluice or the copy_bidirectional relay: a child of ours, ready when it says so.
    Ours(ProxyProcess),
    /// Anything else.
    Child(Child),
}

impl Running {
    fn direct(upstream: SocketAddr) -> Running {
        Running {
            addr: upstream,
            process: Process::None,
            processes: 0,
            _dir: None,
        }
    }

    /// A child of ours, ready (it said so) with its one process.
    fn ours(proxy: ProxyProcess) -> Running {
        Running {
            addr: proxy.listen_addr(),
            process: Process::Ours(proxy),
            processes: 1,
            _dir: None,
        }
    }

    fn process(child: Child, dir: Option<TempDir>, processes: usize) -> Running {
        Running {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            process: Process::Child(child),
            processes,
            _dir: dir,
        }
    }

    fn root_pid(&self) -> Option<u32> {
        match &self.process {
            Process::None => None,
            Process::Ours(proxy) => Some(proxy.pid()),
            Process::Child(child) => Some(child.id()),
        }
    }

    /// Record the address and wait until every process of the subject exists.
    fn ready(mut self, addr: SocketAddr) -> Result<Running> {
        self.addr = addr;
        let deadline = Instant::now() + START_TIMEOUT;
        while self.pids().len() < self.processes {
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "only {} of {} processes started",
                    self.pids().len(),
                    self.processes
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(self)
    }

    /// Poll the kernel's socket table until something listens on 127.0.0.1:`port`. Unlike a
    /// probe connection this opens nothing through the proxy.
    fn wait_listening(&mut self, port: u16, log: &Path) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if listening_on(port) {
                return Ok(());
            }
            if let Err(e) = self.check_alive() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                return Err(e.context(text.trim().to_string()));
            }
            if Instant::now() > deadline {
                bail!("nothing listening on port {port} after {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        let status = match &mut self.process {
            Process::None => None,
            Process::Ours(proxy) => proxy.try_exited(),
            Process::Child(child) => child.try_wait()?,
        };
        if let Some(status) = status {
            bail!("exited early with {status}");
        }
        Ok(())
    }

    /// The subject's process and all its descendants.
    pub fn pids(&self) -> Vec<u32> {
        self.root_pid().map(process_tree).unwrap_or_default()
    }

    /// A reader of the CPU time of the whole process tree as it is now (every process a
    /// subject runs exists once it is ready).
    pub fn cpu_meter(&self) -> CpuMeter {
        CpuMeter::new(self.pids())
    }

    /// Resident memory of the whole process tree, KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids().into_iter().map(rss_kib).sum()
    }

    /// SIGTERM the process (nginx's master takes its workers down), then SIGKILL what is left.
    pub fn stop(&mut self) {
        let tree = self.pids();
        match std::mem::replace(&mut self.process, Process::None) {
            Process::None => return,
            Process::Ours(proxy) => {
                // An error here means it had to be killed; the measurement is done anyway.
                let _ = proxy.stop(STOP_TIMEOUT);
            }
            Process::Child(mut child) => {
                let _ = proxy_process::signal(child.id(), libc::SIGTERM);
                let deadline = Instant::now() + STOP_TIMEOUT;
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Whatever outlived its parent (nginx workers after a SIGKILL of the master).
        for pid in tree.into_iter().skip(1) {
            let _ = proxy_process::signal(pid, libc::SIGKILL);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts nginx (`exe`) with `config` written into `dir`, its error log there too.
/// Returns the child and the error log's path.
pub fn spawn_nginx(exe: &Path, dir: &Path, config: &str) -> Result<(Child, PathBuf)> {
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config)?;
    let log = dir.join("error.log");
    let child = die_with_parent(Command::new(exe))
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log"))?)
        .spawn()
        .with_context(|| format!("running {}", exe.display()))?;
    Ok((child, log))
}

/// Waits until something listens on loopback `port`, failing early (with `log`'s text,
/// if any) when `child`, called `what`, exits first.
pub fn wait_for_listener(
    child: &mut Child,
    port: u16,
    timeout: Duration,
    what: &str,
    log: Option<&Path>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !listening_on(port) {
        if let Some(status) = child.try_wait()? {
            let text = log
                .and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default();
            bail!("{what} exited early with {status}: {}", text.trim());
        }
        if Instant::now() > deadline {
            bail!("{what} is not listening after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Make `command`'s child die with this process (the thread that spawns it lives for the whole
/// run), so an interrupted bench leaves no proxy behind.
pub fn die_with_parent(mut command: Command) -> Command {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// A loopback port nobody listens on right now (competitors cannot report a port 0 back).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether /proc/net/tcp shows a socket listening on 127.0.0.1:`port`.
pub fn listening_on(port: u16) -> bool {
    let wanted = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .map(|table| {
            table.lines().skip(1).any(|line| {
                let mut fields = line.split_whitespace();
                let local = fields.nth(1);
                let state = fields.nth(1);
                local == Some(wanted.as_str()) && state == Some("0A")
            })
        })
        .unwrap_or(false)
}

/// `root` and every process descending from it.
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = parent_of(pid) {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    tree.retain(|pid| Path::new(&format!("/proc/{pid}")).exists());
    tree
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may contain spaces, so split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// VmRSS of one process, KiB (0 once it has gone).
pub fn rss_kib(pid: u32) -> u64 {
    proxy_process::rss_of(pid).map_or(0, |bytes| bytes / 1024)
}

/// A scratch directory for generated configs, removed on drop.
fn tempdir(what: &str) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("sluice-bench-{what}-"))
        .tempdir()
        .context("creating a temporary directory")
}
