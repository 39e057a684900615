//! `sluice-stress bench --quick` end to end: every subject that must always be there gets a
//! full row in the Markdown table and in the JSON, with sane numbers. No speed thresholds:
//! the figures of a quick run on a busy machine mean nothing, only their presence does.

use std::process::Command;

/// Subjects that need nothing installed, as they appear at the start of their table row and
/// as their JSON id.
const ALWAYS: [(&str, &str); 5] = [
    ("direct connection", "direct"),
    ("sluice", "sluice"),
    ("sluice (splice)", "sluice_splice"),
    ("sluice (pinned)", "sluice_pinned"),
    ("tokio copy_bidirectional", "copy_bidirectional"),
];

fn number(cell: &str) -> f64 {
    cell.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {cell:?}"))
}

/// Column headers, in order; a row has one cell per header.
const COLUMNS: [&str; 13] = [
    "subject",
    "1 stream Gbit/s",
    "CPU s/GB, 1 stream",
    "8 streams Gbit/s",
    "RTT p50 / p99 µs, 1 conn",
    "RTT p50 / p99 µs, 64 conns",
    "CPU s/100k round trips, 64 conns",
    "HTTP req/s",
    "HTTP p50 / p99 µs",
    "conn/s",
    "CPU s/10k conns",
    "idle KiB/conn",
    "slow reader KiB/conn",
];

/// Cells that only a subject with a process has (memory and CPU); a direct connection shows
/// "–" there.
const PROCESS_ONLY: [usize; 5] = [2, 6, 10, 11, 12];

/// A `p50 / p99` cell.
fn percentiles(cell: &str, row: &str) {
    let (p50, p99) = cell.split_once('/').expect("`p50 / p99`");
    let (p50, p99) = (number(p50), number(p99));
    assert!(p50 > 0.0 && p99 >= p50, "p50 / p99 `{cell}`: {row}");
}

/// Checks one table row; `has_process` says whether it must carry memory and CPU figures.
fn check_row(row: &str, has_process: bool) {
    let cells: Vec<&str> = row.trim().trim_matches('|').split('|').collect();
    assert_eq!(
        cells.len(),
        COLUMNS.len(),
        "row has {} columns: {row}",
        COLUMNS.len()
    );
    // The table rounds to 0.1: a 200 ms quick window on a loaded machine may show 0.0.
    // The JSON below must be positive.
    assert!(number(cells[1]) >= 0.0, "1 stream: {row}");
    assert!(number(cells[3]) >= 0.0, "8 streams: {row}");
    percentiles(cells[4], row);
    percentiles(cells[5], row);
    assert!(number(cells[7]) > 0.0, "HTTP req/s: {row}");
    percentiles(cells[8], row);
    assert!(number(cells[9]) > 0.0, "conn/s: {row}");
    for i in PROCESS_ONLY {
        if has_process {
            // CPU figures of a quick run may be 0 (10 ms ticks); present is what counts.
            assert!(number(cells[i]) >= 0.0, "{}: {row}", COLUMNS[i]);
        } else {
            assert_eq!(
                cells[i].trim(),
                "–",
                "no {} for a direct connection: {row}",
                COLUMNS[i]
            );
        }
    }
}

/// The rows of the table whose header starts with `header`: the lines after the header and
/// its `|---|` line, up to the first line that is not a row.
fn table_rows<'a>(text: &'a str, header: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|l| !l.starts_with(header))
        .skip(2)
        .take_while(|l| l.starts_with("| "))
        .collect()
}

/// The heading and columns of the table of what a slow reader costs.
const COST_HEADING: &str = "## What a slow reader really costs (per connection)";
const COST_COLUMNS: [&str; 6] = [
    "subject",
    "RSS KiB/conn",
    "kernel receive queues (r) KiB/conn",
    "kernel send queues (w) KiB/conn",
    "kernel KiB/conn",
    "total KiB/conn",
];

/// Checks the slow-reader cost table: one row per subject with a process, each adding up.
fn check_cost_table(stdout: &str, subjects: &[serde_json::Value]) {
    let section = &stdout[stdout
        .find(COST_HEADING)
        .unwrap_or_else(|| panic!("no `{COST_HEADING}` in:\n{stdout}"))..];
    let header = section
        .lines()
        .find(|l| l.starts_with("| subject"))
        .expect("a table under the heading");
    let headers: Vec<&str> = header.trim_matches('|').split('|').map(str::trim).collect();
    assert_eq!(headers, COST_COLUMNS, "the cost table's columns");
    let rows = table_rows(section, "| subject");
    let with_process = subjects.iter().filter(|s| s["id"] != "direct").count();
    assert_eq!(
        rows.len(),
        with_process,
        "one cost row per proxy:\n{section}"
    );
    for row in rows {
        let cells: Vec<&str> = row.trim().trim_matches('|').split('|').collect();
        assert_eq!(cells.len(), COST_COLUMNS.len(), "{row}");
        let [rss, recv, send, kernel, total] = [1, 2, 3, 4, 5].map(|i| number(cells[i]));
        assert!(rss >= 0.0 && recv >= 0.0 && send >= 0.0, "{row}");
        // Slow readers leave bytes queued in every proxy's client-side sockets.
        assert!(kernel > 0.0, "no kernel memory: {row}");
        // Each cell is rounded to 0.1 on its own.
        assert!((recv + send - kernel).abs() <= 0.11, "r + w: {row}");
        assert!((rss + kernel - total).abs() <= 0.11, "RSS + kernel: {row}");
    }
}

fn positive(subject: &serde_json::Value, pointer: &str) {
    let value = subject
        .pointer(pointer)
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| panic!("{pointer} missing in {subject}"));
    assert!(value > 0.0, "{pointer} = {value} in {subject}");
}

fn non_negative(subject: &serde_json::Value, pointer: &str) {
    let value = subject
        .pointer(pointer)
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| panic!("{pointer} missing in {subject}"));
    assert!(value >= 0.0, "{pointer} = {value} in {subject}");
}

#[test]
fn quick_bench_reports_every_subject() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice-stress"));
    command.args(["bench", "--quick", "--json"]).arg(&json_path);
    command
        .arg("--sluice")
        .arg(sluice_testkit::workspace_binary("sluice"));
    let output = command.output().expect("run sluice-stress bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench failed ({}):\n{stdout}\n{stderr}",
        output.status
    );

    let header = stdout
        .lines()
        .find(|l| l.starts_with("| subject"))
        .unwrap_or_else(|| panic!("no table in:\n{stdout}"));
    let headers: Vec<&str> = header.trim_matches('|').split('|').map(str::trim).collect();
    assert_eq!(headers, COLUMNS, "the table's columns");
    let machine = stdout
        .lines()
        .find(|l| l.starts_with("Machine:"))
        .expect("a Machine line above the table");
    for part in ["CPU ", " cores", "kernel Linux "] {
        assert!(machine.contains(part), "{part:?} in {machine}");
    }

    let rows = table_rows(&stdout, "| subject | 1 stream");
    for (name, id) in ALWAYS {
        let row = rows
            .iter()
            .find(|r| r.starts_with(&format!("| {name}")))
            .unwrap_or_else(|| panic!("no row for {name} in:\n{stdout}"));
        check_row(row, id != "direct");
    }
    // HAProxy and nginx, when installed, must be as complete as the others.
    for row in &rows {
        check_row(row, !row.starts_with("| direct"));
    }

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let subjects = report["subjects"].as_array().expect("subjects array");
    assert_eq!(subjects.len(), rows.len(), "one JSON entry per table row");
    for (_, id) in ALWAYS {
        assert!(
            subjects.iter().any(|s| s["id"] == id),
            "no JSON entry for {id}"
        );
    }
    for subject in subjects {
        assert_eq!(subject["errors"].as_array().map(Vec::len), Some(0));
        for figure in [
            "/throughput_1_gbps/median",
            "/throughput_8_gbps/median",
            "/latency_1_p50_us/median",
            "/latency_1_p99_us/median",
            "/latency_64_p50_us/median",
            "/latency_64_p99_us/median",
            "/connections_per_sec/median",
            "/http_requests_per_sec/median",
            "/http_p50_us/median",
            "/http_p99_us/median",
        ] {
            positive(subject, figure);
        }
        let process_only = [
            "idle_kib_per_conn",
            "slow_reader_kib_per_conn",
            "cpu_s_per_gb_1_stream",
            "cpu_s_per_100k_round_trips_64_conns",
            "cpu_s_per_10k_conns",
        ];
        if subject["id"] == "direct" {
            for field in process_only {
                assert!(subject[field].is_null(), "{field} for direct: {subject}");
            }
        } else {
            for field in &process_only[2..] {
                // 10 ms ticks: a quick run may measure 0, never less.
                non_negative(subject, &format!("/{field}/median"));
            }
            // RSS deltas of a quick run are small and may round to nothing; present is
            // what counts here.
            non_negative(subject, "/idle_kib_per_conn/median");
            non_negative(subject, "/slow_reader_kib_per_conn/median");
            positive(subject, "/slow_reader_runs/0/bytes_read");
        }
    }
    // The bench itself fails under CI without `ss`; elsewhere the kernel cells are "–".
    let ss = Command::new("ss")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if ss {
        check_cost_table(&stdout, subjects);
    } else {
        eprintln!("note: ss is not installed; the kernel memory figures are not checked");
    }
    for subject in subjects.iter().filter(|s| s["id"] != "direct") {
        positive(subject, "/slow_reader_cost/bytes_read");
        if ss {
            positive(subject, "/slow_reader_cost/kernel/kib_per_conn");
            positive(subject, "/slow_reader_cost/kernel/peak/sockets");
        }
        let runs = subject["slow_reader_cost_runs"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(runs, 1, "one cost run per round: {subject}");
    }
    assert!(report["machine"]["cpus"].as_u64().unwrap() >= 1);
    for field in ["cpu_model", "kernel"] {
        let text = report["machine"][field].as_str().unwrap_or_default();
        assert!(!text.is_empty(), "machine.{field} in {}", report["machine"]);
    }
    let settings = &report["settings"];
    assert!(settings["clock_ticks_per_sec"].as_f64().unwrap() > 0.0);
    assert!(settings["http_seconds"].as_f64().unwrap() > 0.0);
    assert!(
        !settings["http_tool"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
    );
}
