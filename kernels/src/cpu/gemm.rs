//! GEMM `y = x · Wᵀ` with W stored `[out, in]` as in checkpoints: the hot op of the model.
//!
//! Multi-threaded over output-feature blocks (rayon); inside a block, a 1×4 micro-kernel with
//! 8-lane accumulators (vectorizable without float reassociation) reuses each loaded `x` value
//! for four weight rows, and the weight block stays in cache while every row of `x` passes.
//! Accumulation is f32; the summation order differs from a naive loop, so results agree with one
//! to rounding, not bit for bit.

use rayon::prelude::*;

const LANES: usize = 8;
/// Weight rows per micro-kernel.
const NR: usize = 4;

/// `y[m, n] = Σ_k x[m, k] · w[n, k]` — returns a new `[m, n]` buffer.
pub fn matmul_t(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0.0; m * n];
    matmul_t_into(x, w, &mut y, m, n, k);
    y
}

/// `y[m, n] = Σ_k x[m, k] · w[n, k]`, overwriting `y`.
pub fn matmul_t_into(x: &[f32], w: &[f32], y: &mut [f32], m: usize, n: usize, k: usize) {
    assert_eq!(x.len(), m * k, "matmul_t: x is not [{m}, {k}]");
    assert_eq!(w.len(), n * k, "matmul_t: w is not [{n}, {k}]");
    assert_eq!(y.len(), m * n, "matmul_t: y is not [{m}, {n}]");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        y.fill(0.0);
        return;
    }
    // Output-feature blocks: enough to feed every thread a few times, a multiple of NR, and
    // small enough (≤ ~256 KiB of weights) to stay in L2 while all rows of x pass over it.
    let threads = rayon::current_num_threads().max(1);
    let by_threads = n.div_ceil(threads * 4);
    let by_cache = (256 * 1024 / (4 * k)).max(NR);
    let nb = by_threads.min(by_cache).max(NR).div_ceil(NR) * NR;
    let work = m * n * k;
    if work < 1 << 16 || n <= nb {
        block(x, w, y, m, n, k, 0, n);
        return;
    }
    let parts: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(nb))
        .into_par_iter()
        .map(|b| {
            let n0 = b * nb;
            let n1 = (n0 + nb).min(n);
            let mut part = vec![0.0; m * (n1 - n0)];
            block(x, w, &mut part, m, n1 - n0, k, n0, n1);
            (n0, part)
        })
        .collect();
    for (n0, part) in parts {
        let width = part.len() / m;
        for r in 0..m {
            y[r * n + n0..r * n + n0 + width].copy_from_slice(&part[r * width..(r + 1) * width]);
        }
    }
}

/// Computes output features `[n0, n1)` for all `m` rows into `out` (`[m, n1 - n0]`, row stride
/// `ld`).
fn block(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    ld: usize,
    k: usize,
    n0: usize,
    n1: usize,
) {
    let mut j = n0;
    while j + NR <= n1 {
        let ws = [
            &w[j * k..(j + 1) * k],
            &w[(j + 1) * k..(j + 2) * k],
            &w[(j + 2) * k..(j + 3) * k],
            &w[(j + 3) * k..(j + 4) * k],
        ];
        for r in 0..m {
            let d = dot4(&x[r * k..(r + 1) * k], ws);
            out[r * ld + (j - n0)..r * ld + (j - n0) + NR].copy_from_slice(&d);
        }
        j += NR;
    }
    while j < n1 {
        let wr = &w[j * k..(j + 1) * k];
        for r in 0..m {
            out[r * ld + (j - n0)] = dot(&x[r * k..(r + 1) * k], wr);
        }
        j += 1;
    }
}

/// Four dot products of `a` against four rows.
#[inline]
fn dot4(a: &[f32], ws: [&[f32]; NR]) -> [f32; NR] {
    let k = a.len();
    let mut acc = [[0.0f32; LANES]; NR];
    let full = k / LANES * LANES;
    let mut i = 0;
    while i < full {
        let av = &a[i..i + LANES];
        for (q, wr) in ws.iter().enumerate() {
            let wv = &wr[i..i + LANES];
            for l in 0..LANES {
                acc[q][l] += av[l] * wv[l];
            }
        }
        i += LANES;
    }
    let mut out = [0.0; NR];
    for q in 0..NR {
        let mut s = acc[q].iter().sum::<f32>();
        for t in full..k {
            s += a[t] * ws[q][t];
        }
        out[q] = s;
    }
    out
}

/// One dot product with 8-lane accumulation.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let k = a.len();
    let mut acc = [0.0f32; LANES];
    let full = k / LANES * LANES;
    let mut i = 0;
    while i < full {
        for l in 0..LANES {
            acc[l] += a[i + l] * b[i + l];
        }
        i += LANES;
    }
    let mut s = acc.iter().sum::<f32>();
    for t in full..k {
        s += a[t] * b[t];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, rand_vec};

    fn naive(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0; m * n];
        for r in 0..m {
            for c in 0..n {
                let mut s = 0.0f64;
                for i in 0..k {
                    s += x[r * k + i] as f64 * w[c * k + i] as f64;
                }
                y[r * n + c] = s as f32;
            }
        }
        y
    }

    #[test]
    fn matches_naive_over_odd_and_parallel_shapes() {
        for &(m, n, k) in
            &[(1, 1, 1), (3, 5, 7), (1, 37, 19), (5, 130, 33), (7, 1031, 67), (2, 4096, 24)]
        {
            let x = rand_vec(m * k, 1 + m as u64);
            let w = rand_vec(n * k, 2 + n as u64);
            let y = matmul_t(&x, &w, m, n, k);
            assert_close(&y, &naive(&x, &w, m, n, k), 1e-5);
        }
    }

    #[test]
    fn zero_k_gives_zeros() {
        let mut y = vec![1.0; 6];
        matmul_t_into(&[], &[], &mut y, 2, 3, 0);
        assert!(y.iter().all(|&v| v == 0.0));
    }
}
