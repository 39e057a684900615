//! The table [`SERIES`] against what a scrape shows: every declared series is rendered with
//! its help, kind and labels, and nothing named `sluice_*` is rendered undeclared.

use std::collections::HashSet;
use std::sync::Arc;

use super::{CloseReason, ConnectErrorKind, Kind, Metrics, SERIES, Series};
use crate::pool::{Balance, Pool};

/// A scrape of a process with two services, one of them with two servers (one whose
/// address needs escaping), and a few numbers moved.
fn scrape() -> String {
    let metrics = Metrics::new();
    let service = metrics.service("default", [64 * 1024, 32 * 1024]);
    metrics.service("db", [1024, 1024]);
    service.closed(CloseReason::Complete).increment(1);
    service.connection_duration.record(0.5);
    let addresses = ["127.0.0.1:1".to_string(), "odd\"\\name:2".to_string()];
    let pool = Arc::new(Pool::new(&addresses, Balance::RoundRobin, 1024, None));
    let servers = service.servers(&metrics, &pool);
    servers[0]
        .connect_error(ConnectErrorKind::Refused)
        .increment(1);
    servers[1].connect_duration.record(0.001);
    metrics.render()
}

/// A sample line's series name and label names (`None` for a comment or blank line).
fn sample(line: &str) -> Option<(&str, Vec<&str>)> {
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line.find(['{', ' ']).expect("a name");
    let (name, mut rest) = line.split_at(end);
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        while let Some((key, value)) = rest.split_once("=\"") {
            labels.push(key);
            // The value ends at the first quote that no backslash escapes.
            let mut chars = value.char_indices();
            let close = loop {
                match chars.next().expect("a closing quote") {
                    (_, '\\') => {
                        chars.next();
                    }
                    (i, '"') => break i,
                    _ => {}
                }
            };
            rest = &value[close + 1..];
            match rest.strip_prefix(',') {
                Some(more) => rest = more,
                None => break,
            }
        }
        assert!(rest.starts_with("} "), "{line}");
    }
    Some((name, labels))
}

/// The row of [`SERIES`] a rendered sample name belongs to (a histogram's samples end in
/// `_bucket`, `_sum` or `_count`).
fn declared(sample: &str) -> Option<&'static Series> {
    let of = |name: &str| SERIES.iter().find(|s| s.name == name);
    of(sample).or_else(|| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| of(sample.strip_suffix(suffix)?))
            .filter(|s| matches!(s.kind, Kind::Histogram(_)))
    })
}

#[test]
fn every_declared_series_is_rendered_with_its_help_type_and_labels() {
    let text = scrape();
    for series in &SERIES {
        let help = format!("# HELP {} {}", series.name, series.help);
        let kind = format!("# TYPE {} {}", series.name, series.type_name());
        for header in [help, kind] {
            let times = text.lines().filter(|l| *l == header).count();
            assert_eq!(times, 1, "{header:?} is rendered {times} times in\n{text}");
        }
        let samples: Vec<_> = text
            .lines()
            .filter_map(sample)
            .filter(|(name, _)| declared(name).is_some_and(|s| s.name == series.name))
            .collect();
        assert!(
            !samples.is_empty(),
            "no sample of {} in\n{text}",
            series.name
        );
        for (name, labels) in samples {
            let le = name.ends_with("_bucket").then_some("le");
            let expected: Vec<&str> = series.labels.iter().copied().chain(le).collect();
            assert_eq!(labels, expected, "labels of {name}");
        }
    }
}

#[test]
fn every_rendered_sluice_series_is_declared() {
    let text = scrape();
    for line in text.lines() {
        let name = match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["#", "HELP" | "TYPE", name, ..] => name,
            _ => match sample(line) {
                Some((name, _)) => name,
                None => continue,
            },
        };
        if name.starts_with("sluice_") {
            assert!(
                declared(name).is_some(),
                "{name} is rendered but not declared"
            );
        }
    }
}

#[test]
fn series_names_are_sluice_and_unique() {
    let mut seen = HashSet::new();
    for series in &SERIES {
        assert!(series.name.starts_with("sluice_"), "{}", series.name);
        assert!(
            seen.insert(series.name),
            "{} is declared twice",
            series.name
        );
    }
}
