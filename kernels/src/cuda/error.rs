//! [`CudaError`]: every failure of the CUDA backend, one line each, naming what went wrong.

use std::path::PathBuf;

/// Errors of the CUDA backend. `Display` is one line.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A shared library cudarc needs is not loadable (not installed or not on the search path).
    #[error("CUDA library {lib} not found ({candidates}); {hint}")]
    LibraryMissing { lib: &'static str, candidates: String, hint: &'static str },
    /// An explicit library directory or file given by the caller could not be loaded.
    #[error("cannot load {path}: {reason}")]
    LibraryLoad { path: PathBuf, reason: String },
    /// The driver reports no device with this ordinal.
    #[error("no CUDA device {ordinal}: the driver reports {count} device(s)")]
    NoDevice { ordinal: usize, count: usize },
    /// A CUDA driver call failed.
    #[error("CUDA driver call {op} failed: {source}")]
    Driver { op: &'static str, source: cudarc::driver::DriverError },
    /// NVRTC rejected a kernel source (the log holds the compiler's messages).
    #[error("NVRTC failed to compile {kernel} for {arch}: {log}")]
    Compile { kernel: &'static str, arch: String, log: String },
    /// An NVRTC call other than compilation failed.
    #[error("NVRTC call {op} failed: {status}")]
    Nvrtc { op: &'static str, status: String },
    /// A kernel cache file could not be read or written.
    #[error("kernel cache {path}: {source}")]
    Cache { path: PathBuf, source: std::io::Error },
    /// A cuBLAS or cuBLASLt call failed.
    #[error("{op} failed: {status}")]
    Blas { op: &'static str, status: String },
    /// An NCCL call failed.
    #[error("NCCL {op} failed: {status}")]
    Nccl { op: &'static str, status: String },
    /// An op was called with arguments whose shapes do not fit.
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
}

impl CudaError {
    pub(crate) fn driver(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Self {
        move |source| CudaError::Driver { op, source }
    }

    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        CudaError::Shape { op, detail: detail.into() }
    }
}
