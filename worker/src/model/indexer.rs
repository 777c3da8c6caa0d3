//! DSA lightning indexer (spec §2.3), f32 form as HF: no Hadamard rotation, no FP8 simulation.
//!
//! - q from the q-LoRA norm output `qr`: `wq_b(qr)` → `[n, H_I, d]`, half-split RoPE on the
//!   first `qk_rope_head_dim` dims of each head (rope part first, then nope);
//! - keys: `LayerNorm(wk(x))` with weight and bias (eps 1e-6), same RoPE → `[n, d]` (cached);
//! - head weights `weights_proj(x) · H_I^-0.5 · d^-0.5`;
//! - score `I[s] = Σ_h w[h]·ReLU(q[h]·k[s])` over causal keys `s ≤ p`, top-k with
//!   `k = min(index_topk, p + 1)`; ties break to the lower position (fixed rule).
//!
//! The indexer is replicated on every rank of a TP group (identical selection everywhere).

use super::{ModelError, StepCtx, load};
use crate::weights::TensorSource;
use fathom_common::ModelConfig;
use fathom_kernels::cpu::gemm::matmul_t;
use fathom_kernels::cpu::indexer::indexer_scores;
use fathom_kernels::cpu::norm::layer_norm;
use fathom_kernels::cpu::rope::rope_half_split;
use fathom_kernels::cpu::topk::topk_indices;

/// LayerNorm epsilon of `indexer.k_norm` (spec §2.3).
const K_NORM_EPS: f32 = 1e-6;

/// One layer's indexer weights.
#[derive(Debug, Clone)]
pub struct Indexer {
    /// `[heads·dim, q_lora]`
    wq_b: Vec<f32>,
    /// `[dim, hidden]`
    wk: Vec<f32>,
    k_norm_w: Vec<f32>,
    k_norm_b: Vec<f32>,
    /// `[heads, hidden]`
    weights_proj: Vec<f32>,
    heads: usize,
    dim: usize,
    hidden: usize,
    q_lora: usize,
    topk: usize,
}

/// The indexer's projections of the current tokens.
#[derive(Debug, Clone)]
pub struct IndexerProj {
    /// `[n, heads, dim]`, rotated.
    pub q: Vec<f32>,
    /// `[n, dim]`, normalised and rotated (what the cache stores).
    pub k: Vec<f32>,
    /// `[n, heads]`, with both scale constants folded in.
    pub w: Vec<f32>,
}

impl Indexer {
    /// Loads `{prefix}.indexer.*` (`prefix` = `model.layers.{i}.self_attn`).
    pub fn load(
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        prefix: &str,
    ) -> Result<Self, ModelError> {
        let (heads, dim, hidden, q_lora) =
            (cfg.index_n_heads, cfg.index_head_dim, cfg.hidden_size, cfg.q_lora_rank);
        let p = format!("{prefix}.indexer");
        Ok(Self {
            wq_b: load::exact(src, &format!("{p}.wq_b.weight"), &[heads * dim, q_lora])?,
            wk: load::exact(src, &format!("{p}.wk.weight"), &[dim, hidden])?,
            k_norm_w: load::exact(src, &format!("{p}.k_norm.weight"), &[dim])?,
            k_norm_b: load::exact(src, &format!("{p}.k_norm.bias"), &[dim])?,
            weights_proj: load::exact(src, &format!("{p}.weights_proj.weight"), &[heads, hidden])?,
            heads,
            dim,
            hidden,
            q_lora,
            topk: cfg.index_topk,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `x` `[n, hidden]` (attention-norm output), `qr` `[n, q_lora]`.
    pub fn project(&self, x: &[f32], qr: &[f32], ctx: &StepCtx) -> IndexerProj {
        let n = ctx.n_tokens();
        let mut q = matmul_t(qr, &self.wq_b, n, self.heads * self.dim, self.q_lora); // [n, H_I, d]
        rope_half_split(&mut q, n, self.heads, self.dim, 0, &ctx.cos, &ctx.sin);
        let k_raw = matmul_t(x, &self.wk, n, self.dim, self.hidden); // [n, d]
        let mut k = vec![0.0; n * self.dim];
        layer_norm(&k_raw, &self.k_norm_w, &self.k_norm_b, K_NORM_EPS, self.dim, &mut k);
        rope_half_split(&mut k, n, 1, self.dim, 0, &ctx.cos, &ctx.sin);
        let mut w = matmul_t(x, &self.weights_proj, n, self.heads, self.hidden); // [n, H_I]
        let c = (self.heads as f32).powf(-0.5) * (self.dim as f32).powf(-0.5);
        w.iter_mut().for_each(|v| *v *= c);
        IndexerProj { q, k, w }
    }

    /// Selected key positions (ascending) for one query token given its causal keys
    /// `keys` `[p + 1, dim]`, its `q` `[heads, dim]` and head weights `w` `[heads]`.
    pub fn select(&self, q: &[f32], w: &[f32], keys: &[f32]) -> Vec<u32> {
        let n = keys.len() / self.dim;
        if n <= self.topk {
            return (0..n as u32).collect();
        }
        let mut scores = vec![0.0; n];
        indexer_scores(q, w, keys, self.heads, self.dim, &mut scores);
        topk_indices(&scores, self.topk)
    }
}
