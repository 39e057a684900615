//! sluice-stress: load, slow peers and benchmarks for sluice (placeholder main on the `bench`
//! branch; the `stress` branch owns the real one, which adds the other subcommands).

mod bench;

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
