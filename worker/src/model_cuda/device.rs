//! Where a model runs: [`DeviceChoice`] (`cpu` or `cuda[:N]`, the `--device` flag of `fathom
//! worker` and `fathom generate`), opening the GPU with errors that fit one line (a machine
//! without the driver or libraries gets "no CUDA driver ..." — never a cudarc panic), and the
//! precision an f32 or lower-precision checkpoint runs at on the GPU ([`precision_for`]).

use std::path::PathBuf;
use std::sync::Arc;

use fathom_kernels::cuda::{CudaDevice, CudaError, DeviceOptions};
use safetensors::Dtype;

use super::Precision;
use crate::weights::CheckpointReader;

/// `cpu` or `cuda[:N]` (N = device ordinal, default 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("device {s:?}: expected cpu, cuda or cuda:N")),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Why a GPU could not be opened, in one line.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("--device cuda:{ordinal}: no CUDA driver or library on this machine ({detail})")]
    NoDriver { ordinal: usize, detail: String },
    #[error("--device cuda:{ordinal}: this machine has {count} GPU(s)")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error("--device cuda:{ordinal}: {source}")]
    Cuda { ordinal: usize, source: CudaError },
}

/// Opens GPU `ordinal`, loading CUDA libraries from `lib_dirs` first (empty: the loader's search
/// path) and caching compiled kernels in `kernel_cache`.
pub fn open_gpu(
    ordinal: usize,
    lib_dirs: Vec<PathBuf>,
    kernel_cache: Option<PathBuf>,
) -> Result<Arc<CudaDevice>, OpenError> {
    let count = match CudaDevice::count(&lib_dirs) {
        Ok(n) => n,
        Err(e @ CudaError::LibraryMissing { .. }) => {
            return Err(OpenError::NoDriver { ordinal, detail: e.to_string() });
        }
        Err(source) => return Err(OpenError::Cuda { ordinal, source }),
    };
    if ordinal >= count {
        return Err(OpenError::NoSuchDevice { ordinal, count });
    }
    let opts = DeviceOptions { ordinal, lib_dirs, kernel_cache };
    CudaDevice::open(&opts).map(Arc::new).map_err(|source| OpenError::Cuda { ordinal, source })
}

/// The GPU precision for a checkpoint: f32 checkpoints run in f32 (as the CPU reference and HF
/// do), anything else (bf16, FP8) in bf16.
pub fn precision_for(reader: &CheckpointReader) -> Precision {
    match reader.stored("model.embed_tokens.weight").map(|t| t.dtype) {
        Some(Dtype::F32) => Precision::F32,
        _ => Precision::Bf16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_flag_parses() {
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:1".parse(), Ok(DeviceChoice::Cuda(1)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda1", ""] {
            let e = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        assert_eq!(DeviceChoice::Cuda(3).to_string(), "cuda:3");
    }
}
