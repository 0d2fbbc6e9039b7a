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
}

fn main() -> anyhow::Result<()> {
    let Cli { command } = Cli::parse();
    match command {
        Command::Check(args) => check(&args),
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
