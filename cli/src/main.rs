//! `fathom`: the one binary. Parses arguments, sets up logging, maps errors to one line on stderr
//! and a non-zero exit. All behaviour lives in the library crates.

use clap::{Parser, Subcommand};

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
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => println!("fathom {}", env!("CARGO_PKG_VERSION")),
    }
}
