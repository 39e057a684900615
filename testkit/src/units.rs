//! Sizes ("64KiB"), rates ("64KiB/s") and durations ("30s"): parsed from the command line,
//! printed for people.

use std::fmt;
use std::time::Duration;

/// A kibibyte, for sizes written as multiples of it.
pub const KIB: u64 = 1024;

/// Parses a byte size: `4096`, `64KiB`, `1.5MiB`, `2GiB`, `8k` (pv style, 1024), `10MB` (1000).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 4096, 16KiB, 1.5MiB, 8k)"))?;
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        other => {
            return Err(format!(
                "`{s}`: unknown size unit `{other}` (use B, KiB, MiB, GiB, KB, MB, GB, k, m, g)"
            ));
        }
    };
    Ok((number * multiplier).round() as u64)
}

/// A transfer rate in bytes per second, never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/s", format_bytes(self.0))
    }
}

/// Parses a rate: `64KiB/s`, `1MiB/s`, `8k` (per second implied).
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let t = s.trim();
    let size = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("ps"))
        .unwrap_or(t);
    let bytes = parse_size(size).map_err(|e| format!("{e}; a rate looks like 64KiB/s"))?;
    if bytes == 0 {
        return Err(format!(
            "`{s}`: a rate must be more than 0 bytes per second"
        ));
    }
    Ok(Rate(bytes))
}

/// Parses a duration: `30s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}; examples: 3s, 500ms, 2m)"))?;
    if d.is_zero() {
        return Err(format!("`{s}`: the duration must be more than zero"));
    }
    Ok(d)
}

/// `1536` → `1.5 KiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else if value >= 100.0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A duration in seconds as µs, ms or s.
pub fn format_secs(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1.5MiB"), Ok(1_572_864));
        assert_eq!(parse_size("8k"), Ok(8192));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert_eq!(parse_rate("64KiB/s"), Ok(Rate(65536)));
        assert_eq!(parse_rate("8k"), Ok(Rate(8192)));
        assert!(parse_rate("0/s").is_err());
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(Rate(65536).to_string(), "64 KiB/s");
    }
}
