//! `top`: a running sluice's live connections (its `GET /connections`) as a table redrawn every interval, like top(1); `--once` prints one plain table.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde::Deserialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::proxy_process::http_get;
use crate::units::{format_bytes, parse_duration};

/// Rows shown when stdout is not a terminal and `--limit` is not given.
const ROWS_WITHOUT_TERMINAL: usize = 20;
/// Lines of a frame that are not connections: the header, the direction labels, the column
/// names, and a last empty line so that the cursor's line does not scroll the table.
const FRAME_LINES: usize = 4;

/// The orders `GET /connections` lists in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sort {
    /// Most bytes queued in sluice (both directions) first.
    Queued,
    /// Most bytes held in the kernel (both directions) first.
    Kernel,
    /// Oldest first.
    Age,
}

impl Sort {
    fn as_str(self) -> &'static str {
        match self {
            Sort::Queued => "queued",
            Sort::Kernel => "kernel",
            Sort::Age => "age",
        }
    }
}

/// `sluice-stress top`
#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// sluice's metrics endpoint (`[metrics] address` in its config).
    #[arg(long, default_value = sluice::config::DEFAULT_METRICS_ADDRESS)]
    pub metrics: SocketAddr,
    /// Which connections come first.
    #[arg(long, value_enum, default_value_t = Sort::Queued)]
    pub sort: Sort,
    /// Connections shown at most. Default: as many as the terminal has rows for, or 20 when
    /// stdout is not a terminal.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// How often the table is refreshed.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Print one table, without escape codes, and exit (for scripts).
    #[arg(long)]
    pub once: bool,
}

/// What `GET /connections` answers, as far as the table needs it. Fields this tool does not
/// show are ignored, so a newer sluice that adds some still works with it.
#[derive(Debug, Deserialize)]
struct Listing {
    live: usize,
    sort: String,
    connections: Vec<Connection>,
}

#[derive(Debug, Deserialize)]
struct Connection {
    id: u64,
    client: String,
    /// `None` while sluice is still connecting to the upstream.
    upstream: Option<String>,
    age_seconds: f64,
    client_to_upstream: Direction,
    upstream_to_client: Direction,
}

#[derive(Debug, Deserialize)]
struct Direction {
    bytes: u64,
    queued: u64,
    kernel: u64,
    /// `None` while the direction is reading.
    paused_seconds: Option<f64>,
}

pub async fn run(args: TopArgs) -> Result<()> {
    let terminal = std::io::stdout().is_terminal();
    if args.once {
        let listing = fetch(args.metrics, args.sort, limit(&args, terminal)).await?;
        let frame = frame(args.metrics, Ok(&listing));
        return print(&format!("{}\n", frame.join("\n")));
    }
    // One signal stream for the whole run, so a Ctrl-C between two waits is not lost.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = interrupt.recv() => return Ok(()),
        }
        let fetched = tokio::select! {
            r = fetch(args.metrics, args.sort, limit(&args, terminal)) => r,
            _ = interrupt.recv() => return Ok(()),
        };
        let frame = frame(args.metrics, fetched.as_ref());
        if terminal {
            print(&redraw(
                &frame,
                terminal_size().map_or(usize::MAX, |(_, cols)| cols),
            ))?;
        } else {
            // Like `top -b`: one plain table after another.
            print(&format!("{}\n\n", frame.join("\n")))?;
        }
    }
}

/// Rows to ask for: `--limit`, else what fits the terminal now.
fn limit(args: &TopArgs, terminal: bool) -> usize {
    match (args.limit, terminal.then(terminal_size).flatten()) {
        (Some(n), _) => n as usize,
        (None, Some((rows, _))) => rows.saturating_sub(FRAME_LINES).max(1),
        (None, None) => ROWS_WITHOUT_TERMINAL,
    }
}

/// Asks sluice for its live connections (a blocking GET, on a blocking thread).
async fn fetch(addr: SocketAddr, sort: Sort, limit: usize) -> Result<Listing> {
    let path = format!("/connections?sort={}&limit={limit}", sort.as_str());
    let body = tokio::task::spawn_blocking({
        let path = path.clone();
        move || http_get(addr, &path)
    })
    .await?
    .with_context(|| format!("cannot reach sluice's metrics endpoint at {addr}"))?;
    serde_json::from_str(&body).with_context(|| {
        format!(
            "{addr}{path} did not answer with a connection list (is it sluice's metrics endpoint?)"
        )
    })
}

/// The lines of one table: a header, then (when the listing came) the connections.
fn frame(addr: SocketAddr, listing: Result<&Listing, &anyhow::Error>) -> Vec<String> {
    let now = humantime::format_rfc3339_seconds(SystemTime::now());
    let listing = match listing {
        Ok(l) => l,
        Err(e) => return vec![format!("sluice {addr} · {e:#} (retrying) · {now}")],
    };
    let shown = match listing.connections.len() {
        n if n < listing.live => format!(", {n} shown"),
        _ => String::new(),
    };
    let mut lines = vec![format!(
        "sluice {addr} · {} live{shown} · sort: {} · {now}",
        listing.live, listing.sort
    )];
    lines.extend(table(&listing.connections));
    lines
}

/// The columns: name, and whether the cells are left-aligned (addresses) or right-aligned
/// (figures, so their units line up).
const COLUMNS: [(&str, bool); 12] = [
    ("ID", false),
    ("CLIENT", true),
    ("UPSTREAM", true),
    ("AGE", false),
    ("BYTES", false),
    ("QUEUED", false),
    ("KERNEL", false),
    ("PAUSED", false),
    ("BYTES", false),
    ("QUEUED", false),
    ("KERNEL", false),
    ("PAUSED", false),
];
/// Each direction's label, over the first of its four columns.
const DIRECTION_LABELS: [(usize, &str); 2] = [(4, "client → upstream"), (8, "upstream → client")];
const GAP: &str = "  ";

/// The direction labels, the column names, and one row per connection, aligned.
fn table(connections: &[Connection]) -> Vec<String> {
    let names: Vec<String> = COLUMNS.iter().map(|(name, _)| name.to_string()).collect();
    let rows: Vec<Vec<String>> = connections.iter().map(row).collect();
    let mut widths = names.iter().map(String::len).collect::<Vec<_>>();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &Vec<String>| {
        let mut out = String::new();
        for ((cell, w), (_, left)) in cells.iter().zip(&widths).zip(COLUMNS) {
            if !out.is_empty() {
                out.push_str(GAP);
            }
            if left {
                out.push_str(&format!("{cell:<w$}"));
            } else {
                out.push_str(&format!("{cell:>w$}"));
            }
        }
        out.trim_end().to_string()
    };
    let offset = |column: usize| -> usize { widths[..column].iter().map(|w| w + GAP.len()).sum() };
    let mut labels = String::new();
    for (start, label) in DIRECTION_LABELS {
        let span = offset(start + 4) - offset(start) - GAP.len();
        labels.push_str(&" ".repeat(offset(start) - labels.chars().count()));
        labels.push_str(&format!("{:─<span$}", format!("{label} ")));
    }
    let mut lines = vec![labels, line(&names)];
    lines.extend(rows.iter().map(line));
    lines
}

fn row(c: &Connection) -> Vec<String> {
    let mut cells = vec![
        c.id.to_string(),
        c.client.clone(),
        c.upstream.clone().unwrap_or_else(|| "connecting".into()),
        short_duration(c.age_seconds),
    ];
    cells.extend(direction(&c.client_to_upstream));
    cells.extend(direction(&c.upstream_to_client));
    cells
}

/// Bytes, queued, kernel, paused-for ("-" while reading).
fn direction(d: &Direction) -> [String; 4] {
    [
        size(d.bytes),
        size(d.queued),
        size(d.kernel),
        d.paused_seconds.map_or("-".into(), short_duration),
    ]
}

/// `65536` → `64KiB`: sizes as sluice's config writes them, which keeps columns narrow.
fn size(n: u64) -> String {
    format_bytes(n).replace(' ', "")
}

/// `7.9` → `7s`, `184` → `3m04s`, `7384` → `2h03m`, `93784` → `1d02h`.
fn short_duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// The frame drawn over the previous one: cursor home, each line cut to the terminal's
/// width and cleared to its end, then the rest of the screen cleared. Drawing over the old
/// frame instead of clearing the screen first does not flicker.
fn redraw(frame: &[String], columns: usize) -> String {
    let mut out = String::from("\x1b[H");
    for line in frame {
        out.extend(line.chars().take(columns));
        out.push_str("\x1b[K\n");
    }
    out.push_str("\x1b[J");
    out
}

fn print(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")
}

/// The terminal's (rows, columns), if stdout is one.
fn terminal_size() -> Option<(usize, usize)> {
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points at one.
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (r == 0 && size.ws_row > 0 && size.ws_col > 0)
        .then_some((size.ws_row as usize, size.ws_col as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_durations() {
        for (s, want) in [
            (0.4, "0s"),
            (12.9, "12s"),
            (184.0, "3m04s"),
            (7384.0, "2h03m"),
            (93784.0, "1d02h"),
        ] {
            assert_eq!(short_duration(s), want);
        }
    }

    #[test]
    fn table_aligns_rows_under_their_columns() {
        let listing: Listing = serde_json::from_str(
            r#"{"live": 2, "sort": "queued", "connections": [
              {"id": 1, "client": "127.0.0.1:41792", "upstream": "127.0.0.1:45197", "age_seconds": 184.2,
               "client_to_upstream": {"bytes": 0, "queued": 0, "kernel": 0, "paused_seconds": null},
               "upstream_to_client": {"bytes": 1048576, "queued": 65536, "kernel": 2560, "paused_seconds": 12.5, "new_field": 1}},
              {"id": 12, "client": "[::1]:5", "upstream": null, "age_seconds": 0.1,
               "client_to_upstream": {"bytes": 0, "queued": 0, "kernel": 0, "paused_seconds": null},
               "upstream_to_client": {"bytes": 0, "queued": 0, "kernel": 0, "paused_seconds": null}}]}"#,
        )
        .unwrap();
        let lines = table(&listing.connections);
        assert!(lines[0].contains("client → upstream"), "{lines:#?}");
        let header = &lines[1];
        assert!(lines[2].contains("127.0.0.1:45197") && lines[2].contains("3m04s"));
        assert!(
            lines[2].ends_with("1MiB   64KiB  2.5KiB     12s"),
            "{lines:#?}"
        );
        assert!(lines[3].contains("connecting"));
        // Right-aligned columns end where their names end.
        let end = |line: &str, at: usize| line.chars().nth(at - 1).unwrap();
        let paused_end = header.chars().count();
        assert_eq!(end(&lines[2], paused_end), 's');
        assert_eq!(end(&lines[3], paused_end), '-');
        // The labels start over their direction's first column (BYTES, as wide as its cells).
        let chars_before =
            |line: &str, what: &str| line[..line.find(what).unwrap()].chars().count();
        assert_eq!(
            chars_before(&lines[0], "client →"),
            chars_before(header, "BYTES")
        );
    }
}
