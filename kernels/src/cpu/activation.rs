//! Softmax over rows and the SwiGLU activation `SiLU(gate) ⊙ up`.

/// In-place softmax over each row of `x` (`[rows, cols]`). `−∞` entries get probability 0; a
/// row that is entirely `−∞` becomes all zeros (never NaN).
pub fn softmax_rows(x: &mut [f32], cols: usize) {
    assert!(cols > 0 && x.len() % cols == 0, "softmax_rows: x is not [rows, {cols}]");
    for row in x.chunks_exact_mut(cols) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// `x·σ(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `out[i] = SiLU(gate[i]) · up[i]`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: gate and up differ in length");
    assert_eq!(gate.len(), out.len(), "silu_mul: out differs in length");
    for i in 0..out.len() {
        out[i] = silu(gate[i]) * up[i];
    }
}

/// `1 / (1 + e^−x)`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_handles_masks() {
        let mut x = vec![1.0, 2.0, f32::NEG_INFINITY, 0.5, f32::NEG_INFINITY, f32::NEG_INFINITY];
        softmax_rows(&mut x, 3);
        let s: f32 = x[..3].iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert_eq!(x[2], 0.0);
        let e1 = 1f32.exp();
        let e2 = 2f32.exp();
        assert!((x[1] - e2 / (e1 + e2)).abs() < 1e-6);
        assert_eq!(&x[3..], &[1.0, 0.0, 0.0]);
        let mut all_masked = vec![f32::NEG_INFINITY; 4];
        softmax_rows(&mut all_masked, 4);
        assert_eq!(all_masked, vec![0.0; 4]);
    }

    #[test]
    fn silu_mul_matches_definition() {
        let g = [-2.0f32, 0.0, 1.5];
        let u = [3.0f32, 4.0, -1.0];
        let mut o = [0.0; 3];
        silu_mul(&g, &u, &mut o);
        for i in 0..3 {
            let want = g[i] / (1.0 + (-g[i]).exp()) * u[i];
            assert!((o[i] - want).abs() < 1e-6);
        }
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
    }
}
