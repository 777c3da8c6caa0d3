//! `fathom generate --model DIR`: one-shot generation in this process on the CPU reference
//! model (CLI.md). Greedy decoding (temperature 0); sampling at temperature > 0 needs
//! `fathom_worker::sampling`, which is not in this branch yet, and is refused with a clear error.
//!
//! Also owns [`load_model_dir`], a minimal reader of an HF model directory into memory (F32,
//! BF16, F16 and F8_E4M3 + `weight_scale_inv`) until the worker's mmap checkpoint reader lands.

use anyhow::{Context, Result, anyhow, bail};
use fathom_common::ModelConfig;
use fathom_kernels::Tensor;
use fathom_kernels::cpu::fp8::dequant_block_fp8;
use fathom_worker::kv::{BlockAllocator, blocks_for};
use fathom_worker::model::{ForwardOptions, LogitsMode, Model, SeqInput, ShardSpec};
use fathom_worker::weights::MemorySource;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// HF DeepSeek-V3.2 model directory (config.json, model.safetensors[.index.json]).
    #[arg(long, required_unless_present = "endpoint")]
    model: Option<PathBuf>,
    /// gRPC endpoint of a running cluster (`fathom up`, `fathom coordinator`) instead of --model.
    #[arg(long, conflicts_with = "model")]
    endpoint: Option<String>,
    /// Prompt text, tokenized with the directory's tokenizer.json.
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt token ids, comma-separated (e.g. 0,5,17).
    #[arg(long)]
    prompt_ids: Option<String>,
    /// Number of tokens to generate (at most).
    #[arg(long)]
    max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus mass in (0, 1].
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Keep at most K ids (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Extra stop token ids, comma-separated.
    #[arg(long)]
    stop_ids: Option<String>,
    /// Do not stop at the config's eos_token_id.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// With --json: the K largest logits of each step in steps[i].top.
    #[arg(long)]
    logits_topk: Option<usize>,
    /// With --json: the routed experts of every position fed through the model.
    #[arg(long)]
    return_routed_experts: bool,
    /// KV cache block size in tokens.
    #[arg(long, default_value_t = fathom_worker::kv::DEFAULT_BLOCK_SIZE)]
    block_size: usize,
    /// --world-size, --tp, --comm (`generate_parallel.rs`).
    #[command(flatten)]
    parallel: crate::generate_parallel::ParallelArgs,
}

// The output format is shared with `--endpoint` (cli/src/client.rs).
use crate::client::{GenerationOutput as Output, StepTop as Step};

fn parse_ids(flag: &str, csv: &str) -> Result<Vec<u32>> {
    csv.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>().map_err(|_| {
                anyhow!("{flag}: {s:?} is not a token id (expected comma-separated integers)")
            })
        })
        .collect()
}

/// Reads `dir` (config.json + safetensors) into memory.
pub(crate) fn load_model_dir(dir: &Path) -> Result<(ModelConfig, MemorySource)> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("reading {}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| anyhow!("{}: no weight_map", index.display()))?;
        let set: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        set.into_iter().map(|f| dir.join(f)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let block = cfg.quantization_config.as_ref().map(|q| q.weight_block_size).unwrap_or([128, 128]);
    let mut src = MemorySource::new();
    for file in files {
        let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        let st =
            SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: {e}", file.display()))?;
        for (name, view) in st.tensors() {
            let d = view.data();
            let shape = view.shape().to_vec();
            let data: Vec<f32> = match view.dtype() {
                Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                Dtype::BF16 => d
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::F16 => d
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::F8_E4M3 => {
                    let sname = format!("{name}_scale_inv");
                    let sv = st.tensor(&sname).map_err(|_| {
                        anyhow!("{}: FP8 tensor {name} has no {sname}", file.display())
                    })?;
                    let scale: Vec<f32> = sv
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    if shape.len() != 2
                        || scale.len() != shape[0].div_ceil(block[0]) * shape[1].div_ceil(block[1])
                    {
                        bail!(
                            "{}: FP8 tensor {name} {shape:?} does not match its scale {:?}",
                            file.display(),
                            sv.shape()
                        );
                    }
                    dequant_block_fp8(d, &scale, shape[0], shape[1], block)
                }
                other => bail!("{}: tensor {name} has unsupported dtype {other:?}", file.display()),
            };
            src.insert(name, Tensor::new(shape, data));
        }
    }
    Ok((cfg, src))
}

/// Lowest id among the largest logits.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn top_logits(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    fathom_kernels::cpu::topk::topk_ranked(logits, k)
        .into_iter()
        .map(|i| (i, logits[i as usize]))
        .collect()
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let Some(model_dir) = args.model.clone() else {
        return remote(&args);
    };
    if !args.temperature.is_finite() || args.temperature < 0.0 {
        bail!("--temperature {} must be a finite number >= 0", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p {} must be in (0, 1]", args.top_p);
    }
    if args.temperature > 0.0 {
        bail!(
            "--temperature {} > 0: sampling is not available in this build yet (worker::sampling); use --temperature 0 (greedy)",
            args.temperature
        );
    }
    if args.block_size == 0 {
        bail!("--block-size must be > 0");
    }
    let stop_extra = args
        .stop_ids
        .as_deref()
        .map(|s| parse_ids("--stop-ids", s))
        .transpose()?
        .unwrap_or_default();
    let tok_path = model_dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Some(
            tokenizers::Tokenizer::from_file(&tok_path)
                .map_err(|e| anyhow!("{}: {e}", tok_path.display()))?,
        )
    } else {
        None
    };
    let prompt_ids = match (&args.prompt, &args.prompt_ids) {
        (_, Some(csv)) => parse_ids("--prompt-ids", csv)?,
        (Some(text), None) => {
            let tok = tokenizer.as_ref().ok_or_else(|| {
                anyhow!("--prompt needs {}; pass --prompt-ids instead", tok_path.display())
            })?;
            tok.encode(text.as_str(), true)
                .map_err(|e| anyhow!("tokenizing --prompt: {e}"))?
                .get_ids()
                .to_vec()
        }
        (None, None) => bail!("one of --prompt or --prompt-ids is required"),
    };
    if prompt_ids.is_empty() {
        bail!("the prompt is empty: at least one token is needed");
    }

    let (cfg, src) = load_model_dir(&model_dir)?;
    if let Some(&id) = prompt_ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        bail!("prompt token id {id} is not below vocab_size {}", cfg.vocab_size);
    }
    if let Some(&id) = stop_extra.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        bail!("--stop-ids: {id} is not below vocab_size {}", cfg.vocab_size);
    }
    // Positions fed: the prompt, then every generated token but the last.
    let fed = prompt_ids.len() + args.max_new_tokens.saturating_sub(1);
    if fed > cfg.max_position_embeddings {
        bail!(
            "prompt ({}) + max-new-tokens ({}) needs {fed} positions, past max_position_embeddings {}",
            prompt_ids.len(),
            args.max_new_tokens,
            cfg.max_position_embeddings
        );
    }
    let mut stop: BTreeSet<u32> = stop_extra.into_iter().collect();
    if !args.ignore_eos {
        stop.extend(cfg.eos_ids());
    }
    if args.parallel.is_parallel() {
        let job = crate::generate_parallel::Job {
            prompt_ids: prompt_ids.clone(),
            max_new_tokens: args.max_new_tokens,
            stop_ids: stop.iter().copied().collect(),
            block_size: args.block_size,
            record_routing: args.return_routed_experts,
        };
        let (generated, logits, routed) =
            crate::generate_parallel::generate(&args.parallel, &model_dir, &cfg, &src, &job)?;
        let finish =
            if generated.last().is_some_and(|t| stop.contains(t)) { "stop" } else { "length" };
        let steps =
            logits.iter().map(|l| Step { top: top_logits(l, args.logits_topk.unwrap_or(0)) });
        return emit(
            &args,
            tokenizer.as_ref(),
            prompt_ids,
            generated,
            finish,
            steps.collect(),
            routed,
        );
    }
    let shard = ShardSpec { load_mtp: false, ..ShardSpec::full(&cfg) };
    let model = Model::load(&src, cfg, shard)?;
    drop(src);

    let bs = args.block_size;
    let num_blocks = blocks_for(fed.max(1), bs);
    let mut cache = model.new_cache(bs, num_blocks)?;
    let mut alloc = BlockAllocator::new(num_blocks);
    let mut table = Vec::new();
    let opts = ForwardOptions {
        logits: LogitsMode::LastPerSeq,
        record_hidden: false,
        record_routing: args.return_routed_experts,
    };
    let mut tokens = prompt_ids.clone();
    let mut generated = Vec::new();
    let mut steps = Vec::new();
    let mut routed = Vec::new();
    let mut pos = 0;
    let mut finish = "length";
    while generated.len() < args.max_new_tokens {
        alloc.grow(&mut table, tokens.len(), bs)?;
        let seq = SeqInput { tokens: &tokens[pos..], start_pos: pos, block_table: &table };
        let out = model.forward(&[seq], &mut cache, &opts)?;
        routed.extend(out.routed_experts);
        pos = tokens.len();
        let next = argmax(&out.logits);
        if let Some(k) = args.logits_topk {
            steps.push(Step { top: top_logits(&out.logits, k) });
        }
        generated.push(next);
        tokens.push(next);
        if stop.contains(&next) {
            finish = "stop";
            break;
        }
    }
    emit(&args, tokenizer.as_ref(), prompt_ids, generated, finish, steps, routed)
}

/// Prints the result (JSON, text, or ids).
fn emit(
    args: &GenerateArgs,
    tokenizer: Option<&tokenizers::Tokenizer>,
    prompt_ids: Vec<u32>,
    generated: Vec<u32>,
    finish: &'static str,
    steps: Vec<Step>,
    routed: Vec<Vec<Vec<u32>>>,
) -> Result<()> {
    let text = match tokenizer {
        Some(t) => t.decode(&generated, false).map_err(|e| anyhow!("decoding the output: {e}"))?,
        None => String::new(),
    };
    if args.json {
        let o = Output {
            prompt_ids,
            generated_ids: generated,
            text,
            finish_reason: finish.into(),
            steps: args.logits_topk.map(|_| steps),
            routed_experts: args.return_routed_experts.then_some(routed),
            ..Default::default()
        };
        println!("{}", serde_json::to_string(&o)?);
    } else if tokenizer.is_some() {
        println!("{text}");
    } else {
        println!("{}", generated.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
    }
    Ok(())
}

/// `--endpoint`: the same request through a running cluster (cli/src/client.rs).
fn remote(args: &GenerateArgs) -> Result<()> {
    let ids = |flag: &str, v: &Option<String>| v.as_deref().map(|s| parse_ids(flag, s)).transpose();
    let remote = crate::client::GenerateArgs {
        model: None,
        endpoint: args.endpoint.clone(),
        prompt: args.prompt.clone(),
        prompt_ids: ids("--prompt-ids", &args.prompt_ids)?,
        max_new_tokens: u32::try_from(args.max_new_tokens)
            .map_err(|_| anyhow!("--max-new-tokens {} is too large", args.max_new_tokens))?,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: Some(args.seed),
        stop_ids: ids("--stop-ids", &args.stop_ids)?.unwrap_or_default(),
        ignore_eos: args.ignore_eos,
        json: args.json,
        logits_topk: args.logits_topk.unwrap_or(0) as u32,
        return_routed_experts: args.return_routed_experts,
        return_logprobs: false,
        world_size: 1,
        tp: 1,
        comm: "local".into(),
        device: "cpu".into(),
        timeout_ms: 0,
    };
    crate::client::run(&remote)
}
