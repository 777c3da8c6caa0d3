//! Sharded execution (ARCHITECTURE §2): one rank's part of DeepSeek-V3.2 and the collectives
//! that join the parts, for a [`ParallelPlan`] of W ranks in D = W/T attention groups of T.
//!
//! Owns: [`RankModel`] — loading exactly this rank's tensors (its heads' rows of `q_b`/`kv_b`
//! and columns of `o_proj`, its slice of the dense FFN inner dimension, its vocabulary rows of
//! the embedding and LM head, its routed experts per MoE layer as placed by the plan; norms,
//! `q_a`/`kv_a`, the indexer, routers and shared experts replicated) — and its forward over one
//! step of its group's sequences: TP all-reduces in the group, EP dispatch/combine over the world
//! (`moe.rs`), vocab-parallel embedding and LM head. Also the greedy/sampled generation loop of
//! one rank and the W-thread `LocalComm` runner (`generate.rs`), and a byte-counting
//! [`TensorSource`] wrapper (`counting.rs`), and reloading a model for a new epoch's plan
//! keeping every unchanged tensor (`reuse.rs`, elastic epochs).
//! Does not own: the layer math (`crate::model`), the collectives (`fathom_kernels::comm`), the
//! plan (`fathom_common::plan`), scheduling or block allocation (callers pass block tables).
//!
//! Invariants:
//! - Every rank of a group is given the same step inputs (same sequences, block tables) and
//!   keeps the same KV cache contents; after every all-reduce/all-gather the residual stream is
//!   bit-identical on the ranks of a group (the collectives sum in rank order and copy one
//!   result), so the replicated indexer selects the same top-k everywhere.
//! - Every rank of the world calls [`RankModel::forward`] once per step, also when its group
//!   has no sequences: each MoE layer does exactly two world all-to-alls (dispatch, combine) on
//!   every rank, so groups can never pair different layers' messages.
//! - Group-level collectives in a step depend only on the group's inputs (identical on its
//!   ranks), so they stay in step inside the group.
//! - Numerics: the fp32 weighted sum of expert outputs runs on the routing rank in ascending
//!   expert order, as the one-rank model does; only the TP partial sums change summation order.

//!
//! Use from a worker process (one rank):
//! ```text
//! let plan: ParallelPlan = ...;                          // the epoch's plan, validated
//! let model = RankModel::load(cfg, &reader, &plan, rank)?;   // reads only this rank's bytes
//! let mut world: Box<dyn Collective> = TcpComm / LocalComm / NCCL for W ranks;
//! let mut group = world.split(&plan.groups())?.unwrap();  // this rank's attention group
//! let mut cache = model.new_cache(block_size, num_blocks)?;
//! every step, on every rank:  model.forward(&my_group_seqs, &mut cache, world, group, &opts)?
//! ```
//! or [`generate_on_rank`] for a whole request loop.

mod counting;
mod generate;
mod layer;
pub(crate) mod moe;
mod placement;
mod reuse;
mod table;

pub use counting::CountingSource;
pub use generate::{GenerateOutput, GenerateRequest, generate_on_rank, run_local};
pub use placement::{StagedExperts, StepLoad, stage};
pub use reuse::ReloadReport;
pub use table::{ExpertTable, load_expert};

use crate::kv::PagedKvCache;
use crate::model::embed::{Embedding, LmHead};
use crate::model::{ForwardOptions, ForwardOutput, LogitsMode, ModelError, SeqInput, StepCtx};
use crate::weights::TensorSource;
use fathom_common::ModelConfig;
use fathom_common::ids::Rank;
use fathom_common::plan::{ParallelPlan, PlanError};
use fathom_kernels::comm::{Collective, CollectiveExt, CommError};
use fathom_kernels::cpu::norm::rms_norm_new;
use layer::RankLayer;
use std::ops::Range;

/// Why a sharded load or step failed. Collective failures keep the comm error, which names the
/// world ranks that died or did not arrive.
#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("collective failed: {0}")]
    Comm(#[from] CommError),
    #[error("parallel plan: {0}")]
    Plan(#[from] PlanError),
    #[error("{what}: expected {expected}, got {got}")]
    Layout { what: &'static str, expected: usize, got: usize },
    #[error("layer {layer}: malformed MoE message from rank {rank}: {what}")]
    Protocol { layer: usize, rank: usize, what: String },
    #[error(transparent)]
    Sampling(#[from] crate::sampling::SamplingError),
    #[error("rank {rank}'s thread panicked")]
    RankPanicked { rank: usize },
    #[error("layer {layer}: ranks {ranks:?} of the group disagree on the indexer top-k")]
    Diverged { layer: usize, ranks: Vec<usize> },
}

/// Part `k` of `n` items split into `parts` contiguous ranges, the first ones one longer when it
/// does not divide: `[k·n/parts, (k+1)·n/parts)`.
pub fn even_range(n: usize, parts: usize, k: usize) -> Range<usize> {
    k * n / parts..(k + 1) * n / parts
}

/// Checks that `world` and `group` are the communicators of rank `rank` (position `group_rank`
/// in its group) under `plan`: sizes and positions (the CPU and GPU ranks share it).
pub(crate) fn check_comms(
    plan: &ParallelPlan,
    (rank, group_rank): (usize, usize),
    world: &dyn Collective,
    group: &dyn Collective,
) -> Result<(), ParallelError> {
    let checks = [
        ("world communicator size", plan.world_size, world.world_size()),
        ("rank in the world communicator", rank, world.rank()),
        ("group communicator size", plan.tp, group.world_size()),
        ("rank in the group communicator", group_rank, group.rank()),
    ];
    for (what, expected, got) in checks {
        if expected != got {
            return Err(ParallelError::Layout { what, expected, got });
        }
    }
    Ok(())
}

/// Debug switches of one sharded step (on top of [`ForwardOptions`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct RankForwardOptions {
    pub base: ForwardOptions,
    /// Before each layer's attention, compute the indexer's top-k of every token and check over
    /// the group that all ranks selected the same positions ([`ParallelError::Diverged`]).
    pub check_topk: bool,
}

impl From<ForwardOptions> for RankForwardOptions {
    fn from(base: ForwardOptions) -> Self {
        Self { base, check_topk: false }
    }
}

/// One rank's shard of DeepSeek-V3.2 under a [`ParallelPlan`].
#[derive(Debug)]
pub struct RankModel {
    cfg: ModelConfig,
    plan: ParallelPlan,
    rank: usize,
    /// Position in the group (0..T).
    group_rank: usize,
    embed: Embedding,
    /// First vocabulary row held by `embed` and `head`.
    vocab_start: usize,
    layers: Vec<RankLayer>,
    norm: Vec<f32>,
    head: LmHead,
    freqs: Vec<f32>,
    attention_factor: f32,
    /// The layer and phase of the running forward (for the watchdog).
    progress: std::sync::Arc<crate::model::StepPhase>,
}

impl RankModel {
    /// Loads rank `rank`'s tensors from `src` (and nothing else: see the module doc).
    pub fn load(
        cfg: ModelConfig,
        src: &dyn TensorSource,
        plan: &ParallelPlan,
        rank: usize,
    ) -> Result<Self, ParallelError> {
        cfg.validate().map_err(ModelError::from)?;
        plan.validate_for(&cfg)?;
        if rank >= plan.world_size {
            return Err(ParallelError::Layout {
                what: "rank below world_size",
                expected: plan.world_size,
                got: rank,
            });
        }
        let t = plan.tp;
        let group_rank = plan.rank_in_group(Rank(rank as u32));
        if cfg.vocab_size < t || cfg.intermediate_size < t {
            return Err(ModelError::Shard(format!(
                "tp {t} exceeds vocab_size {} or intermediate_size {}",
                cfg.vocab_size, cfg.intermediate_size
            ))
            .into());
        }
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let vocab = even_range(v, t, group_rank);
        let (embed, vocab_start) =
            Embedding::load_rows(src, "model.embed_tokens.weight", v, h, vocab.clone())?;
        let head = LmHead::load_rows(src, "lm_head.weight", v, h, vocab)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| RankLayer::load(src, &cfg, plan, rank, i))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            embed,
            vocab_start,
            head,
            norm: crate::model::load::exact(src, "model.norm.weight", &[h])?,
            layers,
            freqs: cfg
                .rope_frequencies()
                .map_err(ModelError::from)?
                .iter()
                .map(|&f| f as f32)
                .collect(),
            attention_factor: cfg.rope_attention_factor().map_err(ModelError::from)? as f32,
            group_rank,
            rank,
            plan: plan.clone(),
            cfg,
            progress: Default::default(),
        })
    }

    /// The cell every forward of this rank writes its layer and phase into.
    pub fn step_phase(&self) -> std::sync::Arc<crate::model::StepPhase> {
        self.progress.clone()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn plan(&self) -> &ParallelPlan {
        &self.plan
    }

    /// This rank in the world.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// This rank's attention group.
    pub fn group(&self) -> usize {
        self.plan.group_of(Rank(self.rank as u32))
    }

    /// This rank's position in its group.
    pub fn group_rank(&self) -> usize {
        self.group_rank
    }

    /// A KV cache for this rank, shaped as the one-rank model's (the latent is shared by all
    /// heads, so every rank of a group keeps the same full-width cache).
    pub fn new_cache(
        &self,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<PagedKvCache, ParallelError> {
        Ok(PagedKvCache::new(crate::kv::CacheConfig::for_model(&self.cfg, block_size, num_blocks))
            .map_err(ModelError::from)?)
    }

    /// One step of this rank's group: `seqs` are the group's sequences (identical on every rank
    /// of the group; empty when the group has nothing to do — the call is still required, it
    /// serves the other groups' MoE traffic). `world` is the communicator over all W ranks,
    /// `group` the one over this rank's group (`world.split(&plan.groups())`).
    ///
    /// Returns the same [`ForwardOutput`] on every rank of the group (logits gathered over the
    /// vocabulary parts; routing gathered over the token slices when recorded).
    pub fn forward(
        &self,
        seqs: &[SeqInput],
        cache: &mut PagedKvCache,
        world: &mut dyn Collective,
        group: &mut dyn Collective,
        opts: &RankForwardOptions,
    ) -> Result<ForwardOutput, ParallelError> {
        self.forward_counted(seqs, cache, world, group, opts).map(|(out, _)| out)
    }

    /// [`Self::forward`] plus this rank's expert-load counters of the step ([`StepLoad`]).
    pub fn forward_counted(
        &self,
        seqs: &[SeqInput],
        cache: &mut PagedKvCache,
        world: &mut dyn Collective,
        group: &mut dyn Collective,
        opts: &RankForwardOptions,
    ) -> Result<(ForwardOutput, StepLoad), ParallelError> {
        check_comms(&self.plan, (self.rank, self.group_rank), world, group)?;
        crate::model::validate_batch(&self.cfg, seqs, cache)?;
        let mut ctx = StepCtx::new(seqs, &self.freqs, self.attention_factor);
        ctx.progress = Some(&self.progress);
        let n = ctx.n_tokens();
        let hdim = self.cfg.hidden_size;
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let mut out = ForwardOutput::default();
        ctx.mark(None, crate::model::Phase::Embed);
        let mut h = self.embed.lookup_part(&tokens, self.vocab_start); // [n, hidden]
        if n > 0 {
            group.all_reduce_sum_f32(&mut h)?;
        }
        if opts.base.record_hidden {
            out.layer_hidden.push(h.clone());
        }
        if opts.base.record_routing {
            out.routed_experts = vec![Vec::new(); n];
        }
        let mut load = StepLoad::default();
        for layer in &self.layers {
            let (routing, counts) =
                layer.forward(&mut h, &ctx, cache, world, group, &self.plan, opts)?;
            load.push(counts);
            if opts.base.record_hidden {
                out.layer_hidden.push(h.clone());
            }
            if let (true, Some(per_token)) = (opts.base.record_routing, routing) {
                for (t, ids) in per_token.into_iter().enumerate() {
                    out.routed_experts[t].push(ids);
                }
            }
        }
        ctx.mark(None, crate::model::Phase::Head);
        out.logit_rows = match opts.base.logits {
            LogitsMode::None => Vec::new(),
            LogitsMode::LastPerSeq => (0..seqs.len()).map(|s| ctx.seq_rows(s).end - 1).collect(),
            LogitsMode::All => (0..n).collect(),
        };
        if !out.logit_rows.is_empty() {
            let mut rows = Vec::with_capacity(out.logit_rows.len() * hdim);
            for &r in &out.logit_rows {
                rows.extend_from_slice(&h[r * hdim..(r + 1) * hdim]);
            }
            let normed = rms_norm_new(&rows, &self.norm, self.cfg.rms_norm_eps as f32, hdim);
            out.logits =
                self.gather_logits(&self.head.logits(&normed), out.logit_rows.len(), group)?;
        }
        out.hidden = h;
        Ok((out, load))
    }

    /// Vocab-parallel logits `[rows, local vocab]` → full `[rows, vocab]` on every group rank.
    fn gather_logits(
        &self,
        local: &[f32],
        rows: usize,
        group: &mut dyn Collective,
    ) -> Result<Vec<f32>, ParallelError> {
        gather_vocab_parts(local, rows, self.cfg.vocab_size, group)
    }
}

/// Vocab-parallel logits of this group rank, `[rows, even_range(vocab, T, k).len()]`, → the full
/// `[rows, vocab]` on every rank of `group` (one all-gather of parts padded to equal width).
/// Shared by the CPU and GPU rank models.
pub(crate) fn gather_vocab_parts(
    local: &[f32],
    rows: usize,
    v: usize,
    group: &mut dyn Collective,
) -> Result<Vec<f32>, ParallelError> {
    let t = group.world_size();
    let width = v.div_ceil(t); // padded part width
    let mine = even_range(v, t, group.rank()).len();
    if local.len() != rows * mine {
        return Err(ParallelError::Layout {
            what: "local logits (rows x vocabulary part)",
            expected: rows * mine,
            got: local.len(),
        });
    }
    let mut send = vec![0.0f32; rows * width]; // [rows, width]
    for r in 0..rows {
        send[r * width..r * width + mine].copy_from_slice(&local[r * mine..(r + 1) * mine]);
    }
    let mut recv = vec![0.0f32; t * rows * width]; // [t, rows, width]
    group.all_gather_pod(&send, &mut recv)?;
    let mut logits = vec![0.0f32; rows * v]; // [rows, vocab]
    for k in 0..t {
        let part = even_range(v, t, k);
        for r in 0..rows {
            let src = &recv[(k * rows + r) * width..(k * rows + r) * width + part.len()];
            logits[r * v + part.start..r * v + part.end].copy_from_slice(src);
        }
    }
    Ok(logits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_kernels::comm::LocalComm;

    #[test]
    fn vocab_parts_gather_to_full_rows() {
        let (rows, v) = (2usize, 7usize);
        let full: Vec<f32> = (0..rows * v).map(|i| i as f32).collect(); // [rows, vocab]
        for t in [1usize, 2, 3] {
            let got: Vec<Vec<f32>> = std::thread::scope(|s| {
                let hs: Vec<_> = LocalComm::create(t)
                    .into_iter()
                    .enumerate()
                    .map(|(k, mut c)| {
                        let part = even_range(v, t, k);
                        let local: Vec<f32> = (0..rows)
                            .flat_map(|r| full[r * v + part.start..r * v + part.end].to_vec())
                            .collect();
                        s.spawn(move || {
                            // A part of the wrong width is a layout error, not a panic.
                            if k == 0 && t > 1 {
                                assert!(gather_vocab_parts(&local[1..], rows, v, &mut c).is_err());
                            }
                            gather_vocab_parts(&local, rows, v, &mut c).unwrap()
                        })
                    })
                    .collect();
                hs.into_iter().map(|j| j.join().unwrap()).collect()
            });
            for g in got {
                assert_eq!(g, full, "t={t}");
            }
        }
    }
}
