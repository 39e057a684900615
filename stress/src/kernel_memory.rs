//! The kernel memory a process's TCP sockets hold: `ss -tmneH` (skmem) matched by inode to the sockets in /proc/PID/fd.
//!
//! A proxy bounds what it buffers itself, but the queues of its sockets are memory too, and
//! with the kernel's autotuning a slow reader pins far more there than in the process. This
//! is what `ss -tm` shows per socket as `skmem:(r…,rb…,t…,tb…,f…,w…,o…,bl…,d…)`; of its
//! fields we add two (ss(8), `sock_diag(7)` `SK_MEMINFO_*`):
//!
//! - `r`, rmem_alloc: the receive queue, bytes that arrived and the process has not read;
//! - `w`, wmem_queued: the send queue, bytes the process wrote that are not yet acknowledged.
//!
//! Both count buffers at their true size (`skb->truesize`), headers and slack included, so
//! they exceed the payload bytes `ss` shows as Recv-Q / Send-Q: they are what the machine
//! pays. `t` (wmem_alloc) is left out: it counts those of the send queue's buffers that are
//! in flight below the socket, memory `w` already holds. `rb` and `tb` are limits, `f` is
//! memory reserved in advance.
//!
//! The socket table is read with `ss` (iproute2), the tool the figures were first taken
//! with, so anyone can check them by hand. `-p` would name each socket's processes, but it
//! reads every descriptor of every process on the machine; reading only the watched
//! processes' descriptors costs a fraction of that.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The command line that lists every connected TCP socket with its inode (`-e`) and memory.
pub const SS_ARGS: [&str; 1] = ["-tmneH"];

/// Readings are spaced at least this many times their own duration apart, so they take at
/// most a fifth of one core: one costs about 15 ms with a few hundred sockets on this
/// 2-core machine (a debug build, `ss` included), well over 100 ms with tens of thousands,
/// which every 100 ms would take a whole core from the proxy being watched.
const SPACING: u32 = 5;

/// Kernel memory of a set of sockets, bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SocketMemory {
    /// skmem `r` summed: receive queues.
    pub rmem_alloc: u64,
    /// skmem `w` summed: send queues.
    pub wmem_queued: u64,
    /// How many sockets were counted.
    pub sockets: usize,
}

impl SocketMemory {
    /// Receive queues plus send queues: what the kernel holds for these sockets.
    pub fn bytes(&self) -> u64 {
        self.rmem_alloc + self.wmem_queued
    }
}

/// The fields of one `skmem:(...)` that we use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skmem {
    pub rmem_alloc: u64,
    pub wmem_queued: u64,
}

/// Whether `ss` runs here. Under CI (`CI` set) a missing `ss` is an error, so figures that
/// depend on it cannot quietly drop out of a run; elsewhere the caller goes on without them.
pub fn ss_available() -> Result<bool> {
    match Command::new("ss").arg("-V").output() {
        Ok(output) if output.status.success() => Ok(true),
        outcome => {
            let why = match outcome {
                Ok(output) => format!("`ss -V` exited with {}", output.status),
                Err(e) => format!("`ss` cannot be run: {e}"),
            };
            if std::env::var_os("CI").is_some() {
                bail!(
                    "{why}; CI needs it for the kernel memory figures (apt-get install iproute2)"
                );
            }
            eprintln!("note: {why}; kernel memory figures are left out (apt-get install iproute2)");
            Ok(false)
        }
    }
}

/// `ss -V`'s answer, e.g. "ss utility, iproute2-6.1.0", for reports.
pub fn ss_version() -> Option<String> {
    let output = Command::new("ss").arg("-V").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

/// Kernel memory of the TCP sockets the processes `pids` hold right now. A socket shared by
/// several of them (a listener nginx's workers inherit) counts once.
pub fn of_processes(pids: &[u32]) -> Result<SocketMemory> {
    let inodes = socket_inodes(pids);
    let output = Command::new("ss")
        .args(SS_ARGS)
        .output()
        .context("running ss")?;
    if !output.status.success() {
        bail!(
            "ss {} exited with {}: {}",
            SS_ARGS.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(sum_for(
        &parse(&String::from_utf8_lossy(&output.stdout)),
        &inodes,
    ))
}

/// Adds up the sockets of `table` whose inode is in `inodes`.
pub fn sum_for(table: &[(u64, Skmem)], inodes: &HashSet<u64>) -> SocketMemory {
    let mut total = SocketMemory::default();
    for (inode, skmem) in table {
        if inodes.contains(inode) {
            total.rmem_alloc += skmem.rmem_alloc;
            total.wmem_queued += skmem.wmem_queued;
            total.sockets += 1;
        }
    }
    total
}

/// The inodes of the sockets open in `pids` (links `socket:[INODE]` in /proc/PID/fd). A
/// process that has gone, or a descriptor closed while we look, is skipped.
pub fn socket_inodes(pids: &[u32]) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for pid in pids {
        for (_, target) in sluice_testkit::procfs::descriptors(*pid) {
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            inodes.extend(inode);
        }
    }
    inodes
}

/// Parses `ss -tmneH` output: each socket is a line with `ino:N` among its fields, then an
/// indented line with `skmem:(...)`. Sockets without both (inode 0: orphans the kernel
/// still holds after their process closed them) are left out.
pub fn parse(text: &str) -> Vec<(u64, Skmem)> {
    let mut table = Vec::new();
    let mut inode = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            // A new socket: forget the previous one's inode.
            inode = None;
        }
        for field in line.split_whitespace() {
            if let Some(n) = field.strip_prefix("ino:") {
                inode = n.parse().ok().filter(|&n| n != 0);
            } else if let Some(skmem) = field.strip_prefix("skmem:(")
                && let Some(ino) = inode.take()
            {
                table.push((ino, parse_skmem(skmem.trim_end_matches(')'))));
            }
        }
    }
    table
}

/// `r0,rb131072,t0,tb4194304,f0,w0,o0,bl0,d0`: a name of letters, then a number.
fn parse_skmem(fields: &str) -> Skmem {
    let mut skmem = Skmem::default();
    for field in fields.split(',') {
        let digits = field
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(field.len());
        let value = field[digits..].parse().unwrap_or(0);
        match &field[..digits] {
            "r" => skmem.rmem_alloc = value,
            "w" => skmem.wmem_queued = value,
            _ => {}
        }
    }
    skmem
}

/// Reads the socket memory of a fixed set of processes on a sampler's schedule, but never
/// so often that the readings cost more than a fifth of the time between them.
pub struct Reader {
    pids: Vec<u32>,
    /// The fastest schedule: one reading per this much time.
    every: Duration,
    /// When the next reading is due.
    next: Instant,
}

impl Reader {
    pub fn new(pids: Vec<u32>, every: Duration) -> Reader {
        Reader {
            pids,
            every,
            next: Instant::now(),
        }
    }

    /// A reading if one is due (or `now_anyway`), else `None`.
    pub fn poll(&mut self, now_anyway: bool) -> Option<Result<SocketMemory>> {
        let start = Instant::now();
        if !now_anyway && start < self.next {
            return None;
        }
        let reading = of_processes(&self.pids);
        let cost = start.elapsed();
        self.next = start + self.every.max(cost * SPACING);
        Some(reading)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// Two sockets as `ss -tmneH` (iproute2 6.1) prints them, and an orphan without inode.
    const SAMPLE: &str = "\
ESTAB 0      0      127.0.0.1:51186 127.0.0.1:34325 ino:20215931 sk:5 cgroup:/ <->
\t skmem:(r0,rb131072,t0,tb4194304,f0,w0,o0,bl0,d0)
ESTAB 100000 0      127.0.0.1:34325 127.0.0.1:51186 uid:1000 ino:20215932 sk:6 cgroup:/ <->
\t skmem:(r102496,rb131072,t0,tb4194304,f4000,w2304,o0,bl0,d1)
FIN-WAIT-1 0 86016  127.0.0.1:34325 127.0.0.1:51190 timer:(persist,200ms,0) ino:0 sk:7 cgroup:/ -->
\t skmem:(r0,rb131072,t0,tb2626560,f2048,w88064,o0,bl0,d0)
";

    #[test]
    fn parses_skmem_by_inode() {
        let table = parse(SAMPLE);
        assert_eq!(
            table,
            vec![
                (20215931, Skmem::default()),
                (
                    20215932,
                    Skmem {
                        rmem_alloc: 102496,
                        wmem_queued: 2304
                    }
                ),
            ]
        );
        let mine = sum_for(&table, &HashSet::from([20215932, 99]));
        assert_eq!(mine.bytes(), 102496 + 2304);
        assert_eq!(mine.sockets, 1);
    }

    /// The real thing: bytes written to a loopback connection and not read sit in the
    /// receiving socket's queue, and the reader finds at least that many in this process.
    #[test]
    fn finds_the_unread_bytes_of_this_process() {
        if !ss_available().unwrap() {
            return;
        }
        const UNREAD: usize = 64 * 1024;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        client.write_all(&[7u8; UNREAD]).unwrap();
        // Loopback delivers during the write; the wait is only for a loaded machine.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mine = loop {
            let mine = of_processes(&[std::process::id()]).unwrap();
            if mine.bytes() >= UNREAD as u64 || Instant::now() > deadline {
                break mine;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            mine.rmem_alloc + mine.wmem_queued >= UNREAD as u64,
            "{mine:?}"
        );
        // The listener is not connected, so `ss` leaves it out; the two ends are ours.
        assert!(mine.sockets >= 2, "{mine:?}");
    }
}
