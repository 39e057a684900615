//! sluice's test kit: an in-process proxy on 127.0.0.1:0, stand-in upstreams, and
//! slow readers and writers.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sluice::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A proxy running in this process.
pub struct Proxy {
    pub addr: SocketAddr,
    pub server: Arc<Server>,
    pub stop: CancellationToken,
    pub task: JoinHandle<()>,
}

/// A configuration for tests: listen on any free port, relay to `upstream`.
pub fn config(upstream: &str) -> Config {
    let text = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{upstream}\"\n[metrics]\naddress = \"127.0.0.1:0\"\n"
    );
    let c = Config::parse(&text, "test").expect("test config parses");
    c.validate("test", None).expect("test config is valid");
    c
}

impl Proxy {
    /// Starts a proxy in front of `upstream` with `tweak` applied to the config.
    pub async fn start(upstream: SocketAddr, tweak: impl FnOnce(&mut Config)) -> Proxy {
        let mut c = config(&upstream.to_string());
        tweak(&mut c);
        Proxy::start_config(c).await
    }

    /// Starts a proxy on a whole configuration file's text (metrics on a free port
    /// unless it says otherwise).
    pub async fn start_text(text: &str) -> Proxy {
        let mut c = Config::parse(text, "test").expect("test config parses");
        if !text.contains("[metrics]") {
            c.metrics.address = "127.0.0.1:0".into();
        }
        Proxy::start_config(c).await
    }

    /// Starts a proxy on `c`; `addr` is its first service's address.
    pub async fn start_config(c: Config) -> Proxy {
        c.validate("test", None).expect("test config is valid");
        let listener = sluice::listener::bind(&c).unwrap();
        let addr = listener.addresses()[0].1;
        let server = Arc::new(Server::new(c));
        let stop = CancellationToken::new();
        let task = {
            let (server, stop) = (server.clone(), stop.clone());
            tokio::spawn(async move { server.run(listener, stop).await.unwrap() })
        };
        server.ready().await;
        Proxy {
            addr,
            server,
            stop,
            task,
        }
    }

    pub fn metrics(&self) -> String {
        self.server.metrics().render()
    }

    /// Serves the proxy's admin endpoint (`/metrics`, `/connections`, `/healthz`,
    /// `/readyz`) on a free loopback port until the proxy stops.
    pub async fn serve_endpoint(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(sluice::admin::serve(
            listener,
            self.server.clone(),
            self.stop.clone(),
        ));
        addr
    }

    /// The address service `name` is bound to now.
    pub fn address(&self, name: &str) -> SocketAddr {
        self.server
            .addresses()
            .into_iter()
            .find_map(|(n, a)| (n == name).then_some(a))
            .unwrap_or_else(|| panic!("no service {name} running"))
    }

    /// The value of one series, e.g. `sluice_bytes_total{direction="client_to_upstream"}`.
    pub fn value(&self, series: &str) -> f64 {
        value(&self.metrics(), series)
    }

    pub fn queued(&self, direction: &str) -> f64 {
        self.value(&format!("sluice_queued_bytes{{direction=\"{direction}\"}}"))
    }

    pub fn closed(&self, reason: &str) -> f64 {
        self.value(&format!(
            "sluice_connections_closed_total{{reason=\"{reason}\"}}"
        ))
    }

    /// Waits until no connection is live and every gauge of live things is back to 0.
    pub async fn settled(&self) {
        eventually("gauges return to zero", Duration::from_secs(10), || {
            let m = self.metrics();
            LIVE_GAUGES.iter().all(|s| value(&m, s) == 0.0)
        })
        .await;
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("proxy stops")
            .unwrap();
    }
}

/// The gauges that count live things: all 0 once no connection is open.
pub const LIVE_GAUGES: [&str; 5] = [
    "sluice_connections_active",
    "sluice_queued_bytes{direction=\"client_to_upstream\"}",
    "sluice_queued_bytes{direction=\"upstream_to_client\"}",
    "sluice_paused_connections{direction=\"client_to_upstream\"}",
    "sluice_paused_connections{direction=\"upstream_to_client\"}",
];

/// The value of `series` in a Prometheus exposition, as PromQL's `sum(series)` would
/// give it: the labels written must match, labels left out (such as `service`) are
/// summed over. `sluice_bytes_total{direction="client_to_upstream"}` is every
/// service's bytes that way. Panics if no series matches.
pub fn value(text: &str, series: &str) -> f64 {
    let (name, wanted) = split_series(series);
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, v)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, labels) = split_series(key);
        if n == name && wanted.iter().all(|w| labels.contains(w)) {
            *found.get_or_insert(0.0) += v.trim().parse::<f64>().unwrap();
        }
    }
    found.unwrap_or_else(|| panic!("series {series} not in the scrape:\n{text}"))
}

/// `name{a="x",b="y"}` as its name and its `a="x"` pairs.
fn split_series(series: &str) -> (&str, Vec<&str>) {
    match series.split_once('{') {
        Some((name, rest)) => {
            let inner = rest.trim_end_matches('}');
            (name, inner.split(',').filter(|p| !p.is_empty()).collect())
        }
        None => (series, Vec::new()),
    }
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `limit`.
pub async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A listener on a free loopback port serving each connection with `f`.
pub async fn upstream<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    upstream_with_rcvbuf(0, f).await
}

/// Like [`upstream`], with SO_RCVBUF set on the listener before listen() so accepted
/// sockets advertise a small window from their first segment (0: kernel default).
pub async fn upstream_with_rcvbuf<F, Fut>(rcvbuf: u32, f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let sock = TcpSocket::new_v4().unwrap();
    if rcvbuf > 0 {
        sock.set_recv_buffer_size(rcvbuf).unwrap();
    }
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(1024).unwrap();
    let addr = l.local_addr().unwrap();
    let f = Arc::new(f);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let f = f.clone();
            tokio::spawn(async move { f(s).await });
        }
    });
    addr
}

/// An upstream that echoes every byte and passes EOF on.
pub async fn echo_upstream() -> SocketAddr {
    upstream(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Deterministic pseudo-random bytes for stream `seed`.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

pub fn sha(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Writes `bytes` in random chunk sizes (1 byte to 64 KiB), then shuts the write half.
pub async fn write_chunked<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    bytes: &[u8],
    seed: u64,
) -> std::io::Result<()> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut at = 0;
    while at < bytes.len() {
        let n = rng.random_range(1..=65536).min(bytes.len() - at);
        w.write_all(&bytes[at..at + n]).await?;
        at += n;
    }
    w.shutdown().await
}

/// Reads to EOF, returning the hash and the length.
pub async fn read_hash<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<([u8; 32], usize)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((h.finalize().into(), total));
        }
        h.update(&buf[..n]);
        total += n;
    }
}

/// Connects with a small SO_RCVBUF (set before connect, so the window is small too).
pub async fn connect_small_rcvbuf(addr: SocketAddr, rcvbuf: u32) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(rcvbuf).unwrap();
    s.connect(addr).await.unwrap()
}

/// Reads to EOF at about `rate` bytes per second, in reads of at most 1 KiB.
pub async fn read_slowly<R: AsyncReadExt + Unpin>(
    r: &mut R,
    rate: u64,
) -> std::io::Result<Vec<u8>> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let due = start + Duration::from_secs_f64(out.len() as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// A loopback address that refuses connections: a socket bound to it that never
/// listens, so no other test can take the port while the guard lives.
pub fn refusing_address() -> (SocketAddr, socket2::Socket) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    (sock.local_addr().unwrap().as_socket().unwrap(), sock)
}

/// `GET path` on a metrics endpoint: the status code and the body.
pub async fn get(endpoint: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(endpoint).await.unwrap();
    // Read to the end below: the endpoint keeps an HTTP/1.1 connection open unless told.
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: sluice\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

/// `GET /connections{query}`, which must answer 200, as JSON.
pub async fn connections(endpoint: SocketAddr, query: &str) -> serde_json::Value {
    let (status, body) = get(endpoint, &format!("/connections{query}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Asks for `/connections{query}` every 10 ms until `cond` holds (20 s at most);
/// returns that listing.
pub async fn poll_connections(
    endpoint: SocketAddr,
    query: &str,
    what: &str,
    mut cond: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listing = connections(endpoint, query).await;
        if cond(&listing) {
            return listing;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; last listing: {listing}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A free loopback address kept for the caller: a socket bound to it with SO_REUSEPORT
/// (as sluice binds) that never listens, so sluice can bind it while no other test's
/// `127.0.0.1:0` is given the port meanwhile. Keep the socket alive while using it.
pub fn reserved_address() -> (SocketAddr, socket2::Socket) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_reuse_address(true).unwrap();
    sock.set_reuse_port(true).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    (sock.local_addr().unwrap().as_socket().unwrap(), sock)
}

/// A loopback address whose handshakes never complete: a listener that never accepts,
/// with its backlog filled. Keep the returned value alive while using the address.
pub async fn blackhole() -> (SocketAddr, Vec<TcpStream>, socket2::Socket) {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    // Fill the accept queue until a handshake stops completing.
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            _ => return (addr, fillers, sock),
        }
    }
    panic!("could not fill the backlog of {addr}");
}

/// The real `sluice` binary, started with a config file, its stderr collected.
pub struct Daemon {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
    pub config_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Writes `config` (TOML) to a temp file and starts sluice on it; returns once it
    /// has logged its listening addresses.
    pub fn start(config: &str) -> Daemon {
        Daemon::start_with(config, |_| {})
    }

    pub fn start_with(config: &str, tweak: impl FnOnce(&mut std::process::Command)) -> Daemon {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("sluice.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = std::process::Command::new(workspace_binary("sluice"));
        cmd.arg("--config")
            .arg(&config_path)
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null());
        tweak(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    for (marker, kind) in [
                        ("sluice listening address=", 0),
                        ("metrics endpoint listening address=", 1),
                    ] {
                        if let Some(rest) = line.split(marker).nth(1) {
                            let addr: SocketAddr =
                                rest.split_whitespace().next().unwrap().parse().unwrap();
                            let _ = tx.send((kind, addr));
                        }
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let mut addrs = [None, None];
        while addrs.iter().any(Option::is_none) {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok((k, a)) => addrs[k] = Some(a),
                Err(_) => panic!("sluice did not start; log: {:?}", log.lock().unwrap()),
            }
        }
        Daemon {
            child,
            addr: addrs[0].unwrap(),
            metrics_addr: addrs[1].unwrap(),
            log,
            config_path,
            _dir: dir,
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill only sends a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// GET /metrics.
    pub fn scrape(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.metrics_addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    pub fn value(&self, series: &str) -> f64 {
        value(&self.scrape(), series)
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Sockets the daemon holds now (entries of /proc/PID/fd that are sockets): a leaked
    /// connection is a leaked socket, while other descriptors come and go (sluice reads
    /// /proc itself).
    pub fn open_sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count()
    }

    /// Waits until no connection is live and every gauge of live things is back to 0.
    pub async fn settled(&self) {
        eventually("gauges return to zero", Duration::from_secs(10), || {
            let m = self.scrape();
            LIVE_GAUGES.iter().all(|s| value(&m, s) == 0.0)
        })
        .await;
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A daemon config relaying `listen 127.0.0.1:0` to `upstream`, plus `extra` TOML.
pub fn daemon_config(upstream: SocketAddr, extra: &str) -> String {
    format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n[upstream]\naddress = \"{upstream}\"\n[metrics]\naddress = \"127.0.0.1:0\"\n{extra}\n"
    )
}

/// A binary of this workspace (`sluice`, `sluice-stress`): the file cargo built beside the
/// running test or tool (`target/<profile>/NAME`; tests run from `target/<profile>/deps`).
/// `cargo test` at the top builds every member's binaries before it runs any test.
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the running executable's path");
    let mut dir = exe
        .parent()
        .expect("the executable's directory")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built (run `cargo build --workspace`)",
        path.display()
    );
    path
}
