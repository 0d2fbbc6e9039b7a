//! The `auditor` binary: a thin CLI over the library.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "auditor", version, about = "eBPF flow auditor for Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() -> anyhow::Result<()> {
    let Cli { command } = Cli::parse();
    match command {}
}
