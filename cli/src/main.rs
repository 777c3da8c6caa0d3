//! `fathom`: the one binary. Parses arguments, sets up logging, maps errors to one line on stderr
//! and a non-zero exit. All behaviour lives in the library crates and the per-command modules.

use clap::{Parser, Subcommand};

/// `eprintln!` in one write. `fathom up` and its worker processes share one stderr, and Rust's
/// unbuffered stderr issues a write per formatted piece, so lines of several processes would
/// interleave mid-line (tests and operators parse these lines).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut line = format!($($arg)*);
        line.push('\n');
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

mod admin;
mod bench;
mod bench_comm;
mod bench_parallel;
mod bench_rl;
mod bench_serve;
mod checkpoint;
mod client;
mod coordinator;
mod generate;
mod generate_parallel;
mod progress;
mod telemetry;
mod up;
mod worker;

/// Fathom serves DeepSeek-V3.2 on a cluster of GPU (or CPU) workers.
#[derive(Debug, Parser)]
#[command(name = "fathom", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    telemetry: telemetry::TelemetryArgs,
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
    /// Start a coordinator and W worker processes on this machine.
    Up(up::UpArgs),
    /// Run the coordinator role (one process).
    Coordinator(coordinator::CoordinatorArgs),
    /// Run the worker role (one process, one rank).
    Worker(worker::WorkerArgs),
    /// Operate a running cluster: status, expert load and replicas (Admin API).
    Admin(admin::AdminArgs),
}

/// Cache directory of `fathom up` (resolved here: libraries never read the environment).
fn cache_dir(flag: Option<&std::path::Path>) -> anyhow::Result<std::path::PathBuf> {
    let dir = match (flag, std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty())) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(x)) => std::path::PathBuf::from(x).join("fathom"),
        (None, None) => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
            std::path::PathBuf::from(home).join(".cache").join("fathom")
        }
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("creating the cache directory {}: {e}", dir.display()))?;
    Ok(dir)
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Usage errors: one line on stderr (CLI.md); --help and --version print as usual.
        Err(e) if e.use_stderr() => {
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            say!("fathom: {}", line.trim_start_matches("error: "));
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    };
    let env = telemetry::TelemetryEnv::from_vars(|k| std::env::var(k).ok());
    let service = match &cli.command {
        Command::Coordinator(_) | Command::Up(_) => "fathom-coordinator",
        Command::Worker(_) => "fathom-worker",
        _ => "fathom",
    };
    let guard = match telemetry::init(&cli.telemetry, &env, service) {
        Ok(g) => g,
        Err(e) => {
            say!("fathom: {e:#}");
            std::process::exit(2);
        }
    };
    let tel = &cli.telemetry;
    let result: anyhow::Result<()> = match cli.command {
        Command::Version => {
            println!("fathom {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Checkpoint(args) => checkpoint::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Rank(args) => generate_parallel::run_rank_cmd(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Up(a) => cache_dir(a.cache_dir.as_deref()).and_then(|c| up::run(&a, &c, tel)),
        Command::Coordinator(a) => coordinator::run(&a),
        Command::Worker(a) => worker::run(&a),
        Command::Admin(a) => admin::run(a),
    };
    drop(guard); // flushes exported spans before the process exits
    if let Err(e) = result {
        // One line on stderr, non-zero exit (CLI.md); causes already quoted by their parent are
        // not repeated.
        let mut msg = e.to_string();
        for cause in e.chain().skip(1).map(|c| c.to_string()) {
            if !msg.contains(&cause) {
                msg = format!("{msg}: {cause}");
            }
        }
        say!("fathom: {}", msg.replace('\n', " "));
        std::process::exit(1);
    }
}
