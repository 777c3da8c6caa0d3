//! The multi-token-prediction module (spec §2.6; layer index `num_hidden_layers + k`): draft
//! logits for the token after next.
//!
//! `u = eh_proj([enorm(Embed(t_{i+1})) ; hnorm(h_i)])` (embedding first, as the code and the
//! checkpoint), then one full MoE decoder block (own cache layer), then `shared_head.norm` and
//! `shared_head.head`. The embedding is the module's own copy when the checkpoint stores one
//! (`model.layers.{L}.embed_tokens.weight`), else the main model's. Which hidden state to feed
//! (the main model's final-normed output, as vLLM and HF do) is the caller's choice.

use super::embed::{Embedding, LmHead};
use super::layer::DecoderLayer;
use super::{ModelError, ShardSpec, StepCtx, load};
use crate::kv::PagedKvCache;
use crate::weights::TensorSource;
use fathom_common::ModelConfig;
use fathom_kernels::cpu::gemm::matmul_t;
use fathom_kernels::cpu::norm::{rms_norm, rms_norm_new};

#[derive(Debug, Clone)]
pub struct Mtp {
    enorm: Vec<f32>,
    hnorm: Vec<f32>,
    /// `[hidden, 2·hidden]`
    eh_proj: Vec<f32>,
    pub block: DecoderLayer,
    norm: Vec<f32>,
    head: LmHead,
    embed: Option<Embedding>,
    hidden: usize,
    eps: f32,
}

impl Mtp {
    /// Loads MTP module `k` (layer `num_hidden_layers + k`).
    pub fn load(
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        k: usize,
        shard: &ShardSpec,
    ) -> Result<Self, ModelError> {
        let index = cfg.num_hidden_layers + k;
        let p = format!("model.layers.{index}");
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed_name = format!("{p}.embed_tokens.weight");
        let embed = if src.contains(&embed_name) {
            Some(Embedding::load(src, &embed_name, v, h)?)
        } else {
            None
        };
        Ok(Self {
            enorm: load::exact(src, &format!("{p}.enorm.weight"), &[h])?,
            hnorm: load::exact(src, &format!("{p}.hnorm.weight"), &[h])?,
            eh_proj: load::exact(src, &format!("{p}.eh_proj.weight"), &[h, 2 * h])?,
            block: DecoderLayer::load(src, cfg, index, shard)?,
            norm: load::exact(src, &format!("{p}.shared_head.norm.weight"), &[h])?,
            head: LmHead::load(src, &format!("{p}.shared_head.head.weight"), v, h)?,
            embed,
            hidden: h,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    /// Draft logits `[n, vocab]`: row r combines token `tokens[r]` with hidden `hidden[r]`.
    pub(crate) fn forward(
        &self,
        main_embed: &Embedding,
        tokens: &[u32],
        hidden: &[f32],
        ctx: &StepCtx,
        cache: &mut PagedKvCache,
    ) -> Result<Vec<f32>, ModelError> {
        let h = self.hidden;
        let n = tokens.len();
        let e = self.embed.as_ref().unwrap_or(main_embed).lookup(tokens);
        let e = rms_norm_new(&e, &self.enorm, self.eps, h);
        let g = rms_norm_new(hidden, &self.hnorm, self.eps, h);
        let mut cat = Vec::with_capacity(n * 2 * h); // [n, 2·hidden]: [e ; g]
        for r in 0..n {
            cat.extend_from_slice(&e[r * h..(r + 1) * h]);
            cat.extend_from_slice(&g[r * h..(r + 1) * h]);
        }
        let mut u = matmul_t(&cat, &self.eh_proj, n, h, 2 * h);
        self.block.forward(&mut u, ctx, cache)?;
        let mut normed = vec![0.0; u.len()];
        rms_norm(&u, &self.norm, self.eps, h, &mut normed);
        Ok(self.head.logits(&normed))
    }
}
