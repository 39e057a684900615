//! The request/response case: HTTP/1.1 keep-alive requests for a 1 KiB file through each
//! subject. With wrk and nginx installed, a real nginx serves the file and `wrk --latency`
//! drives it; otherwise sluice-stress's own client runs against the built-in HTTP upstream.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;

use super::subjects;
use super::traffic::{HTTP_CONNS, Requests};
use super::upstreams::HTTP_BODY;
use crate::proxy_process;

/// wrk's threads: one per core of the 2-core machine the figures are quoted for.
pub const WRK_THREADS: usize = 2;

/// nginx workers serving the file. One: on two cores it is a fixed one-core ceiling that
/// every subject shares, and a second worker would only take CPU from wrk and the proxy.
pub const NGINX_WORKERS: usize = 1;

/// How long nginx gets to start listening, and to exit after SIGTERM.
const NGINX_TIMEOUT: Duration = Duration::from_secs(10);

/// The installed wrk's version ("wrk 4.1.0"), or None when it is not installed.
pub fn wrk_version() -> Option<String> {
    // `wrk -v` prints "wrk debian/4.1.0-3+b2 [epoll] Copyright ..." and exits 1.
    let output = Command::new("wrk").arg("-v").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.split_whitespace().nth(1)?;
    let version = version.rsplit('/').next()?.split('-').next()?;
    Some(format!("wrk {version}"))
}

/// A real nginx serving `/1k` (1 KiB) over HTTP/1.1 keep-alive on a free loopback port,
/// from a generated config in a temporary directory.
pub struct NginxUpstream {
    pub addr: SocketAddr,
    child: Child,
    _dir: TempDir,
}

impl NginxUpstream {
    pub fn start() -> Result<NginxUpstream> {
        let exe = subjects::which("nginx").context("nginx is not installed")?;
        let dir = tempfile::Builder::new()
            .prefix("sluice-bench-http-")
            .tempdir()
            .context("creating a temporary directory")?;
        // The workers run as an unprivileged user when started as root: let them in.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let www = dir.path().join("www");
        std::fs::create_dir(&www)?;
        std::fs::set_permissions(&www, std::fs::Permissions::from_mode(0o755))?;
        let body: Vec<u8> = (0..HTTP_BODY).map(|i| b'a' + (i % 26) as u8).collect();
        std::fs::write(www.join("1k"), body)?;
        std::fs::set_permissions(www.join("1k"), std::fs::Permissions::from_mode(0o644))?;

        let port = subjects::free_port()?;
        let d = dir.path().display();
        let mut config = String::new();
        write!(
            config,
            "daemon off;\nmaster_process on;\nworker_processes {NGINX_WORKERS};\n\
             pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n    access_log off;\n    default_type application/octet-stream;\n\
             \x20   keepalive_requests 100000000;\n    keepalive_timeout 10m;\n\
             \x20   tcp_nodelay on;\n\
             \x20   client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   server {{\n        listen 127.0.0.1:{port};\n        root {d}/www;\n\
             \x20       location = /1k {{ }}\n    }}\n}}\n"
        )?;
        let (mut child, log) = subjects::spawn_nginx(&exe, dir.path(), &config)?;
        subjects::wait_for_listener(
            &mut child,
            port,
            NGINX_TIMEOUT,
            "nginx (HTTP upstream)",
            Some(&log),
        )?;
        Ok(NginxUpstream {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            _dir: dir,
        })
    }
}

impl Drop for NginxUpstream {
    fn drop(&mut self) {
        // SIGTERM, so the master takes its workers down; SIGKILL whatever is left.
        let tree = subjects::process_tree(self.child.id());
        let _ = proxy_process::signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + NGINX_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in tree.into_iter().skip(1) {
            let _ = proxy_process::signal(pid, libc::SIGKILL);
        }
    }
}

/// `wrk -t2 -c64 -d<seconds>s --latency http://<target>/1k`: requests per second and the
/// 50 % and 99 % latencies it prints.
pub async fn wrk(target: SocketAddr, seconds: u32) -> Result<Requests> {
    let output = tokio::process::Command::new("wrk")
        .arg(format!("-t{WRK_THREADS}"))
        .arg(format!("-c{HTTP_CONNS}"))
        .arg(format!("-d{seconds}s"))
        .arg("--latency")
        .arg(format!("http://{target}/1k"))
        .stdin(Stdio::null())
        .output()
        .await
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "wrk exited with {}: {}{}",
        output.status,
        text.trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    parse_wrk(&text).with_context(|| format!("reading wrk's output:\n{}", text.trim()))
}

fn parse_wrk(text: &str) -> Result<Requests> {
    if let Some(line) = text
        .lines()
        .find(|l| l.contains("Non-2xx or 3xx responses"))
    {
        bail!("{}", line.trim());
    }
    let per_sec: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .context("no Requests/sec line")?
        .trim()
        .parse()
        .context("Requests/sec is not a number")?;
    let percentile = |p: &str| -> Result<f64> {
        let value = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .with_context(|| format!("no {p} latency line (was --latency given?)"))?;
        micros(value.trim())
    };
    Ok(Requests {
        per_sec,
        p50_us: percentile("50%")?,
        p99_us: percentile("99%")?,
    })
}

/// wrk's durations ("386.00us", "1.20ms", "2.01s") in microseconds.
fn micros(value: &str) -> Result<f64> {
    let split = value
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {value:?}"))?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("not a number: {value:?}"))?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        _ => bail!("unknown unit in {value:?}"),
    };
    Ok(number * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK_OUTPUT: &str = "\
Running 1s test @ http://127.0.0.1:40000/1k
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.31ms  405.12us   9.87ms   80.00%
    Req/Sec    24.50k     1.20k   26.80k    70.00%
  Latency Distribution
     50%    1.25ms
     75%    1.50ms
     90%    1.80ms
     99%    2.61ms
  48750 requests in 1.00s, 58.90MB read
Requests/sec:  48612.35
Transfer/sec:     58.73MB
";

    #[test]
    fn reads_requests_per_second_and_percentiles() {
        let r = parse_wrk(WRK_OUTPUT).unwrap();
        assert_eq!(r.per_sec, 48612.35);
        assert!((r.p50_us - 1250.0).abs() < 1e-6);
        assert!((r.p99_us - 2610.0).abs() < 1e-6);
    }

    #[test]
    fn error_responses_fail_the_measurement() {
        let text = format!("{WRK_OUTPUT}  Non-2xx or 3xx responses: 12\n");
        assert!(parse_wrk(&text).is_err());
    }

    #[test]
    fn units() {
        assert_eq!(micros("386.00us").unwrap(), 386.0);
        assert!((micros("2.01s").unwrap() - 2_010_000.0).abs() < 1e-3);
        assert!(micros("12").is_err());
    }
}
