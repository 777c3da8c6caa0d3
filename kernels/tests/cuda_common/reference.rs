//! Naive CPU references for the CUDA parity tests.
//!
//! These stand in for `fathom_kernels::cpu` until its ops are merged; each function here is
//! the one line to swap for the CPU op of the same name.

/// RMSNorm in f64: `y = w ⊙ x / sqrt(mean(x²) + eps)`. x: [rows, dim].
pub fn rmsnorm(x: &[f32], w: &[f32], rows: usize, dim: usize, eps: f32) -> Vec<f32> {
    let mut y = vec![0f32; rows * dim];
    for r in 0..rows {
        let row = &x[r * dim..(r + 1) * dim];
        let ms = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / dim as f64;
        let inv = 1.0 / (ms + f64::from(eps)).sqrt();
        for i in 0..dim {
            y[r * dim + i] = (f64::from(row[i]) * inv * f64::from(w[i])) as f32;
        }
    }
    y
}

/// Decodes e4m3fn bits.
pub fn e4m3(bits: u8) -> f32 {
    float8::F8E4M3::from_bits(bits).to_f32()
}

/// ue8m0 activation quantisation (spec §4.3): per row and 128-group, amax = max(|x|, 1e-4),
/// s = 2^ceil(log2(amax / 448)), q = e4m3(clamp(x / s, ±448)).
/// Returns (q bits [rows, k], scales [rows, k/128] row-major).
pub fn act_quant(x: &[f32], rows: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let groups = k / 128;
    let mut q = vec![0u8; rows * k];
    let mut s = vec![0f32; rows * groups];
    for r in 0..rows {
        for g in 0..groups {
            let base = r * k + g * 128;
            let amax = x[base..base + 128].iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-4);
            let ratio = amax / 448.0;
            let scale = 2f64.powi((f64::from(ratio)).log2().ceil() as i32) as f32;
            s[r * groups + g] = scale;
            for i in 0..128 {
                let v = (x[base + i] / scale).clamp(-448.0, 448.0);
                q[base + i] = float8::F8E4M3::from_f32(v).to_bits();
            }
        }
    }
    (q, s)
}

/// Block dequantisation: `w[i, j] · s[i/128, j/128]`. w: [n, k] e4m3 bits.
pub fn dequant(w: &[u8], s: &[f32], n: usize, k: usize) -> Vec<f32> {
    let kb = k.div_ceil(128);
    (0..n * k).map(|i| e4m3(w[i]) * s[(i / k / 128) * kb + (i % k) / 128]).collect()
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ` accumulated in f64.
pub fn matmul_nt(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            y[i * n + j] =
                xr.iter().zip(wr).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() as f32;
        }
    }
    y
}
