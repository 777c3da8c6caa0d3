//! `fathom`: the one binary. Parses arguments, sets up logging, maps errors to one line on stderr
//! and a non-zero exit. All behaviour lives in the library crates.

use clap::{Parser, Subcommand};

mod bench_comm;

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
    /// Micro-benchmarks: each prints a table and writes a JSON record.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// TcpComm all-reduce and all-to-all bandwidth over loopback.
    Comm(bench_comm::Args),
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => println!("fathom {}", env!("CARGO_PKG_VERSION")),
        Command::Bench { bench: Bench::Comm(args) } => {
            if let Err(e) = bench_comm::run(&args) {
                eprintln!("fathom bench comm: {e:#}");
                std::process::exit(1);
            }
        }
    }
}
