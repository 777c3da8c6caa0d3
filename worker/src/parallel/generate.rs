//! Generation on one rank ([`generate_on_rank`]) and the W-thread runner over [`LocalComm`]
//! ([`run_local`]) behind `fathom generate --world-size W --tp T --comm local` and the tests.
//!
//! Each group generates its own sequences (data-parallel attention); all W ranks step together:
//! after every step the world all-reduces the number of still-running sequences and stops when
//! it is zero, so every rank makes the same number of forwards (a group that is done, or never
//! had a sequence, keeps stepping with an empty batch to serve the others' MoE traffic).

use super::{ParallelError, RankForwardOptions, RankModel};
use crate::kv::{BlockAllocator, blocks_for};
use crate::model::{ForwardOptions, LogitsMode, ModelError, SeqInput};
use crate::sampling::{Sampled, SamplingParams, sample};
use crate::weights::TensorSource;
use fathom_common::ModelConfig;
use fathom_common::plan::ParallelPlan;
use fathom_kernels::comm::{Collective, CommOptions, LocalComm};

/// What one group generates.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// One prompt per sequence (may be empty: the group then only serves the others).
    pub prompts: Vec<Vec<u32>>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end a sequence (included in its output).
    pub stop_ids: Vec<u32>,
    /// Keep every step's full logits in the output.
    pub keep_logits: bool,
    /// Record the routed experts of every position fed (prompt, then generated tokens but the
    /// last), per MoE layer, ascending.
    pub record_routing: bool,
    /// KV block size in tokens.
    pub block_size: usize,
}

/// What one group generated (identical on its ranks).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateOutput {
    /// Per sequence, the generated ids.
    pub generated: Vec<Vec<u32>>,
    /// Per sequence, per generated token, the `[vocab]` logits it was sampled from (only with
    /// `keep_logits`).
    pub logits: Vec<Vec<Vec<f32>>>,
    /// Per sequence: hit a stop id (`true`) or the length limit.
    pub stopped: Vec<bool>,
    /// Per sequence, per position fed, per MoE layer: the routed experts ascending (only with
    /// `record_routing`).
    pub routed_experts: Vec<Vec<Vec<Vec<u32>>>>,
    /// Per sequence, per generated token, what the sampler returned (log-prob, mask, top
    /// log-probs) — only when `sampling.return_mask` or `sampling.top_logprobs > 0`, else empty.
    pub sampled: Vec<Vec<Sampled>>,
    /// Wall time of every world step on this rank, in seconds (step 0 is the prompt prefill).
    pub step_s: Vec<f64>,
}

/// Runs `req` (this rank's group's sequences, identical on every rank of the group) to the end.
/// Every rank of the world must call it, with the same `max_new_tokens` bound semantics (the
/// world keeps stepping until every group is done).
pub fn generate_on_rank(
    model: &RankModel,
    world: &mut dyn Collective,
    group: &mut dyn Collective,
    req: &GenerateRequest,
) -> Result<GenerateOutput, ParallelError> {
    let bs = req.block_size.max(1);
    let n_seq = req.prompts.len();
    if let Some(s) = req.prompts.iter().position(Vec::is_empty) {
        return Err(ModelError::EmptySequence { seq: s }.into());
    }
    let need: usize =
        req.prompts.iter().map(|p| blocks_for(p.len() + req.max_new_tokens, bs)).sum();
    let mut cache = model.new_cache(bs, need.max(1))?;
    let mut alloc = BlockAllocator::new(need.max(1));
    let tables: Vec<Vec<u32>> = req
        .prompts
        .iter()
        .map(|p| alloc.alloc(blocks_for(p.len() + req.max_new_tokens, bs)))
        .collect::<Result<_, _>>()
        .map_err(ModelError::from)?;
    let mut out = GenerateOutput {
        generated: vec![Vec::new(); n_seq],
        logits: vec![Vec::new(); n_seq],
        stopped: vec![false; n_seq],
        routed_experts: vec![Vec::new(); n_seq],
        sampled: vec![Vec::new(); n_seq],
        step_s: Vec::new(),
    };
    let keep_sampled = req.sampling.return_mask || req.sampling.top_logprobs > 0;
    // Per sequence: next input tokens and their start position.
    let mut pending: Vec<(Vec<u32>, usize)> = req.prompts.iter().map(|p| (p.clone(), 0)).collect();
    let mut running: Vec<bool> = vec![req.max_new_tokens > 0; n_seq];
    let opts = RankForwardOptions::from(ForwardOptions {
        logits: LogitsMode::LastPerSeq,
        record_hidden: false,
        record_routing: req.record_routing,
    });
    loop {
        let step_started = std::time::Instant::now();
        let mut active_count = [running.iter().filter(|&&r| r).count() as f32];
        world.all_reduce_sum_f32(&mut active_count)?;
        if active_count[0] == 0.0 {
            break;
        }
        let active: Vec<usize> = (0..n_seq).filter(|&s| running[s]).collect();
        let seqs: Vec<SeqInput> = active
            .iter()
            .map(|&s| SeqInput {
                tokens: &pending[s].0,
                start_pos: pending[s].1,
                block_table: &tables[s],
            })
            .collect();
        let mut fwd = model.forward(&seqs, &mut cache, world, group, &opts)?;
        if req.record_routing {
            let mut rows = fwd.routed_experts.drain(..);
            for &s in &active {
                out.routed_experts[s].extend(rows.by_ref().take(pending[s].0.len()));
            }
        }
        let v = model.config().vocab_size;
        for (i, &s) in active.iter().enumerate() {
            let logits = &fwd.logits[i * v..(i + 1) * v];
            let step = out.generated[s].len() as u64;
            let picked = sample(logits, &req.sampling, step)?;
            let tok = picked.token;
            out.generated[s].push(tok);
            if keep_sampled {
                out.sampled[s].push(picked);
            }
            if req.keep_logits {
                out.logits[s].push(logits.to_vec());
            }
            let next_pos = pending[s].1 + pending[s].0.len();
            pending[s] = (vec![tok], next_pos);
            if req.stop_ids.contains(&tok) {
                out.stopped[s] = true;
                running[s] = false;
            } else if out.generated[s].len() >= req.max_new_tokens {
                running[s] = false;
            }
        }
        out.step_s.push(step_started.elapsed().as_secs_f64());
    }
    Ok(out)
}

/// Runs a whole world of `plan.world_size` ranks as threads over [`LocalComm`]: each thread
/// loads its shard from `src`, splits its group communicator, and generates `requests[g]` for
/// its group `g`. Returns each group's output (from its rank 0), or the first error by rank.
pub fn run_local(
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    plan: &ParallelPlan,
    requests: &[GenerateRequest],
    comm: CommOptions,
) -> Result<Vec<GenerateOutput>, ParallelError> {
    let d = plan.num_groups();
    if requests.len() != d {
        return Err(ParallelError::Layout {
            what: "requests (one per group)",
            expected: d,
            got: requests.len(),
        });
    }
    let comms = LocalComm::create_with(plan.world_size, comm);
    let results: Vec<Result<GenerateOutput, ParallelError>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, mut world)| {
                s.spawn(move || {
                    let model = RankModel::load(cfg.clone(), src, plan, rank)?;
                    let mut group = world.split(&plan.groups())?.ok_or(ParallelError::Layout {
                        what: "group communicator for rank",
                        expected: rank,
                        got: usize::MAX,
                    })?;
                    generate_on_rank(&model, &mut world, group.as_mut(), &requests[model.group()])
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| h.join().unwrap_or(Err(ParallelError::RankPanicked { rank })))
            .collect()
    });
    let mut outputs = Vec::with_capacity(d);
    for (rank, r) in results.into_iter().enumerate() {
        let r = r?;
        if plan.rank_in_group(fathom_common::ids::Rank(rank as u32)) == 0 {
            outputs.push(r);
        }
    }
    Ok(outputs)
}
