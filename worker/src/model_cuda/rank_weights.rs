//! Loading one rank's shard of the GPU model under a [`ParallelPlan`] — exactly the tensors
//! `parallel::RankModel` loads on the CPU, through the same layout helpers (`even_range`,
//! `ParallelPlan::head_range`, `ParallelPlan::experts_on`) and sliced reads
//! (`TensorSource::load_slice`), so only this rank's bytes are read:
//! - attention: `q_b_proj` and `kv_b_proj` rows of the rank's heads, `o_proj` columns of them;
//!   `q_a`/`kv_a`, their norms and the whole indexer replicated (as on the CPU);
//! - dense FFN: the rank's part of the inner dimension (`gate`/`up` rows, `down` columns);
//! - MoE: router (`mlp.gate`) and shared expert replicated, the routed experts the plan places on
//!   the rank stacked in slot order ([`EpW`]);
//! - embedding and LM head: the group rank's vocabulary rows (`even_range(vocab, T, k)`), the
//!   final norm replicated.
//!
//! The result uses the one-GPU weight types ([`LayerW`], `Mat`) so `layer.rs`/`layer_f32.rs`
//! run it unchanged; precision rules as `weights.rs` (f32 norms, router, indexer, `q_a`, `kv_b`).

use fathom_common::ModelConfig;
use fathom_common::ids::Rank;
use fathom_common::plan::ParallelPlan;
use fathom_kernels::cuda::CudaDevice;
use std::ops::Range;

use super::rank_moe::EpW;
use super::weights::{self, AttnW, FfnW, LayerW, MlpW, up_f32, up_mat, up_mat_host};
use super::{CudaModelError, Precision};
use crate::model::{ModelError, load};
use crate::parallel::even_range;
use crate::weights::TensorSource;

/// Rows `[a, b)` of dimension `dim` of `name` (full shape `full`), as f32 on the host.
fn part(
    src: &dyn TensorSource,
    name: &str,
    full: &[usize],
    dim: usize,
    r: Range<usize>,
) -> Result<Vec<f32>, CudaModelError> {
    Ok(load::slice(src, name, full, dim, r.start, r.end)?)
}

/// A SwiGLU MLP restricted to `inner_part` of its inner dimension (the whole range: replicated).
fn mlp_part(
    dev: &CudaDevice,
    src: &dyn TensorSource,
    prefix: &str,
    (hidden, inner): (usize, usize),
    inner_part: Range<usize>,
    prec: Precision,
) -> Result<MlpW, CudaModelError> {
    if inner_part.is_empty() || inner_part.end > inner {
        return Err(ModelError::Shard(format!(
            "{prefix}: inner range {inner_part:?} is not a non-empty part of 0..{inner}"
        ))
        .into());
    }
    let full = [inner, hidden];
    let mut gu = part(src, &format!("{prefix}.gate_proj.weight"), &full, 0, inner_part.clone())?;
    gu.extend(part(src, &format!("{prefix}.up_proj.weight"), &full, 0, inner_part.clone())?);
    let down =
        part(src, &format!("{prefix}.down_proj.weight"), &[hidden, inner], 1, inner_part.clone())?;
    Ok(MlpW {
        gate_up: up_mat_host(dev, gu, prec)?,
        down: up_mat_host(dev, down, prec)?,
        inner: inner_part.len(),
    })
}

/// Layer `i` of `rank` under `plan` (see the module doc).
pub(crate) fn load_layer(
    dev: &CudaDevice,
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    plan: &ParallelPlan,
    rank: usize,
    i: usize,
    prec: Precision,
) -> Result<LayerW, CudaModelError> {
    let p = format!("model.layers.{i}");
    let a = format!("{p}.self_attn");
    let r = Rank(rank as u32);
    let (h, ql, kl) = (cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank);
    let (nope, rope, v) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim);
    let nh = cfg.num_attention_heads;
    let (ih, id) = (cfg.index_n_heads, cfg.index_head_dim);
    let heads = plan.head_range(r);
    if heads.is_empty() || heads.end > nh {
        return Err(ModelError::Shard(format!(
            "head range {heads:?} is not a non-empty part of 0..{nh}"
        ))
        .into());
    }
    let qk = nope + rope;
    let q_b = part(
        src,
        &format!("{a}.q_b_proj.weight"),
        &[nh * qk, ql],
        0,
        heads.start * qk..heads.end * qk,
    )?; // [local heads·(nope+rope), q_lora]
    let kv_b = part(
        src,
        &format!("{a}.kv_b_proj.weight"),
        &[nh * (nope + v), kl],
        0,
        heads.start * (nope + v)..heads.end * (nope + v),
    )?; // [local heads·(nope+v), kv_lora]
    let o_proj =
        part(src, &format!("{a}.o_proj.weight"), &[h, nh * v], 1, heads.start * v..heads.end * v)?; // [hidden, local heads·v]
    let attn = AttnW {
        q_a: up_f32(dev, src, &format!("{a}.q_a_proj.weight"), &[ql, h])?,
        q_a_norm: up_f32(dev, src, &format!("{a}.q_a_layernorm.weight"), &[ql])?,
        q_b: up_mat_host(dev, q_b, prec)?,
        kv_a: up_mat(dev, src, &format!("{a}.kv_a_proj_with_mqa.weight"), &[kl + rope, h], prec)?,
        kv_norm: up_f32(dev, src, &format!("{a}.kv_a_layernorm.weight"), &[kl])?,
        kv_b: up_mat_host(dev, kv_b, prec)?,
        o_proj: up_mat_host(dev, o_proj, prec)?,
        idx_wq_b: up_f32(dev, src, &format!("{a}.indexer.wq_b.weight"), &[ih * id, ql])?,
        idx_wk: up_f32(dev, src, &format!("{a}.indexer.wk.weight"), &[id, h])?,
        idx_k_norm_w: up_f32(dev, src, &format!("{a}.indexer.k_norm.weight"), &[id])?,
        idx_k_norm_b: up_f32(dev, src, &format!("{a}.indexer.k_norm.bias"), &[id])?,
        idx_weights_proj: up_f32(dev, src, &format!("{a}.indexer.weights_proj.weight"), &[ih, h])?,
    };
    let ffn = if !cfg.is_moe_layer(i) {
        let inner = cfg.intermediate_size;
        let mine = even_range(inner, plan.tp, plan.rank_in_group(r));
        FfnW::Dense(mlp_part(dev, src, &format!("{p}.mlp"), (h, inner), mine, prec)?)
    } else {
        FfnW::Ep(Box::new(load_ep(dev, src, cfg, plan, rank, i, prec)?))
    };
    Ok(LayerW {
        attn_norm: up_f32(dev, src, &format!("{p}.input_layernorm.weight"), &[h])?,
        attn,
        ffn_norm: up_f32(dev, src, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
        ffn,
    })
}

/// The router, shared expert and this rank's routed experts of MoE layer `i`.
fn load_ep(
    dev: &CudaDevice,
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    plan: &ParallelPlan,
    rank: usize,
    i: usize,
    prec: Precision,
) -> Result<EpW, CudaModelError> {
    let p = format!("model.layers.{i}.mlp");
    let (h, e, inner) = (cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size);
    let experts: Vec<u32> =
        plan.experts_on(i, Rank(rank as u32)).into_iter().map(|(_, x)| x.0).collect();
    let mut local_of = vec![-1i32; e];
    let mut w13 = Vec::with_capacity(experts.len() * 2 * inner * h);
    let mut w2 = Vec::with_capacity(experts.len() * h * inner);
    for (k, &x) in experts.iter().enumerate() {
        let slot = local_of.get_mut(x as usize).ok_or_else(|| {
            ModelError::Shard(format!("layer {i}: expert {x} is not below n_routed_experts {e}"))
        })?;
        *slot = k as i32;
        let (gu, down) = weights::gate_up_host(src, &format!("{p}.experts.{x}"), h, inner)?;
        w13.extend(gu);
        w2.extend(down);
    }
    let (w13, w2) = if experts.is_empty() {
        (None, None)
    } else {
        (Some(up_mat_host(dev, w13, prec)?), Some(up_mat_host(dev, w2, prec)?))
    };
    let shared = if cfg.n_shared_experts > 0 {
        let si = inner * cfg.n_shared_experts;
        Some(mlp_part(dev, src, &format!("{p}.shared_experts"), (h, si), 0..si, prec)?)
    } else {
        None
    };
    Ok(EpW {
        gate: up_f32(dev, src, &format!("{p}.gate.weight"), &[e, h])?,
        bias: up_f32(dev, src, &format!("{p}.gate.e_score_correction_bias"), &[e])?,
        experts,
        local_of,
        w13,
        w2,
        inner,
        shared,
    })
}

/// Embedding rows `vocab` and LM-head rows `vocab` of `[vocab_size, hidden]`, final norm.
pub(crate) fn load_top(
    dev: &CudaDevice,
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    vocab: Range<usize>,
    prec: Precision,
) -> Result<weights::Top, CudaModelError> {
    let full = [cfg.vocab_size, cfg.hidden_size];
    let embed = part(src, "model.embed_tokens.weight", &full, 0, vocab.clone())?;
    let head = part(src, "lm_head.weight", &full, 0, vocab)?;
    Ok((
        up_mat_host(dev, embed, prec)?,
        up_f32(dev, src, "model.norm.weight", &[cfg.hidden_size])?,
        up_mat_host(dev, head, prec)?,
    ))
}
