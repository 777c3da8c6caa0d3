//! Lightning-indexer scoring (spec §2.3, f32 form): for one query token,
//! `I[s] = Σ_h w[h] · ReLU(q[h] · k[s])`. The caller folds every positive constant into `w`
//! (`weights_proj(x) · H^-0.5 · d^-0.5`); the Hadamard rotation is omitted (orthonormal, HF omits
//! it) and FP8 simulation is not applied.

use super::gemm::dot;

/// Scores of `n_keys` keys (`keys`: `[n_keys, dim]`) for one query (`q`: `[heads, dim]`, head
/// weights `w`: `[heads]`), written to `out` (`[n_keys]`).
pub fn indexer_scores(
    q: &[f32],
    w: &[f32],
    keys: &[f32],
    heads: usize,
    dim: usize,
    out: &mut [f32],
) {
    assert_eq!(q.len(), heads * dim, "indexer_scores: q is not [{heads}, {dim}]");
    assert_eq!(w.len(), heads, "indexer_scores: w is not [{heads}]");
    assert!(dim > 0 && keys.len() % dim == 0, "indexer_scores: keys are not [n, {dim}]");
    assert_eq!(out.len(), keys.len() / dim, "indexer_scores: out is not [n_keys]");
    for (s, k) in keys.chunks_exact(dim).enumerate() {
        let mut acc = 0.0f32;
        for h in 0..heads {
            acc += w[h] * dot(&q[h * dim..(h + 1) * dim], k).max(0.0);
        }
        out[s] = acc;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, rand_vec};

    #[test]
    fn matches_naive_relu_weighted_sum() {
        let (heads, dim, n) = (5, 12, 9);
        let q = rand_vec(heads * dim, 1);
        let w = rand_vec(heads, 2);
        let k = rand_vec(n * dim, 3);
        let mut out = vec![0.0; n];
        indexer_scores(&q, &w, &k, heads, dim, &mut out);
        let want: Vec<f32> = (0..n)
            .map(|s| {
                (0..heads)
                    .map(|h| {
                        let d: f32 = (0..dim).map(|i| q[h * dim + i] * k[s * dim + i]).sum();
                        w[h] * d.max(0.0)
                    })
                    .sum()
            })
            .collect();
        assert_close(&out, &want, 1e-5);
        // A key orthogonal-negative to every head scores exactly 0.
        let neg: Vec<f32> = q[..dim].iter().map(|v| -v).collect();
        let mut o1 = [1.0];
        indexer_scores(&q[..dim], &[3.0], &neg, 1, dim, &mut o1);
        assert_eq!(o1[0], 0.0);
    }
}
