//! MoE routing only (spec §2.5): router logits `x · W_gᵀ` in f32, then the sigmoid
//! group-limited selection of `fathom_kernels::cpu::router`. Produces an explicit list of
//! (token, expert, weight) [`Assignment`]s — the unit the expert-parallel dispatch will move.
//! Does not run experts.

use super::experts::Assignment;
use super::{ModelError, load};
use crate::weights::TensorSource;
use fathom_common::ModelConfig;
use fathom_kernels::cpu::gemm::matmul_t;
use fathom_kernels::cpu::router::{RouterParams, route_token};

/// `mlp.gate.weight` `[n_experts, hidden]` and `mlp.gate.e_score_correction_bias` `[n_experts]`.
#[derive(Debug, Clone)]
pub struct Router {
    weight: Vec<f32>,
    bias: Vec<f32>,
    hidden: usize,
    params: RouterParams,
}

impl Router {
    pub fn load(
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        prefix: &str,
    ) -> Result<Self, ModelError> {
        let e = cfg.n_routed_experts;
        let weight = load::exact(src, &format!("{prefix}.weight"), &[e, cfg.hidden_size])?;
        let bias = load::exact(src, &format!("{prefix}.e_score_correction_bias"), &[e])?;
        Ok(Self {
            weight,
            bias,
            hidden: cfg.hidden_size,
            params: RouterParams {
                n_experts: e,
                n_group: cfg.n_group,
                topk_group: cfg.topk_group,
                top_k: cfg.num_experts_per_tok,
                routed_scaling_factor: cfg.routed_scaling_factor as f32,
                norm_topk_prob: cfg.norm_topk_prob,
            },
        })
    }

    /// Routes every row of `x` (`[n, hidden]`): `top_k` assignments per token, token-major, in
    /// rank order within a token.
    pub fn route(&self, x: &[f32]) -> Vec<Assignment> {
        let n = x.len() / self.hidden;
        let e = self.params.n_experts;
        let logits = matmul_t(x, &self.weight, n, e, self.hidden); // [n, E]
        let mut out = Vec::with_capacity(n * self.params.top_k);
        for t in 0..n {
            for (expert, weight) in
                route_token(&logits[t * e..(t + 1) * e], &self.bias, &self.params)
            {
                out.push(Assignment { token: t as u32, expert, weight });
            }
        }
        out
    }
}
