//! Rotary position embedding with precomputed (YaRN) frequencies, in the two pairings
//! DeepSeek-V3.2 uses (spec §2.2):
//! - MLA: interleaved pairs `(x[2i], x[2i+1])`, rotated in place;
//! - indexer: half-split pairs `(x[i], x[i + d/2])`, layout [real half | imaginary half].
//!
//! Angles are formed as `p · f` in f32 (as the reference and HF do) and cos/sin are evaluated
//! accurately; `attention_factor` multiplies cos and sin (HF's YaRN attention factor, 1 for
//! DeepSeek-V3.2).

/// cos and sin tables `[positions.len(), freqs.len()]`: `cos(p·f_i)·a`, `sin(p·f_i)·a`.
pub fn rope_cos_sin(
    freqs: &[f32],
    attention_factor: f32,
    positions: &[usize],
) -> (Vec<f32>, Vec<f32>) {
    let half = freqs.len();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in freqs {
            let angle = p as f32 * f;
            cos.push((angle as f64).cos() as f32 * attention_factor);
            sin.push((angle as f64).sin() as f32 * attention_factor);
        }
    }
    (cos, sin)
}

fn check(
    x: &[f32],
    tokens: usize,
    heads: usize,
    head_dim: usize,
    offset: usize,
    cos: &[f32],
    sin: &[f32],
) -> usize {
    assert_eq!(
        x.len(),
        tokens * heads * head_dim,
        "rope: x is not [{tokens}, {heads}, {head_dim}]"
    );
    assert_eq!(cos.len(), sin.len(), "rope: cos and sin differ in length");
    assert!(tokens > 0 && cos.len() % tokens == 0, "rope: cos is not [{tokens}, half]");
    let half = cos.len() / tokens;
    assert!(
        offset + 2 * half <= head_dim,
        "rope: rope slice [{offset}, +{}) exceeds head dim {head_dim}",
        2 * half
    );
    half
}

/// Interleaved RoPE on `x[t, h, offset .. offset + 2·half]` of `x` (`[tokens, heads, head_dim]`),
/// with `cos`/`sin` `[tokens, half]` from [`rope_cos_sin`].
pub fn rope_interleaved(
    x: &mut [f32],
    tokens: usize,
    heads: usize,
    head_dim: usize,
    offset: usize,
    cos: &[f32],
    sin: &[f32],
) {
    if x.is_empty() {
        return;
    }
    let half = check(x, tokens, heads, head_dim, offset, cos, sin);
    for t in 0..tokens {
        let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
        for h in 0..heads {
            let v = &mut x[(t * heads + h) * head_dim + offset..][..2 * half];
            for i in 0..half {
                let (a, b) = (v[2 * i], v[2 * i + 1]);
                v[2 * i] = a * c[i] - b * s[i];
                v[2 * i + 1] = b * c[i] + a * s[i];
            }
        }
    }
}

/// Half-split RoPE (pairs `(i, i + half)`) on `x[t, h, offset .. offset + 2·half]`.
pub fn rope_half_split(
    x: &mut [f32],
    tokens: usize,
    heads: usize,
    head_dim: usize,
    offset: usize,
    cos: &[f32],
    sin: &[f32],
) {
    if x.is_empty() {
        return;
    }
    let half = check(x, tokens, heads, head_dim, offset, cos, sin);
    for t in 0..tokens {
        let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
        for h in 0..heads {
            let v = &mut x[(t * heads + h) * head_dim + offset..][..2 * half];
            for i in 0..half {
                let (a, b) = (v[i], v[i + half]);
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i] + a * s[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, rand_vec};

    #[test]
    fn layouts_rotate_the_right_pairs_and_preserve_norm() {
        let freqs = [1.0f32, 0.1];
        let (cos, sin) = rope_cos_sin(&freqs, 1.0, &[3]);
        // head_dim 6, rope slice at offset 2 (4 dims).
        let x = rand_vec(6, 9);
        let mut a = x.clone();
        rope_interleaved(&mut a, 1, 1, 6, 2, &cos, &sin);
        let mut b = x.clone();
        rope_half_split(&mut b, 1, 1, 6, 2, &cos, &sin);
        assert_eq!(&a[..2], &x[..2]);
        assert_eq!(&b[..2], &x[..2]);
        for i in 0..2 {
            let th = 3.0 * freqs[i];
            let (c, s) = (th.cos(), th.sin());
            // interleaved pair (2+2i, 3+2i)
            let (p, q) = (x[2 + 2 * i], x[3 + 2 * i]);
            assert!((a[2 + 2 * i] - (p * c - q * s)).abs() < 1e-6);
            assert!((a[3 + 2 * i] - (q * c + p * s)).abs() < 1e-6);
            // half-split pair (2+i, 4+i)
            let (p, q) = (x[2 + i], x[4 + i]);
            assert!((b[2 + i] - (p * c - q * s)).abs() < 1e-6);
            assert!((b[4 + i] - (q * c + p * s)).abs() < 1e-6);
        }
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!((n(&a) - n(&x)).abs() < 1e-5 && (n(&b) - n(&x)).abs() < 1e-5);
    }

    #[test]
    fn relative_position_property_and_attention_factor() {
        // q(p)·k(s) depends only on p - s.
        let freqs = [0.7f32, 0.05, 0.001];
        let q = rand_vec(6, 1);
        let k = rand_vec(6, 2);
        let score = |p: usize, s: usize| {
            let (cq, sq) = rope_cos_sin(&freqs, 1.0, &[p]);
            let (ck, sk) = rope_cos_sin(&freqs, 1.0, &[s]);
            let mut a = q.clone();
            let mut b = k.clone();
            rope_half_split(&mut a, 1, 1, 6, 0, &cq, &sq);
            rope_half_split(&mut b, 1, 1, 6, 0, &ck, &sk);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((score(10, 4) - score(16, 10)).abs() < 1e-4);
        let (c1, s1) = rope_cos_sin(&freqs, 1.0, &[5, 6]);
        let (c2, s2) = rope_cos_sin(&freqs, 2.0, &[5, 6]);
        assert_close(&c2, &c1.iter().map(|v| 2.0 * v).collect::<Vec<_>>(), 1e-6);
        assert_close(&s2, &s1.iter().map(|v| 2.0 * v).collect::<Vec<_>>(), 1e-6);
    }
}
