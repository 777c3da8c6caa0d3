//! DeepSeek-V3.2's router selection (spec §2.5, `noaux_tc`): sigmoid scores, bias-corrected
//! selection scores (the bias is used for selection only), group score = sum of the group's top-2
//! selection scores, keep the `topk_group` best groups (other experts get −∞), take the top-k
//! experts, weights = sigmoid scores normalised over the selection (+1e-20 as HF) when
//! `norm_topk_prob`, times `routed_scaling_factor`. Ties: lower index first (see `topk`).

use super::activation::sigmoid;
use super::topk::topk_ranked;

/// Router hyper-parameters (from `ModelConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterParams {
    pub n_experts: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub top_k: usize,
    pub routed_scaling_factor: f32,
    pub norm_topk_prob: bool,
}

/// Routes one token from its router logits (`[n_experts]`) and the correction bias
/// (`[n_experts]`). Returns `top_k` (expert, weight) pairs in rank order (best first).
pub fn route_token(logits: &[f32], bias: &[f32], p: &RouterParams) -> Vec<(u32, f32)> {
    let e = p.n_experts;
    assert_eq!(logits.len(), e, "route_token: logits are not [{e}]");
    assert_eq!(bias.len(), e, "route_token: bias is not [{e}]");
    assert!(p.n_group > 0 && e % p.n_group == 0, "route_token: n_group must divide n_experts");
    let per = e / p.n_group;
    let scores: Vec<f32> = logits.iter().map(|&z| sigmoid(z)).collect();
    let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    let group_scores: Vec<f32> = (0..p.n_group)
        .map(|g| {
            topk_ranked(&choice[g * per..(g + 1) * per], 2)
                .iter()
                .map(|&i| choice[g * per + i as usize])
                .sum()
        })
        .collect();
    let keep = topk_ranked(&group_scores, p.topk_group);
    for g in 0..p.n_group {
        if !keep.contains(&(g as u32)) {
            choice[g * per..(g + 1) * per].fill(f32::NEG_INFINITY);
        }
    }
    let chosen = topk_ranked(&choice, p.top_k);
    let mut w: Vec<f32> = chosen.iter().map(|&i| scores[i as usize]).collect();
    if p.norm_topk_prob {
        let denom = w.iter().sum::<f32>() + 1e-20;
        w.iter_mut().for_each(|v| *v /= denom);
    }
    chosen.into_iter().zip(w).map(|(i, v)| (i, v * p.routed_scaling_factor)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> RouterParams {
        RouterParams {
            n_experts: 8,
            n_group: 4,
            topk_group: 2,
            top_k: 3,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
        }
    }

    #[test]
    fn group_limited_selection_and_normalised_weights() {
        // Groups {0,1} {2,3} {4,5} {6,7}. Expert 7 has the single highest score, but its group's
        // top-2 sum is lower than groups 0 and 2.
        let logits = [2.0, 1.9, -3.0, -3.0, 1.5, 1.4, -3.0, 3.0];
        let bias = [0.0; 8];
        let r = route_token(&logits, &bias, &params());
        let ids: Vec<u32> = r.iter().map(|x| x.0).collect();
        // group sums: g0 = σ2+σ1.9 ≈ 1.75, g1 ≈ 0.09, g2 ≈ 1.62, g3 ≈ 0.999: keep g0, g2.
        assert_eq!(ids, vec![0, 1, 4]);
        let s: f32 = r.iter().map(|x| x.1).sum();
        assert!((s - 2.5).abs() < 1e-5);
        let want0 = sigmoid(2.0) / (sigmoid(2.0) + sigmoid(1.9) + sigmoid(1.5)) * 2.5;
        assert!((r[0].1 - want0).abs() < 1e-6);
    }

    #[test]
    fn bias_changes_selection_but_not_weights() {
        let logits = [0.0, 0.1, 0.2, 0.3, 0.0, 0.0, 0.0, 0.0];
        let mut bias = [0.0; 8];
        bias[5] = 1.0;
        bias[4] = 1.0;
        let p = RouterParams { topk_group: 4, top_k: 2, ..params() };
        let r = route_token(&logits, &bias, &p);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![4, 5]);
        // Weights from the unbiased sigmoid: both σ(0) → 1.25 each.
        assert!((r[0].1 - 1.25).abs() < 1e-6 && (r[1].1 - 1.25).abs() < 1e-6);
    }
}
