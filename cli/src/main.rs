//! `fathom`: the one binary. Parses arguments, sets up logging, maps errors to one line on stderr
//! and a non-zero exit. All behaviour lives in the library crates.

use clap::{Parser, Subcommand};

mod bench;
mod bench_comm;
mod bench_parallel;
mod generate;
mod generate_parallel;

/// Fathom serves DeepSeek-V3.2 on a cluster of GPU (or CPU) workers.
#[derive(Debug, Parser)]
#[command(name = "fathom", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the version.
    Version,
    /// One-shot generation (CLI.md).
    Generate(generate::GenerateArgs),
    /// One rank of a `generate --comm tcp` world (started by `fathom generate`).
    #[command(hide = true)]
    Rank(generate_parallel::RankArgs),
    /// Benchmarks; records worth keeping go to docs/perf/.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Prints an error as one line on stderr and exits non-zero.
fn exit_on_error(r: anyhow::Result<()>) {
    if let Err(e) = r {
        // The chain on one line, skipping causes the message above already quotes.
        let mut line = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !line.contains(&c) {
                line = format!("{line}: {c}");
            }
        }
        eprintln!("fathom: error: {line}");
        std::process::exit(1);
    }
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => println!("fathom {}", env!("CARGO_PKG_VERSION")),
        Command::Generate(args) => exit_on_error(generate::run(args)),
        Command::Rank(args) => exit_on_error(generate_parallel::run_rank_cmd(args)),
        Command::Bench(cmd) => exit_on_error(bench::run(cmd)),
    }
}
