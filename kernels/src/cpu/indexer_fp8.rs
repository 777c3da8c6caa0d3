//! The lightning indexer's FP8 path (spec §2.3 steps 4–5, as DeepSeek's inference runs it), the
//! CPU twin of `kernels/cuda/indexer_fp8.cu`:
//! - [`hadamard_rotate`]: `v ← (H_d · v) / √d` with the Sylvester (natural-order) ±1 Hadamard
//!   matrix — orthonormal, so it changes no dot product; it spreads outliers before quantisation;
//! - [`rotate_quant_fp8`]: rotate, then one ue8m0 scale per vector (`2^ceil(log2(max(amax,
//!   1e-4) / 448))`) and saturating e4m3 codes — q per (token, head), k per token;
//! - [`indexer_scores_fp8`]: `I[s] = sk[s] · Σ_h (w[h] · sq[h]) · ReLU(q8[h] · k8[s])`, which is
//!   `Σ_h w[h] · ReLU(q̂[h] · k̂[s])` of the dequantised vectors (the scales are positive).
//!
//! Bit-exactness with the GPU: the transform adds and subtracts in the same order and multiplies
//! by the same f32 `1/√d`, and e4m3 rounding is round-to-nearest-even on both, so the codes and
//! scales are identical; scores differ only by fp32 summation order.

use super::fp8::{E4M3_MAX, e4m3_to_f32, f32_to_e4m3, ue8m0_ceil};

/// `1/√d` as f32: the one value both the CPU and the GPU multiply by.
pub fn inv_sqrt(d: usize) -> f32 {
    (1.0 / (d as f64).sqrt()) as f32
}

/// In-place normalised fast Walsh–Hadamard transform; `v.len()` must be a power of two.
pub fn hadamard_rotate(v: &mut [f32]) {
    let d = v.len();
    assert!(d.is_power_of_two(), "hadamard_rotate: length {d} is not a power of two");
    let mut h = 1;
    while h < d {
        for i in (0..d).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (v[j], v[j + h]);
                v[j] = a + b;
                v[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = inv_sqrt(d);
    for x in v.iter_mut() {
        *x *= s;
    }
}

/// Rotates each `dim`-vector of `x` and quantises it: returns (e4m3 codes `[n, dim]`, scales
/// `[n]`).
pub fn rotate_quant_fp8(x: &[f32], dim: usize) -> (Vec<u8>, Vec<f32>) {
    assert!(dim > 0 && x.len() % dim == 0, "rotate_quant_fp8: x is not [n, {dim}]");
    let mut codes = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / dim);
    let mut v = vec![0f32; dim];
    for row in x.chunks_exact(dim) {
        v.copy_from_slice(row);
        hadamard_rotate(&mut v);
        let amax = v.iter().fold(0f32, |m, a| m.max(a.abs()));
        let s = ue8m0_ceil(amax.max(1e-4) / E4M3_MAX);
        codes.extend(v.iter().map(|a| f32_to_e4m3(a / s)));
        scales.push(s);
    }
    (codes, scales)
}

/// Scores of `n` quantised keys (`k8 [n, dim]`, `sk [n]`) for one quantised query (`q8 [heads,
/// dim]`, `sq [heads]`) with head weights `w [heads]`, into `out [n]`.
#[allow(clippy::too_many_arguments)]
pub fn indexer_scores_fp8(
    q8: &[u8],
    sq: &[f32],
    w: &[f32],
    k8: &[u8],
    sk: &[f32],
    heads: usize,
    dim: usize,
    out: &mut [f32],
) {
    assert_eq!(q8.len(), heads * dim, "indexer_scores_fp8: q is not [{heads}, {dim}]");
    assert_eq!(sq.len(), heads, "indexer_scores_fp8: sq is not [{heads}]");
    assert_eq!(w.len(), heads, "indexer_scores_fp8: w is not [{heads}]");
    assert_eq!(k8.len(), sk.len() * dim, "indexer_scores_fp8: keys are not [n, {dim}]");
    assert_eq!(out.len(), sk.len(), "indexer_scores_fp8: out is not [n_keys]");
    let qf: Vec<f32> = q8.iter().map(|&b| e4m3_to_f32(b)).collect();
    for (s, k) in k8.chunks_exact(dim).enumerate() {
        let kf: Vec<f32> = k.iter().map(|&b| e4m3_to_f32(b)).collect();
        let mut acc = 0f32;
        for h in 0..heads {
            let d: f32 = qf[h * dim..(h + 1) * dim].iter().zip(&kf).map(|(a, b)| a * b).sum();
            acc += w[h] * sq[h] * d.max(0.0);
        }
        out[s] = acc * sk[s];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::indexer::indexer_scores;
    use crate::cpu::testutil::rand_vec;

    #[test]
    fn hadamard_is_orthonormal_and_natural_order() {
        // H_4 (Sylvester, natural order) rows: ++++, +-+-, ++--, +--+.
        let mut e1 = [0.0, 1.0, 0.0, 0.0];
        hadamard_rotate(&mut e1);
        assert_eq!(e1, [0.5, -0.5, 0.5, -0.5]);
        let x = rand_vec(128, 4);
        let mut y = x.clone();
        hadamard_rotate(&mut y);
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n(&x) - n(&y)).abs() < 1e-4 * n(&x));
        hadamard_rotate(&mut y); // H·H = I for the normalised matrix
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn quantised_scores_track_the_f32_indexer() {
        let (heads, dim, n) = (8, 64, 50);
        let q = rand_vec(heads * dim, 5);
        let w: Vec<f32> = rand_vec(heads, 6).iter().map(|v| v.abs() + 0.1).collect();
        let k = rand_vec(n * dim, 7);
        let mut exact = vec![0f32; n];
        indexer_scores(&q, &w, &k, heads, dim, &mut exact);
        let (q8, sq) = rotate_quant_fp8(&q, dim);
        let (k8, sk) = rotate_quant_fp8(&k, dim);
        assert!(sq.iter().chain(&sk).all(|s| s.log2().fract() == 0.0), "ue8m0 scales");
        let mut got = vec![0f32; n];
        indexer_scores_fp8(&q8, &sq, &w, &k8, &sk, heads, dim, &mut got);
        let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // e4m3 keeps 3 mantissa bits (≈ 6 % per element); dot products over 64 dims average it.
        assert!(worst < 0.1 * scale, "fp8 scores off by {worst} (scale {scale})");
    }
}
