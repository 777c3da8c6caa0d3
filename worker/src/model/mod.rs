//! DeepSeek-V3.2 (spec §2) composed from the CPU reference ops of `fathom_kernels::cpu`.
//!
//! Owns: model structure and weights for one rank's shard ([`ShardSpec`]: a head range, a set of
//! routed experts), the batched forward over several sequences at once ([`SeqInput`]: new tokens,
//! start position, KV block table — prefill chunks and decodes mix freely), final norm, LM head,
//! and the MTP draft head. Input validation with [`ModelError`].
//! Does not own: block allocation (callers pass block tables), sampling, collectives (the places
//! where a TP all-reduce or an EP dispatch/combine goes are marked in `layer.rs`, `ffn.rs`).
//!
//! Files: `embed.rs` (embedding, LM head), `mla.rs` (attention), `indexer.rs` (DSA),
//! `gate.rs` (routing only), `experts.rs` (expert compute only), `ffn.rs` (dense MLP, MoE
//! composition), `layer.rs` (a block), `mtp.rs`, `random.rs` (random weights for tests and
//! benchmarks), `load.rs` (shape-checked loading), `progress.rs` (the layer and phase a running
//! step is in, for the watchdog).

pub mod embed;
pub mod experts;
pub mod ffn;
pub mod gate;
pub mod indexer;
pub mod layer;
pub(crate) mod load;
pub mod mla;
pub mod mtp;
pub mod progress;
pub mod random;

use crate::kv::{CacheConfig, KvError, PagedKvCache};
use crate::weights::{TensorSource, WeightsError};
use embed::{Embedding, LmHead};
pub use experts::StepLoad;
use fathom_common::{ConfigError, ModelConfig};
use fathom_kernels::cpu::norm::rms_norm_new;
use fathom_kernels::cpu::rope::rope_cos_sin;
use layer::DecoderLayer;
use mtp::Mtp;
pub use progress::{Phase, StepPhase};
use std::ops::Range;
use std::sync::Arc;

/// Why the model could not be built or run. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("tensor {name} has shape {got:?}, expected {want:?}")]
    Shape { name: String, got: Vec<usize>, want: Vec<usize> },
    #[error("invalid shard: {0}")]
    Shard(String),
    #[error("sequence {seq} has no new tokens")]
    EmptySequence { seq: usize },
    #[error("token id {id} (sequence {seq}, position {pos}) is not below vocab_size {vocab}")]
    TokenOutOfVocab { seq: usize, pos: usize, id: u32, vocab: usize },
    #[error("sequence {seq}: context of {end} tokens exceeds max_position_embeddings {max}")]
    ContextTooLong { seq: usize, end: usize, max: usize },
    #[error("expert {expert} of layer {layer} is not held by this rank")]
    ExpertNotLoaded { layer: usize, expert: u32 },
    #[error("KV cache does not fit the model: {0}")]
    CacheMismatch(String),
    #[error("the model was loaded without MTP layers")]
    NoMtp,
    #[error("MTP input: {0}")]
    MtpInput(String),
}

/// What one rank holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    /// Attention heads `[h0, h1)` (q_b/kv_b rows, o_proj columns).
    pub heads: Range<usize>,
    /// Routed experts held (logical ids, every MoE layer); `None` = all.
    pub experts: Option<Vec<u32>>,
    /// Whether to load the MTP layers.
    pub load_mtp: bool,
}

impl ShardSpec {
    /// Everything, one rank: all heads, all experts, MTP when the config has it.
    pub fn full(cfg: &ModelConfig) -> Self {
        Self {
            heads: 0..cfg.num_attention_heads,
            experts: None,
            load_mtp: cfg.num_nextn_predict_layers > 0,
        }
    }
}

/// One sequence's part of a step: its new tokens at positions `start_pos ..`, and the block
/// table that covers positions `[0, start_pos + tokens.len())`. Earlier positions must already be
/// in the cache.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub block_table: &'a [u32],
}

/// Which rows get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// No logits (e.g. a non-final prefill chunk).
    None,
    /// The last new token of every sequence (generation).
    LastPerSeq,
    /// Every new token (teacher forcing, tests).
    All,
}

/// Options of one forward.
#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions {
    pub logits: LogitsMode,
    /// Record the residual stream after the embedding and after every layer.
    pub record_hidden: bool,
    /// Record the routed experts of every token in every MoE layer.
    pub record_routing: bool,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self { logits: LogitsMode::LastPerSeq, record_hidden: false, record_routing: false }
    }
}

/// Result of one forward. Token rows are the sequences' new tokens concatenated in batch order.
#[derive(Debug, Clone, Default)]
pub struct ForwardOutput {
    /// `[logit_rows.len(), vocab]`.
    pub logits: Vec<f32>,
    /// The token row of each logits row.
    pub logit_rows: Vec<usize>,
    /// Final residual stream (before the final norm) `[n, hidden]`.
    pub hidden: Vec<f32>,
    /// With `record_hidden`: `num_hidden_layers + 1` entries of `[n, hidden]` (embedding output,
    /// then after each layer; before the final norm).
    pub layer_hidden: Vec<Vec<f32>>,
    /// With `record_routing`: per token row, per MoE layer, the expert ids ascending.
    pub routed_experts: Vec<Vec<Vec<u32>>>,
}

/// Per-step context shared by the layers: the batch, each token row's position and the RoPE
/// cos/sin of those positions (`[n, qk_rope_head_dim / 2]`, one table for MLA and indexer).
#[derive(Debug)]
pub struct StepCtx<'a> {
    pub seqs: &'a [SeqInput<'a>],
    /// `offsets[s]..offsets[s + 1]` are sequence `s`'s token rows.
    offsets: Vec<usize>,
    pub positions: Vec<usize>,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// Where the step is, for the watchdog (`None`: not tracked).
    pub progress: Option<&'a StepPhase>,
}

impl<'a> StepCtx<'a> {
    /// Positions and RoPE tables of a batch (`freqs` from `ModelConfig::rope_frequencies`).
    pub fn new(seqs: &'a [SeqInput<'a>], freqs: &[f32], attention_factor: f32) -> Self {
        let mut offsets = vec![0];
        let mut positions = Vec::new();
        for s in seqs {
            positions.extend(s.start_pos..s.start_pos + s.tokens.len());
            offsets.push(positions.len());
        }
        let (cos, sin) = rope_cos_sin(freqs, attention_factor, &positions);
        Self { seqs, offsets, positions, cos, sin, progress: None }
    }

    /// Records that the step entered `phase` of `layer` (`None`: outside the layers).
    pub fn mark(&self, layer: Option<usize>, phase: Phase) {
        if let Some(p) = self.progress {
            p.set(layer, phase);
        }
    }

    pub fn n_tokens(&self) -> usize {
        self.positions.len()
    }

    /// Token rows of sequence `s`.
    pub fn seq_rows(&self, s: usize) -> Range<usize> {
        self.offsets[s]..self.offsets[s + 1]
    }

    /// `(row, sequence, position)` for every token row.
    pub fn rows(&self) -> impl Iterator<Item = (usize, &SeqInput<'a>, usize)> + '_ {
        self.seqs
            .iter()
            .enumerate()
            .flat_map(move |(s, seq)| self.seq_rows(s).map(move |r| (r, seq, self.positions[r])))
    }
}

/// DeepSeek-V3.2 on one rank.
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    shard: ShardSpec,
    embed: Embedding,
    pub layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    head: LmHead,
    pub mtp: Vec<Mtp>,
    freqs: Vec<f32>,
    attention_factor: f32,
    /// The layer and phase of the running forward.
    progress: Arc<StepPhase>,
}

impl Model {
    /// Loads every tensor of `shard` from `src` (HF names), checking shapes against `cfg`.
    pub fn load(
        src: &dyn TensorSource,
        cfg: ModelConfig,
        shard: ShardSpec,
    ) -> Result<Self, ModelError> {
        cfg.validate()?;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(src, &cfg, i, &shard))
            .collect::<Result<_, _>>()?;
        let mtp = if shard.load_mtp {
            (0..cfg.num_nextn_predict_layers)
                .map(|k| Mtp::load(src, &cfg, k, &shard))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        Ok(Self {
            embed: Embedding::load(src, "model.embed_tokens.weight", v, h)?,
            norm: load::exact(src, "model.norm.weight", &[h])?,
            head: LmHead::load(src, "lm_head.weight", v, h)?,
            layers,
            mtp,
            freqs: cfg.rope_frequencies()?.iter().map(|&f| f as f32).collect(),
            attention_factor: cfg.rope_attention_factor()? as f32,
            cfg,
            shard,
            progress: Arc::default(),
        })
    }

    /// The cell every forward of this model writes its layer and phase into (share it with a
    /// reporter thread).
    pub fn step_phase(&self) -> Arc<StepPhase> {
        self.progress.clone()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn shard(&self) -> &ShardSpec {
        &self.shard
    }

    /// The step context of a batch (for running single layers, e.g. in tests and the parallel
    /// engine).
    pub fn step_ctx<'a>(&self, seqs: &'a [SeqInput<'a>]) -> StepCtx<'a> {
        StepCtx::new(seqs, &self.freqs, self.attention_factor)
    }

    /// A cache shaped for this model (main + MTP layers).
    pub fn new_cache(
        &self,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<PagedKvCache, ModelError> {
        Ok(PagedKvCache::new(CacheConfig::for_model(&self.cfg, block_size, num_blocks))?)
    }

    /// Checks a batch before anything runs (so a bad request leaves the cache untouched).
    fn validate(&self, seqs: &[SeqInput], cache: &PagedKvCache) -> Result<(), ModelError> {
        validate_batch(&self.cfg, seqs, cache)
    }

    /// One step over a batch of sequences: writes their new tokens into `cache` and returns the
    /// requested logits (f32, after the final norm and the LM head).
    pub fn forward(
        &self,
        seqs: &[SeqInput],
        cache: &mut PagedKvCache,
        opts: &ForwardOptions,
    ) -> Result<ForwardOutput, ModelError> {
        self.forward_counted(seqs, cache, opts).map(|(out, _)| out)
    }

    /// [`Self::forward`] plus the step's expert-load counters ([`StepLoad`]: tokens per (MoE
    /// layer, logical expert), counted inside each MoE layer from its assignment list whether
    /// or not `opts.record_routing` is set). The counts equal a tally of the recorded routing.
    pub fn forward_counted(
        &self,
        seqs: &[SeqInput],
        cache: &mut PagedKvCache,
        opts: &ForwardOptions,
    ) -> Result<(ForwardOutput, StepLoad), ModelError> {
        self.validate(seqs, cache)?;
        let mut ctx = StepCtx::new(seqs, &self.freqs, self.attention_factor);
        ctx.progress = Some(&self.progress);
        let n = ctx.n_tokens();
        let hdim = self.cfg.hidden_size;
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let mut h = self.embed.lookup(&tokens); // [n, hidden]
        let mut out = ForwardOutput::default();
        if opts.record_hidden {
            out.layer_hidden.push(h.clone());
        }
        if opts.record_routing {
            out.routed_experts = vec![Vec::new(); n];
        }
        let mut load = StepLoad::default();
        for layer in &self.layers {
            let routing = layer.forward(&mut h, &ctx, cache)?;
            if opts.record_hidden {
                out.layer_hidden.push(h.clone());
            }
            if let Some(assignments) = &routing {
                load.push_layer(assignments, self.cfg.n_routed_experts);
            }
            if let (true, Some(assignments)) = (opts.record_routing, routing) {
                let mut per_token = vec![Vec::new(); n];
                for a in assignments {
                    per_token[a.token as usize].push(a.expert);
                }
                for (t, mut ids) in per_token.into_iter().enumerate() {
                    ids.sort_unstable();
                    out.routed_experts[t].push(ids);
                }
            }
        }
        ctx.mark(None, Phase::Head);
        out.logit_rows = match opts.logits {
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
            out.logits = self.head.logits(&normed);
        }
        out.hidden = h;
        Ok((out, load))
    }

    /// The final RMSNorm applied to hidden rows `[n, hidden]`.
    pub fn final_norm(&self, hidden: &[f32]) -> Vec<f32> {
        rms_norm_new(hidden, &self.norm, self.cfg.rms_norm_eps as f32, self.cfg.hidden_size)
    }

    /// Draft logits `[n, vocab]` of MTP module `k`. `seqs[s].tokens` are the *next* tokens
    /// `t_{i+1}` and `hidden` (`[n, hidden]`, rows in batch order) the main model's hidden states
    /// `h_i` of the same positions; the module's own cache layer is written at those positions.
    pub fn mtp_forward(
        &self,
        k: usize,
        seqs: &[SeqInput],
        hidden: &[f32],
        cache: &mut PagedKvCache,
    ) -> Result<Vec<f32>, ModelError> {
        let mtp = self.mtp.get(k).ok_or(ModelError::NoMtp)?;
        self.validate(seqs, cache)?;
        let ctx = StepCtx::new(seqs, &self.freqs, self.attention_factor);
        if hidden.len() != ctx.n_tokens() * self.cfg.hidden_size {
            return Err(ModelError::MtpInput(format!(
                "hidden has {} values, expected {} tokens × {}",
                hidden.len(),
                ctx.n_tokens(),
                self.cfg.hidden_size
            )));
        }
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        mtp.forward(&self.embed, &tokens, hidden, &ctx, cache)
    }
}

/// Checks a batch against `cfg` and `cache` before anything runs (so a bad request leaves the
/// cache untouched). Shared by [`Model`] and the sharded executor.
pub(crate) fn validate_batch(
    cfg: &ModelConfig,
    seqs: &[SeqInput],
    cache: &PagedKvCache,
) -> Result<(), ModelError> {
    let want = CacheConfig::for_model(cfg, cache.config().block_size, cache.config().num_blocks);
    if *cache.config() != want {
        return Err(ModelError::CacheMismatch(format!(
            "cache {:?}, model needs {want:?}",
            cache.config()
        )));
    }
    for (s, seq) in seqs.iter().enumerate() {
        if seq.tokens.is_empty() {
            return Err(ModelError::EmptySequence { seq: s });
        }
        for (i, &id) in seq.tokens.iter().enumerate() {
            if id as usize >= cfg.vocab_size {
                return Err(ModelError::TokenOutOfVocab {
                    seq: s,
                    pos: seq.start_pos + i,
                    id,
                    vocab: cfg.vocab_size,
                });
            }
        }
        let end = seq.start_pos + seq.tokens.len();
        if end > cfg.max_position_embeddings {
            return Err(ModelError::ContextTooLong {
                seq: s,
                end,
                max: cfg.max_position_embeddings,
            });
        }
        cache.check_table(seq.block_table, end)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::BlockAllocator;
    use crate::metrics::ExpertTally;

    /// The in-layer counters equal a tally of the recorded routing of the same step, and do
    /// not need routing to be recorded.
    #[test]
    fn counted_forward_equals_the_tally_of_recorded_routing() {
        let cfg = ModelConfig::tiny();
        let model =
            Model::load(&random::random_source(&cfg, 11), cfg.clone(), ShardSpec::full(&cfg))
                .unwrap();
        let prompts: [Vec<u32>; 3] = [
            (0..13).map(|i| (i * 37 + 5) % 512).collect(),
            (0..5).map(|i| (i * 11 + 200) % 512).collect(),
            vec![42],
        ];
        let run = |record_routing: bool| {
            let mut cache = model.new_cache(4, 64).unwrap();
            let mut alloc = BlockAllocator::new(64);
            let tables: Vec<Vec<u32>> = prompts
                .iter()
                .map(|p| {
                    let mut t = Vec::new();
                    alloc.grow(&mut t, p.len(), 4).unwrap();
                    t
                })
                .collect();
            let seqs: Vec<SeqInput> = prompts
                .iter()
                .zip(&tables)
                .map(|(p, t)| SeqInput { tokens: p, start_pos: 0, block_table: t })
                .collect();
            let opts = ForwardOptions { record_routing, ..Default::default() };
            model.forward_counted(&seqs, &mut cache, &opts).unwrap()
        };
        let phase = model.step_phase();
        phase.set(Some(99), Phase::Combine);
        let (recorded, counted) = run(true);
        // The forward walked its layers and ended in the head.
        assert_eq!(phase.get(), (-1, Phase::Head));
        let (plain, counted_plain) = run(false);
        assert!(plain.routed_experts.is_empty(), "no routing recorded unless asked");
        assert_eq!(counted_plain, counted, "counting does not depend on record_routing");
        let mut tally = ExpertTally::for_model(&cfg).unwrap();
        tally.add_routing(&recorded.routed_experts);
        let from_counts: Vec<u64> = counted.routed.iter().map(|&c| u64::from(c)).collect();
        assert_eq!(from_counts, tally.counts);
        let tokens: usize = prompts.iter().map(Vec::len).sum();
        let per_layer = (tokens * cfg.num_experts_per_tok) as u64;
        assert_eq!(counted.moe_layers(), cfg.num_moe_layers());
        assert_eq!(counted.computed, vec![per_layer; cfg.num_moe_layers()]);
        assert_eq!(tally.total(), per_layer * cfg.num_moe_layers() as u64);
        // Not all in one expert: the counts are per expert, not a copy of the total.
        assert!(counted.routed.iter().filter(|&&c| c > 0).count() > cfg.num_experts_per_tok);
    }
}
