//! Device weights of the GPU forward, uploaded from any [`TensorSource`] (HF names, as the CPU
//! model loads them; every shape checked against the config). GEMM weights are bf16 (cuBLAS);
//! norm weights, the router (`mlp.gate`), `q_a_proj` and the whole indexer (its discrete
//! top-k must follow the f32 reference) and `kv_b_proj` (used by the absorption kernels in
//! fp32) stay f32. One rank holds everything (W = 1).

use fathom_common::ModelConfig;
use fathom_kernels::cuda::CudaDevice;
use fathom_kernels::cuda::cudarc::driver::CudaSlice;
use half::bf16;

use super::CudaModelError;
use crate::model::ModelError;
use crate::weights::TensorSource;

pub(crate) fn load_f32(
    src: &dyn TensorSource,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>, CudaModelError> {
    let t = src.load(name).map_err(ModelError::from)?;
    if t.shape() != shape {
        return Err(ModelError::Shape {
            name: name.into(),
            got: t.shape().to_vec(),
            want: shape.to_vec(),
        }
        .into());
    }
    Ok(t.into_data())
}

pub(crate) fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn up_f32(
    dev: &CudaDevice,
    src: &dyn TensorSource,
    name: &str,
    shape: &[usize],
) -> Result<CudaSlice<f32>, CudaModelError> {
    Ok(dev.upload(&load_f32(src, name, shape)?)?)
}

fn up_bf16(
    dev: &CudaDevice,
    src: &dyn TensorSource,
    name: &str,
    shape: &[usize],
) -> Result<CudaSlice<bf16>, CudaModelError> {
    Ok(dev.upload(&to_bf16(&load_f32(src, name, shape)?))?)
}

/// One layer's attention and indexer weights (all heads).
#[derive(Debug)]
pub(crate) struct AttnW {
    pub q_a: CudaSlice<f32>,      // [q_lora, hidden]
    pub q_a_norm: CudaSlice<f32>, // [q_lora]
    pub q_b: CudaSlice<bf16>,     // [heads·(nope+rope), q_lora]
    pub kv_a: CudaSlice<bf16>,    // [kv_lora + rope, hidden]
    pub kv_norm: CudaSlice<f32>,  // [kv_lora]
    pub kv_b: CudaSlice<f32>,     // [heads·(nope+v), kv_lora]
    pub o_proj: CudaSlice<bf16>,  // [hidden, heads·v]
    pub idx_wq_b: CudaSlice<f32>, // [H_I·d, q_lora]
    pub idx_wk: CudaSlice<f32>,   // [d, hidden]
    pub idx_k_norm_w: CudaSlice<f32>,
    pub idx_k_norm_b: CudaSlice<f32>,
    pub idx_weights_proj: CudaSlice<f32>, // [H_I, hidden]
}

/// A SwiGLU MLP: fused gate|up `[2·inner, hidden]` and down `[hidden, inner]`.
#[derive(Debug)]
pub(crate) struct MlpW {
    pub gate_up: CudaSlice<bf16>,
    pub down: CudaSlice<bf16>,
    pub inner: usize,
}

/// One per layer, so the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum FfnW {
    Dense(MlpW),
    Moe {
        gate: CudaSlice<f32>, // [E, hidden]
        bias: CudaSlice<f32>, // [E]
        w13: CudaSlice<bf16>, // [E, 2·inner, hidden]
        w2: CudaSlice<bf16>,  // [E, hidden, inner]
        inner: usize,
        shared: Option<MlpW>,
    },
}

#[derive(Debug)]
pub(crate) struct LayerW {
    pub attn_norm: CudaSlice<f32>,
    pub attn: AttnW,
    pub ffn_norm: CudaSlice<f32>,
    pub ffn: FfnW,
}

fn gate_up_host(
    src: &dyn TensorSource,
    prefix: &str,
    hidden: usize,
    inner: usize,
) -> Result<(Vec<f32>, Vec<f32>), CudaModelError> {
    let mut gu = load_f32(src, &format!("{prefix}.gate_proj.weight"), &[inner, hidden])?;
    gu.extend(load_f32(src, &format!("{prefix}.up_proj.weight"), &[inner, hidden])?);
    let down = load_f32(src, &format!("{prefix}.down_proj.weight"), &[hidden, inner])?;
    Ok((gu, down))
}

fn mlp(
    dev: &CudaDevice,
    src: &dyn TensorSource,
    prefix: &str,
    hidden: usize,
    inner: usize,
) -> Result<MlpW, CudaModelError> {
    let (gu, down) = gate_up_host(src, prefix, hidden, inner)?;
    Ok(MlpW { gate_up: dev.upload(&to_bf16(&gu))?, down: dev.upload(&to_bf16(&down))?, inner })
}

impl LayerW {
    pub(crate) fn load(
        dev: &CudaDevice,
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        i: usize,
    ) -> Result<Self, CudaModelError> {
        let p = format!("model.layers.{i}");
        let a = format!("{p}.self_attn");
        let (h, ql, kl) = (cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank);
        let (nope, rope, v) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim);
        let nh = cfg.num_attention_heads;
        let (ih, id) = (cfg.index_n_heads, cfg.index_head_dim);
        let attn = AttnW {
            q_a: up_f32(dev, src, &format!("{a}.q_a_proj.weight"), &[ql, h])?,
            q_a_norm: up_f32(dev, src, &format!("{a}.q_a_layernorm.weight"), &[ql])?,
            q_b: up_bf16(dev, src, &format!("{a}.q_b_proj.weight"), &[nh * (nope + rope), ql])?,
            kv_a: up_bf16(dev, src, &format!("{a}.kv_a_proj_with_mqa.weight"), &[kl + rope, h])?,
            kv_norm: up_f32(dev, src, &format!("{a}.kv_a_layernorm.weight"), &[kl])?,
            kv_b: up_f32(dev, src, &format!("{a}.kv_b_proj.weight"), &[nh * (nope + v), kl])?,
            o_proj: up_bf16(dev, src, &format!("{a}.o_proj.weight"), &[h, nh * v])?,
            idx_wq_b: up_f32(dev, src, &format!("{a}.indexer.wq_b.weight"), &[ih * id, ql])?,
            idx_wk: up_f32(dev, src, &format!("{a}.indexer.wk.weight"), &[id, h])?,
            idx_k_norm_w: up_f32(dev, src, &format!("{a}.indexer.k_norm.weight"), &[id])?,
            idx_k_norm_b: up_f32(dev, src, &format!("{a}.indexer.k_norm.bias"), &[id])?,
            idx_weights_proj: up_f32(
                dev,
                src,
                &format!("{a}.indexer.weights_proj.weight"),
                &[ih, h],
            )?,
        };
        let ffn = if !cfg.is_moe_layer(i) {
            FfnW::Dense(mlp(dev, src, &format!("{p}.mlp"), h, cfg.intermediate_size)?)
        } else {
            let e = cfg.n_routed_experts;
            let inner = cfg.moe_intermediate_size;
            let mut w13 = Vec::with_capacity(e * 2 * inner * h);
            let mut w2 = Vec::with_capacity(e * h * inner);
            for x in 0..e {
                let (gu, down) = gate_up_host(src, &format!("{p}.mlp.experts.{x}"), h, inner)?;
                w13.extend(to_bf16(&gu));
                w2.extend(to_bf16(&down));
            }
            let shared = if cfg.n_shared_experts > 0 {
                Some(mlp(
                    dev,
                    src,
                    &format!("{p}.mlp.shared_experts"),
                    h,
                    inner * cfg.n_shared_experts,
                )?)
            } else {
                None
            };
            FfnW::Moe {
                gate: up_f32(dev, src, &format!("{p}.mlp.gate.weight"), &[e, h])?,
                bias: up_f32(dev, src, &format!("{p}.mlp.gate.e_score_correction_bias"), &[e])?,
                w13: dev.upload(&w13)?,
                w2: dev.upload(&w2)?,
                inner,
                shared,
            }
        };
        Ok(Self {
            attn_norm: up_f32(dev, src, &format!("{p}.input_layernorm.weight"), &[h])?,
            attn,
            ffn_norm: up_f32(dev, src, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
            ffn,
        })
    }
}

/// Embedding `[vocab, hidden]` bf16, final norm f32, LM head `[vocab, hidden]` bf16.
pub(crate) type Top = (CudaSlice<bf16>, CudaSlice<f32>, CudaSlice<bf16>);

/// Loads [`Top`].
pub(crate) fn load_top(
    dev: &CudaDevice,
    src: &dyn TensorSource,
    cfg: &ModelConfig,
) -> Result<Top, CudaModelError> {
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    Ok((
        up_bf16(dev, src, "model.embed_tokens.weight", &[v, h])?,
        up_f32(dev, src, "model.norm.weight", &[h])?,
        up_bf16(dev, src, "lm_head.weight", &[v, h])?,
    ))
}
