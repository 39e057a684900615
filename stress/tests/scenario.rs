//! sluice-stress against the real binaries: a slow-readers scenario (bounded queues, flat
//! memory, a growing baseline), real `nc` + `pv` slow peers through sluice, and usage errors.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sluice_testkit::{ChildProcess, Daemon, Scrape};

const STRESS: &str = env!("CARGO_BIN_EXE_sluice-stress");
const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn stress() -> Command {
    let mut cmd = Command::new(STRESS);
    cmd.env("SLUICE_BIN", sluice_testkit::workspace_binary("sluice"));
    cmd
}

/// The scenario's summary of one run ("sluice" or "unbounded").
fn run_summary<'a>(report: &'a Value, proxy: &str) -> &'a Value {
    report["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .find(|r| r["proxy"] == proxy)
        .unwrap_or_else(|| panic!("no {proxy} run in the report"))
        .get("summary")
        .expect("summary")
}

fn u(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("not an unsigned integer: {v}"))
}

/// Runs `sluice-stress scenario ARGS --out DIR` and asserts it succeeded; returns DIR, its
/// stdout (also printed) and DIR/report.json.
fn run_scenario(args: &[&str]) -> (tempfile::TempDir, String, Value) {
    let dir = tempfile::tempdir().unwrap();
    let out = stress()
        .arg("scenario")
        .args(args)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scenario failed: {stdout}\n{stderr}");
    println!("{stdout}");
    let report = std::fs::read_to_string(dir.path().join("report.json")).unwrap();
    (dir, stdout, serde_json::from_str(&report).unwrap())
}

#[test]
fn slow_readers_scenario_stays_bounded_and_the_unbounded_baseline_grows() {
    let conns = 50u64;
    let (dir, stdout, report) = run_scenario(&[
        "slow-readers",
        "--conns",
        "50",
        "--duration",
        "3s",
        "--baseline",
        "unbounded",
        "--baseline-cap",
        "1GiB",
    ]);
    let s = run_summary(&report, "sluice");
    let bound = u(&s["bound_upstream_to_client"]);
    assert_eq!(bound, 64 * KIB);

    // Every byte the clients read was checked against the pattern, and nothing failed.
    assert_eq!(u(&s["errors"]), 0, "errors: {}", s["error_samples"]);
    assert!(u(&s["bytes_verified"]) > 0);
    assert_eq!(u(&s["bytes_verified"]), u(&s["clients"]["bytes_read"]));
    assert_eq!(s["proxy_exit"], "exit status: 0");

    // The bound held, and it was reached: readers were slow, so sluice paused.
    let peak_queued = u(&s["peak_queued_upstream_to_client"]);
    assert!(
        peak_queued <= conns * bound,
        "queued {peak_queued} > {conns} × {bound}"
    );
    assert!(u(&s["pauses"]) > 0, "no pauses: {s}");

    // Memory: at most both bounds per connection on top of a fixed overhead. The overhead
    // is the process at rest (about 10-11 MiB for a debug build on this machine, measured
    // as start_rss_bytes) plus per-connection tasks and sockets' user-space state
    // (a few KiB each): 16 MiB covers it with room, and a leak of even one extra
    // 64 KiB buffer per connection (3 MiB here) on top of a full queue would still show
    // against the 6.25 MiB of bounds.
    let peak_rss = u(&s["peak_rss_bytes"]);
    let budget = conns * 2 * bound + 16 * MIB;
    assert!(
        peak_rss < budget,
        "sluice peak RSS {peak_rss} over {budget} (start {})",
        s["start_rss_bytes"]
    );

    // Without backpressure the same workload's memory grows far past sluice's.
    let b = run_summary(&report, "unbounded");
    let baseline_rss = u(&b["peak_rss_bytes"]);
    assert!(
        baseline_rss > peak_rss,
        "baseline peak RSS {baseline_rss} not above sluice's {peak_rss}"
    );

    // The kernel memory in each proxy's sockets was read along with its RSS: slow readers
    // leave bytes queued in the proxy's client-side send queues.
    let kernel = tool_available("ss", "iproute2", "the kernel memory series");
    if kernel {
        for proxy in ["sluice", "unbounded"] {
            let run = report["runs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["proxy"] == proxy)
                .unwrap();
            let samples = run["samples"].as_array().unwrap();
            let read = samples
                .iter()
                .filter(|s| s["kernel_bytes"].is_u64())
                .count();
            assert!(read > 0, "no sample of {proxy} has kernel_bytes");
            for s in samples.iter().filter(|s| s["kernel_bytes"].is_u64()) {
                assert_eq!(
                    u(&s["kernel_bytes"]),
                    u(&s["kernel_rmem_alloc"]) + u(&s["kernel_wmem_queued"]),
                    "{s}"
                );
            }
            let peak = u(&run["summary"]["peak_kernel_bytes"]);
            assert!(peak > 0, "{proxy}: no kernel memory in its sockets");
        }
        assert!(stdout.contains("peak kernel "), "{stdout}");
    }

    let svg = std::fs::read_to_string(dir.path().join("report.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("unbounded relay") && svg.contains("sluice ("));
    // Panels (RSS, queued, and kernel memory when `ss` is there) × two runs.
    let panels = if kernel { 3 } else { 2 };
    assert_eq!(svg.matches("<path ").count(), panels * 2);
    if kernel {
        assert!(svg.contains("Kernel memory in the proxy"));
    }
}

/// `scenario budget` at a small size: report.json holds the four measured targets, and
/// the budget's gauges show used ≤ limit in every sample while the readers contend for it.
#[test]
fn budget_scenario_reports_its_four_targets_and_used_stays_within_the_limit() {
    let (_dir, stdout, report) = run_scenario(&[
        "budget",
        "--conns",
        "50",
        "--total",
        "1MiB",
        "--duration",
        "3s",
    ]);
    let budget = &report["budget"];
    // Four targets, each a measurement against a limit (pass or fail is not asserted: the
    // figures depend on the machine).
    let targets = budget["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 4, "{targets:?}");
    for t in targets {
        assert!(t["measured"].as_f64().unwrap() > 0.0, "{t}");
        assert!(t["limit"].as_f64().unwrap() > 0.0, "{t}");
        assert!(t["pass"].is_boolean(), "{t}");
    }
    for line in [
        "1. peak RSS",
        "2. budget used",
        "3. ping-pong p99",
        "4. GET /metrics",
    ] {
        assert!(stdout.contains(line), "no {line:?} in {stdout}");
    }
    let memory = &budget["memory"];
    assert!(u(&memory["start_rss"]) > 0 && u(&memory["idle_rss"]) > 0);
    assert_eq!(
        u(&memory["limit"]),
        u(&memory["start_rss"]) + 50 * u(&memory["idle_cost_per_conn"]) + MIB
    );
    assert_eq!(u(&budget["ping_pong"]["round_trips"]), 2000);
    assert!(u(&budget["scrapes"]["samples"]) > 0);

    // used ≤ limit in every sample, the limit is the total asked for, and the 50 readers
    // (50 × 64 KiB wanted of 1 MiB) took buffers and queued for more.
    let samples = report["runs"][0]["samples"].as_array().unwrap();
    let mut gauged = 0;
    for s in samples.iter().filter(|s| s["budget_used_bytes"].is_u64()) {
        assert_eq!(u(&s["budget_limit_bytes"]), MIB, "{s}");
        assert!(u(&s["budget_used_bytes"]) <= MIB, "{s}");
        gauged += 1;
    }
    assert_eq!(gauged, u(&budget["used"]["samples"]));
    assert!(gauged > 0);
    assert_eq!(u(&budget["used"]["samples_over_limit"]), 0);
    assert!(u(&budget["used"]["max_used"]) > 0);
    assert!(
        u(&budget["at_end"]["waits_upstream_to_client"]) > 0,
        "{budget}"
    );
    // Every byte a reader got was the upstream's pattern.
    assert_eq!(u(&budget["readers"]["errors"]), 0);
    assert!(u(&budget["readers"]["bytes_total"]) > 0);
}

/// `scenario balance` at a small size: under each policy every client's upload arrived
/// whole at one of the three servers, the servers' counts add up to the clients (and match
/// sluice's own per-server count where it reports one), and the two targets are judged.
/// The targets' outcome is not asserted: it is a measurement (README), and timing depends
/// on the machine.
#[test]
fn balance_scenario_delivers_every_upload_under_each_policy() {
    let (clients, upload) = (30u64, 64 * KIB);
    let (_dir, stdout, report) = run_scenario(&[
        "balance",
        "--conns",
        "30",
        "--duration",
        "3s",
        "--upload",
        "64KiB",
    ]);
    let balance = &report["balance"];
    let runs = balance["runs"].as_array().expect("runs");
    let policies: Vec<&str> = runs.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(policies, ["round_robin", "least_queued"]);
    for run in runs {
        assert_eq!(u(&run["errors"]), 0, "{}", run["error_samples"]);
        assert_eq!(u(&run["clients"]), clients);
        assert_eq!(u(&run["completed"]), clients, "{run}");
        assert_eq!(u(&run["bytes_expected"]), clients * upload);
        assert_eq!(u(&run["bytes_verified"]), clients * upload, "{run}");
        assert_eq!(run["proxy_exit"], "exit status: 0");
        let servers = run["servers"].as_array().unwrap();
        let names: Vec<&str> = servers
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["fast-1", "fast-2", "slow"]);
        let accepted: u64 = servers.iter().map(|s| u(&s["accepted"])).sum();
        assert_eq!(accepted, clients, "{run}");
        for s in servers {
            assert_eq!(u(&s["completed"]), u(&s["accepted"]), "{s}");
            if s["sluice_connects"].is_u64() {
                assert_eq!(u(&s["sluice_connects"]), u(&s["accepted"]), "{s}");
            }
        }
        assert!(run["completion"]["p99"].as_f64().unwrap() > 0.0, "{run}");
    }
    // Round robin sends every server its turn.
    assert!(
        runs[0]["servers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| u(&s["accepted"]) > 0)
    );
    let targets = balance["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 2, "{targets:?}");
    assert!(targets.iter().all(|t| t["pass"].is_boolean()));
    assert!(stdout.contains("target: slow server's share"), "{stdout}");
    assert!(stdout.contains("target: p99 completion"), "{stdout}");
}

#[test]
fn bad_arguments_exit_with_code_2() {
    for args in [
        &["scenario", "no-such-scenario"][..],
        &[
            "clients",
            "--target",
            "127.0.0.1:1",
            "--mode",
            "read",
            "--rate",
            "fast",
        ],
        &[
            "clients",
            "--target",
            "127.0.0.1:1",
            "--mode",
            "read",
            "--conns",
            "0",
        ],
        &["upstream", "--mode", "firehose"],
        &["scenario", "slow-readers", "--duration", "0s"],
        &["scenario", "balance", "--upload", "0"],
        &["demo", "--config", "/nonexistent/proxy.toml"],
        &[],
    ] {
        let out = stress().args(args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty(), "{args:?} printed no error");
    }
}

#[test]
fn clients_verify_an_echo_upstream() {
    let mut cmd = stress();
    cmd.args(["upstream", "--listen", "127.0.0.1:0", "--mode", "echo"]);
    let upstream = ChildProcess::spawn(cmd, "upstream", false, None).unwrap();
    let out = stress()
        .args(["clients", "--target", &upstream.listen_addr().to_string()])
        .args([
            "--conns", "5", "--mode", "echo", "--bytes", "1MiB", "--json",
        ])
        .output()
        .unwrap();
    drop(upstream);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u(&summary["errors"]), 0);
    assert_eq!(u(&summary["completed"]), 5);
    assert_eq!(u(&summary["bytes_verified"]), 5 * MIB);
}

/// A sluice process with small bounds and kernel buffers in front of `upstream`.
fn start_sluice(upstream: SocketAddr, bound: u64) -> Daemon {
    let mut c = sluice_testkit::config::relay_to(upstream);
    c.buffer.client_to_upstream = ByteSize::b(bound);
    c.buffer.upstream_to_client = ByteSize::b(bound);
    let small = ByteSize::kib(4);
    c.socket.client_recv_buffer = small;
    c.socket.client_send_buffer = small;
    c.socket.upstream_recv_buffer = small;
    c.socket.upstream_send_buffer = small;
    Daemon::start(&c)
}

/// SIGTERM, and sluice exits 0.
fn stop(mut sluice: Daemon) {
    sluice.signal(libc::SIGTERM);
    let status = sluice.wait(Duration::from_secs(30)).expect("sluice exits");
    assert!(status.success(), "sluice exited with {status}");
}

/// GET /metrics, or None if it is not a metrics endpoint.
fn scrape(addr: SocketAddr) -> Option<Scrape> {
    sluice_testkit::scrape::scrape(addr, Duration::from_secs(2)).ok()
}

fn sha(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

/// Whether `name` is installed; under CI its absence fails the test instead of skipping
/// `what`.
fn tool_available(name: &str, package: &str, what: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{name} is required under CI (apt-get install {package})");
        }
        eprintln!("note: {name} not installed; skipping {what}");
    }
    found
}

/// Samples `sluice_queued_bytes` of each endpoint every 100 ms; returns the peaks per
/// endpoint, as (client_to_upstream, upstream_to_client), once `done` is set.
fn sample_queued(
    endpoints: Vec<SocketAddr>,
    done: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<(u64, u64)>> {
    thread::spawn(move || {
        let mut peaks = vec![(0, 0); endpoints.len()];
        while !done.load(Ordering::Relaxed) {
            for (peak, addr) in peaks.iter_mut().zip(&endpoints) {
                if let Some(s) = scrape(*addr) {
                    let c2u = s.direction("sluice_queued_bytes", "client_to_upstream") as u64;
                    let u2c = s.direction("sluice_queued_bytes", "upstream_to_client") as u64;
                    *peak = (peak.0.max(c2u), peak.1.max(u2c));
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
        peaks
    })
}

#[test]
fn netcat_and_pv_slow_peers_get_exact_bytes_and_queues_stay_bounded() {
    let what = "the netcat/pv test";
    if !tool_available("nc", "netcat-openbsd", what) || !tool_available("pv", "pv", what) {
        return;
    }
    const CONNS: usize = 4;
    const BOUND: u64 = 16 * KIB;
    // Readers: 128 KiB at 8 KiB/s is 16 s; more than the pipe (64 KiB), pv's buffer (-B 4096;
    // by default pv reads far ahead of its rate limit) and the small socket buffers hold, so
    // sluice's own buffer fills and pauses. Writers: 48 KiB in 6 s.
    let read_data = test_data(1, 128 * KIB as usize);
    let write_data = test_data(2, 48 * KIB as usize);
    let dir = tempfile::tempdir().unwrap();
    let write_file = dir.path().join("upload.bin");
    std::fs::write(&write_file, &write_data).unwrap();

    // Upstream for readers: sends the data, then EOF.
    let source = TcpListener::bind("127.0.0.1:0").unwrap();
    let source_addr = source.local_addr().unwrap();
    {
        let data = read_data.clone();
        thread::spawn(move || {
            for conn in source.incoming().take(CONNS) {
                let data = data.clone();
                thread::spawn(move || {
                    let mut conn = conn.unwrap();
                    conn.write_all(&data).unwrap();
                    conn.shutdown(std::net::Shutdown::Write).unwrap();
                    let _ = std::io::copy(&mut conn, &mut std::io::sink());
                });
            }
        });
    }
    // Upstream for writers: reads to EOF and reports what it got.
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let (got_tx, got_rx) = mpsc::channel();
    thread::spawn(move || {
        for conn in sink.incoming().take(CONNS) {
            let got_tx = got_tx.clone();
            thread::spawn(move || {
                let mut conn = conn.unwrap();
                let mut bytes = Vec::new();
                conn.read_to_end(&mut bytes).unwrap();
                got_tx.send(bytes).unwrap();
            });
        }
    });

    let to_source = start_sluice(source_addr, BOUND);
    let to_sink = start_sluice(sink_addr, BOUND);
    let done = Arc::new(AtomicBool::new(false));
    let sampler = sample_queued(
        vec![to_source.metrics_addr, to_sink.metrics_addr],
        done.clone(),
    );

    let started = Instant::now();
    let mut children = Vec::new();
    for i in 0..CONNS {
        let out = dir.path().join(format!("download-{i}.bin"));
        let readers = format!(
            "nc -d -I 4096 {} {} | pv -q -B 4096 -L 8k > {}",
            to_source.addr.ip(),
            to_source.addr.port(),
            out.display()
        );
        children.push((Some(out), shell(&readers)));
        let writers = format!(
            "pv -q -L 8k {} | nc -N {} {}",
            write_file.display(),
            to_sink.addr.ip(),
            to_sink.addr.port()
        );
        children.push((None, shell(&writers)));
    }
    for (out, mut child) in children {
        let status = child.wait().unwrap();
        assert!(status.success(), "shell pipeline failed: {status}");
        if let Some(out) = out {
            let got = std::fs::read(&out).unwrap();
            assert_eq!(got.len(), read_data.len(), "{}", out.display());
            assert_eq!(sha(&got), sha(&read_data), "{} differs", out.display());
        }
    }
    for _ in 0..CONNS {
        let got = got_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got.len(), write_data.len());
        assert_eq!(sha(&got), sha(&write_data));
    }
    let elapsed = started.elapsed();

    let pauses = to_source
        .scrape()
        .direction("sluice_pauses_total", "upstream_to_client") as u64;
    done.store(true, Ordering::Relaxed);
    let peaks = sampler.join().unwrap();
    stop(to_source);
    stop(to_sink);
    println!(
        "nc/pv: {elapsed:?}; peak queued (c→u, u→c): readers' sluice {:?}, writers' sluice {:?}; \
         reader pauses {pauses}",
        peaks[0], peaks[1]
    );
    let limit = CONNS as u64 * BOUND;
    for (c2u, u2c) in &peaks {
        assert!(
            *c2u <= limit && *u2c <= limit,
            "queued over {limit}: {peaks:?}"
        );
    }
    // The readers were slower than everything in front of them, so sluice held data for
    // them and paused reading the upstream.
    assert!(peaks[0].1 > 0, "no bytes ever queued for the slow readers");
    assert!(
        pauses > 0,
        "sluice never paused the upstream of the slow readers"
    );
}

fn shell(script: &str) -> Child {
    Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

/// Deterministic pseudo-random bytes (xorshift64*), so hashes differ per seed.
fn test_data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}
