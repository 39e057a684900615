//! `sluice-stress bench --quick` end to end: every subject that must always be there gets a
//! full row in the Markdown table and in the JSON, with sane numbers. No speed thresholds:
//! the figures of a quick run on a busy machine mean nothing, only their presence does.

use std::process::Command;

/// Subjects that need nothing installed, as they appear at the start of their table row and
/// as their JSON id.
const ALWAYS: [(&str, &str); 3] = [
    ("direct connection", "direct"),
    ("sluice", "sluice"),
    ("tokio copy_bidirectional", "copy_bidirectional"),
];

fn number(cell: &str) -> f64 {
    cell.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {cell:?}"))
}

/// Checks one table row; `has_process` says whether it must carry memory figures.
fn check_row(row: &str, has_process: bool) {
    let cells: Vec<&str> = row.trim().trim_matches('|').split('|').collect();
    assert_eq!(cells.len(), 8, "row has 8 columns: {row}");
    assert!(number(cells[1]) > 0.0, "1 stream: {row}");
    assert!(number(cells[2]) > 0.0, "8 streams: {row}");
    for rtt in &cells[3..5] {
        let (p50, p99) = rtt.split_once('/').expect("RTT is `p50 / p99`");
        let (p50, p99) = (number(p50), number(p99));
        assert!(p50 > 0.0 && p99 >= p50, "RTT: {row}");
    }
    assert!(number(cells[5]) > 0.0, "conn/s: {row}");
    for memory in &cells[6..8] {
        if has_process {
            assert!(number(memory) > 0.0, "memory: {row}");
        } else {
            assert_eq!(
                memory.trim(),
                "–",
                "no memory figure for a direct connection: {row}"
            );
        }
    }
}

fn positive(subject: &serde_json::Value, pointer: &str) {
    let value = subject
        .pointer(pointer)
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| panic!("{pointer} missing in {subject}"));
    assert!(value > 0.0, "{pointer} = {value} in {subject}");
}

#[test]
fn quick_bench_reports_every_subject() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice-stress"));
    command.args(["bench", "--quick", "--json"]).arg(&json_path);
    if let Some(sluice) = option_env!("CARGO_BIN_EXE_sluice") {
        command.arg("--sluice").arg(sluice);
    }
    let output = command.output().expect("run sluice-stress bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench failed ({}):\n{stdout}\n{stderr}",
        output.status
    );

    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| subject"))
        .collect();
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
        ] {
            positive(subject, figure);
        }
        if subject["id"] == "direct" {
            assert!(subject["idle_kib_per_conn"].is_null());
            assert!(subject["slow_reader_kib_per_conn"].is_null());
        } else {
            positive(subject, "/idle_kib_per_conn/median");
            positive(subject, "/slow_reader_kib_per_conn/median");
            positive(subject, "/slow_reader_runs/0/bytes_read");
        }
    }
    assert!(report["machine"]["cpus"].as_u64().unwrap() >= 1);
}
