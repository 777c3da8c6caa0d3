//! `fathom bench parallel-decode`: sharded decode throughput of the CPU reference model with W
//! ranks as threads over `LocalComm`, for a list of layouts `WxT`. Random weights from a preset
//! (as `bench decode`). The batch is spread over the D = W/T groups (data-parallel attention);
//! throughput = sequences / mean decode step time of world rank 0 (steps after the prefill).

use anyhow::{Context, Result, anyhow, bail};
use fathom_common::ModelConfig;
use fathom_common::ids::Epoch;
use fathom_common::plan::{ParallelPlan, PlanSpec};
use fathom_kernels::comm::CommOptions;
use fathom_worker::model::random::random_source;
use fathom_worker::parallel::{GenerateRequest, run_local};
use fathom_worker::sampling::SamplingParams;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model shape with random weights: tiny, small, full-width:N.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Comma-separated layouts `WxT`, e.g. 1x1,2x2,4x2.
    #[arg(long, default_value = "1x1,2x1,2x2,4x1,4x2,4x4")]
    layouts: String,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Sequences in total (spread over the groups).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Write the JSON records here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Record {
    bench: &'static str,
    model: String,
    world_size: usize,
    tp: usize,
    batch: usize,
    prompt_len: usize,
    steps: usize,
    prefill_s: f64,
    decode_step_ms: f64,
    decode_tokens_per_s: f64,
}

fn parse_layout(s: &str) -> Result<(usize, usize)> {
    let (w, t) = s.trim().split_once('x').ok_or_else(|| anyhow!("layout {s:?}: expected WxT"))?;
    Ok((w.parse().context("W")?, t.parse().context("T")?))
}

pub fn run(a: &Args) -> Result<()> {
    if a.batch == 0 || a.prompt_len == 0 || a.steps < 2 {
        bail!("--batch and --prompt-len must be > 0 and --steps >= 2");
    }
    let cfg = ModelConfig::preset(&a.preset)?;
    let src = random_source(&cfg, 1);
    let vocab = cfg.vocab_size;
    let mut records = Vec::new();
    println!("| W | T | batch | prefill s | decode ms/step | decode tokens/s |");
    println!("|---|---|---|---|---|---|");
    for layout in a.layouts.split(',') {
        let (w, t) = parse_layout(layout)?;
        let plan = ParallelPlan::build(&PlanSpec::new(Epoch(0), w, t), &cfg)?;
        let d = plan.num_groups();
        let reqs: Vec<GenerateRequest> = (0..d)
            .map(|g| GenerateRequest {
                prompts: (0..a.batch)
                    .filter(|b| b % d == g)
                    .map(|b| {
                        (0..a.prompt_len).map(|i| ((i * 131 + b * 17 + 3) % vocab) as u32).collect()
                    })
                    .collect(),
                max_new_tokens: a.steps,
                sampling: SamplingParams::greedy(),
                stop_ids: Vec::new(),
                keep_logits: false,
                record_routing: false,
                block_size: 64,
            })
            .collect();
        let outs = run_local(&cfg, &src, &plan, &reqs, CommOptions::default())?;
        let steps = &outs[0].step_s;
        let decode: f64 = steps[1..].iter().sum::<f64>() / (steps.len() - 1) as f64;
        let r = Record {
            bench: "parallel-decode",
            model: format!("preset {} (random weights)", a.preset),
            world_size: w,
            tp: t,
            batch: a.batch,
            prompt_len: a.prompt_len,
            steps: a.steps,
            prefill_s: steps[0],
            decode_step_ms: decode * 1e3,
            decode_tokens_per_s: a.batch as f64 / decode,
        };
        println!(
            "| {w} | {t} | {} | {:.4} | {:.3} | {:.0} |",
            a.batch, r.prefill_s, r.decode_step_ms, r.decode_tokens_per_s
        );
        records.push(r);
    }
    let json = serde_json::to_string_pretty(&records)?;
    println!("{json}");
    if let Some(p) = &a.out {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
