//! Feed-forward blocks: the SwiGLU MLP (dense layers, shared experts, and each routed expert) and
//! the MoE block that composes routing (`gate.rs`) with expert compute (`experts.rs`).
//!
//! The MoE forward is written as the distributed version will run it: route → (dispatch) →
//! experts over an explicit assignment list → (combine) → + shared expert. Here dispatch and
//! combine are the identity because one rank holds every expert.

use super::experts::{Assignment, Experts};
use super::gate::Router;
use super::{ModelError, load};
use crate::weights::TensorSource;
use fathom_common::ModelConfig;
use fathom_kernels::cpu::activation::silu_mul;
use fathom_kernels::cpu::gemm::matmul_t;

/// `down(SiLU(gate(x)) ⊙ up(x))`; gate and up are stored fused as `[2·inner, hidden]`.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    /// `[2·inner, hidden]`: rows `[0, inner)` gate_proj, `[inner, 2·inner)` up_proj.
    gate_up: Vec<f32>,
    /// `[hidden, inner]`
    down: Vec<f32>,
    hidden: usize,
    inner: usize,
}

impl SwiGlu {
    /// Loads `{prefix}.gate_proj.weight`, `up_proj`, `down_proj`.
    pub fn load(
        src: &dyn TensorSource,
        prefix: &str,
        hidden: usize,
        inner: usize,
    ) -> Result<Self, ModelError> {
        let mut gate_up =
            load::exact(src, &format!("{prefix}.gate_proj.weight"), &[inner, hidden])?;
        gate_up.extend(load::exact(src, &format!("{prefix}.up_proj.weight"), &[inner, hidden])?);
        let down = load::exact(src, &format!("{prefix}.down_proj.weight"), &[hidden, inner])?;
        Ok(Self { gate_up, down, hidden, inner })
    }

    /// `x` `[n, hidden]` → `[n, hidden]`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let n = x.len() / self.hidden;
        let gu = matmul_t(x, &self.gate_up, n, 2 * self.inner, self.hidden); // [n, 2·inner]
        let mut act = vec![0.0; n * self.inner]; // [n, inner]
        for r in 0..n {
            let row = &gu[r * 2 * self.inner..(r + 1) * 2 * self.inner];
            silu_mul(
                &row[..self.inner],
                &row[self.inner..],
                &mut act[r * self.inner..(r + 1) * self.inner],
            );
        }
        matmul_t(&act, &self.down, n, self.hidden, self.inner)
    }
}

/// Routed experts plus the shared expert.
#[derive(Debug, Clone)]
pub struct Moe {
    pub router: Router,
    pub experts: Experts,
    pub shared: Option<SwiGlu>,
}

/// The FFN of one layer.
#[derive(Debug, Clone)]
pub enum Ffn {
    Dense(SwiGlu),
    Moe(Moe),
}

impl Ffn {
    /// Loads the FFN of layer `layer` (`prefix` = `model.layers.{layer}`); `experts` limits which
    /// routed experts this rank holds (`None`: all).
    pub fn load(
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        prefix: &str,
        layer: usize,
        experts: Option<&[u32]>,
    ) -> Result<Self, ModelError> {
        let h = cfg.hidden_size;
        if !cfg.is_moe_layer(layer) {
            return Ok(Ffn::Dense(SwiGlu::load(
                src,
                &format!("{prefix}.mlp"),
                h,
                cfg.intermediate_size,
            )?));
        }
        let router = Router::load(src, cfg, &format!("{prefix}.mlp.gate"))?;
        let all: Vec<u32> = (0..cfg.n_routed_experts as u32).collect();
        let ids = experts.unwrap_or(&all);
        let experts = Experts::load(src, &format!("{prefix}.mlp.experts"), ids, cfg)?;
        let shared = if cfg.n_shared_experts > 0 {
            Some(SwiGlu::load(
                src,
                &format!("{prefix}.mlp.shared_experts"),
                h,
                cfg.moe_intermediate_size * cfg.n_shared_experts,
            )?)
        } else {
            None
        };
        Ok(Ffn::Moe(Moe { router, experts, shared }))
    }

    /// `x` `[n, hidden]` → (`[n, hidden]`, the routing assignments when MoE).
    pub fn forward(
        &self,
        x: &[f32],
        layer: usize,
    ) -> Result<(Vec<f32>, Option<Vec<Assignment>>), ModelError> {
        match self {
            Ffn::Dense(mlp) => Ok((mlp.forward(x), None)),
            Ffn::Moe(moe) => {
                let assignments = moe.router.route(x);
                let mut out = vec![0.0; x.len()];
                moe.experts.forward(x, &assignments, layer, &mut out)?;
                if let Some(shared) = &moe.shared {
                    for (o, s) in out.iter_mut().zip(shared.forward(x)) {
                        *o += s;
                    }
                }
                Ok((out, Some(assignments)))
            }
        }
    }
}
