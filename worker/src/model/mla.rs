//! Multi-head latent attention (spec §2.1, §2.4) with DSA sparse selection, for a head range.
//!
//! Projections run over all tokens of the step at once; attention runs per sequence in the
//! absorbed (MQA) form over the paged latent cache, for prefill chunks and decode alike (one form,
//! so there is nothing to keep equal). Per token at position p:
//! `q_abs[h] = [W_UK[h]ᵀ q_nope[h] | rope(q_pe[h])]`, keys = selected rows of `[c | k_pe]`,
//! `o[h] = W_UV[h] · Σ softmax(s · q_abs·kv) c`, output `o_proj(concat_h o[h])`.
//!
//! Tensor parallel: a rank holds heads `[h0, h1)` — `q_b_proj` and `kv_b_proj` rows of those
//! heads, `o_proj` columns of those heads — and its output is a partial sum that the TP group
//! all-reduces. `q_a`, `kv_a`, their norms, the indexer and the cache writes are replicated.

use super::indexer::Indexer;
use super::{ModelError, StepCtx, load};
use crate::kv::PagedKvCache;
use crate::weights::TensorSource;
use fathom_common::ModelConfig;
use fathom_kernels::cpu::attention::mla_sparse_attention;
use fathom_kernels::cpu::gemm::matmul_t;
use fathom_kernels::cpu::norm::rms_norm;
use fathom_kernels::cpu::rope::rope_interleaved;
use rayon::prelude::*;
use std::ops::Range;

/// One layer's attention weights for heads `heads`.
#[derive(Debug, Clone)]
pub struct Mla {
    heads: Range<usize>,
    hidden: usize,
    q_lora: usize,
    kv_lora: usize,
    nope: usize,
    rope: usize,
    v: usize,
    eps: f32,
    scale: f32,
    /// `[q_lora, hidden]`
    q_a: Vec<f32>,
    q_a_norm: Vec<f32>,
    /// `[n_local·(nope+rope), q_lora]`
    q_b: Vec<f32>,
    /// `[kv_lora + rope, hidden]`
    kv_a: Vec<f32>,
    kv_norm: Vec<f32>,
    /// Per local head `[kv_lora, nope]` (W_UK transposed), concatenated.
    wuk_t: Vec<f32>,
    /// Per local head `[v, kv_lora]` (W_UV), concatenated.
    wuv: Vec<f32>,
    /// `[hidden, n_local·v]`
    o_proj: Vec<f32>,
    pub indexer: Indexer,
}

impl Mla {
    /// Loads `model.layers.{i}.self_attn.*` (`prefix`) for heads `heads`.
    pub fn load(
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        prefix: &str,
        heads: Range<usize>,
    ) -> Result<Self, ModelError> {
        let (h, ql, kl) = (cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank);
        let (nope, rope, v) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim);
        let nh = cfg.num_attention_heads;
        if heads.start >= heads.end || heads.end > nh {
            return Err(ModelError::Shard(format!(
                "head range {heads:?} is not a non-empty part of 0..{nh}"
            )));
        }
        let qk = nope + rope;
        let nl = heads.len();
        let q_b = load::slice(
            src,
            &format!("{prefix}.q_b_proj.weight"),
            &[nh * qk, ql],
            0,
            heads.start * qk,
            heads.end * qk,
        )?;
        let kv_b = load::slice(
            src,
            &format!("{prefix}.kv_b_proj.weight"),
            &[nh * (nope + v), kl],
            0,
            heads.start * (nope + v),
            heads.end * (nope + v),
        )?; // [nl, nope + v, kv_lora]
        let mut wuk_t = vec![0.0; nl * kl * nope];
        let mut wuv = Vec::with_capacity(nl * v * kl);
        for hd in 0..nl {
            let base = hd * (nope + v) * kl;
            for i in 0..nope {
                for c in 0..kl {
                    wuk_t[hd * kl * nope + c * nope + i] = kv_b[base + i * kl + c];
                }
            }
            wuv.extend_from_slice(&kv_b[base + nope * kl..base + (nope + v) * kl]);
        }
        let o_proj = load::slice(
            src,
            &format!("{prefix}.o_proj.weight"),
            &[h, nh * v],
            1,
            heads.start * v,
            heads.end * v,
        )?;
        Ok(Self {
            hidden: h,
            q_lora: ql,
            kv_lora: kl,
            nope,
            rope,
            v,
            eps: cfg.rms_norm_eps as f32,
            scale: cfg.softmax_scale()? as f32,
            q_a: load::exact(src, &format!("{prefix}.q_a_proj.weight"), &[ql, h])?,
            q_a_norm: load::exact(src, &format!("{prefix}.q_a_layernorm.weight"), &[ql])?,
            q_b,
            kv_a: load::exact(
                src,
                &format!("{prefix}.kv_a_proj_with_mqa.weight"),
                &[kl + rope, h],
            )?,
            kv_norm: load::exact(src, &format!("{prefix}.kv_a_layernorm.weight"), &[kl])?,
            wuk_t,
            wuv,
            o_proj,
            indexer: Indexer::load(src, cfg, prefix)?,
            heads,
        })
    }

    /// Heads held here.
    pub fn heads(&self) -> Range<usize> {
        self.heads.clone()
    }

    /// `x` `[n, hidden]` (attention-norm output) → partial attention output `[n, hidden]` over
    /// this rank's heads. Writes the step's latents and indexer keys into `cache` layer `layer`
    /// first, then attends (so a token sees itself and every earlier position).
    pub fn forward(
        &self,
        x: &[f32],
        ctx: &StepCtx,
        cache: &mut PagedKvCache,
        layer: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let n = ctx.n_tokens();
        let (kl, nope, rope, v) = (self.kv_lora, self.nope, self.rope, self.v);
        let (qk, lat) = (nope + rope, kl + rope);
        let nl = self.heads.len();

        let cq = matmul_t(x, &self.q_a, n, self.q_lora, self.hidden); // [n, q_lora]
        let mut qr = vec![0.0; cq.len()];
        rms_norm(&cq, &self.q_a_norm, self.eps, self.q_lora, &mut qr);
        let mut q = matmul_t(&qr, &self.q_b, n, nl * qk, self.q_lora); // [n, nl, nope + rope]
        rope_interleaved(&mut q, n, nl, qk, nope, &ctx.cos, &ctx.sin);

        let mut ckv = matmul_t(x, &self.kv_a, n, lat, self.hidden); // [n, kv_lora + rope]
        for row in ckv.chunks_exact_mut(lat) {
            let c = row[..kl].to_vec();
            rms_norm(&c, &self.kv_norm, self.eps, kl, &mut row[..kl]);
        }
        rope_interleaved(&mut ckv, n, 1, lat, kl, &ctx.cos, &ctx.sin);

        let ip = self.indexer.project(x, &qr, ctx);
        let idim = self.indexer.dim();
        for (r, seq, pos) in ctx.rows() {
            cache.write(
                layer,
                seq.block_table,
                pos,
                &ckv[r * lat..(r + 1) * lat],
                &ip.k[r * idim..(r + 1) * idim],
            )?;
        }

        // Absorbed queries [n, nl, kv_lora + rope].
        let mut q_abs = vec![0.0; n * nl * lat];
        for hd in 0..nl {
            let mut qn = Vec::with_capacity(n * nope); // [n, nope]
            for r in 0..n {
                qn.extend_from_slice(&q[(r * nl + hd) * qk..(r * nl + hd) * qk + nope]);
            }
            let qa = matmul_t(&qn, &self.wuk_t[hd * kl * nope..(hd + 1) * kl * nope], n, kl, nope); // [n, kv_lora]
            for r in 0..n {
                let dst = &mut q_abs[(r * nl + hd) * lat..(r * nl + hd + 1) * lat];
                dst[..kl].copy_from_slice(&qa[r * kl..(r + 1) * kl]);
                dst[kl..].copy_from_slice(&q[(r * nl + hd) * qk + nope..(r * nl + hd + 1) * qk]);
            }
        }

        // Sparse attention per sequence → latent outputs [n, nl, kv_lora].
        let mut o_lat = vec![0.0; n * nl * kl];
        for (s, seq) in ctx.seqs.iter().enumerate() {
            let rows = ctx.seq_rows(s);
            let end = seq.start_pos + seq.tokens.len();
            let latents = cache.read_latent(layer, seq.block_table, end)?; // [end, kv_lora + rope]
            let keys = cache.read_index(layer, seq.block_table, end)?; // [end, index_dim]
            let outs: Vec<Vec<f32>> = rows
                .clone()
                .into_par_iter()
                .map(|r| {
                    let p = ctx.positions[r];
                    let sel = self.indexer.select(
                        &ip.q[r * ip.q.len() / n..(r + 1) * ip.q.len() / n],
                        &ip.w[r * ip.w.len() / n..(r + 1) * ip.w.len() / n],
                        &keys[..(p + 1) * idim],
                    );
                    let mut o = vec![0.0; nl * kl];
                    mla_sparse_attention(
                        &q_abs[r * nl * lat..(r + 1) * nl * lat],
                        &latents,
                        &sel,
                        nl,
                        kl,
                        rope,
                        self.scale,
                        &mut o,
                    );
                    o
                })
                .collect();
            for (r, o) in rows.zip(outs) {
                o_lat[r * nl * kl..(r + 1) * nl * kl].copy_from_slice(&o);
            }
        }

        // Un-absorb through W_UV per head → [n, nl·v], then o_proj.
        let mut o_heads = vec![0.0; n * nl * v];
        for hd in 0..nl {
            let mut ol = Vec::with_capacity(n * kl);
            for r in 0..n {
                ol.extend_from_slice(&o_lat[(r * nl + hd) * kl..(r * nl + hd + 1) * kl]);
            }
            let oh = matmul_t(&ol, &self.wuv[hd * v * kl..(hd + 1) * v * kl], n, v, kl); // [n, v]
            for r in 0..n {
                o_heads[(r * nl + hd) * v..(r * nl + hd + 1) * v]
                    .copy_from_slice(&oh[r * v..(r + 1) * v]);
            }
        }
        Ok(matmul_t(&o_heads, &self.o_proj, n, self.hidden, nl * v))
    }
}
