//! Elastic epochs: a [`RankModel`] for a new epoch's plan built from this worker's previous
//! epoch's model, reloading only what changed.
//!
//! What a rank holds depends on: its position in its group and T (attention heads, dense FFN
//! slice, vocabulary rows of the embedding and LM head), nothing (norms, `q_a`/`kv_a`, indexer,
//! routers, shared experts: replicated), and the experts the plan places on it, keyed by
//! (layer, logical expert) — not by rank number. [`RankModel::reload`] keeps every tensor whose
//! slice is identical under the new plan and loads the rest from the checkpoint, so a rank that
//! survives a shrink (same T and group position, same experts) reads nothing.
//!
//! Invariant: the result equals what [`RankModel::load`] would build for the new plan (same
//! tensors, bit for bit); the model is consumed (its weights move, nothing is copied). Does not
//! own: KV caches (rebuilt per epoch by the executor), collectives.

use super::{ParallelError, RankModel, even_range};
use crate::model::ModelError;
use crate::model::embed::{Embedding, LmHead};
use crate::weights::TensorSource;
use fathom_common::ids::Rank;
use fathom_common::plan::ParallelPlan;

/// What [`RankModel::reload`] kept and loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Attention, dense FFN and vocabulary slices were kept (same T and group position).
    pub slices_kept: bool,
    /// (layer, expert) pairs no longer held (their weights were freed).
    pub dropped_experts: Vec<(usize, u32)>,
}

impl RankModel {
    /// `prev` under `plan` as rank `rank` (module doc). Fails like [`RankModel::load`] on a
    /// plan that does not fit the model; `prev` is consumed either way.
    pub fn reload(
        prev: RankModel,
        src: &dyn TensorSource,
        plan: &ParallelPlan,
        rank: usize,
    ) -> Result<(Self, ReloadReport), ParallelError> {
        let cfg = prev.cfg;
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
        let same_slices = prev.plan.tp == t
            && prev.group_rank == group_rank
            && prev.plan.num_heads == plan.num_heads;
        let (embed, vocab_start, head) = if same_slices {
            (prev.embed, prev.vocab_start, prev.head)
        } else {
            let (h, v) = (cfg.hidden_size, cfg.vocab_size);
            let vocab = even_range(v, t, group_rank);
            let (embed, start) =
                Embedding::load_rows(src, "model.embed_tokens.weight", v, h, vocab.clone())?;
            (embed, start, LmHead::load_rows(src, "lm_head.weight", v, h, vocab)?)
        };
        let mut report = ReloadReport { slices_kept: same_slices, dropped_experts: Vec::new() };
        let mut layers = Vec::with_capacity(prev.layers.len());
        for layer in prev.layers {
            let index = layer.index();
            let (layer, dropped) = layer.reload(src, &cfg, plan, rank, same_slices)?;
            report.dropped_experts.extend(dropped.into_iter().map(|e| (index, e)));
            layers.push(layer);
        }
        let model = RankModel {
            cfg,
            plan: plan.clone(),
            rank,
            group_rank,
            embed,
            vocab_start,
            layers,
            norm: prev.norm,
            head,
            freqs: prev.freqs,
            attention_factor: prev.attention_factor,
            // A new epoch's executor starts with a fresh phase cell.
            progress: Default::default(),
        };
        Ok((model, report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::random_source;
    use crate::parallel::CountingSource;
    use fathom_common::ModelConfig;
    use fathom_common::ids::Epoch;
    use fathom_common::plan::elastic::reshape;
    use fathom_common::plan::{LayerCounts, PlanSpec};

    fn plan(w: usize, t: usize, redundant: usize) -> ParallelPlan {
        let mut spec = PlanSpec::new(Epoch(1), w, t);
        spec.redundant_slots_per_rank = redundant;
        ParallelPlan::build(&spec, &ModelConfig::tiny()).unwrap()
    }

    #[test]
    fn a_survivor_of_a_shrink_reads_nothing_and_equals_a_fresh_load() {
        let cfg = ModelConfig::tiny();
        let src = random_source(&cfg, 3);
        let old = plan(4, 1, 5);
        let prev = RankModel::load(cfg.clone(), &src, &old, 2).unwrap();
        // Rank 1 is lost: old rank 2 becomes rank 1 of three.
        let origins = [Some(Rank(0)), Some(Rank(2)), Some(Rank(3))];
        let new = reshape(&old, &origins, Epoch(2), 0, &LayerCounts::new()).unwrap();
        let counting = CountingSource::new(&src);
        let (model, report) = RankModel::reload(prev, &counting, &new, 1).unwrap();
        assert_eq!(counting.total_bytes(), 0, "{:?}", counting.bytes_by_tensor());
        assert_eq!(report, ReloadReport { slices_kept: true, dropped_experts: Vec::new() });
        let fresh = RankModel::load(cfg, &src, &new, 1).unwrap();
        assert_eq!(format!("{model:?}"), format!("{fresh:?}"));
    }

    #[test]
    fn changed_slices_and_experts_are_loaded_the_rest_kept() {
        let cfg = ModelConfig::tiny();
        let src = random_source(&cfg, 4);
        // Rank 1 of W = 2, T = 2 (second half of the heads, experts 8..16) becomes rank 0 of
        // W = 2, T = 1 (all heads, experts 0..8).
        let prev = RankModel::load(cfg.clone(), &src, &plan(2, 2, 0), 1).unwrap();
        let new = plan(2, 1, 0);
        let counting = CountingSource::new(&src);
        let (model, report) = RankModel::reload(prev, &counting, &new, 0).unwrap();
        assert!(!report.slices_kept);
        let moe = fathom_common::plan::moe_layers(&cfg);
        assert_eq!(report.dropped_experts.len(), 8 * moe.len());
        let loaded = counting.bytes_by_tensor();
        assert!(loaded.keys().any(|n| n.contains("self_attn")), "attention reloaded");
        assert!(loaded.keys().any(|n| n.contains(".mlp.experts.0.")), "expert 0 loaded");
        assert!(!loaded.keys().any(|n| n.contains("input_layernorm")), "norms kept");
        assert!(!loaded.keys().any(|n| n.contains(".gate.")), "routers kept");
        let fresh = RankModel::load(cfg, &src, &new, 0).unwrap();
        assert_eq!(format!("{model:?}"), format!("{fresh:?}"));
    }
}
