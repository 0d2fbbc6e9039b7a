//! The `auditor` binary: a thin CLI over the library.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "auditor", version, about = "eBPF flow auditor for Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Judge flows (JSON Lines) against the intended policy model, offline.
    Check(auditor::check::CheckArgs),
    /// Run the daemon: attach, audit every flow, serve metrics (SPEC 5.2).
    Run(auditor::daemon::RunArgs),
}

fn main() -> anyhow::Result<()> {
    let Cli { command } = Cli::parse();
    match command {
        Command::Check(args) => check(&args),
        Command::Run(args) => run(&args),
    }
}

/// The daemon logs to stderr: stdout carries the unexpected-flow JSON lines (SPEC 5.2).
fn run(args: &auditor::daemon::RunArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match auditor::daemon::run(args) {
        Ok(()) => Ok(()),
        Err(e) if e.is_bad_input() => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
        Err(e) => Err(e.into()),
    }
}

/// Bad input exits 2 with one message naming where (SPEC 5.1); nothing was printed before it.
fn check(args: &auditor::check::CheckArgs) -> anyhow::Result<()> {
    let stdin = std::io::stdin().lock();
    let stdout = std::io::BufWriter::new(std::io::stdout().lock());
    match auditor::check::run(args, stdin, stdout) {
        Ok(()) => Ok(()),
        Err(e) if e.is_bad_input() => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
        Err(e) => Err(e.into()),
    }
}
