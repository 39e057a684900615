//! iperf3 through a subject, for the one-stream figure (the wording), when iperf3 is
//! installed: one `iperf3 -s` upstream for the whole run, one `iperf3 -c` per measurement.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::subjects;

/// A running `iperf3 -s` on 127.0.0.1.
pub struct Server {
    pub addr: SocketAddr,
    child: Child,
}

/// The installed iperf3's version line ("iperf 3.12"), or None when it is not installed.
pub fn version() -> Option<String> {
    let output = Command::new("iperf3").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    Some(text.lines().next()?.split(" (").next()?.trim().to_string())
}

impl Server {
    pub fn start() -> Result<Server> {
        let port = subjects::free_port()?;
        let mut child = subjects::die_with_parent(Command::new("iperf3"))
            .args(["-s", "-B", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("running iperf3 -s")?;
        subjects::wait_for_listener(&mut child, port, Duration::from_secs(10), "iperf3 -s", None)?;
        Ok(Server {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one `iperf3 -c` run reported.
pub struct Transfer {
    pub gbps: f64,
    /// Bytes the server received.
    pub bytes: u64,
}

/// Run `iperf3 -c` against `target` for `seconds`; Gbit/s and bytes received, as iperf3
/// reports them.
pub async fn client(target: SocketAddr, seconds: u32) -> Result<Transfer> {
    let output = tokio::process::Command::new("iperf3")
        .args([
            "-c",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
        ])
        .args(["-t", &seconds.to_string(), "-J"])
        .stdin(Stdio::null())
        .output()
        .await
        .context("running iperf3 -c")?;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("parsing iperf3's JSON (exit {})", output.status))?;
    if let Some(error) = report.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {error}");
    }
    let bps = report
        .pointer("/end/sum_received/bits_per_second")
        .and_then(|v| v.as_f64())
        .context("iperf3's JSON has no end.sum_received.bits_per_second")?;
    let bytes = report
        .pointer("/end/sum_received/bytes")
        .and_then(|v| v.as_u64())
        .context("iperf3's JSON has no end.sum_received.bytes")?;
    Ok(Transfer {
        gbps: bps / 1e9,
        bytes,
    })
}
