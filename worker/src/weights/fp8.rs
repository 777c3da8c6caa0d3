//! DeepSeek's FP8 weight format (spec §4.2): e4m3fn elements with one fp32 scale per
//! `block[0] × block[1]` block, `W = fp8 · weight_scale_inv[i / b0, j / b1]` (the stored "inverse"
//! scale multiplies). Scales are ue8m0: the smallest power of two ≥ amax/448, amax clamped to
//! ≥ 1e-4 as the reference does (KERNELS.md pitfalls 3–5). Partial edge blocks (576 rows of
//! `kv_a_proj_with_mqa`) are quantized over the elements they have.
//!
//! Owns the element/scale arithmetic only; file layout lives in `st_write` / `reader`.

use float8::F8E4M3;

/// Largest finite e4m3fn value.
pub const E4M3_MAX: f32 = 448.0;

const fn build_lut() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = F8E4M3::from_bits(i as u8).to_f32();
        i += 1;
    }
    t
}

/// e4m3fn byte → f32 (0x7F/0xFF are NaN).
pub const E4M3_TO_F32: [f32; 256] = build_lut();

/// The ue8m0 scale of a block whose largest magnitude is `amax`: `2^ceil(log2(max(amax, 1e-4)
/// / 448))`, with the exponent taken from the f32 bits (exact at powers of two).
pub fn ue8m0_scale(amax: f32) -> f32 {
    let s = amax.max(1e-4) / E4M3_MAX;
    let bits = s.to_bits();
    let exp = (bits >> 23) & 0xff;
    let mantissa = bits & 0x7f_ffff;
    // s ≥ 1e-4/448 ≈ 2.2e-7 is a normal f32, so exp ≥ 1 and exp + 1 stays finite.
    let e = if mantissa == 0 { exp } else { exp + 1 };
    f32::from_bits(e << 23)
}

/// f32 → e4m3fn byte, saturating to ±448.
pub fn f32_to_e4m3(x: f32) -> u8 {
    F8E4M3::from_f32(x.clamp(-E4M3_MAX, E4M3_MAX)).to_bits()
}

/// Quantizes a row-major `[rows, cols]` slab whose first row is a multiple of `block[0]` of the
/// full weight (or its last, partial block). Returns the e4m3 bytes (`[rows, cols]`) and the
/// scales (`[ceil(rows/b0), ceil(cols/b1)]`, row-major).
pub fn quantize_blocks(
    values: &[f32],
    rows: usize,
    cols: usize,
    block: [usize; 2],
) -> (Vec<u8>, Vec<f32>) {
    assert_eq!(values.len(), rows * cols, "slab length");
    let (br, bc) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
    let mut scales = vec![0.0f32; br * bc];
    for (i, v) in values.iter().enumerate() {
        let s = &mut scales[(i / cols / block[0]) * bc + (i % cols) / block[1]];
        *s = s.max(v.abs());
    }
    for s in &mut scales {
        *s = ue8m0_scale(*s);
    }
    let bytes = values
        .iter()
        .enumerate()
        .map(|(i, v)| f32_to_e4m3(v / scales[(i / cols / block[0]) * bc + (i % cols) / block[1]]))
        .collect();
    (bytes, scales)
}

/// Inverse of [`quantize_blocks`] for a whole `[rows, cols]` matrix.
pub fn dequantize_blocks(
    bytes: &[u8],
    scales: &[f32],
    rows: usize,
    cols: usize,
    block: [usize; 2],
) -> Vec<f32> {
    let bc = cols.div_ceil(block[1]);
    debug_assert_eq!(scales.len(), rows.div_ceil(block[0]) * bc);
    bytes
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            E4M3_TO_F32[b as usize] * scales[(i / cols / block[0]) * bc + (i % cols) / block[1]]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ue8m0_is_the_next_power_of_two() {
        assert_eq!(ue8m0_scale(448.0), 1.0); // exact power of two stays
        assert_eq!(ue8m0_scale(448.5), 2.0);
        assert_eq!(ue8m0_scale(224.0), 0.5);
        assert_eq!(ue8m0_scale(300.0), 1.0);
        assert_eq!(ue8m0_scale(0.0), ue8m0_scale(1e-4)); // clamp
        assert_eq!(ue8m0_scale(1e-4), 2f32.powi(-22)); // 1e-4/448 = 2.23e-7 → 2^-22
        for a in [1e-3f32, 0.02, 0.7, 3.0, 1e4] {
            let s = ue8m0_scale(a);
            assert_eq!(s.to_bits() & 0x7f_ffff, 0, "{a}: power of two");
            assert!(a / s <= 448.0 && a / s > 224.0, "{a} / {s}");
        }
    }

    #[test]
    fn saturates_and_round_trips_partial_blocks() {
        assert_eq!(E4M3_TO_F32[f32_to_e4m3(1e9) as usize], 448.0);
        assert_eq!(E4M3_TO_F32[f32_to_e4m3(-1e9) as usize], -448.0);
        assert!(E4M3_TO_F32[0x7f].is_nan());
        // 5 × 3 with 2 × 2 blocks: partial last row and column blocks.
        let (rows, cols) = (5, 3);
        let vals: Vec<f32> = (0..15).map(|i| (i as f32 - 7.0) * 0.37).collect();
        let (q, s) = quantize_blocks(&vals, rows, cols, [2, 2]);
        assert_eq!(s.len(), 3 * 2);
        // The last row block holds one row (index 4): its scale comes from that row only.
        assert_eq!(s[4], ue8m0_scale(vals[12].abs().max(vals[13].abs())));
        let back = dequantize_blocks(&q, &s, rows, cols, [2, 2]);
        for (a, b) in vals.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() / 16.0 + 1e-6, "{a} vs {b}");
        }
    }
}
