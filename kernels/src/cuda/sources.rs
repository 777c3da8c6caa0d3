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

/// Embedding gather, LayerNorm with bias, RoPE (both layouts), SiLU·mul, greedy argmax.
pub const ELEMENTWISE: KernelSource = KernelSource {
    name: "elementwise",
    code: include_str!("../../cuda/elementwise.cu"),
    kernels: &[
        "embedding_gather_bf16",
        "layernorm_bf16",
        "rope_bf16",
        "rope_f32",
        "silu_mul_bf16",
        "silu_mul_f32",
        "argmax_f32",
    ],
};

/// The sigmoid group-limited MoE router, one warp per token.
pub const ROUTER: KernelSource = KernelSource {
    name: "router",
    code: include_str!("../../cuda/router.cu"),
    kernels: &["router_select"],
};

/// Exact radix top-k over rows with the fixed tie rule.
pub const TOPK: KernelSource = KernelSource {
    name: "topk",
    code: include_str!("../../cuda/topk.cu"),
    kernels: &["topk_rows_f32"],
};

/// Lightning-indexer scoring (bf16 keys and queries).
pub const INDEXER: KernelSource = KernelSource {
    name: "indexer",
    code: include_str!("../../cuda/indexer.cu"),
    kernels: &[
        "indexer_scores_bf16_d128",
        "indexer_scores_bf16_d64",
        "indexer_scores_bf16_d32",
        "indexer_mma_bf16_d128",
        "indexer_mma_bf16_d64",
        "indexer_mma_bf16_d32",
    ],
};

/// The indexer's FP8 path: Hadamard rotation + ue8m0 e4m3 quantisation, e4m3 MMA scoring.
pub const INDEXER_FP8: KernelSource = KernelSource {
    name: "indexer_fp8",
    code: include_str!("../../cuda/indexer_fp8.cu"),
    kernels: &[
        "indexer_rotate_quant_fp8",
        "indexer_rotate_quant_fp8_rows",
        "indexer_mma_fp8_rows_d128",
        "indexer_mma_fp8_rows_d64",
        "indexer_mma_fp8_rows_d32",
        "indexer_mma_fp8_rows_d16",
    ],
};

/// Sparse MLA decode (absorbed form, bf16 latent) and its split combine.
pub const MLA: KernelSource = KernelSource {
    name: "mla",
    code: include_str!("../../cuda/mla.cu"),
    kernels: &["mla_sparse_decode_bf16", "mla_combine", "mla_sparse_decode_mma_bf16"],
};

/// MoE token permutation, gather and weighted combine.
pub const MOE: KernelSource = KernelSource {
    name: "moe",
    code: include_str!("../../cuda/moe.cu"),
    kernels: &["moe_plan", "moe_gather_bf16", "moe_combine_bf16"],
};

/// Every source, in load order.
pub const ALL: &[KernelSource] =
    &[NORM, QUANT, FILL, ELEMENTWISE, ROUTER, TOPK, INDEXER, INDEXER_FP8, MLA, MOE];
