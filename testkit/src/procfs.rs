//! What /proc says about a process: its resident memory and its open descriptors.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};

/// Resident set size of process `pid` in bytes, from `/proc/PID/status` (`VmRSS`).
pub fn rss_of(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_vmrss(&status).ok_or_else(|| anyhow!("no VmRSS line in {path}"))
}

/// Resident set size of this process in bytes.
pub fn own_rss() -> Result<u64> {
    rss_of(std::process::id())
}

fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(value * 1024),
        Some(_) => None,
    }
}

/// Every descriptor process `pid` holds now, and what it points to (`socket:[123]`,
/// `pipe:[45]`, a path); empty once the process has gone.
pub fn descriptors(pid: u32) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut fds: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = e.file_name().to_str()?.parse().ok()?;
            Some((fd, std::fs::read_link(e.path()).ok()?))
        })
        .collect();
    fds.sort();
    fds
}

/// How many of process `pid`'s descriptors are sockets: a leaked connection is a leaked
/// socket, while other descriptors come and go (sluice reads /proc itself).
pub fn open_sockets(pid: u32) -> usize {
    open_of_kind(pid, "socket:")
}

/// How many of process `pid`'s descriptors point to something whose name starts with
/// `kind` (`socket:`, `pipe:`, a path).
pub fn open_of_kind(pid: u32, kind: &str) -> usize {
    descriptors(pid)
        .iter()
        .filter(|(_, target)| target.to_string_lossy().starts_with(kind))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_and_descriptors() {
        let status = "Name:\tsluice\nVmPeak:\t 1000 kB\nVmRSS:\t    5120 kB\n";
        assert_eq!(parse_vmrss(status), Some(5120 * 1024));
        assert!(own_rss().unwrap() > 0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let before = open_sockets(std::process::id());
        assert!(before >= 1);
        drop(listener);
        assert!(!descriptors(std::process::id()).is_empty());
    }
}
