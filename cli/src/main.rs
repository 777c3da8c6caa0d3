//! `fathom`: the one binary. Parses arguments, sets up logging, maps errors to one line on stderr
//! and a non-zero exit. All behaviour lives in the library crates and the per-command modules.

use clap::{Parser, Subcommand};

mod bench;
mod bench_comm;
mod bench_parallel;
mod checkpoint;
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
    /// Synthesize or inspect checkpoints.
    Checkpoint(checkpoint::CheckpointArgs),
    /// One-shot generation (CLI.md).
    Generate(generate::GenerateArgs),
    /// One rank of a `generate --comm tcp` world (started by `fathom generate`).
    #[command(hide = true)]
    Rank(generate_parallel::RankArgs),
    /// Benchmarks; records worth keeping go to docs/perf/.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Usage errors: one line on stderr (CLI.md); --help and --version print as usual.
        Err(e) if e.use_stderr() => {
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("fathom: {}", line.trim_start_matches("error: "));
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    };
    let result: anyhow::Result<()> = match cli.command {
        Command::Version => {
            println!("fathom {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Checkpoint(args) => checkpoint::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Rank(args) => generate_parallel::run_rank_cmd(args),
        Command::Bench(cmd) => bench::run(cmd),
    };
    if let Err(e) = result {
        // One line on stderr, non-zero exit (CLI.md); causes already quoted by their parent are
        // not repeated.
        let mut msg = e.to_string();
        for cause in e.chain().skip(1).map(|c| c.to_string()) {
            if !msg.contains(&cause) {
                msg = format!("{msg}: {cause}");
            }
        }
        eprintln!("fathom: {}", msg.replace('\n', " "));
        std::process::exit(1);
    }
}
