//! CUDA backend: device, run-time compiled kernels, cuBLAS/cuBLASLt GEMMs, NCCL.
//!
//! Owns: opening a GPU through cudarc with every CUDA library loaded at run time (the binary
//! links none of them), compiling the CUDA C++ of `kernels/cuda/` with NVRTC for the device's
//! architecture (cached on disk), the device ops (RMSNorm, FP8 quantisation, and every op of the
//! CPU set: embedding, LayerNorm, RoPE, SiLU·mul, router, indexer, top-k, sparse MLA decode, MoE
//! permutation/experts/combine, argmax), bf16 and FP8 block-scaled GEMMs, and raw NCCL communicators.
//!
//! Does not own: model structure, weight loading, the `Collective` trait (kernels::comm), or
//! where library and cache directories come from (the binary's `main` passes them in; nothing
//! here reads environment variables).
//!
//! Invariants: every library is probed with `is_culib_present()` before cudarc touches it (a
//! missing library would panic inside cudarc), so a machine without a GPU gets a one-line
//! [`CudaError`] instead. All work of one [`CudaDevice`] is issued on its one stream, in order.
//! Device buffers hold raw bits: bf16 as `half::bf16`, e4m3 as `u8`.

mod device;
mod error;
mod gemm;
mod libs;
pub mod nccl;
pub use nccl::{NcclComm, NcclUniqueId};
mod nvrtc;
mod ops;
mod ops_attn;
mod ops_model;
mod ops_moe;
mod ops_select;
pub mod sources;

pub use cudarc;
pub use device::{CudaDevice, DeviceInfo, DeviceOptions};
pub use error::CudaError;
pub use gemm::{
    ActScaleLayout, BlasGemm, Fp8Gemm, GroupedProblem, LtBf16Gemm, StridedGemm, WeightScaleLayout,
};
pub use libs::{CudaLib, PreloadedLibraries, preload_libraries, require_libraries};
pub use nvrtc::{KernelCache, compile_cubin, nvrtc_version};
pub use ops::{Ops, grid_stride};
pub use ops_attn::MlaDecodeShape;
pub use ops_model::{RopeLayout, RopeShape};
pub use ops_moe::{MoeScratch, MoeShape, moe_experts_bf16};
pub use sources::KernelSource;
