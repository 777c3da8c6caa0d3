//! RMSNorm and LayerNorm (with bias) over the last dimension, computed in f32.

/// `out[r] = w ⊙ x[r] / sqrt(mean(x[r]²) + eps)` for each row of `x` (`[rows, dim]`).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, dim: usize, out: &mut [f32]) {
    assert_eq!(w.len(), dim, "rms_norm: weight is not [{dim}]");
    assert!(dim > 0 && x.len() % dim == 0, "rms_norm: x is not [rows, {dim}]");
    assert_eq!(out.len(), x.len(), "rms_norm: out and x differ in length");
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for i in 0..dim {
            or[i] = w[i] * (xr[i] * inv);
        }
    }
}

/// [`rms_norm`] returning a new buffer.
pub fn rms_norm_new(x: &[f32], w: &[f32], eps: f32, dim: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    rms_norm(x, w, eps, dim, &mut out);
    out
}

/// `out[r] = (x[r] − mean) / sqrt(var + eps) ⊙ w + b` per row (biased variance, as torch).
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, dim: usize, out: &mut [f32]) {
    assert_eq!(w.len(), dim, "layer_norm: weight is not [{dim}]");
    assert_eq!(b.len(), dim, "layer_norm: bias is not [{dim}]");
    assert!(dim > 0 && x.len() % dim == 0, "layer_norm: x is not [rows, {dim}]");
    assert_eq!(out.len(), x.len(), "layer_norm: out and x differ in length");
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mean = xr.iter().sum::<f32>() / dim as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / dim as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for i in 0..dim {
            or[i] = (xr[i] - mean) * inv * w[i] + b[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, rand_vec};

    #[test]
    fn rms_norm_matches_definition() {
        let (rows, dim) = (3, 10);
        let x = rand_vec(rows * dim, 3);
        let w = rand_vec(dim, 4);
        let y = rms_norm_new(&x, &w, 1e-6, dim);
        for r in 0..rows {
            let xr = &x[r * dim..(r + 1) * dim];
            let rms =
                (xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / dim as f64 + 1e-6).sqrt();
            let want: Vec<f32> =
                (0..dim).map(|i| (w[i] as f64 * xr[i] as f64 / rms) as f32).collect();
            assert_close(&y[r * dim..(r + 1) * dim], &want, 1e-5);
        }
    }

    #[test]
    fn layer_norm_output_has_zero_mean_unit_variance_before_affine() {
        let dim = 16;
        let x = rand_vec(2 * dim, 5);
        let ones = vec![1.0; dim];
        let zeros = vec![0.0; dim];
        let mut y = vec![0.0; 2 * dim];
        layer_norm(&x, &ones, &zeros, 1e-6, dim, &mut y);
        for r in y.chunks(dim) {
            let mean: f32 = r.iter().sum::<f32>() / dim as f32;
            let var: f32 = r.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / dim as f32;
            assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3, "{mean} {var}");
        }
        let w = rand_vec(dim, 6);
        let b = rand_vec(dim, 7);
        let mut z = vec![0.0; 2 * dim];
        layer_norm(&x, &w, &b, 1e-6, dim, &mut z);
        for i in 0..2 * dim {
            assert!((z[i] - (y[i] * w[i % dim] + b[i % dim])).abs() < 1e-5);
        }
    }
}
