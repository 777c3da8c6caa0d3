//! `fathom bench decode`: decode throughput of the CPU reference model.
//!
//! Builds a model from a preset with random weights in memory (or loads `--model DIR`),
//! prefills `--batch` prompts of `--prompt-len` tokens, then times `--steps` greedy decode steps
//! of the whole batch. Prints a table and one JSON record (also written to `--out`).

use anyhow::{Result, bail};
use fathom_common::ModelConfig;
use fathom_worker::kv::{BlockAllocator, blocks_for};
use fathom_worker::model::random::random_source;
use fathom_worker::model::{ForwardOptions, Model, SeqInput, ShardSpec};
use fathom_worker::weights::TensorSource;
use fathom_worker::weights::reader::CheckpointReader;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Decode tokens/s of the CPU reference model.
    Decode(DecodeArgs),
    /// TcpComm all-reduce and all-to-all bandwidth over loopback.
    Comm(crate::bench_comm::Args),
    /// Sharded decode tokens/s over W threads (LocalComm), per layout WxT.
    ParallelDecode(crate::bench_parallel::Args),
    /// Serving through a local cluster: requests/s, TTFT, coordinator overhead per step.
    Serve(crate::bench_serve::Args),
    /// RL rollout outputs (routed experts, logprobs, masks): bytes per token and step overhead.
    RlCapture(crate::bench_rl::Args),
}

#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
    /// Model shape with random weights: tiny, small, full-width:N (ignored with --model).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Load this HF model directory instead of random weights.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Write the JSON record here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Record {
    bench: &'static str,
    model: String,
    batch: usize,
    prompt_len: usize,
    steps: usize,
    threads: usize,
    load_s: f64,
    prefill_s: f64,
    prefill_tokens_per_s: f64,
    decode_s: f64,
    decode_step_ms: f64,
    decode_tokens_per_s: f64,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Decode(a) => decode(a),
        BenchCommand::Comm(a) => crate::bench_comm::run(&a),
        BenchCommand::ParallelDecode(a) => crate::bench_parallel::run(&a),
        BenchCommand::Serve(a) => crate::bench_serve::run(&a),
        BenchCommand::RlCapture(a) => crate::bench_rl::run(&a),
    }
}

fn decode(a: DecodeArgs) -> Result<()> {
    if a.batch == 0 || a.prompt_len == 0 || a.steps == 0 {
        bail!("--batch, --prompt-len and --steps must be > 0");
    }
    let t0 = Instant::now();
    let (name, cfg, src): (String, ModelConfig, Box<dyn TensorSource>) = match &a.model {
        Some(dir) => {
            let src = CheckpointReader::open(dir)?;
            (dir.display().to_string(), src.config().clone(), Box::new(src))
        }
        None => {
            let cfg = ModelConfig::preset(&a.preset)?;
            let src = random_source(&cfg, 1);
            (format!("preset {} (random weights)", a.preset), cfg, Box::new(src))
        }
    };
    let end = a.prompt_len + a.steps;
    if end > cfg.max_position_embeddings {
        bail!(
            "--prompt-len + --steps = {end} exceeds max_position_embeddings {}",
            cfg.max_position_embeddings
        );
    }
    let vocab = cfg.vocab_size as u32;
    let model = Model::load(
        src.as_ref(),
        cfg.clone(),
        ShardSpec { load_mtp: false, ..ShardSpec::full(&cfg) },
    )?;
    drop(src);
    let load_s = t0.elapsed().as_secs_f64();

    let bs = 64;
    let per_seq = blocks_for(end, bs);
    let mut cache = model.new_cache(bs, per_seq * a.batch)?;
    let mut alloc = BlockAllocator::new(per_seq * a.batch);
    let tables: Vec<Vec<u32>> =
        (0..a.batch).map(|_| alloc.alloc(per_seq)).collect::<Result<_, _>>()?;
    let mut seqs: Vec<Vec<u32>> = (0..a.batch)
        .map(|b| (0..a.prompt_len).map(|i| ((i * 131 + b * 17 + 3) as u32) % vocab).collect())
        .collect();

    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |m, (i, &v)| if v > m.1 { (i, v) } else { m })
            .0 as u32
    };
    let step = |seqs: &mut Vec<Vec<u32>>, cache: &mut _, start: usize| -> Result<()> {
        let inputs: Vec<SeqInput> = seqs
            .iter()
            .zip(&tables)
            .map(|(s, t)| SeqInput { tokens: &s[start..], start_pos: start, block_table: t })
            .collect();
        let out = model.forward(&inputs, cache, &ForwardOptions::default())?;
        let v = vocab as usize;
        for (b, s) in seqs.iter_mut().enumerate() {
            s.push(argmax(&out.logits[b * v..(b + 1) * v]));
        }
        Ok(())
    };
    let t1 = Instant::now();
    step(&mut seqs, &mut cache, 0)?;
    let prefill_s = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    for i in 0..a.steps - 1 {
        step(&mut seqs, &mut cache, a.prompt_len + i)?;
    }
    let decode_s = t2.elapsed().as_secs_f64();
    let decode_steps = (a.steps - 1).max(1) as f64;
    let r = Record {
        bench: "decode",
        model: name,
        batch: a.batch,
        prompt_len: a.prompt_len,
        steps: a.steps,
        threads: rayon::current_num_threads(),
        load_s,
        prefill_s,
        prefill_tokens_per_s: (a.batch * a.prompt_len) as f64 / prefill_s,
        decode_s,
        decode_step_ms: decode_s * 1e3 / decode_steps,
        decode_tokens_per_s: a.batch as f64 * decode_steps / decode_s,
    };
    println!("{:<28} {:>12}", "metric", "value");
    println!("{:<28} {:>12.3}", "load s", r.load_s);
    println!("{:<28} {:>12.1}", "prefill tokens/s", r.prefill_tokens_per_s);
    println!("{:<28} {:>12.3}", "decode ms/step", r.decode_step_ms);
    println!("{:<28} {:>12.1}", "decode tokens/s", r.decode_tokens_per_s);
    let json = serde_json::to_string_pretty(&r)?;
    println!("{json}");
    if let Some(p) = &a.out {
        std::fs::write(p, &json)?;
    }
    Ok(())
}
