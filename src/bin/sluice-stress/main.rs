//! sluice-stress: stand-in upstreams and clients, scenarios and a demo that drive a real sluice.
//!
//! On the `bench` branch only `bench` is wired; the `stress` branch owns this file and adds
//! the other subcommands (the lead reconciles the two at merge).
// Work in progress: the subcommands land in the next commits.
#![allow(dead_code)]

mod bench;
mod proxy_process;

use clap::{Parser, Subcommand};

/// Stress and benchmark tool for the sluice TCP proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure sluice side by side with a direct connection, tokio's copy_bidirectional,
    /// HAProxy and nginx.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(args) => bench::run(args),
    }
}
