//! `fathom bench serve`: serving through a real local cluster (the coordinator in this process,
//! one `fathom worker` process, gRPC on loopback).
//!
//! For each concurrency N in `--sequences`, N greedy requests (`--prompt-len` tokens in,
//! exactly `--max-tokens` out) start together; it reports requests/s, time to first token
//! (p50/p99) and the coordinator's own time per step — scheduling, building and handing the
//! step to the transport, and applying/streaming results; the wait for the ranks (model compute
//! and the network) is excluded and reported separately. Protobuf encoding of the step happens
//! on the transport's task, so it is not in the overhead figure.

use crate::client::{GenerateArgs, generate_remote};
use crate::coordinator::{CoordinatorArgs, start_coordinator, wait_serving};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Model directory (e.g. the tiny model `fathom up` caches).
    #[arg(long)]
    model: PathBuf,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    sequences: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Write the JSON records here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Record {
    bench: &'static str,
    model: String,
    sequences: usize,
    prompt_len: usize,
    max_tokens: u32,
    wall_s: f64,
    requests_per_s: f64,
    tokens_per_s: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    steps: usize,
    /// Coordinator time per step (µs): all steps, and steps carrying >= 90% of N sequences.
    overhead_us_mean: f64,
    overhead_us_p50: f64,
    overhead_us_p99: f64,
    overhead_us_full_batch_mean: f64,
    full_batch_steps: usize,
    /// Wait for the ranks per step (µs), mean.
    rank_wait_us_mean: f64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(a: &Args) -> Result<()> {
    if a.sequences.is_empty() || a.prompt_len == 0 || a.max_tokens == 0 {
        bail!("--sequences, --prompt-len and --max-tokens must be non-empty / > 0");
    }
    let max_n = *a.sequences.iter().max().expect("non-empty");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let waddr = format!("127.0.0.1:{port}");
    let exe = std::env::current_exe()?;
    let mut worker = Command::new(exe)
        .args(["worker", "--id", "w0", "--listen", &waddr, "--advertise", &waddr])
        .stdin(Stdio::null())
        .spawn()
        .context("spawning the worker")?;
    let per_seq = a.prompt_len + a.max_tokens as usize;
    let blocks = (max_n * per_seq.div_ceil(16)).max(64);
    let cargs = CoordinatorArgs {
        config: None,
        listen: Some("127.0.0.1:0".into()),
        http: None,
        model: Some(a.model.clone()),
        world_size: Some(1),
        tp: Some(1),
        static_workers: vec![format!("w0={waddr}")],
        admin_token: None,
        kv_blocks: Some(blocks),
        kv_block_size: Some(16),
        max_queue: Some(max_n * 2),
        max_step_tokens: Some(8192),
        max_batch: Some(max_n),
        step_timeout_ms: Some(120_000),
        metrics_listen: None,
        watchdog_ms: None,
        migrate_timeout_ms: 0,
        ha_id: None,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(async {
        let (mut c, _) = start_coordinator(&cargs, std::future::pending()).await?;
        wait_serving(&mut c, Duration::from_secs(120)).await?;
        let mut records = Vec::new();
        for &n in &a.sequences {
            let _ = c.engine.take_step_stats();
            let started = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..n {
                let g = GenerateArgs {
                    model: None,
                    endpoint: None,
                    prompt: None,
                    prompt_ids: Some(
                        (0..a.prompt_len as u32)
                            .map(|j| (j * 31 + i as u32 * 7) % 400 + 1)
                            .collect(),
                    ),
                    max_new_tokens: a.max_tokens,
                    temperature: 0.0,
                    top_p: 1.0,
                    top_k: 0,
                    seed: None,
                    stop_ids: Vec::new(),
                    ignore_eos: true,
                    json: true,
                    logits_topk: 0,
                    return_routed_experts: false,
                    return_logprobs: false,
                    world_size: 1,
                    tp: 1,
                    comm: "local".into(),
                    device: "cpu".into(),
                    timeout_ms: 0,
                };
                let ep = c.addr.to_string();
                tasks.push(tokio::spawn(async move { generate_remote(&ep, &g, false).await }));
            }
            let mut ttft = Vec::new();
            for t in tasks {
                let (_, timing) = t.await??;
                ttft.push(timing.ttft.as_secs_f64() * 1e3);
            }
            let wall = started.elapsed().as_secs_f64();
            let stats = c.engine.take_step_stats().samples;
            let mut over: Vec<f64> = stats.iter().map(|s| s.1 as f64).collect();
            let full: Vec<f64> =
                stats.iter().filter(|s| s.0 as usize * 10 >= n * 9).map(|s| s.1 as f64).collect();
            let mean =
                |v: &[f64]| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
            let wait: Vec<f64> = stats.iter().map(|s| s.2 as f64).collect();
            records.push(Record {
                bench: "serve",
                model: a.model.display().to_string(),
                sequences: n,
                prompt_len: a.prompt_len,
                max_tokens: a.max_tokens,
                wall_s: wall,
                requests_per_s: n as f64 / wall,
                tokens_per_s: (n * a.max_tokens as usize) as f64 / wall,
                ttft_p50_ms: pct(&mut ttft, 0.5),
                ttft_p99_ms: pct(&mut ttft, 0.99),
                steps: stats.len(),
                overhead_us_mean: mean(&over),
                overhead_us_p50: pct(&mut over, 0.5),
                overhead_us_p99: pct(&mut over, 0.99),
                overhead_us_full_batch_mean: mean(&full),
                full_batch_steps: full.len(),
                rank_wait_us_mean: mean(&wait),
            });
        }
        anyhow::Ok(records)
    });
    let _ = worker.kill();
    let _ = worker.wait();
    rt.shutdown_timeout(Duration::from_secs(1));
    let records = result?;
    println!(
        "{:>5} {:>9} {:>9} {:>10} {:>10} {:>6} {:>12} {:>12} {:>12} {:>12}",
        "seqs",
        "req/s",
        "tok/s",
        "ttft p50",
        "ttft p99",
        "steps",
        "coord µs",
        "p99 µs",
        "full µs",
        "wait µs"
    );
    for r in &records {
        println!(
            "{:>5} {:>9.1} {:>9.0} {:>8.1}ms {:>8.1}ms {:>6} {:>12.1} {:>12.1} {:>12.1} {:>12.0}",
            r.sequences,
            r.requests_per_s,
            r.tokens_per_s,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.steps,
            r.overhead_us_mean,
            r.overhead_us_p99,
            r.overhead_us_full_batch_mean,
            r.rank_wait_us_mean
        );
    }
    let json = serde_json::to_string_pretty(&records)?;
    println!("{json}");
    if let Some(p) = &a.out {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
