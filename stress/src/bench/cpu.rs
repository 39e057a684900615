//! CPU time a subject spends, read from `/proc/PID/stat` (utime + stime) of every process in
//! its tree, so that costs compare per byte, per round trip and per connection.

/// Reads the CPU time of a fixed set of processes (a subject's tree, taken once it is ready).
/// An empty set (a direct connection) reads as zero.
#[derive(Clone, Debug, Default)]
pub struct CpuMeter {
    pids: Vec<u32>,
}

impl CpuMeter {
    pub fn new(pids: Vec<u32>) -> CpuMeter {
        CpuMeter { pids }
    }

    /// Whether there is a process to measure at all.
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty()
    }

    /// User plus system CPU seconds the processes have used so far. The kernel counts in
    /// clock ticks (10 ms at the usual 100 Hz), so short windows read coarse figures.
    pub fn seconds(&self) -> f64 {
        let ticks: u64 = self.pids.iter().filter_map(|&pid| ticks(pid)).sum();
        ticks as f64 / ticks_per_second()
    }
}

/// `sysconf(_SC_CLK_TCK)`: the unit of utime and stime.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant of the running system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// utime + stime of one process (all its threads), in clock ticks; None once it has gone.
fn ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_ticks(&stat)
}

/// "pid (comm) state ppid ... utime stime ...": utime and stime are fields 14 and 15 of the
/// line, the 12th and 13th after comm, which may contain spaces, so split after the last ')'.
fn parse_ticks(stat: &str) -> Option<u64> {
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace().skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU seconds spent between two readings, scaled to `per` units of work out of `work` done;
/// None when there was no process to measure or no work was done.
pub fn cost(meter: &CpuMeter, spent: f64, work: f64, per: f64) -> Option<f64> {
    (!meter.is_empty() && work > 0.0).then(|| spent.max(0.0) / work * per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utime_and_stime_after_a_comm_with_spaces() {
        let stat = "1234 (nginx: worker) S 1200 1200 1200 0 -1 4194624 120 0 0 0 \
                    37 15 0 0 20 0 1 0 5000 1000000 300 18446744073709551615";
        assert_eq!(parse_ticks(stat), Some(52));
    }

    #[test]
    fn this_process_has_a_reading() {
        let meter = CpuMeter::new(vec![std::process::id()]);
        assert!(meter.seconds() >= 0.0);
        assert!(CpuMeter::default().seconds() == 0.0);
    }
}
