//! One decoder block: `h += Attn(RMSNorm_attn(h))`, then `h += FFN(RMSNorm_ffn(h))` (spec §2.0).
//! The TP all-reduce of the partial attention output (and of the FFN in the distributed layout)
//! goes between the sub-layer and the residual add; with one rank it is the identity.

use super::experts::Assignment;
use super::ffn::Ffn;
use super::mla::Mla;
use super::{ModelError, Phase, ShardSpec, StepCtx, load};
use crate::kv::PagedKvCache;
use crate::weights::TensorSource;
use fathom_common::ModelConfig;
use fathom_kernels::cpu::norm::rms_norm_new;

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// Layer index (also the cache layer).
    pub index: usize,
    attn_norm: Vec<f32>,
    pub attn: Mla,
    ffn_norm: Vec<f32>,
    pub ffn: Ffn,
    hidden: usize,
    eps: f32,
}

impl DecoderLayer {
    /// Loads `model.layers.{index}.*` for the heads and experts of `shard`.
    pub fn load(
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        index: usize,
        shard: &ShardSpec,
    ) -> Result<Self, ModelError> {
        let p = format!("model.layers.{index}");
        let h = cfg.hidden_size;
        Ok(Self {
            index,
            attn_norm: load::exact(src, &format!("{p}.input_layernorm.weight"), &[h])?,
            attn: Mla::load(src, cfg, &format!("{p}.self_attn"), shard.heads.clone())?,
            ffn_norm: load::exact(src, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
            ffn: Ffn::load(src, cfg, &p, index, shard.experts.as_deref())?,
            hidden: h,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// Runs the block on the residual stream `h` (`[n, hidden]`, updated in place). Returns the
    /// MoE assignments when this is a MoE layer.
    pub fn forward(
        &self,
        h: &mut [f32],
        ctx: &StepCtx,
        cache: &mut PagedKvCache,
    ) -> Result<Option<Vec<Assignment>>, ModelError> {
        ctx.mark(Some(self.index), Phase::Attention);
        let x = rms_norm_new(h, &self.attn_norm, self.eps, self.hidden);
        let a = tracing::trace_span!("attention", layer = self.index)
            .in_scope(|| self.attn.forward(&x, ctx, cache, self.index))?;
        h.iter_mut().zip(&a).for_each(|(h, a)| *h += a);
        let phase = if matches!(self.ffn, Ffn::Moe(_)) { Phase::Experts } else { Phase::Ffn };
        ctx.mark(Some(self.index), phase);
        let x = rms_norm_new(h, &self.ffn_norm, self.eps, self.hidden);
        let (f, routing) = tracing::trace_span!("ffn", layer = self.index)
            .in_scope(|| self.ffn.forward(&x, self.index))?;
        h.iter_mut().zip(&f).for_each(|(h, f)| *h += f);
        Ok(routing)
    }
}
