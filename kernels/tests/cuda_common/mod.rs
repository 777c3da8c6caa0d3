//! Shared helpers of the `cuda_*` integration tests: finding the CUDA libraries, opening a GPU
//! or saying SKIP loudly, deterministic random inputs, and the CPU references.
//!
//! SKIP lines go straight to the process's stderr (not through the test harness's capture), so
//! they show in every run; `scripts/gpu.sh`'s runner fails a GPU machine run that prints one.
#![allow(dead_code)]

pub mod reference;

use std::io::Write;
use std::path::PathBuf;

use fathom_kernels::cuda::{CudaDevice, CudaError, DeviceOptions};

/// Prints `SKIP: <test>: <reason>` on the real stderr.
pub fn skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr().lock(), "SKIP: {test}: {reason}");
}

/// Library directories for the tests: `FATHOM_CUDA_LIB_DIRS` (colon-separated), else none (the
/// loader's search path, which the GPU runner sets).
pub fn lib_dirs() -> Vec<PathBuf> {
    std::env::var_os("FATHOM_CUDA_LIB_DIRS")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default()
}

/// Opens GPU 0 with a fresh kernel cache, or prints SKIP and returns `None` where this machine
/// has no driver or no GPU. Any other failure (a GPU that does not open) panics: that is a bug.
pub fn gpu(test: &str) -> Option<(CudaDevice, tempfile::TempDir)> {
    let dirs = lib_dirs();
    match CudaDevice::count(&dirs) {
        Ok(0) => {
            skip(test, "the CUDA driver reports no GPU");
            return None;
        }
        Err(e @ CudaError::LibraryMissing { .. }) => {
            skip(test, &format!("no CUDA driver: {e}"));
            return None;
        }
        Err(e) => panic!("{test}: counting devices failed: {e}"),
        Ok(_) => {}
    }
    let cache = tempfile::tempdir().expect("temp dir");
    let opts = DeviceOptions {
        ordinal: 0,
        lib_dirs: dirs,
        kernel_cache: Some(cache.path().to_path_buf()),
    };
    let dev = CudaDevice::open(&opts).unwrap_or_else(|e| panic!("{test}: opening GPU 0: {e}"));
    Some((dev, cache))
}

/// SplitMix64: deterministic, seedable, no dependencies.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    /// `n` values uniform in [-scale, scale), rounded to bf16 (so host and device agree).
    pub fn bf16_vec(&mut self, n: usize, scale: f32) -> Vec<half::bf16> {
        (0..n).map(|_| half::bf16::from_f32(self.uniform(-scale, scale))).collect()
    }

    /// `n` random finite e4m3 bit patterns (never NaN: 0x7F/0xFF excluded).
    pub fn e4m3_vec(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                loop {
                    let b = (self.next_u64() & 0xff) as u8;
                    if b & 0x7f != 0x7f {
                        break b;
                    }
                }
            })
            .collect()
    }
}

pub fn to_f32(v: &[half::bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// ‖a − b‖ / ‖b‖ in f64; NaN anywhere gives infinity.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        num += (f64::from(x) - f64::from(y)).powi(2);
        den += f64::from(y).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}
