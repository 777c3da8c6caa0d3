//! Model ops on the device, part 4: routed experts (`kernels/cuda/moe.cu` + cuBLAS).
//!
//! [`moe_experts_bf16`] = permute tokens by expert (deterministic: by expert, then pair order),
//! one bf16 cuBLAS GEMM per non-empty expert for gate|up (`w13[e]` `[2·inter, dim]`, gate rows
//! first), one SwiGLU launch over all permuted rows, one cuBLAS GEMM per expert for down
//! (`w2[e]` `[dim, inter]`), then the weighted combine in fp32. **First version**: per-expert
//! cuBLAS calls need the expert row offsets on the host, so the call synchronises the stream once
//! (≈ tens of µs; not CUDA-graph capturable). The grouped/masked FP8 kernel of KERNELS.md §3
//! replaces it. Pairs whose expert id is < 0 or ≥ n_experts (e.g. another EP rank's experts) are
//! dropped by design and contribute nothing.
//! CPU twin: per token, `Σ_slot w · (silu_mul(x·W_gateᵀ, x·W_upᵀ) · W_downᵀ)` with
//! `crate::cpu::{gemm::matmul_t, activation::silu_mul}`.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::ops::{check_len, to_i32};
use crate::cuda::{BlasGemm, CudaDevice, CudaError, GroupedProblem};

/// Dims of one routed-expert call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeShape {
    pub tokens: usize,
    pub top_k: usize,
    /// Experts held by this call's weights (local experts); ≤ 1024.
    pub n_experts: usize,
    /// Hidden size; a multiple of 8.
    pub dim: usize,
    /// Expert intermediate size.
    pub inter: usize,
}

/// Device buffers of [`moe_experts_bf16`], sized for at most `max_pairs` (token, slot) pairs.
#[derive(Debug)]
pub struct MoeScratch {
    max_pairs: usize,
    n_experts: usize,
    dim: usize,
    inter: usize,
    /// `[n_experts]` rows per expert.
    pub counts: CudaSlice<i32>,
    /// `[n_experts + 1]` first permuted row of each expert; the last entry = rows used.
    pub offsets: CudaSlice<i32>,
    /// `[max_pairs]` permuted row of each pair (−1: dropped).
    pub pair_row: CudaSlice<i32>,
    /// `[max_pairs]` pair of each permuted row.
    pub row_pair: CudaSlice<i32>,
    x_perm: CudaSlice<bf16>,
    gu: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    y_perm: CudaSlice<bf16>,
    /// Run the per-expert GEMMs as one grouped cuBLAS call each (gate|up, down) instead of one
    /// call per expert ([`BlasGemm::gemm_bf16_grouped`]). Same results up to cuBLAS's choice of
    /// kernel; off by default.
    pub grouped: bool,
}

impl MoeScratch {
    /// Allocates buffers for up to `max_pairs` pairs of `shape`'s expert dims.
    pub fn new(dev: &CudaDevice, max_pairs: usize, shape: &MoeShape) -> Result<Self, CudaError> {
        let (e, d, i) = (shape.n_experts, shape.dim, shape.inter);
        let p = max_pairs.max(1);
        Ok(Self {
            max_pairs,
            n_experts: e,
            dim: d,
            inter: i,
            counts: dev.zeros(e.max(1))?,
            offsets: dev.zeros(e + 1)?,
            pair_row: dev.zeros(p)?,
            row_pair: dev.zeros(p)?,
            x_perm: dev.zeros(p * d)?,
            gu: dev.zeros(p * 2 * i)?,
            act: dev.zeros(p * i)?,
            y_perm: dev.zeros(p * d)?,
            grouped: false,
        })
    }
}

/// Routed experts for `shape.tokens` tokens: `out[t] = Σ_slot weights[t, slot] ·
/// down_e(SiLU(gate_e(x[t])) · up_e(x[t]))` with `e = ids[t, slot]`. x `[tokens, dim]` bf16,
/// ids `[tokens, top_k]` i32, weights `[tokens, top_k]` f32, w13 `[n_experts, 2·inter, dim]`
/// bf16, w2 `[n_experts, dim, inter]` bf16, out `[tokens, dim]` bf16. Synchronises the stream
/// once (see the module doc).
#[allow(clippy::too_many_arguments)]
pub fn moe_experts_bf16(
    dev: &CudaDevice,
    blas: &BlasGemm,
    x: &CudaSlice<bf16>,
    ids: &CudaSlice<i32>,
    weights: &CudaSlice<f32>,
    w13: &CudaSlice<bf16>,
    w2: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
    scratch: &mut MoeScratch,
    s: &MoeShape,
) -> Result<(), CudaError> {
    const OP: &str = "moe_experts_bf16";
    let pairs = s.tokens * s.top_k;
    let (e, d, i) = (s.n_experts, s.dim, s.inter);
    if e == 0 || e > 1024 {
        return Err(CudaError::shape(OP, format!("n_experts {e} not in 1..=1024")));
    }
    if d == 0 || d % 8 != 0 || i == 0 {
        return Err(CudaError::shape(
            OP,
            format!("dim {d} must be a positive multiple of 8, inter {i} > 0"),
        ));
    }
    if (scratch.n_experts, scratch.dim, scratch.inter) != (e, d, i) || scratch.max_pairs < pairs {
        return Err(CudaError::shape(
            OP,
            format!(
                "scratch is for {} pairs of ({}, {}, {}), call needs {pairs} of ({e}, {d}, {i})",
                scratch.max_pairs, scratch.n_experts, scratch.dim, scratch.inter
            ),
        ));
    }
    check_len(OP, "x", x.len(), s.tokens * d)?;
    check_len(OP, "ids", ids.len(), pairs)?;
    check_len(OP, "weights", weights.len(), pairs)?;
    check_len(OP, "w13", w13.len(), e * 2 * i * d)?;
    check_len(OP, "w2", w2.len(), e * d * i)?;
    check_len(OP, "out", out.len(), s.tokens * d)?;
    if s.tokens == 0 {
        return Ok(());
    }
    let ops = dev.ops();
    let stream = dev.stream();
    let (pairs_i, e_i) = (to_i32(OP, "pairs", pairs)?, e as i32);
    let (k_i, d_i) = (to_i32(OP, "top_k", s.top_k)?, to_i32(OP, "dim", d)?);
    to_i32(OP, "pairs × dim", pairs * d.max(2 * i))?;
    let sc = &mut *scratch;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    let mut b = stream.launch_builder(ops.model_fn("moe_plan")?);
    b.arg(ids).arg(&pairs_i).arg(&e_i).arg(&mut sc.counts).arg(&mut sc.offsets);
    b.arg(&mut sc.pair_row).arg(&mut sc.row_pair);
    // SAFETY: matches `moe_plan`; ids holds `pairs` entries, pair_row/row_pair ≥ pairs, counts
    // n_experts, offsets n_experts + 1; each expert's rows are < the number of valid pairs.
    unsafe { b.launch(one) }.map_err(CudaError::driver("launch moe_plan"))?;
    let cfg = |n: usize, t: u32| LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (t, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(ops.model_fn("moe_gather_bf16")?);
    b.arg(x).arg(&sc.row_pair).arg(&sc.offsets).arg(&e_i).arg(&k_i).arg(&mut sc.x_perm).arg(&d_i);
    // SAFETY: matches `moe_gather_bf16`; rows r < offsets[E] ≤ pairs have row_pair[r] a valid
    // pair, so row_pair[r] / top_k < tokens; x_perm holds max_pairs × dim, dim % 8 == 0.
    unsafe { b.launch(cfg(pairs, 128)) }.map_err(CudaError::driver("launch moe_gather_bf16"))?;
    let offsets = dev.download(&sc.offsets)?; // the one host sync
    // The plan kernel guarantees 0 = offsets[0] ≤ … ≤ offsets[E] ≤ pairs; check anyway, so a
    // broken plan is an error rather than an out-of-range slice.
    if offsets[0] != 0 || offsets.windows(2).any(|w| w[0] > w[1]) || offsets[e] as usize > pairs {
        return Err(CudaError::shape(OP, format!("moe_plan produced invalid offsets {offsets:?}")));
    }
    let rows_used = offsets[e] as usize;
    let experts = || {
        (0..e).filter_map(|ex| {
            let (r0, r1) = (offsets[ex] as usize, offsets[ex + 1] as usize);
            (r1 > r0).then_some((ex, r0, r1 - r0))
        })
    };
    if sc.grouped {
        let up: Vec<GroupedProblem> = experts()
            .map(|(ex, r0, m)| GroupedProblem {
                m,
                n: 2 * i,
                k: d,
                x_at: r0 * d,
                w_at: ex * 2 * i * d,
                y_at: r0 * 2 * i,
            })
            .collect();
        blas.gemm_bf16_grouped(dev, &sc.x_perm, w13, &mut sc.gu, &up)?;
    } else {
        for (ex, r0, m) in experts() {
            let xs = sc.x_perm.slice(r0 * d..(r0 + m) * d);
            let ws = w13.slice(ex * 2 * i * d..(ex + 1) * 2 * i * d);
            let mut ys = sc.gu.slice_mut(r0 * 2 * i..(r0 + m) * 2 * i);
            blas.gemm_bf16_view(&xs, &ws, &mut ys, m, 2 * i, d)?;
        }
    }
    if rows_used > 0 {
        let gu = sc.gu.slice(..rows_used * 2 * i);
        let up = sc.gu.slice(i..rows_used * 2 * i);
        let mut act = sc.act.slice_mut(..rows_used * i);
        let (gs, os, rows_i) = (2 * i as i32, i as i32, rows_used as i32);
        let mut b = stream.launch_builder(ops.model_fn("silu_mul_bf16")?);
        b.arg(&gu).arg(&gs).arg(&up).arg(&gs).arg(&mut act).arg(&os).arg(&rows_i).arg(&os);
        // SAFETY: matches `silu_mul_bf16`; gu holds rows_used rows of 2·inter (the up view
        // starts inter in, its last row ends at the end of gu), act rows_used × inter.
        unsafe { b.launch(crate::cuda::ops::grid_stride(rows_used * i)) }
            .map_err(CudaError::driver("launch silu_mul_bf16"))?;
    }
    if sc.grouped {
        let down: Vec<GroupedProblem> = experts()
            .map(|(ex, r0, m)| GroupedProblem {
                m,
                n: d,
                k: i,
                x_at: r0 * i,
                w_at: ex * d * i,
                y_at: r0 * d,
            })
            .collect();
        blas.gemm_bf16_grouped(dev, &sc.act, w2, &mut sc.y_perm, &down)?;
    } else {
        for (ex, r0, m) in experts() {
            let xs = sc.act.slice(r0 * i..(r0 + m) * i);
            let ws = w2.slice(ex * d * i..(ex + 1) * d * i);
            let mut ys = sc.y_perm.slice_mut(r0 * d..(r0 + m) * d);
            blas.gemm_bf16_view(&xs, &ws, &mut ys, m, d, i)?;
        }
    }
    let mut b = stream.launch_builder(ops.model_fn("moe_combine_bf16")?);
    b.arg(&sc.y_perm).arg(&sc.pair_row).arg(weights).arg(out).arg(&k_i).arg(&d_i);
    // SAFETY: matches `moe_combine_bf16`; pair_row entries are −1 or rows < rows_used that the
    // down GEMMs wrote; weights/pair_row hold tokens × top_k, out tokens × dim.
    unsafe { b.launch(cfg(s.tokens, 256)) }
        .map_err(CudaError::driver("launch moe_combine_bf16"))?;
    Ok(())
}
