//! `fathom generate`: one-shot generation (CLI.md). With `--model DIR` it runs in this process
//! on the CPU reference model — one rank, or W ranks with `--world-size/--tp/--comm`
//! (`generate_parallel.rs`) — reading the checkpoint through the mmap `CheckpointReader`; with
//! `--endpoint URL` it is a gRPC client of a running cluster (`client.rs`). Greedy at
//! temperature 0, else seeded sampling (`fathom_worker::sampling`: the same tokens for the same
//! seed on every layout).

use anyhow::{Result, anyhow, bail};
use fathom_worker::kv::{BlockAllocator, blocks_for};
use fathom_worker::model::{ForwardOptions, LogitsMode, Model, SeqInput, ShardSpec};
use fathom_worker::sampling::{SamplingParams, sample};
use fathom_worker::weights::reader::CheckpointReader;
use std::collections::BTreeSet;
use std::path::PathBuf;

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
    /// With --json: "logprobs" (per generated token, under the distribution it was drawn from)
    /// and "sampling_masks" (per generated token, the sorted ids that survived top-k/top-p).
    #[arg(long)]
    return_logprobs: bool,
    /// KV cache block size in tokens.
    #[arg(long, default_value_t = fathom_worker::kv::DEFAULT_BLOCK_SIZE)]
    block_size: usize,
    /// `cpu` (the reference model) or `cuda[:N]` (the GPU model on GPU N, one rank; an f32
    /// checkpoint runs in f32, others in bf16).
    #[arg(long, default_value = "cpu")]
    device: fathom_worker::model_cuda::DeviceChoice,
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
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        return_mask: args.return_logprobs,
        top_logprobs: 0,
    };
    sampling.validate().map_err(|e| anyhow!("invalid sampling: {e}"))?;
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

    let src = CheckpointReader::open(&model_dir)?;
    let cfg = src.config().clone();
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
    if let fathom_worker::model_cuda::DeviceChoice::Cuda(ordinal) = args.device {
        if args.parallel.is_parallel() {
            bail!(
                "--device {}: fathom generate runs one GPU (W = 1); for sharded plans on several \
                 GPUs use `fathom up --device cuda --workers W [--tp T]`",
                args.device
            );
        }
        let keep = args.logits_topk.is_some() || args.return_logprobs;
        let (generated, finish, logits, routed) = generate_cuda(
            ordinal,
            src,
            cfg,
            &prompt_ids,
            &stop,
            &sampling,
            args.max_new_tokens,
            (keep, args.return_routed_experts),
        )?;
        return emit(&args, tokenizer.as_ref(), prompt_ids, generated, finish, &logits, routed);
    }
    if args.parallel.is_parallel() {
        let job = crate::generate_parallel::Job {
            prompt_ids: prompt_ids.clone(),
            max_new_tokens: args.max_new_tokens,
            stop_ids: stop.iter().copied().collect(),
            block_size: args.block_size,
            record_routing: args.return_routed_experts,
            sampling,
        };
        let (generated, logits, routed) =
            crate::generate_parallel::generate(&args.parallel, &model_dir, &cfg, &src, &job)?;
        let finish =
            if generated.last().is_some_and(|t| stop.contains(t)) { "stop" } else { "length" };
        return emit(&args, tokenizer.as_ref(), prompt_ids, generated, finish, &logits, routed);
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
    let keep_logits = args.logits_topk.is_some() || args.return_logprobs;
    let mut tokens = prompt_ids.clone();
    let mut generated = Vec::new();
    let mut step_logits = Vec::new();
    let mut routed = Vec::new();
    let mut pos = 0;
    let mut finish = "length";
    while generated.len() < args.max_new_tokens {
        alloc.grow(&mut table, tokens.len(), bs)?;
        let seq = SeqInput { tokens: &tokens[pos..], start_pos: pos, block_table: &table };
        let out = model.forward(&[seq], &mut cache, &opts)?;
        routed.extend(out.routed_experts);
        pos = tokens.len();
        // The token index within the request keys the random stream (worker::sampling).
        let next = sample(&out.logits, &sampling, generated.len() as u64)?.token;
        if keep_logits {
            step_logits.push(out.logits);
        }
        generated.push(next);
        tokens.push(next);
        if stop.contains(&next) {
            finish = "stop";
            break;
        }
    }
    emit(&args, tokenizer.as_ref(), prompt_ids, generated, finish, &step_logits, routed)
}

/// Generated ids, finish reason, (when kept) each step's logits, (when recorded) each fed
/// row's routed experts per MoE layer.
type Generated = (Vec<u32>, &'static str, Vec<Vec<f32>>, Vec<Vec<Vec<u32>>>);

/// The generation loop on one GPU (`--device cuda[:N]`): the prompt in one prefill, then one
/// token per step, sampled exactly as on the CPU. CUDA libraries come from the loader's path
/// plus `FATHOM_CUDA_LIB_DIRS`; compiled kernels are cached in `~/.cache/fathom/kernels`.
#[allow(clippy::too_many_arguments)]
fn generate_cuda(
    ordinal: usize,
    src: CheckpointReader,
    cfg: fathom_common::ModelConfig,
    prompt_ids: &[u32],
    stop: &BTreeSet<u32>,
    sampling: &SamplingParams,
    max_new_tokens: usize,
    (keep_logits, record_routing): (bool, bool),
) -> Result<Generated> {
    use fathom_worker::model_cuda::{CudaModel, CudaSeqInput, open_gpu, precision_for};
    let lib_dirs: Vec<PathBuf> = std::env::var_os("FATHOM_CUDA_LIB_DIRS")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    let cache_dir =
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/fathom/kernels"));
    let dev = open_gpu(ordinal, lib_dirs, cache_dir.clone())?;
    let kc = cache_dir.map(fathom_kernels::cuda::KernelCache::new);
    let prec = precision_for(&src);
    let fed = prompt_ids.len() + max_new_tokens.saturating_sub(1);
    let max_ctx = fed.max(cfg.index_topk).min(cfg.max_position_embeddings);
    let model = CudaModel::load_with(dev, &src, cfg, kc.as_ref(), prec)?;
    drop(src);
    let mut cache = model.new_cache(1, max_ctx)?;
    let opts =
        ForwardOptions { logits: LogitsMode::LastPerSeq, record_routing, ..Default::default() };
    let (mut tokens, mut generated, mut kept) = (prompt_ids.to_vec(), Vec::new(), Vec::new());
    let mut routed = Vec::new();
    let mut pos = 0;
    while generated.len() < max_new_tokens {
        let seq = CudaSeqInput { tokens: &tokens[pos..], start_pos: pos, slot: 0 };
        let out = model.forward(&[seq], &mut cache, &opts)?;
        routed.extend(out.routed_experts);
        pos = tokens.len();
        let next = sample(&out.logits, sampling, generated.len() as u64)?.token;
        if keep_logits {
            kept.push(out.logits);
        }
        generated.push(next);
        tokens.push(next);
        if stop.contains(&next) {
            return Ok((generated, "stop", kept, routed));
        }
    }
    Ok((generated, "length", kept, routed))
}

/// Prints the result (JSON, text, or ids). `step_logits[i]` is the distribution that produced
/// `generated[i]` (kept when `--logits-topk` or `--return-logprobs` asked for it); logprobs and
/// masks are recomputed from it with the same sampler, which must give back the same token.
fn emit(
    args: &GenerateArgs,
    tokenizer: Option<&tokenizers::Tokenizer>,
    prompt_ids: Vec<u32>,
    generated: Vec<u32>,
    finish: &'static str,
    step_logits: &[Vec<f32>],
    routed: Vec<Vec<Vec<u32>>>,
) -> Result<()> {
    let text = match tokenizer {
        Some(t) => t.decode(&generated, false).map_err(|e| anyhow!("decoding the output: {e}"))?,
        None => String::new(),
    };
    if args.json {
        let steps = args.logits_topk.map(|k| {
            step_logits.iter().map(|l| Step { top: top_logits(l, k) }).collect::<Vec<_>>()
        });
        let (mut logprobs, mut masks) = (Vec::new(), Vec::new());
        if args.return_logprobs {
            let params = SamplingParams {
                temperature: args.temperature,
                top_p: args.top_p,
                top_k: args.top_k,
                seed: args.seed,
                return_mask: true,
                top_logprobs: 0,
            };
            for (i, (l, &tok)) in step_logits.iter().zip(&generated).enumerate() {
                let s = sample(l, &params, i as u64)?;
                if s.token != tok {
                    bail!("internal: step {i} resampled to {} instead of {tok}", s.token);
                }
                logprobs.push(s.logprob);
                masks.push(s.mask.unwrap_or_default());
            }
        }
        let o = Output {
            prompt_ids,
            generated_ids: generated,
            text,
            finish_reason: finish.into(),
            steps,
            routed_experts: args.return_routed_experts.then_some(routed),
            logprobs: args.return_logprobs.then_some(logprobs),
            sampling_masks: args.return_logprobs.then_some(masks),
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
        return_logprobs: args.return_logprobs,
        world_size: 1,
        tp: 1,
        comm: "local".into(),
        device: "cpu".into(),
        timeout_ms: 0,
    };
    crate::client::run(&remote)
}
