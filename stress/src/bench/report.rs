//! What `bench` found: per-subject results, the machine, the Markdown table and the JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::memory::{KernelFigure, MemoryFigure};
use super::subjects::Skipped;

/// Repeated measurements of one figure and their median (the number quoted).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Series {
    pub median: f64,
    pub runs: Vec<f64>,
}

impl Series {
    pub fn push(&mut self, value: f64) {
        self.runs.push(value);
        let mut sorted = self.runs.clone();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        self.median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
    }
}

/// Everything measured for one subject. `None` means not measured (direct has no process) or
/// failed (see `errors`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SubjectResult {
    pub id: &'static str,
    pub name: String,
    pub version: String,
    pub config: &'static str,
    pub throughput_1_gbps: Option<Series>,
    pub throughput_8_gbps: Option<Series>,
    pub latency_1_p50_us: Option<Series>,
    pub latency_1_p99_us: Option<Series>,
    pub latency_64_p50_us: Option<Series>,
    pub latency_64_p99_us: Option<Series>,
    /// HTTP/1.1 keep-alive requests for a 1 KiB file, 64 connections.
    pub http_requests_per_sec: Option<Series>,
    pub http_p50_us: Option<Series>,
    pub http_p99_us: Option<Series>,
    /// Connection churn against an upstream that sends one byte and closes.
    pub connections_per_sec: Option<Series>,
    /// The subject's CPU seconds (utime + stime of all its processes) per GB relayed in the
    /// 1-stream case. None for a direct connection.
    pub cpu_s_per_gb_1_stream: Option<Series>,
    /// CPU seconds per 100,000 round trips in the 64-connection ping-pong.
    pub cpu_s_per_100k_round_trips_64_conns: Option<Series>,
    /// CPU seconds per 10,000 connections in the churn case: the proxy-bound figure.
    pub cpu_s_per_10k_conns: Option<Series>,
    /// Idle memory per connection, median over fresh processes.
    pub idle_kib_per_conn: Option<Series>,
    /// The raw numbers of each idle run.
    pub idle_runs: Vec<MemoryFigure>,
    /// Slow-reader memory per connection, median over fresh processes.
    pub slow_reader_kib_per_conn: Option<Series>,
    pub slow_reader_runs: Vec<MemoryFigure>,
    /// What a slow reader costs the machine at the subject's shipped defaults: the run with
    /// the median total (RSS + kernel) per connection, quoted whole so its parts add up.
    pub slow_reader_cost: Option<MemoryFigure>,
    /// Every run of that test.
    pub slow_reader_cost_runs: Vec<MemoryFigure>,
    pub errors: Vec<String>,
}

/// The machine the figures come from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gib: f64,
    /// 1-minute load average when the run began and when it ended: on a shared machine,
    /// the first thing to look at when figures disagree between runs.
    pub load_before: f64,
    pub load_after: f64,
    /// The kernel's TCP settings that decide how much a socket's queues may hold when no
    /// SO_RCVBUF/SO_SNDBUF is set: `tcp_rmem`, `tcp_wmem` (min, default, most), `tcp_mem`
    /// (pages, for all sockets) and the congestion control.
    pub tcp: String,
}

impl Machine {
    pub fn here() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_else(|| "unknown CPU".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_string())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            kernel,
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            load_before: load_average(),
            load_after: 0.0,
            tcp: tcp_settings(),
        }
    }
}

/// `tcp_rmem 4096 131072 6291456, tcp_wmem ..., tcp_mem ..., congestion control cubic`.
fn tcp_settings() -> String {
    let read = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "?".into())
    };
    format!(
        "tcp_rmem {}, tcp_wmem {}, tcp_mem {}, congestion control {}",
        read("tcp_rmem"),
        read("tcp_wmem"),
        read("tcp_mem"),
        read("tcp_congestion_control")
    )
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// How the run was set up, so a reader can reproduce it.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub repeats: usize,
    pub throughput_1_tool: String,
    pub throughput_seconds: f64,
    pub latency_seconds: f64,
    pub connect_seconds: f64,
    pub connect_concurrency: usize,
    pub http_tool: String,
    pub http_seconds: f64,
    pub http_conns: usize,
    /// Unit of the CPU figures as the kernel counts them (`sysconf(_SC_CLK_TCK)`).
    pub clock_ticks_per_sec: f64,
    pub idle_conns: usize,
    pub slow_readers: usize,
    pub slow_reader_rate_bytes_per_sec: f64,
    pub slow_reader_rcvbuf_bytes: u32,
    pub slow_reader_seconds: f64,
    pub memory_buffer_bytes: usize,
    /// How the kernel memory of a subject's sockets was read, or why it was not.
    pub kernel_memory_tool: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub command: String,
    pub quick: bool,
    pub machine: Machine,
    pub settings: Settings,
    pub subjects: Vec<SubjectResult>,
    pub skipped: Vec<Skipped>,
}

fn gbps(s: &Option<Series>) -> String {
    s.as_ref()
        .map_or("err".into(), |s| format!("{:.1}", s.median))
}

fn micros(s: &Option<Series>) -> String {
    match s {
        Some(s) if s.median >= 100.0 => format!("{:.0}", s.median),
        Some(s) => format!("{:.1}", s.median),
        None => "err".into(),
    }
}

fn rtt(p50: &Option<Series>, p99: &Option<Series>) -> String {
    format!("{} / {}", micros(p50), micros(p99))
}

fn kib(m: &Option<Series>, has_process: bool) -> String {
    match m {
        Some(m) => format!("{:.1}", m.median),
        None if has_process => "err".into(),
        None => "–".into(),
    }
}

/// CPU seconds per unit of work: three significant figures, whatever the size.
fn cpu(m: &Option<Series>, has_process: bool) -> String {
    match m {
        Some(m) if m.median >= 10.0 => format!("{:.1}", m.median),
        Some(m) if m.median >= 1.0 => format!("{:.2}", m.median),
        Some(m) => format!("{:.3}", m.median),
        None if has_process => "err".into(),
        None => "–".into(),
    }
}

/// The run whose total per connection (RSS + kernel, or RSS alone when the kernel was not
/// read) is the median; of an even number, the lower of the middle two.
pub fn median_run(runs: &[MemoryFigure]) -> Option<MemoryFigure> {
    let total = |m: &MemoryFigure| m.total_kib_per_conn().unwrap_or(m.kib_per_conn);
    let mut sorted: Vec<&MemoryFigure> = runs.iter().collect();
    sorted.sort_by(|a, b| total(a).total_cmp(&total(b)));
    sorted
        .get(sorted.len().saturating_sub(1) / 2)
        .map(|m| (*m).clone())
}

fn whole(s: &Option<Series>) -> String {
    s.as_ref()
        .map_or("err".into(), |s| format!("{:.0}", s.median))
}

impl Report {
    /// The table and the notes that say how each column was measured.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        self.machine_line(&mut out);
        self.table(&mut out);
        self.notes(&mut out);
        self.runs_configs_and_errors(&mut out);
        self.slow_reader_cost(&mut out);
        out
    }

    /// The machine, its load, and how the figures were taken.
    fn machine_line(&self, out: &mut String) {
        let m = &self.machine;
        let s = &self.settings;
        let _ = writeln!(
            out,
            "Machine: CPU {}, {} cores available; kernel Linux {}; {} GiB RAM; loopback; load \
             average {:.1} at the start, {:.1} at the end. {}{} interleaved.\n",
            m.cpu_model,
            m.cpus,
            m.kernel,
            m.memory_gib,
            m.load_before,
            m.load_after,
            if s.repeats > 1 {
                format!("Medians of {} runs, subjects", s.repeats)
            } else {
                "One run, subjects".into()
            },
            if self.quick {
                " (--quick: tiny sizes, figures meaningless)"
            } else {
                ""
            },
        );
    }

    /// The speed and memory table, a row per subject.
    fn table(&self, out: &mut String) {
        out.push_str(
            "| subject | 1 stream Gbit/s | CPU s/GB, 1 stream | 8 streams Gbit/s \
             | RTT p50 / p99 µs, 1 conn | RTT p50 / p99 µs, 64 conns \
             | CPU s/100k round trips, 64 conns | HTTP req/s | HTTP p50 / p99 µs \
             | conn/s | CPU s/10k conns | idle KiB/conn | slow reader KiB/conn |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.subjects {
            let has_process = r.id != "direct";
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.name,
                gbps(&r.throughput_1_gbps),
                cpu(&r.cpu_s_per_gb_1_stream, has_process),
                gbps(&r.throughput_8_gbps),
                rtt(&r.latency_1_p50_us, &r.latency_1_p99_us),
                rtt(&r.latency_64_p50_us, &r.latency_64_p99_us),
                cpu(&r.cpu_s_per_100k_round_trips_64_conns, has_process),
                whole(&r.http_requests_per_sec),
                rtt(&r.http_p50_us, &r.http_p99_us),
                whole(&r.connections_per_sec),
                cpu(&r.cpu_s_per_10k_conns, has_process),
                kib(&r.idle_kib_per_conn, has_process),
                kib(&r.slow_reader_kib_per_conn, has_process),
            );
        }
    }

    /// How each column was measured.
    fn notes(&self, out: &mut String) {
        let s = &self.settings;
        let _ = writeln!(
            out,
            "\n- 1 stream: {}, {} s, client → proxy → server. 8 streams: sluice-stress, 8 \
             connections writing 128 KiB chunks into a sink, {} s.",
            s.throughput_1_tool, s.throughput_seconds, s.throughput_seconds
        );
        let _ = writeln!(
            out,
            "- RTT: 64-byte messages echoed by the upstream, one outstanding per connection, {} s.",
            s.latency_seconds
        );
        let _ = writeln!(
            out,
            "- HTTP: HTTP/1.1 keep-alive GET of a 1 KiB response, {} connections, one request \
             outstanding on each, {} s; {}. req/s and the 50 % / 99 % latency, in µs. Client, \
             upstream and proxy share this machine's cores, so the direct row is the same load \
             with one hop less rather than a ceiling.",
            s.http_conns, s.http_seconds, s.http_tool
        );
        let _ = writeln!(
            out,
            "- conn/s: {} loops at once, each connecting, reading the one byte the upstream \
             sends, reading its close, closing; {} s. The client never writes and the upstream \
             never reads, so the proxy does most of the work per connection; but client, \
             upstream and proxy share this machine's cores, so conn/s moves only with the \
             proxy's share. CPU s/10k conns is the proxy-bound figure: its own CPU time per \
             connection, whatever the client could do.",
            s.connect_concurrency, s.connect_seconds
        );
        let _ = writeln!(
            out,
            "- CPU: utime + stime of all the proxy's processes (nginx: master and workers) from \
             /proc/PID/stat, read before and after each case (kernel ticks of {:.0} ms, so short \
             windows read coarse figures, possibly 0): per GB the 1-stream case relayed, per \
             100,000 round trips of the 64-connection ping-pong, per 10,000 connections of the \
             churn case. A direct connection has no proxy: \"–\".",
            1000.0 / s.clock_ticks_per_sec
        );
        let _ = writeln!(
            out,
            "- Memory: RSS of a fresh proxy process (all its processes), peak minus start, per \
             connection; {} KiB per-direction buffers everywhere. Idle: {} connections, each \
             after one 64-byte round trip. Slow reader: {} clients with a {} B SO_RCVBUF reading \
             {:.0} KiB/s each for {} s from an upstream writing as fast as it can.",
            s.memory_buffer_bytes / 1024,
            s.idle_conns,
            s.slow_readers,
            s.slow_reader_rcvbuf_bytes,
            s.slow_reader_rate_bytes_per_sec / 1024.0,
            s.slow_reader_seconds
        );
    }

    /// Every run of the 1-stream figure, each subject's config, the skipped and the errors.
    fn runs_configs_and_errors(&self, out: &mut String) {
        let s = &self.settings;
        if s.repeats > 1 {
            let runs: Vec<String> = self
                .subjects
                .iter()
                .filter_map(|r| {
                    let t = r.throughput_1_gbps.as_ref()?;
                    let v: Vec<String> = t.runs.iter().map(|x| format!("{x:.1}")).collect();
                    Some(format!("{} {}", r.id, v.join(", ")))
                })
                .collect();
            let _ = writeln!(out, "- 1 stream, every run (Gbit/s): {}.", runs.join("; "));
        }
        for r in &self.subjects {
            let _ = writeln!(out, "- {}: {}.", r.name, r.config);
        }
        for skipped in &self.skipped {
            let _ = writeln!(out, "- Skipped {}: {}", skipped.id, skipped.reason);
        }
        for r in &self.subjects {
            for e in &r.errors {
                let _ = writeln!(out, "- Error, {}: {}", r.name, e);
            }
        }
    }

    /// The second table: RSS and kernel memory per slow reader, every subject as shipped.
    fn slow_reader_cost(&self, out: &mut String) {
        let s = &self.settings;
        let _ = writeln!(
            out,
            "\n## {SLOW_READER_COST}\n\n\
             {} clients with a {} B SO_RCVBUF reading {:.0} KiB/s each for {} s from an upstream \
             writing as fast as it can, through each proxy at its shipped defaults (a fresh \
             process each run). The memory the proxy bounds is not all a slow reader pins: the \
             kernel queues bytes in the proxy's sockets too.\n",
            s.slow_readers,
            s.slow_reader_rcvbuf_bytes,
            s.slow_reader_rate_bytes_per_sec / 1024.0,
            s.slow_reader_seconds
        );
        out.push_str(
            "| subject | RSS KiB/conn | kernel receive queues (r) KiB/conn \
             | kernel send queues (w) KiB/conn | kernel KiB/conn | total KiB/conn |\n\
             |---|---|---|---|---|---|\n",
        );
        for r in self.subjects.iter().filter(|r| r.id != "direct") {
            let Some(m) = &r.slow_reader_cost else {
                let _ = writeln!(out, "| {} | err | err | err | err | err |", r.name);
                continue;
            };
            let kernel = |f: fn(&KernelFigure) -> f64| {
                m.kernel
                    .as_ref()
                    .map_or("–".into(), |k| format!("{:.1}", f(k)))
            };
            let _ = writeln!(
                out,
                "| {} | {:.1} | {} | {} | {} | {} |",
                r.name,
                m.kib_per_conn,
                kernel(|k| k.recv_kib_per_conn),
                kernel(|k| k.send_kib_per_conn),
                kernel(|k| k.kib_per_conn),
                m.total_kib_per_conn()
                    .map_or("–".into(), |t| format!("{t:.1}")),
            );
        }
        let _ = writeln!(
            out,
            "\n- RSS: of all the proxy's processes, peak minus start, per connection. Kernel: \
             {}; r (rmem_alloc) is the receive queues, bytes that arrived and the proxy has not \
             read, w (wmem_queued) the send queues, bytes it wrote that the reader has not \
             taken; both at the buffers' true size. Summed over the proxy's client-side and \
             upstream-side sockets at the fullest reading (every 100 ms, and once more at the \
             end before the readers close), per connection. Total: RSS + kernel.",
            s.kernel_memory_tool
        );
        let _ = writeln!(
            out,
            "- The kernel's settings that size those queues when a proxy sets no socket \
             buffer: {}.",
            self.machine.tcp
        );
        if s.repeats > 1 {
            let _ = writeln!(
                out,
                "- Each row is the run with the median total of {}, quoted whole so that it adds \
                 up; every run is in the JSON (slow_reader_cost_runs).",
                s.repeats
            );
        }
        let _ = writeln!(
            out,
            "- sluice (splice) keeps its queued bytes in pipes, not sockets: up to its bound per \
             direction more kernel memory than the kernel column shows."
        );
    }
}

/// The heading of the slow-reader cost table.
pub const SLOW_READER_COST: &str = "What a slow reader really costs (per connection)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        let mut s = Series::default();
        s.push(3.0);
        s.push(1.0);
        assert_eq!(s.median, 2.0);
        s.push(10.0);
        assert_eq!(s.median, 3.0);
    }
}
