//! CPU reference ops: f32 math, multi-threaded where it pays. The oracle for every backend.
//!
//! Owns the op set the model is written against, one module per family. Every op is a plain
//! function over slices with explicit dims (row-major), so a CUDA backend can implement the same
//! signatures over device buffers. Shape mismatches between arguments are programming errors and
//! panic with a message naming the op; user input is validated by the model before it gets here.
//!
//! Does not own: model structure, weights, caches or scheduling.

pub mod activation;
pub mod attention;
pub mod fp8;
pub mod gemm;
pub mod indexer;
pub mod indexer_fp8;
pub mod norm;
pub mod rope;
pub mod router;
pub mod topk;

#[cfg(test)]
pub(crate) mod testutil {
    /// Deterministic pseudo-random values in [-1, 1) (xorshift), for op tests.
    pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Asserts `|a - b| <= tol · max(1, |b|)` element-wise.
    pub fn assert_close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len(), "length mismatch");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * y.abs().max(1.0), "element {i}: {x} vs {y}");
        }
    }
}
