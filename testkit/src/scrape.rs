//! The Prometheus text format, read: one parser for every scrape the tests and the stress
//! tool take, and `GET /metrics` itself.
//!
//! A small parser of our own rather than the `prometheus-parse` crate: that one splits
//! label pairs on `,` and `=` without reading quotes or escapes (`x="a\"b"` keeps its
//! backslash, a value with a comma is lost), folds histogram buckets into one sample (so
//! `*_bucket` names disappear, which the dashboard test checks for) and brings regex and
//! chrono along. sluice's exposition needs names, labels with escapes, and values
//! (`+Inf`, `NaN`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;

/// One sample line: `name{labels} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One scrape of a Prometheus text exposition, parsed.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// The text as it came, for failure messages.
    text: String,
    samples: Vec<Sample>,
    /// Lines that are neither comments, blank, nor samples.
    unparsed: Vec<String>,
}

impl Scrape {
    /// Parses the text format; lines it cannot read are kept in [`Scrape::unparsed`].
    pub fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape {
            text: text.to_string(),
            ..Scrape::default()
        };
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match parse_sample(line) {
                Some(sample) => scrape.samples.push(sample),
                None => scrape.unparsed.push(line.to_string()),
            }
        }
        scrape
    }

    /// The exposition text.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Lines that could not be read as samples (none in a well-formed exposition).
    pub fn unparsed(&self) -> &[String] {
        &self.unparsed
    }

    /// The sum of `name` over the samples whose labels include all of `labels`, as PromQL's
    /// `sum` gives it (labels left out, such as `service`, are summed over); `None` if no
    /// sample matches.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .reduce(|a, b| a + b)
    }

    /// As [`Scrape::get`], for a series that must be there: panics with the scrape if it
    /// is not.
    pub fn require(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in the scrape:\n{}", self.text))
    }

    /// The value of a series written as PromQL selects it, e.g.
    /// `sluice_bytes_total{direction="client_to_upstream"}`, summed over the labels it
    /// leaves out; panics if no series matches.
    pub fn value(&self, series: &str) -> f64 {
        let (name, labels) =
            parse_series(series).unwrap_or_else(|| panic!("not a series selector: {series}"));
        let labels: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.get(name, &labels)
            .unwrap_or_else(|| panic!("series {series} not in the scrape:\n{}", self.text))
    }

    /// `name{direction=DIR}`, 0 when absent.
    pub fn direction(&self, name: &str, dir: &str) -> f64 {
        self.get(name, &[("direction", dir)]).unwrap_or(0.0)
    }

    /// The sum of `name` over all its label sets, 0 when absent.
    pub fn sum(&self, name: &str) -> f64 {
        self.get(name, &[]).unwrap_or(0.0)
    }

    /// Whether any sample of `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// Every sample name (histograms as their `_bucket`, `_sum` and `_count` series).
    pub fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }

    /// The sample names that carry `label`.
    pub fn names_with_label(&self, label: &str) -> BTreeSet<String> {
        self.samples
            .iter()
            .filter(|s| s.labels.contains_key(label))
            .map(|s| s.name.clone())
            .collect()
    }
}

/// The gauges that count live things: all 0 once no connection is open.
pub const LIVE_GAUGES: [&str; 5] = [
    "sluice_connections_active",
    "sluice_queued_bytes{direction=\"client_to_upstream\"}",
    "sluice_queued_bytes{direction=\"upstream_to_client\"}",
    "sluice_paused_connections{direction=\"client_to_upstream\"}",
    "sluice_paused_connections{direction=\"upstream_to_client\"}",
];

/// The value of `series` (a PromQL selector, see [`Scrape::value`]) in exposition `text`.
pub fn value(text: &str, series: &str) -> f64 {
    Scrape::parse(text).value(series)
}

/// `GET /metrics` from an admin endpoint, parsed; `timeout` bounds each step.
pub fn scrape(admin: SocketAddr, timeout: Duration) -> Result<Scrape> {
    Ok(Scrape::parse(&crate::http::get_ok(
        admin, "/metrics", timeout,
    )?))
}

/// `name{k="v",...} value [timestamp]`.
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' ', '\t'])?;
    let (series, rest) = if line[name_end..].starts_with('{') {
        line.split_at(name_end + closing_brace(&line[name_end..])? + 1)
    } else {
        line.split_at(name_end)
    };
    let (name, labels) = parse_series(series)?;
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `name` or `name{k="v",...}` as the name and its labels.
fn parse_series(series: &str) -> Option<(&str, BTreeMap<String, String>)> {
    let series = series.trim();
    let Some((name, inner)) = series.split_once('{') else {
        return Some((series, BTreeMap::new()));
    };
    let inner = inner.strip_suffix('}')?;
    let mut labels = BTreeMap::new();
    let mut chars = inner.chars();
    let mut key = String::new();
    while let Some(c) = chars.next() {
        match c {
            ',' | ' ' => {}
            '=' => {
                if chars.next()? != '"' {
                    return None;
                }
                let mut value = String::new();
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => match chars.next()? {
                            'n' => value.push('\n'),
                            other => value.push(other),
                        },
                        other => value.push(other),
                    }
                }
                labels.insert(std::mem::take(&mut key), value);
            }
            other => key.push(other),
        }
    }
    key.is_empty().then_some((name, labels))
}

/// Where the `}` that closes the label set `labels` opens is, skipping quoted values.
fn closing_brace(labels: &str) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text() {
        let text = "# HELP sluice_queued_bytes bytes\n# TYPE sluice_queued_bytes gauge\n\
            sluice_queued_bytes{direction=\"client_to_upstream\"} 10\n\
            sluice_queued_bytes{direction=\"upstream_to_client\"} 20\n\
            sluice_connections_active 3\n\
            sluice_build_info{version=\"0.1.0\",x=\"a\\\"b}, c\"} 1\n\
            h_bucket{le=\"+Inf\"} 5 1700000000\n\
            nan_gauge NaN\n";
        let m = Scrape::parse(text);
        assert!(m.unparsed().is_empty(), "{:?}", m.unparsed());
        assert_eq!(
            m.direction("sluice_queued_bytes", "upstream_to_client"),
            20.0
        );
        assert_eq!(m.sum("sluice_queued_bytes"), 30.0);
        assert_eq!(m.get("sluice_connections_active", &[]), Some(3.0));
        assert_eq!(m.get("sluice_build_info", &[("x", "a\"b}, c")]), Some(1.0));
        assert_eq!(m.get("h_bucket", &[("le", "+Inf")]), Some(5.0));
        assert!(m.get("nan_gauge", &[]).unwrap().is_nan());
        assert!(!m.has("nope"));
        assert_eq!(
            value(
                text,
                "sluice_queued_bytes{direction=\"client_to_upstream\"}"
            ),
            10.0
        );
        assert_eq!(value(text, "sluice_queued_bytes"), 30.0);
        assert_eq!(
            m.names_with_label("le"),
            BTreeSet::from(["h_bucket".to_string()])
        );
        assert_eq!(Scrape::parse("what is this\n").unparsed().len(), 1);
    }
}
