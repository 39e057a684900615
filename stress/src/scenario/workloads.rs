//! The upstream and clients of each scenario the rig runs as they are: slow-readers, slow-upstream, mixed, many-conns and soak (budget and balance drive their own clients; their workloads stand beside them).

use super::args::ScenarioName;
use crate::clients::{ClientMode, ClientSpec};
use crate::rig::{Workload, upstream_spec};
use crate::units::{KIB, Rate, format_bytes};
use crate::upstream::{UpstreamMode, UpstreamSpec};

/// A slow reader's or a trickling writer's pace.
const SLOW: Rate = Rate(16 * KIB);
/// Soak connections echo this much each, then close and reconnect.
pub const SOAK_BYTES_PER_CONN: u64 = 256 * KIB;

/// The workload of `name`, one of the scenarios [`super::steady`] runs.
pub fn steady(name: ScenarioName, conns: usize) -> Workload {
    match name {
        ScenarioName::SlowReaders => slow_readers(conns),
        ScenarioName::SlowUpstream => slow_upstream(conns),
        ScenarioName::Mixed => mixed(conns),
        ScenarioName::ManyConns => many_conns(conns),
        ScenarioName::Soak | ScenarioName::Budget | ScenarioName::Balance => {
            unreachable!("soak, budget and balance have runs of their own")
        }
    }
}

/// `slow-readers`: a fast source; clients read 16 KiB/s through a 4 KiB receive buffer.
fn slow_readers(conns: usize) -> Workload {
    Workload {
        description: format!(
            "{conns} clients reading at 16 KiB/s (4 KiB SO_RCVBUF) from an upstream writing as fast as it can"
        ),
        upstream: upstream_spec(UpstreamMode::Source),
        clients: vec![
            ClientSpec {
                read_rate: Some(SLOW),
                rcvbuf: Some(4 * KIB),
                ..ClientSpec::new(ClientMode::Read)
            };
            conns
        ],
    }
}

/// `slow-upstream`: clients write as fast as they can into a sink reading 64 KiB/s.
fn slow_upstream(conns: usize) -> Workload {
    Workload {
        description: format!(
            "{conns} clients writing as fast as they can into an upstream reading 64 KiB/s per connection"
        ),
        upstream: UpstreamSpec {
            rate: Some(Rate(64 * KIB)),
            rcvbuf: Some(16 * KIB),
            ..upstream_spec(UpstreamMode::Sink)
        },
        clients: vec![
            ClientSpec {
                sndbuf: Some(16 * KIB),
                ..ClientSpec::new(ClientMode::Write)
            };
            conns
        ],
    }
}

/// `mixed`: echo clients; a third write fast and read slowly (both directions fill), a
/// third trickle, a third stream at 1 MiB/s.
fn mixed(conns: usize) -> Workload {
    Workload {
        description: format!(
            "{conns} echo clients: 1/3 write fast and read 16 KiB/s, 1/3 write 16 KiB/s, 1/3 write 1 MiB/s"
        ),
        upstream: small_buffered_echo(),
        clients: (0..conns)
            .map(|i| match i % 3 {
                0 => ClientSpec {
                    read_rate: Some(SLOW),
                    rcvbuf: Some(4 * KIB),
                    sndbuf: Some(16 * KIB),
                    ..ClientSpec::new(ClientMode::Echo)
                },
                1 => echo_writing(SLOW),
                _ => echo_writing(Rate(1024 * KIB)),
            })
            .collect(),
    }
}

/// `many-conns`: every connection echoes through sluice for the whole run. Three in four
/// trickle 2 KiB/s each way; one in four writes 16 KiB/s but reads only 2 KiB/s through a
/// 4 KiB receive buffer, so both of its directions in sluice fill to the bound and pause.
fn many_conns(conns: usize) -> Workload {
    let filling = ClientSpec {
        read_rate: Some(Rate(2 * KIB)),
        rcvbuf: Some(4 * KIB),
        sndbuf: Some(16 * KIB),
        ..echo_writing(Rate(16 * KIB))
    };
    Workload {
        description: format!(
            "{conns} concurrent echo connections: 3/4 at 2 KiB/s, 1/4 writing 16 KiB/s and reading 2 KiB/s (bounds full)"
        ),
        upstream: small_buffered_echo(),
        clients: one_in_four(conns, filling, echo_writing(Rate(2 * KIB))),
    }
}

/// `soak`: one client spec per slot. Each slot echoes 256 KiB per connection, closes and
/// reconnects. One slot in four writes 64 KiB/s and reads 16 KiB/s through a 4 KiB receive
/// buffer (its directions fill and pause); the rest echo at 256 KiB/s.
pub fn soak(conns: usize) -> Workload {
    let filling = ClientSpec {
        bytes: Some(SOAK_BYTES_PER_CONN),
        read_rate: Some(SLOW),
        rcvbuf: Some(4 * KIB),
        ..echo_writing(Rate(64 * KIB))
    };
    let streaming = ClientSpec {
        bytes: Some(SOAK_BYTES_PER_CONN),
        ..echo_writing(Rate(256 * KIB))
    };
    Workload {
        description: format!(
            "{conns} slots churning echo connections of {} each: 1/4 reading at 16 KiB/s, the rest at 256 KiB/s",
            format_bytes(SOAK_BYTES_PER_CONN)
        ),
        upstream: small_buffered_echo(),
        clients: one_in_four(conns, filling, streaming),
    }
}

/// An echo upstream with 16 KiB socket buffers, so backpressure reaches sluice quickly.
fn small_buffered_echo() -> UpstreamSpec {
    UpstreamSpec {
        rcvbuf: Some(16 * KIB),
        sndbuf: Some(16 * KIB),
        ..upstream_spec(UpstreamMode::Echo)
    }
}

/// An echo client writing at `rate`.
fn echo_writing(rate: Rate) -> ClientSpec {
    ClientSpec {
        write_rate: Some(rate),
        ..ClientSpec::new(ClientMode::Echo)
    }
}

/// `conns` clients: the first and every fourth after it `one`, the rest `other`.
fn one_in_four(conns: usize, one: ClientSpec, other: ClientSpec) -> Vec<ClientSpec> {
    (0..conns)
        .map(|i| {
            if i % 4 == 0 {
                one.clone()
            } else {
                other.clone()
            }
        })
        .collect()
}
