//! `fathom`: the one binary. Parses arguments, sets up logging, maps errors to one line on stderr
//! and a non-zero exit. All behaviour lives in the library crates.

use clap::{Parser, Subcommand};

mod client;
mod coordinator;
mod up;
mod worker;

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
    /// Start a coordinator and W worker processes on this machine.
    Up(up::UpArgs),
    /// Run the coordinator role (one process).
    Coordinator(coordinator::CoordinatorArgs),
    /// Run the worker role (one process, one rank).
    Worker(worker::WorkerArgs),
    /// Generate from one prompt (`--endpoint`: through a running cluster).
    Generate(client::GenerateArgs),
}

/// Cache directory of `fathom up` (resolved here: libraries never read the environment).
fn cache_dir(flag: Option<&std::path::Path>) -> std::path::PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return std::path::PathBuf::from(x).join("fathom");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    std::path::PathBuf::from(home).join(".cache").join("fathom")
}

fn fail(e: anyhow::Error) -> ! {
    eprintln!("fathom: error: {e:#}");
    std::process::exit(1)
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FATHOM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match cli.command {
        Command::Version => println!("fathom {}", env!("CARGO_PKG_VERSION")),
        Command::Up(a) => {
            let cache = cache_dir(a.cache_dir.as_deref());
            if let Err(e) = std::fs::create_dir_all(&cache) {
                fail(anyhow::anyhow!("creating the cache directory {}: {e}", cache.display()));
            }
            up::run(&a, &cache).unwrap_or_else(|e| fail(e))
        }
        Command::Coordinator(a) => coordinator::run(&a).unwrap_or_else(|e| fail(e)),
        Command::Worker(a) => worker::run(&a).unwrap_or_else(|e| fail(e)),
        Command::Generate(a) if a.endpoint.is_some() => client::run(&a).unwrap_or_else(|e| fail(e)),
        Command::Generate(_) => {
            fail(anyhow::anyhow!("generate --model is not in this build yet; use --endpoint"))
        }
    }
}
