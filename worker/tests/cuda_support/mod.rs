//! Shared set-up of the worker's GPU test binaries (`cuda_model_*`): finding GPUs (or printing
//! `SKIP:` loudly on the real stderr — the GPU runner fails on any SKIP except "needs N GPUs"),
//! the golden fixtures, reading a fixture checkpoint, greedy argmax.
#![allow(dead_code)]

use fathom_kernels::Tensor;
use fathom_kernels::cuda::{CudaDevice, CudaError, DeviceOptions};
use fathom_worker::weights::MemorySource;
use safetensors::{Dtype, SafeTensors};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Prints `SKIP: <test>: <reason>` past the test harness's capture.
pub fn skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr().lock(), "SKIP: {test}: {reason}");
}

/// `FATHOM_CUDA_LIB_DIRS` (colon-separated), where the runner points at the CUDA wheels.
pub fn lib_dirs() -> Vec<PathBuf> {
    std::env::var_os("FATHOM_CUDA_LIB_DIRS")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default()
}

/// GPUs 0 .. n, opened, or SKIP (no driver, no GPU, or fewer than `n`: "needs n GPUs, found m").
pub fn gpus(test: &str, n: usize) -> Option<Vec<Arc<CudaDevice>>> {
    let dirs = lib_dirs();
    let found = match CudaDevice::count(&dirs) {
        Ok(found) => found,
        Err(e @ CudaError::LibraryMissing { .. }) => {
            skip(test, &format!("no CUDA device: {e}"));
            return None;
        }
        Err(e) => panic!("{test}: counting devices failed: {e}"),
    };
    if found == 0 {
        skip(test, "no CUDA device: the driver reports no GPU");
        return None;
    }
    if found < n {
        skip(test, &format!("needs {n} GPUs, found {found}"));
        return None;
    }
    Some(
        (0..n)
            .map(|ordinal| {
                let opts = DeviceOptions { ordinal, lib_dirs: dirs.clone(), kernel_cache: None };
                Arc::new(
                    CudaDevice::open(&opts)
                        .unwrap_or_else(|e| panic!("{test}: opening GPU {ordinal}: {e}")),
                )
            })
            .collect(),
    )
}

/// GPU 0, or SKIP.
pub fn gpu(test: &str) -> Option<Arc<CudaDevice>> {
    gpus(test, 1).map(|mut v| v.remove(0))
}

/// `FATHOM_GOLDEN_DIR` (the GPU runner sets it: the binary runs far from its build tree), else
/// the workspace's `tests/fixtures/golden`.
pub fn fixtures() -> PathBuf {
    std::env::var_os("FATHOM_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden"))
}

/// A golden fixture's safetensors file (f32 or bf16 tensors) as an in-memory source.
pub fn read_source(path: &Path) -> MemorySource {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut src = MemorySource::new();
    for (name, v) in st.tensors() {
        let d = v.data();
        let data: Vec<f32> = match v.dtype() {
            Dtype::F32 => {
                d.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
            }
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => panic!("{name}: unsupported dtype {other:?} in a golden model"),
        };
        src.insert(name, Tensor::new(v.shape().to_vec(), data));
    }
    src
}

/// Index of the largest value (the first on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}
