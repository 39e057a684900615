//! sluice-stress: stand-in upstreams and clients, scenarios and a demo that drive a real sluice.
// Work in progress: the subcommands land in the next commits.
#![allow(dead_code)]

mod proxy_process;

fn main() {
    eprintln!("sluice-stress: subcommands coming");
    std::process::exit(2);
}
