//! The CUDA C++ kernel sources, embedded at build time, and their kernel names.
//!
//! Each source is compiled as `PRELUDE + source` (one NVRTC program per source). Adding a `.cu`
//! file means adding it to [`ALL`]; the NVRTC test compiles every entry.

/// Helpers prepended to every source (bf16/e4m3 bit conversions, warp reductions).
pub const PRELUDE: &str = include_str!("../../cuda/prelude.cuh");

/// One CUDA C++ translation unit and the `extern "C"` kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// Short name, used in cache file names and error messages.
    pub name: &'static str,
    /// The source text (without the prelude).
    pub code: &'static str,
    /// Kernels the module must export.
    pub kernels: &'static [&'static str],
}

/// RMSNorm.
pub const NORM: KernelSource = KernelSource {
    name: "norm",
    code: include_str!("../../cuda/norm.cu"),
    kernels: &["rmsnorm_bf16", "rmsnorm_bf16_v8"],
};

/// FP8 activation quantisation and weight dequantisation.
pub const QUANT: KernelSource = KernelSource {
    name: "quant",
    code: include_str!("../../cuda/quant.cu"),
    kernels: &["act_quant_fp8", "dequant_fp8_block", "dequant_fp8_block_v16"],
};

/// Pseudo-random device fills (benchmarks).
pub const FILL: KernelSource = KernelSource {
    name: "fill",
    code: include_str!("../../cuda/fill.cu"),
    kernels: &["fill_uniform_bf16", "fill_uniform_e4m3", "fill_uniform_f32", "copy_16b"],
};

/// Every source, in load order.
pub const ALL: &[KernelSource] = &[NORM, QUANT, FILL];
