//! FP8 (e4m3fn) formats of DeepSeek-V3.2 (spec §4.2–§4.3):
//! - weights: e4m3 bytes with f32 block scales `[ceil(rows/br), ceil(cols/bc)]` that *multiply*
//!   (`weight_scale_inv`), partial edge blocks indexed by `row / br`;
//! - activations: per row, per group of 128 channels, `amax = max(|x|, 1e-4)`, scale
//!   `amax / 448` or, with ue8m0, `2^ceil(log2(amax / 448))` taken from the f32 bits; values
//!   clamped to ±448 and converted with saturation.

use float8::F8E4M3;

/// Largest finite e4m3fn value.
pub const E4M3_MAX: f32 = 448.0;

/// Decodes one e4m3fn byte.
#[inline]
pub fn e4m3_to_f32(b: u8) -> f32 {
    F8E4M3::from_bits(b).to_f32()
}

/// Encodes with saturation to ±448 (NaN stays NaN).
#[inline]
pub fn f32_to_e4m3(v: f32) -> u8 {
    F8E4M3::from_f32(v.clamp(-E4M3_MAX, E4M3_MAX)).to_bits()
}

/// `W[i, j] = e4m3(w[i, j]) · scale[i / br, j / bc]` for a `[rows, cols]` weight.
pub fn dequant_block_fp8(
    w: &[u8],
    scale: &[f32],
    rows: usize,
    cols: usize,
    block: [usize; 2],
) -> Vec<f32> {
    let [br, bc] = block;
    assert!(br > 0 && bc > 0, "dequant_block_fp8: zero block size");
    assert_eq!(w.len(), rows * cols, "dequant_block_fp8: weight is not [{rows}, {cols}]");
    let sc = cols.div_ceil(bc);
    assert_eq!(
        scale.len(),
        rows.div_ceil(br) * sc,
        "dequant_block_fp8: scale is not [{}, {sc}]",
        rows.div_ceil(br)
    );
    let lut: Vec<f32> = (0..=255u8).map(e4m3_to_f32).collect();
    let mut out = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        let srow = &scale[(i / br) * sc..(i / br + 1) * sc];
        for j in 0..cols {
            out.push(lut[w[i * cols + j] as usize] * srow[j / bc]);
        }
    }
    out
}

/// The power-of-two scale `2^ceil(log2(v))` for a positive normal `v`, from its bits (exact at
/// powers of two, where `log2f` + `ceilf` can be off by one).
#[inline]
pub fn ue8m0_ceil(v: f32) -> f32 {
    let bits = v.to_bits();
    let mut exp = ((bits >> 23) & 0xff) as i32 - 127;
    if bits & 0x7f_ffff != 0 {
        exp += 1;
    }
    (exp as f32).exp2()
}

/// Per-row, per-`group` activation quantization of `x` (`[rows, cols]`): returns the e4m3 bytes
/// (`[rows, cols]`) and scales (`[rows, ceil(cols / group)]`).
pub fn act_quant(x: &[f32], cols: usize, group: usize, ue8m0: bool) -> (Vec<u8>, Vec<f32>) {
    assert!(cols > 0 && group > 0 && x.len() % cols == 0, "act_quant: x is not [rows, {cols}]");
    let rows = x.len() / cols;
    let groups = cols.div_ceil(group);
    let mut q = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(rows * groups);
    for r in x.chunks_exact(cols) {
        for g in r.chunks(group) {
            let amax = g.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-4);
            let s = if ue8m0 { ue8m0_ceil(amax / E4M3_MAX) } else { amax / E4M3_MAX };
            q.extend(g.iter().map(|v| f32_to_e4m3(v / s)));
            scales.push(s);
        }
    }
    (q, scales)
}

/// Inverse of [`act_quant`]: `x[r, j] = e4m3(q[r, j]) · scale[r, j / group]`.
pub fn act_dequant(q: &[u8], scales: &[f32], cols: usize, group: usize) -> Vec<f32> {
    assert!(cols > 0 && q.len() % cols == 0, "act_dequant: q is not [rows, {cols}]");
    let groups = cols.div_ceil(group);
    assert_eq!(scales.len(), q.len() / cols * groups, "act_dequant: scales shape");
    q.iter()
        .enumerate()
        .map(|(i, &b)| e4m3_to_f32(b) * scales[(i / cols) * groups + (i % cols) / group])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::rand_vec;

    #[test]
    fn e4m3_known_values_and_saturation() {
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f32_to_e4m3(1000.0), 0x7e);
        assert_eq!(f32_to_e4m3(-1000.0), 0xfe);
        assert!(e4m3_to_f32(0x7f).is_nan());
        assert_eq!(e4m3_to_f32(f32_to_e4m3(0.5)), 0.5);
    }

    #[test]
    fn block_dequant_uses_partial_edge_blocks() {
        // [3, 5] with blocks [2, 2] → scales [2, 3].
        let w: Vec<u8> = (0..15).map(|_| 0x38).collect(); // all 1.0
        let scale = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0];
        let d = dequant_block_fp8(&w, &scale, 3, 5, [2, 2]);
        assert_eq!(&d[..5], &[1.0, 1.0, 2.0, 2.0, 4.0]);
        assert_eq!(&d[10..], &[8.0, 8.0, 16.0, 16.0, 32.0]);
    }

    #[test]
    fn ue8m0_is_exact_at_powers_of_two() {
        assert_eq!(ue8m0_ceil(1.0), 1.0);
        assert_eq!(ue8m0_ceil(0.25), 0.25);
        assert_eq!(ue8m0_ceil(0.3), 0.5);
        assert_eq!(ue8m0_ceil(1.0001), 2.0);
    }

    #[test]
    fn act_quant_round_trips_within_e4m3_precision() {
        let cols = 300; // 3 groups, last partial
        let x: Vec<f32> = rand_vec(2 * cols, 11).iter().map(|v| v * 5.0).collect();
        for ue8m0 in [false, true] {
            let (q, s) = act_quant(&x, cols, 128, ue8m0);
            assert_eq!(s.len(), 6);
            if ue8m0 {
                assert!(s.iter().all(|v| v.log2().fract() == 0.0));
            }
            let y = act_dequant(&q, &s, cols, 128);
            for (a, b) in x.iter().zip(&y) {
                // e4m3 has 3 mantissa bits: relative error ≤ 2^-4, plus subnormal floor.
                assert!((a - b).abs() <= a.abs() / 16.0 + 5.0 / 448.0 / 8.0, "{a} {b}");
            }
        }
        // Tiny blocks clamp amax at 1e-4 (no division by zero).
        let (q, s) = act_quant(&[0.0; 4], 4, 128, true);
        assert!(s[0] > 0.0 && q.iter().all(|&b| e4m3_to_f32(b) == 0.0));
    }
}
