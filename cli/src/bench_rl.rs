//! `fathom bench rl-capture`: what the RL rollout outputs (issue 12) cost — bytes per token on
//! the wire and step time — for routed-expert capture, logprobs + sampling masks, and both,
//! against a request that asks for nothing.
//!
//! Runs the real single-rank step executor (`executor::single`, the code a W=1 worker runs for
//! every `StepRequest`) over a checkpoint synthesized from a preset (random f32 weights, in a
//! temporary directory), with `--batch` sequences sampled at temperature 1, top-k 5, top-p 0.9
//! and a fixed seed per sequence, so every mode draws the same tokens (asserted). One executor
//! per preset, warmed up by one unrecorded run; modes then run interleaved in `--rounds` rounds
//! (the order rotated every round) to spread machine noise over all of them. Step time = `Executor::execute` (forward, sampling,
//! result building) plus the prost length computation of its results.
//!
//! Bytes are prost-encoded lengths of what travels: the worker's `SeqResult` per sampled token
//! (worker → coordinator, inside `StepEvent`) and the coordinator's `GenerateResponse` chunk per
//! token (→ client, built field for field as the engine builds it). The floor of the routing
//! payload is `positions × moe_layers × top_k × bytes_per_id`.

use anyhow::{Context, Result, bail, ensure};
use fathom_common::ModelConfig;
use fathom_proto::v1::{
    GenerateChunk, GenerateResponse, GroupStep, Plan, SamplingParams, SeqOutputs, SeqResult,
    SeqStep, StepRequest, generate_response,
};
use fathom_worker::executor::single::SingleRankFactory;
use fathom_worker::executor::{EpochContext, Executor, ExecutorFactory};
use fathom_worker::kv::blocks_for;
use fathom_worker::weights::{SynthOptions, synth_checkpoint};
use prost::Message;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Comma-separated presets with random weights: tiny, small, full-width:N.
    #[arg(long, default_value = "tiny,small")]
    presets: String,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Decode steps per run (after the prefill step).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Runs of every mode, interleaved.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Write the JSON records here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// What a request asks back.
#[derive(Debug, Clone, Copy)]
struct Mode {
    name: &'static str,
    outputs: SeqOutputs,
}

fn modes() -> [Mode; 4] {
    let none = SeqOutputs::default();
    [
        Mode { name: "off", outputs: none },
        Mode { name: "routing", outputs: SeqOutputs { routed_experts: true, ..none } },
        Mode {
            name: "logprobs+mask",
            outputs: SeqOutputs { logprobs: true, sampling_mask: true, ..none },
        },
        Mode {
            name: "all",
            outputs: SeqOutputs {
                routed_experts: true,
                logprobs: true,
                sampling_mask: true,
                ..none
            },
        },
    ]
}

#[derive(Debug, Serialize)]
struct Record {
    bench: &'static str,
    model: String,
    mode: &'static str,
    batch: usize,
    prompt_len: usize,
    steps: usize,
    rounds: usize,
    moe_layers: usize,
    top_k: usize,
    bytes_per_id: usize,
    /// `moe_layers × top_k × bytes_per_id`: routing bytes per position, no framing.
    routing_floor_bytes_per_position: usize,
    /// Worker → coordinator: encoded `SeqResult` bytes per decoded token.
    worker_bytes_per_token: f64,
    /// Coordinator → client: encoded `GenerateResponse` bytes per decoded token.
    client_bytes_per_token: f64,
    /// Prefill step: encoded `SeqResult` bytes per prompt position (routing covers them all).
    prefill_worker_bytes_per_position: f64,
    /// Median decode step time of the executor (forward + sampling + encoding of results).
    decode_step_ms: f64,
    /// Relative to mode `off` of the same model (0 for `off`).
    decode_overhead_pct: f64,
    prefill_step_ms: f64,
    prefill_overhead_pct: f64,
}

/// One run's measurements.
#[derive(Debug, Default)]
struct Run {
    tokens: Vec<Vec<u32>>,
    decode_s: Vec<f64>,
    prefill_s: f64,
    worker_bytes: usize,
    client_bytes: usize,
    prefill_bytes: usize,
}

pub fn run(a: &Args) -> Result<()> {
    if a.batch == 0 || a.prompt_len == 0 || a.steps == 0 || a.rounds == 0 {
        bail!("--batch, --prompt-len, --steps and --rounds must be > 0");
    }
    let mut records = Vec::new();
    println!(
        "| model | mode | worker B/token | client B/token | prefill B/position | routing floor \
         B/position | decode ms/step | overhead | prefill ms | overhead |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for preset in a.presets.split(',').map(str::trim) {
        let cfg = ModelConfig::preset(preset)?;
        let dir = tempfile::Builder::new().prefix("fathom-bench-rl-").tempdir()?;
        let opts = SynthOptions { tokenizer: false, ..SynthOptions::default() };
        synth_checkpoint(&cfg, &opts, dir.path()).context("synthesizing the checkpoint")?;
        let ms = modes();
        let bs = 16usize;
        let per_seq = blocks_for(a.prompt_len + a.steps + 1, bs);
        let plan = Plan {
            epoch: 1,
            world_size: 1,
            tp: 1,
            model_path: dir.path().display().to_string(),
            kv_block_size: bs as u32,
            kv_blocks: (per_seq * a.batch) as u32,
            comm: "local".into(),
            ..Default::default()
        };
        let mut ex: Box<dyn Executor> = SingleRankFactory
            .prepare(EpochContext { plan, rank: 0, world: None, group: None })
            .context("preparing the single-rank executor")?;
        let mut step_id = 0;
        // Warm-up (first touch of the mapped weights, allocator), not recorded.
        run_once(a, &cfg, ex.as_mut(), &ms[3], &mut step_id)?;
        let mut runs: Vec<Vec<Run>> = ms.iter().map(|_| Vec::new()).collect();
        for round in 0..a.rounds {
            // Rotate the order so no mode always runs first or last in a round.
            for m in (0..ms.len()).map(|i| (i + round) % ms.len()) {
                runs[m].push(run_once(a, &cfg, ex.as_mut(), &ms[m], &mut step_id)?);
            }
        }
        let base_tokens = &runs[0][0].tokens;
        for (m, rs) in runs.iter().enumerate() {
            for r in rs {
                ensure!(
                    &r.tokens == base_tokens,
                    "{preset}: mode {} drew different tokens than mode off",
                    ms[m].name
                );
            }
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let decode_ms: Vec<f64> = runs
            .iter()
            .map(|rs| median(rs.iter().flat_map(|r| r.decode_s.iter().copied()).collect()) * 1e3)
            .collect();
        let prefill_ms: Vec<f64> =
            runs.iter().map(|rs| median(rs.iter().map(|r| r.prefill_s).collect()) * 1e3).collect();
        let bytes_per_id = if cfg.n_routed_experts <= 256 { 1 } else { 2 };
        for (m, rs) in runs.iter().enumerate() {
            let r = &rs[0];
            let tokens = (a.batch * a.steps) as f64;
            let rec = Record {
                bench: "rl-capture",
                model: format!("preset {preset} (random weights)"),
                mode: ms[m].name,
                batch: a.batch,
                prompt_len: a.prompt_len,
                steps: a.steps,
                rounds: a.rounds,
                moe_layers: cfg.num_moe_layers(),
                top_k: cfg.num_experts_per_tok,
                bytes_per_id,
                routing_floor_bytes_per_position: cfg.num_moe_layers()
                    * cfg.num_experts_per_tok
                    * bytes_per_id,
                worker_bytes_per_token: r.worker_bytes as f64 / tokens,
                client_bytes_per_token: r.client_bytes as f64 / tokens,
                prefill_worker_bytes_per_position: r.prefill_bytes as f64
                    / (a.batch * a.prompt_len) as f64,
                decode_step_ms: decode_ms[m],
                decode_overhead_pct: (decode_ms[m] / decode_ms[0] - 1.0) * 100.0,
                prefill_step_ms: prefill_ms[m],
                prefill_overhead_pct: (prefill_ms[m] / prefill_ms[0] - 1.0) * 100.0,
            };
            println!(
                "| {preset} | {} | {:.1} | {:.1} | {:.2} | {} | {:.3} | {:+.1}% | {:.2} | {:+.1}% |",
                rec.mode,
                rec.worker_bytes_per_token,
                rec.client_bytes_per_token,
                rec.prefill_worker_bytes_per_position,
                rec.routing_floor_bytes_per_position,
                rec.decode_step_ms,
                rec.decode_overhead_pct,
                rec.prefill_step_ms,
                rec.prefill_overhead_pct
            );
            records.push(rec);
        }
    }
    full_model_wire_sizes();
    let json = serde_json::to_string_pretty(&records)?;
    println!("{json}");
    if let Some(p) = &a.out {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Prefill + `steps` decode steps of `batch` sequences through `ex` (KV blocks
/// `[b·per_seq, (b+1)·per_seq)` for sequence `b`, overwritten by every run).
fn run_once(
    a: &Args,
    cfg: &ModelConfig,
    ex: &mut dyn Executor,
    mode: &Mode,
    step_id: &mut u64,
) -> Result<Run> {
    let bs = 16usize;
    let per_seq = blocks_for(a.prompt_len + a.steps + 1, bs);
    let vocab = cfg.vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..a.batch)
        .map(|b| (0..a.prompt_len).map(|i| ((i * 131 + b * 17 + 3) as u32) % vocab).collect())
        .collect();
    let mut run = Run { tokens: vec![Vec::new(); a.batch], ..Run::default() };
    for step in 0..=a.steps {
        let seqs: Vec<SeqStep> = (0..a.batch)
            .map(|b| {
                let (tokens, start) = if step == 0 {
                    (prompts[b].clone(), 0)
                } else {
                    (vec![*run.tokens[b].last().unwrap_or(&0)], a.prompt_len + step - 1)
                };
                let end = start + tokens.len();
                let first = (b * per_seq) as u32;
                SeqStep {
                    seq_id: b as u64,
                    token_ids: tokens,
                    start_position: start as u32,
                    block_table: (first..first + blocks_for(end, bs) as u32).collect(),
                    sample: true,
                    sampling: Some(SamplingParams {
                        temperature: 1.0,
                        top_p: 0.9,
                        top_k: 5,
                        ..Default::default()
                    }),
                    seed: 1000 + b as u64,
                    generated: step as u32,
                    outputs: Some(mode.outputs),
                }
            })
            .collect();
        *step_id += 1;
        let req = StepRequest {
            epoch: 1,
            step_id: *step_id,
            groups: vec![GroupStep { group: 0, seqs, released_seq_ids: Vec::new() }],
            flags: None,
            ..Default::default()
        };
        let t0 = Instant::now();
        let results = ex.execute(&req)?;
        let wire: usize = results.iter().map(SeqResult::encoded_len).sum();
        let elapsed = t0.elapsed().as_secs_f64();
        ensure!(results.len() == a.batch, "step {step}: {} results", results.len());
        if step == 0 {
            run.prefill_s = elapsed;
            run.prefill_bytes = wire;
        } else {
            run.decode_s.push(elapsed);
            run.worker_bytes += wire;
            run.client_bytes +=
                results.iter().map(|r| client_chunk(r).encoded_len()).sum::<usize>();
        }
        for r in results {
            run.tokens[r.seq_id as usize].push(r.token_id);
        }
    }
    Ok(run)
}

/// The client-side message of one token, field for field as the coordinator's engine builds it
/// from a `SeqResult` (no tokenizer: no text).
fn client_chunk(r: &SeqResult) -> GenerateResponse {
    GenerateResponse {
        kind: Some(generate_response::Kind::Chunk(GenerateChunk {
            token_ids: vec![r.token_id],
            text_delta: String::new(),
            logprobs: r.logprob.clone().into_iter().collect(),
            sampling_masks: r.sampling_mask.clone().into_iter().collect(),
            top_logits: r.top_logits.clone().into_iter().collect(),
            routed_experts: r.routed_experts.clone(),
        })),
    }
}

/// Wire sizes for the full DeepSeek-V3.2 config (58 MoE layers, top-8 of 256 experts): exact
/// encoded lengths of the messages the executor builds, with the ids filled (sizes do not
/// depend on the values beyond varint widths, taken at their largest here).
fn full_model_wire_sizes() {
    let cfg = ModelConfig::full();
    let (layers, k) = (cfg.num_moe_layers() as u32, cfg.num_experts_per_tok as u32);
    let routed = |positions: u32| fathom_proto::v1::RoutedExperts {
        start_position: 100_000,
        positions,
        moe_layers: layers,
        top_k: k,
        bytes_per_id: 1,
        ids: vec![255; (positions * layers * k) as usize],
    };
    let base = SeqResult { seq_id: 1 << 40, token_id: 128_000, ..Default::default() };
    let with = |positions| SeqResult { routed_experts: Some(routed(positions)), ..base.clone() };
    println!(
        "full config ({layers} MoE layers x top-{k}, 1 byte/id): floor {} B/position; decode \
         SeqResult {} B without routing, {} B with; 4096-token prefill {:.2} B/position",
        layers * k,
        base.encoded_len(),
        with(1).encoded_len(),
        with(4096).encoded_len() as f64 / 4096.0
    );
}
