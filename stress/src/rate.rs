//! Sizes ("64KiB"), rates ("64KiB/s"), durations ("30s"), and the token bucket that paces a connection.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

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

/// Paces one direction of one connection. Tokens may go negative ("debt"): the caller
/// does its I/O, then `take`s what it moved and sleeps off any debt, so the average rate is
/// exact whatever sizes the socket returns.
#[derive(Debug)]
pub struct TokenBucket {
    /// Bytes per second.
    rate: f64,
    /// Most tokens that can pile up while idle, so a stalled peer cannot cause a burst later.
    burst: f64,
    tokens: f64,
    /// Bytes per I/O call.
    chunk: usize,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: Rate) -> Self {
        let chunk = Self::chunk_for(rate);
        TokenBucket {
            rate: rate.0 as f64,
            // A quarter second of catch-up: a peer that stalls briefly (a delayed window
            // update) does not lower the average, a long stall does not cause a flood.
            burst: (rate.0 as f64 / 4.0).max(chunk as f64),
            tokens: chunk as f64,
            chunk,
            last: Instant::now(),
        }
    }

    /// How many bytes to move per I/O call at this rate: about 1/16 s worth, so pacing is
    /// smooth, but at least 256 bytes and at most 64 KiB.
    pub fn chunk_for(rate: Rate) -> usize {
        (rate.0 / 16).clamp(256, 64 * 1024) as usize
    }

    /// The I/O size for this bucket.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// Accounts for `n` bytes moved and sleeps until the rate allows more.
    pub async fn take(&mut self, n: usize) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - n as f64;
        if self.tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / self.rate)).await;
        }
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

    #[tokio::test]
    async fn bucket_paces_to_the_rate() {
        // 512 KiB at 1 MiB/s, less the 256 KiB burst: at least a quarter second.
        let mut bucket = TokenBucket::new(Rate(1024 * 1024));
        let start = Instant::now();
        for _ in 0..128 {
            bucket.take(4096).await;
        }
        let secs = start.elapsed().as_secs_f64();
        assert!(secs >= 0.24, "512 KiB at 1 MiB/s took only {secs} s");
    }
}
