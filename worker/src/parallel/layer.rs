//! One decoder block on one rank: attention over the rank's heads + all-reduce in the group,
//! then a dense FFN split over the inner dimension + all-reduce in the group, or the
//! expert-parallel MoE of `moe.rs`. Norms are replicated; the residual stream `h` is the same on
//! every rank of the group before and after the block.

use super::moe::{EpMoe, MoeCounts};
use super::{ParallelError, RankForwardOptions, even_range};
use crate::kv::PagedKvCache;
use crate::model::ffn::SwiGlu;
use crate::model::load;
use crate::model::mla::Mla;
use crate::model::{Phase, StepCtx};
use crate::weights::TensorSource;
use fathom_common::ModelConfig;
use fathom_common::ids::Rank;
use fathom_common::plan::ParallelPlan;
use fathom_kernels::comm::{Collective, CollectiveExt};
use fathom_kernels::cpu::norm::rms_norm_new;

#[derive(Debug)]
enum RankFfn {
    /// This rank's part of the dense MLP's inner dimension (partial output).
    Dense(SwiGlu),
    Moe(EpMoe),
}

/// What one block returns besides the residual update: each token's experts (MoE layer,
/// routing recorded) and the layer's load counters (MoE layer).
pub(super) type LayerOut = (Option<Vec<Vec<u32>>>, Option<MoeCounts>);

#[derive(Debug)]
pub(super) struct RankLayer {
    index: usize,
    attn_norm: Vec<f32>,
    attn: Mla,
    ffn_norm: Vec<f32>,
    ffn: RankFfn,
    hidden: usize,
    eps: f32,
}

impl RankLayer {
    /// Loads `model.layers.{index}.*` for `rank`: its heads, its FFN slice or its experts.
    pub(super) fn load(
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        plan: &ParallelPlan,
        rank: usize,
        index: usize,
    ) -> Result<Self, ParallelError> {
        let p = format!("model.layers.{index}");
        let h = cfg.hidden_size;
        let r = Rank(rank as u32);
        let ffn = if cfg.is_moe_layer(index) {
            RankFfn::Moe(EpMoe::load(src, cfg, plan, rank, index)?)
        } else {
            let inner = cfg.intermediate_size;
            let part = even_range(inner, plan.tp, plan.rank_in_group(r));
            RankFfn::Dense(SwiGlu::load_split(src, &format!("{p}.mlp"), h, inner, part)?)
        };
        Ok(Self {
            index,
            attn_norm: load::exact(src, &format!("{p}.input_layernorm.weight"), &[h])?,
            attn: Mla::load(src, cfg, &format!("{p}.self_attn"), plan.head_range(r))?,
            ffn_norm: load::exact(src, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
            ffn,
            hidden: h,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// This block under a new plan (elastic epochs), keeping what is unchanged: norms, router and
    /// shared expert always (replicated); the attention heads and dense FFN slice when
    /// `same_slices` (same T and position in the group); every expert the new plan still places
    /// on `rank`. Loads the rest from `src`. Returns the experts this rank no longer holds.
    pub(super) fn reload(
        self,
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        plan: &ParallelPlan,
        rank: usize,
        same_slices: bool,
    ) -> Result<(Self, Vec<u32>), ParallelError> {
        let Self { index, attn_norm, attn, ffn_norm, ffn, hidden, eps } = self;
        let p = format!("model.layers.{index}");
        let r = Rank(rank as u32);
        let attn = if same_slices {
            attn
        } else {
            Mla::load(src, cfg, &format!("{p}.self_attn"), plan.head_range(r))?
        };
        let mut dropped = Vec::new();
        let ffn = match ffn {
            RankFfn::Dense(mlp) if same_slices => RankFfn::Dense(mlp),
            RankFfn::Dense(_) => {
                let inner = cfg.intermediate_size;
                let part = even_range(inner, plan.tp, plan.rank_in_group(r));
                RankFfn::Dense(SwiGlu::load_split(src, &format!("{p}.mlp"), hidden, inner, part)?)
            }
            RankFfn::Moe(moe) => {
                let (moe, gone) = moe.reload(src, cfg, plan, rank, index)?;
                dropped = gone;
                RankFfn::Moe(moe)
            }
        };
        Ok((Self { index, attn_norm, attn, ffn_norm, ffn, hidden, eps }, dropped))
    }

    /// Runs the block on `h` (`[n, hidden]`, updated in place; `n` may be 0). Returns, for a MoE
    /// layer with routing recorded, each token's experts ascending, and for a MoE layer its load
    /// counters.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &self,
        h: &mut [f32],
        ctx: &StepCtx,
        cache: &mut PagedKvCache,
        world: &mut dyn Collective,
        group: &mut dyn Collective,
        plan: &ParallelPlan,
        opts: &RankForwardOptions,
    ) -> Result<LayerOut, ParallelError> {
        let n = ctx.n_tokens();
        if n > 0 {
            ctx.mark(Some(self.index), Phase::Attention);
            let x = rms_norm_new(h, &self.attn_norm, self.eps, self.hidden);
            let attention = tracing::trace_span!("attention", layer = self.index).entered();
            let mut a = self.attn.forward(&x, ctx, cache, self.index)?; // [n, hidden] partial
            if opts.check_topk {
                self.check_topk(&x, ctx, cache, group)?;
            }
            group.all_reduce_sum_f32(&mut a)?;
            drop(attention);
            h.iter_mut().zip(&a).for_each(|(h, a)| *h += a);
        }
        let x = rms_norm_new(h, &self.ffn_norm, self.eps, self.hidden);
        let (f, routing, counts) = match &self.ffn {
            RankFfn::Dense(mlp) => {
                if n == 0 {
                    return Ok((None, None));
                }
                ctx.mark(Some(self.index), Phase::Ffn);
                let _ffn = tracing::trace_span!("ffn", layer = self.index).entered();
                let mut f = mlp.forward(&x); // [n, hidden] partial
                group.all_reduce_sum_f32(&mut f)?;
                (f, None, None)
            }
            RankFfn::Moe(moe) => {
                let (f, r, c) =
                    moe.forward(&x, self.index, ctx, world, group, plan, opts.base.record_routing)?;
                (f, r, Some(c))
            }
        };
        h.iter_mut().zip(&f).for_each(|(h, f)| *h += f);
        Ok((routing, counts))
    }

    /// The expert table of a MoE layer (`None` for a dense layer).
    pub(super) fn experts(&self) -> Option<&super::table::ExpertTable> {
        match &self.ffn {
            RankFfn::Moe(m) => Some(m.table()),
            RankFfn::Dense(_) => None,
        }
    }

    pub(super) fn experts_mut(&mut self) -> Option<&mut super::table::ExpertTable> {
        match &mut self.ffn {
            RankFfn::Moe(m) => Some(m.table_mut()),
            RankFfn::Dense(_) => None,
        }
    }

    pub(super) fn index(&self) -> usize {
        self.index
    }

    /// Every rank of the group computes the indexer top-k of every token; a digest of them is
    /// all-gathered and must be identical.
    fn check_topk(
        &self,
        x: &[f32],
        ctx: &StepCtx,
        cache: &PagedKvCache,
        group: &mut dyn Collective,
    ) -> Result<(), ParallelError> {
        let sel = self.attn.index_selection(x, ctx, cache, self.index)?;
        let mut digest: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a over (row, count, ids)
        for (r, ids) in sel.iter().enumerate() {
            for v in [r as u32, ids.len() as u32].iter().chain(ids) {
                for b in v.to_le_bytes() {
                    digest = (digest ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
                }
            }
        }
        let mut all = vec![0u64; group.world_size()];
        group.all_gather_pod(&[digest], &mut all)?;
        let differ: Vec<usize> = (0..all.len()).filter(|&k| all[k] != all[0]).collect();
        if !differ.is_empty() {
            return Err(ParallelError::Diverged { layer: self.index, ranks: differ });
        }
        Ok(())
    }
}
