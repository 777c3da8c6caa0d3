//! Device weights of the GPU forward, uploaded from any [`TensorSource`] (HF names, as the CPU
//! model loads them; every shape checked against the config). GEMM weights ([`Mat`]) are bf16
//! (cuBLAS) under [`Precision::Bf16`] and f32 under [`Precision::F32`]; norm weights, the router
//! (`mlp.gate`), `q_a_proj` and the whole indexer (its discrete top-k must follow the f32
//! reference) and `kv_b_proj` (used by the absorption kernels in fp32) are f32 in both.
//! [`LayerW::load`] holds everything (W = 1); a rank's shard is loaded by `rank_weights.rs`
//! into the same types.

use fathom_common::ModelConfig;
use fathom_kernels::cuda::CudaDevice;
use fathom_kernels::cuda::cudarc::driver::CudaSlice;
use half::bf16;

use super::{CudaModelError, Precision};
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

pub(crate) fn up_f32(
    dev: &CudaDevice,
    src: &dyn TensorSource,
    name: &str,
    shape: &[usize],
) -> Result<CudaSlice<f32>, CudaModelError> {
    Ok(dev.upload(&load_f32(src, name, shape)?)?)
}

/// A GEMM weight `[out, in]` at the model's [`Precision`].
#[derive(Debug)]
pub(crate) enum Mat {
    Bf16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
}

impl Mat {
    /// The bf16 copy (the bf16 forward only ever loads bf16 matrices).
    pub(crate) fn bf16(&self) -> Result<&CudaSlice<bf16>, CudaModelError> {
        match self {
            Mat::Bf16(w) => Ok(w),
            Mat::F32(_) => Err(CudaModelError::Precision { want: Precision::Bf16 }),
        }
    }

    /// The f32 copy (the f32 forward only ever loads f32 matrices).
    pub(crate) fn f32(&self) -> Result<&CudaSlice<f32>, CudaModelError> {
        match self {
            Mat::F32(w) => Ok(w),
            Mat::Bf16(_) => Err(CudaModelError::Precision { want: Precision::F32 }),
        }
    }
}

pub(crate) fn up_mat_host(
    dev: &CudaDevice,
    v: Vec<f32>,
    prec: Precision,
) -> Result<Mat, CudaModelError> {
    Ok(match prec {
        Precision::Bf16 => Mat::Bf16(dev.upload(&to_bf16(&v))?),
        Precision::F32 => Mat::F32(dev.upload(&v)?),
    })
}

pub(crate) fn up_mat(
    dev: &CudaDevice,
    src: &dyn TensorSource,
    name: &str,
    shape: &[usize],
    prec: Precision,
) -> Result<Mat, CudaModelError> {
    up_mat_host(dev, load_f32(src, name, shape)?, prec)
}

/// One layer's attention and indexer weights (all heads).
#[derive(Debug)]
pub(crate) struct AttnW {
    pub q_a: CudaSlice<f32>,      // [q_lora, hidden]
    pub q_a_norm: CudaSlice<f32>, // [q_lora]
    pub q_b: Mat,                 // [heads·(nope+rope), q_lora]
    pub kv_a: Mat,                // [kv_lora + rope, hidden]
    pub kv_norm: CudaSlice<f32>,  // [kv_lora]
    pub kv_b: Mat,                // [heads·(nope+v), kv_lora]
    pub o_proj: Mat,              // [hidden, heads·v]
    pub idx_wq_b: CudaSlice<f32>, // [H_I·d, q_lora]
    pub idx_wk: CudaSlice<f32>,   // [d, hidden]
    pub idx_k_norm_w: CudaSlice<f32>,
    pub idx_k_norm_b: CudaSlice<f32>,
    pub idx_weights_proj: CudaSlice<f32>, // [H_I, hidden]
}

/// A SwiGLU MLP: fused gate|up `[2·inner, hidden]` and down `[hidden, inner]`.
#[derive(Debug)]
pub(crate) struct MlpW {
    pub gate_up: Mat,
    pub down: Mat,
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
        w13: Mat,             // [E, 2·inner, hidden]
        w2: Mat,              // [E, hidden, inner]
        inner: usize,
        shared: Option<MlpW>,
    },
    /// A MoE layer of a sharded rank: the router, this rank's routed experts and the shared
    /// expert (`rank_moe.rs`), run through the expert-parallel seam.
    Ep(Box<super::rank_moe::EpW>),
}

#[derive(Debug)]
pub(crate) struct LayerW {
    pub attn_norm: CudaSlice<f32>,
    pub attn: AttnW,
    pub ffn_norm: CudaSlice<f32>,
    pub ffn: FfnW,
}

pub(crate) fn gate_up_host(
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
    prec: Precision,
) -> Result<MlpW, CudaModelError> {
    let (gu, down) = gate_up_host(src, prefix, hidden, inner)?;
    Ok(MlpW { gate_up: up_mat_host(dev, gu, prec)?, down: up_mat_host(dev, down, prec)?, inner })
}

impl LayerW {
    pub(crate) fn load(
        dev: &CudaDevice,
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        i: usize,
        prec: Precision,
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
            q_b: up_mat(
                dev,
                src,
                &format!("{a}.q_b_proj.weight"),
                &[nh * (nope + rope), ql],
                prec,
            )?,
            kv_a: up_mat(
                dev,
                src,
                &format!("{a}.kv_a_proj_with_mqa.weight"),
                &[kl + rope, h],
                prec,
            )?,
            kv_norm: up_f32(dev, src, &format!("{a}.kv_a_layernorm.weight"), &[kl])?,
            kv_b: up_mat(dev, src, &format!("{a}.kv_b_proj.weight"), &[nh * (nope + v), kl], prec)?,
            o_proj: up_mat(dev, src, &format!("{a}.o_proj.weight"), &[h, nh * v], prec)?,
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
            FfnW::Dense(mlp(dev, src, &format!("{p}.mlp"), h, cfg.intermediate_size, prec)?)
        } else {
            let e = cfg.n_routed_experts;
            let inner = cfg.moe_intermediate_size;
            let mut w13 = Vec::with_capacity(e * 2 * inner * h);
            let mut w2 = Vec::with_capacity(e * h * inner);
            for x in 0..e {
                let (gu, down) = gate_up_host(src, &format!("{p}.mlp.experts.{x}"), h, inner)?;
                w13.extend(gu);
                w2.extend(down);
            }
            let shared = if cfg.n_shared_experts > 0 {
                Some(mlp(
                    dev,
                    src,
                    &format!("{p}.mlp.shared_experts"),
                    h,
                    inner * cfg.n_shared_experts,
                    prec,
                )?)
            } else {
                None
            };
            FfnW::Moe {
                gate: up_f32(dev, src, &format!("{p}.mlp.gate.weight"), &[e, h])?,
                bias: up_f32(dev, src, &format!("{p}.mlp.gate.e_score_correction_bias"), &[e])?,
                w13: up_mat_host(dev, w13, prec)?,
                w2: up_mat_host(dev, w2, prec)?,
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

/// Embedding `[vocab, hidden]`, final norm f32, LM head `[vocab, hidden]`.
pub(crate) type Top = (Mat, CudaSlice<f32>, Mat);

/// Loads [`Top`].
pub(crate) fn load_top(
    dev: &CudaDevice,
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    prec: Precision,
) -> Result<Top, CudaModelError> {
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    Ok((
        up_mat(dev, src, "model.embed_tokens.weight", &[v, h], prec)?,
        up_f32(dev, src, "model.norm.weight", &[h])?,
        up_mat(dev, src, "lm_head.weight", &[v, h], prec)?,
    ))
}

/// Random bf16 weights made on the device (no host copy), for full-width layer benchmarks:
/// matrices uniform in ±1/√in, norm weights in [0.9, 1.1], biases in ±0.1.
pub(crate) struct RandomInit<'a> {
    pub dev: &'a CudaDevice,
    pub seed: u32,
}

impl RandomInit<'_> {
    fn next(&mut self) -> u32 {
        self.seed = self.seed.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
        self.seed
    }

    pub(crate) fn mat(&mut self, rows: usize, cols: usize) -> Result<Mat, CudaModelError> {
        let mut w = self.dev.zeros::<bf16>(rows * cols)?;
        let s = self.next();
        self.dev.ops().fill_uniform_bf16(&mut w, s, (cols as f32).powf(-0.5))?;
        Ok(Mat::Bf16(w))
    }

    pub(crate) fn f32(
        &mut self,
        n: usize,
        lo: f32,
        hi: f32,
    ) -> Result<CudaSlice<f32>, CudaModelError> {
        let mut w = self.dev.zeros::<f32>(n)?;
        let s = self.next();
        self.dev.ops().fill_uniform_f32(&mut w, s, lo, hi)?;
        Ok(w)
    }

    fn lin_f32(&mut self, rows: usize, cols: usize) -> Result<CudaSlice<f32>, CudaModelError> {
        let a = (cols as f32).powf(-0.5);
        self.f32(rows * cols, -a, a)
    }

    fn mlp(&mut self, hidden: usize, inner: usize) -> Result<MlpW, CudaModelError> {
        Ok(MlpW { gate_up: self.mat(2 * inner, hidden)?, down: self.mat(hidden, inner)?, inner })
    }

    /// Layer `i` of `cfg` at [`Precision::Bf16`] (shapes as [`LayerW::load`]).
    pub(crate) fn layer(&mut self, cfg: &ModelConfig, i: usize) -> Result<LayerW, CudaModelError> {
        let (h, ql, kl) = (cfg.hidden_size, cfg.q_lora_rank, cfg.kv_lora_rank);
        let (nope, rope, v) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim);
        let nh = cfg.num_attention_heads;
        let (ih, id) = (cfg.index_n_heads, cfg.index_head_dim);
        let attn = AttnW {
            q_a: self.lin_f32(ql, h)?,
            q_a_norm: self.f32(ql, 0.9, 1.1)?,
            q_b: self.mat(nh * (nope + rope), ql)?,
            kv_a: self.mat(kl + rope, h)?,
            kv_norm: self.f32(kl, 0.9, 1.1)?,
            kv_b: self.mat(nh * (nope + v), kl)?,
            o_proj: self.mat(h, nh * v)?,
            idx_wq_b: self.lin_f32(ih * id, ql)?,
            idx_wk: self.lin_f32(id, h)?,
            idx_k_norm_w: self.f32(id, 0.9, 1.1)?,
            idx_k_norm_b: self.f32(id, -0.1, 0.1)?,
            idx_weights_proj: self.lin_f32(ih, h)?,
        };
        let ffn = if !cfg.is_moe_layer(i) {
            FfnW::Dense(self.mlp(h, cfg.intermediate_size)?)
        } else {
            let (e, inner) = (cfg.n_routed_experts, cfg.moe_intermediate_size);
            let shared = if cfg.n_shared_experts > 0 {
                Some(self.mlp(h, inner * cfg.n_shared_experts)?)
            } else {
                None
            };
            FfnW::Moe {
                gate: self.lin_f32(e, h)?,
                bias: self.f32(e, -0.1, 0.1)?,
                w13: self.mat(e * 2 * inner, h)?,
                w2: self.mat(e * h, inner)?,
                inner,
                shared,
            }
        };
        Ok(LayerW {
            attn_norm: self.f32(h, 0.9, 1.1)?,
            attn,
            ffn_norm: self.f32(h, 0.9, 1.1)?,
            ffn,
        })
    }

    /// Embedding, final norm and LM head of `cfg`.
    pub(crate) fn top(&mut self, cfg: &ModelConfig) -> Result<Top, CudaModelError> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        Ok((self.mat(v, h)?, self.f32(h, 0.9, 1.1)?, self.mat(v, h)?))
    }
}
