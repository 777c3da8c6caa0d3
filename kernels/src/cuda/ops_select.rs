//! Model ops on the device, part 2: lightning-indexer scoring and exact top-k selection
//! (`kernels/cuda/indexer.cu`, `kernels/cuda/topk.cu`). CPU twins:
//! `crate::cpu::indexer::indexer_scores`, `crate::cpu::topk::topk_indices`.
//!
//! Invariant (top-k): for a row of `len` valid scores, exactly `min(k, len)` positions come out,
//! ascending, then −1 up to k; ties between equal scores (−0.0 == +0.0) go to the lower position.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::CudaError;
use crate::cuda::ops::{Ops, check_len, to_i32};

impl Ops {
    /// Indexer scores for `batch` query tokens, each over its own keys:
    /// `out[b, s] = Σ_h w[b, h] · ReLU(q[b, h] · keys[b, s])` for `s < lens[b]`, −∞ for
    /// `lens[b] ≤ s < max_ctx`. q `[batch, heads, dim]` bf16, w `[batch, heads]` f32,
    /// keys `[batch, max_ctx, dim]` bf16, lens `[batch]` i32 (device; clamped by the kernel's
    /// bounds: s < max_ctx always), out `[batch, max_ctx]` f32. heads ≤ 64, dim ∈ {32, 64, 128}.
    /// bf16 tensor-core MMA with fp32 accumulation.
    #[allow(clippy::too_many_arguments)]
    pub fn indexer_scores_bf16(
        &self,
        q: &CudaSlice<bf16>,
        w: &CudaSlice<f32>,
        keys: &CudaSlice<bf16>,
        lens: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        batch: usize,
        heads: usize,
        dim: usize,
        max_ctx: usize,
    ) -> Result<(), CudaError> {
        self.indexer(true, q, w, keys, lens, out, batch, heads, dim, max_ctx)
    }

    /// The indexer's FP8 path, step 1 (CPU twin `cpu::indexer_fp8::rotate_quant_fp8`): each of
    /// the `n` vectors of `x [n, dim]` f32 is Hadamard-rotated and quantised to e4m3 with one
    /// ue8m0 scale, written to row `v` of `codes [≥ n, dim]` / `scales [≥ n]`, or — with `dst`
    /// (device i32 `[n]`) — to row `dst[v]` of `codes [n_out, dim]` / `scales [n_out]` (the key
    /// cache; a row < 0 or ≥ n_out is skipped on the device). dim ∈ {16, 32, 64, 128}.
    #[allow(clippy::too_many_arguments)]
    pub fn indexer_rotate_quant_fp8(
        &self,
        x: &CudaSlice<f32>,
        dst: Option<&CudaSlice<i32>>,
        codes: &mut CudaSlice<u8>,
        scales: &mut CudaSlice<f32>,
        n: usize,
        dim: usize,
        n_out: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "indexer_rotate_quant_fp8";
        if !matches!(dim, 16 | 32 | 64 | 128) {
            return Err(CudaError::shape(OP, format!("dim {dim} is not 16, 32, 64 or 128")));
        }
        if dst.is_none() && n_out < n {
            return Err(CudaError::shape(OP, format!("{n} vectors into {n_out} rows")));
        }
        check_len(OP, "x", x.len(), n * dim)?;
        check_len(OP, "codes", codes.len(), n_out * dim)?;
        check_len(OP, "scales", scales.len(), n_out)?;
        if let Some(d) = dst {
            check_len(OP, "dst", d.len(), n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let (n_i, d_i) = (to_i32(OP, "n", n)?, to_i32(OP, "dim", dim)?);
        let inv = crate::cpu::indexer_fp8::inv_sqrt(dim);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(128) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        match dst {
            None => {
                let mut b = self.stream().launch_builder(self.model_fn(OP)?);
                b.arg(x).arg(codes).arg(scales).arg(&n_i).arg(&d_i).arg(&inv);
                // SAFETY: matches `indexer_rotate_quant_fp8`; x holds n × dim, codes and
                // scales at least n rows (checked); one thread per vector, dim ≤ 128.
                unsafe { b.launch(cfg) }.map_err(CudaError::driver("launch rotate_quant_fp8"))?;
            }
            Some(dst) => {
                let n_out_i = n_out as i64;
                let mut b =
                    self.stream().launch_builder(self.model_fn("indexer_rotate_quant_fp8_rows")?);
                b.arg(x).arg(dst).arg(codes).arg(scales).arg(&n_i).arg(&d_i).arg(&inv);
                b.arg(&n_out_i);
                // SAFETY: matches `indexer_rotate_quant_fp8_rows`; x and dst hold n entries,
                // codes/scales n_out rows (checked); the kernel skips rows outside [0, n_out).
                unsafe { b.launch(cfg) }
                    .map_err(CudaError::driver("launch rotate_quant_fp8_rows"))?;
            }
        }
        Ok(())
    }

    /// The indexer's FP8 path, step 2 (CPU twin `cpu::indexer_fp8::indexer_scores_fp8`): scores
    /// of query rows over a key cache shared by many rows (the model's per-slot cache): row b
    /// scores keys `[base[b], base[b] + lens[b])` of the e4m3 cache `keys [n_rows, dim]` with
    /// per-key scales `kscales [n_rows]`; `out [batch, max_ctx]`: position s < lens[b] gets its
    /// score, the rest −∞. Queries `q [batch, heads, dim]` e4m3 with scales `qscales [batch,
    /// heads]`, head weights `w [batch, heads]` f32. A row whose `base[b]` is negative or whose
    /// block `[base[b], base[b] + max_ctx)` runs past `n_rows` scores nothing (all −∞):
    /// device-resident bases cannot be checked on the host, so the kernel never reads outside
    /// `keys`. e4m3 tensor-core MMA (m16n8k32), fp32 accumulation; dim ∈ {16, 32, 64, 128}.
    #[allow(clippy::too_many_arguments)]
    pub fn indexer_scores_fp8_rows(
        &self,
        q: &CudaSlice<u8>,
        qscales: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        keys: &CudaSlice<u8>,
        kscales: &CudaSlice<f32>,
        n_rows: usize,
        base: &CudaSlice<i32>,
        lens: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        shape: (usize, usize, usize, usize),
    ) -> Result<(), CudaError> {
        const OP: &str = "indexer_scores_fp8_rows";
        let (batch, heads, dim, max_ctx) = shape;
        let name = match dim {
            128 => "indexer_mma_fp8_rows_d128",
            64 => "indexer_mma_fp8_rows_d64",
            32 => "indexer_mma_fp8_rows_d32",
            16 => "indexer_mma_fp8_rows_d16",
            _ => return Err(CudaError::shape(OP, format!("dim {dim} is not 16, 32, 64 or 128"))),
        };
        if heads == 0 || heads > 64 {
            return Err(CudaError::shape(OP, format!("heads {heads} not in 1..=64")));
        }
        check_len(OP, "q", q.len(), batch * heads * dim)?;
        check_len(OP, "qscales", qscales.len(), batch * heads)?;
        check_len(OP, "w", w.len(), batch * heads)?;
        check_len(OP, "keys", keys.len(), n_rows * dim)?;
        check_len(OP, "kscales", kscales.len(), n_rows)?;
        check_len(OP, "base", base.len(), batch)?;
        check_len(OP, "lens", lens.len(), batch)?;
        check_len(OP, "out", out.len(), batch * max_ctx)?;
        if batch == 0 || max_ctx == 0 {
            return Ok(());
        }
        if batch > 65_535 {
            return Err(CudaError::shape(OP, format!("batch {batch} exceeds 65535")));
        }
        let (h_i, ctx_i) = (to_i32(OP, "heads", heads)?, to_i32(OP, "max_ctx", max_ctx)?);
        let rows_i = n_rows as i64;
        let cfg = LaunchConfig {
            grid_dim: (max_ctx.div_ceil(128) as u32, batch as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream().launch_builder(self.model_fn(name)?);
        b.arg(q).arg(qscales).arg(w).arg(keys).arg(kscales).arg(base).arg(lens).arg(out);
        b.arg(&h_i).arg(&ctx_i).arg(&rows_i);
        // SAFETY: matches `indexer_mma_fp8_rows_d{dim}`; every buffer checked against batch,
        // heads ≤ 64, dim, max_ctx and n_rows; the kernel reads key rows and scales only inside
        // [base[b], base[b] + max_ctx) ⊂ [0, n_rows) (checked on the device).
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("launch indexer_scores_fp8_rows"))?;
        Ok(())
    }

    /// [`Self::indexer_scores_bf16`] on CUDA cores (one thread per key): the SIMT reference.
    #[allow(clippy::too_many_arguments)]
    pub fn indexer_scores_bf16_simt(
        &self,
        q: &CudaSlice<bf16>,
        w: &CudaSlice<f32>,
        keys: &CudaSlice<bf16>,
        lens: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        batch: usize,
        heads: usize,
        dim: usize,
        max_ctx: usize,
    ) -> Result<(), CudaError> {
        self.indexer(false, q, w, keys, lens, out, batch, heads, dim, max_ctx)
    }

    #[allow(clippy::too_many_arguments)]
    fn indexer(
        &self,
        mma: bool,
        q: &CudaSlice<bf16>,
        w: &CudaSlice<f32>,
        keys: &CudaSlice<bf16>,
        lens: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        batch: usize,
        heads: usize,
        dim: usize,
        max_ctx: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "indexer_scores_bf16";
        let name = match (dim, mma) {
            (128, true) => "indexer_mma_bf16_d128",
            (64, true) => "indexer_mma_bf16_d64",
            (32, true) => "indexer_mma_bf16_d32",
            (128, false) => "indexer_scores_bf16_d128",
            (64, false) => "indexer_scores_bf16_d64",
            (32, false) => "indexer_scores_bf16_d32",
            _ => return Err(CudaError::shape(OP, format!("dim {dim} is not 32, 64 or 128"))),
        };
        if heads == 0 || heads > 64 {
            return Err(CudaError::shape(OP, format!("heads {heads} not in 1..=64")));
        }
        check_len(OP, "q", q.len(), batch * heads * dim)?;
        check_len(OP, "w", w.len(), batch * heads)?;
        check_len(OP, "keys", keys.len(), batch * max_ctx * dim)?;
        check_len(OP, "lens", lens.len(), batch)?;
        check_len(OP, "out", out.len(), batch * max_ctx)?;
        if batch == 0 || max_ctx == 0 {
            return Ok(());
        }
        if batch > 65_535 {
            return Err(CudaError::shape(OP, format!("batch {batch} exceeds 65535")));
        }
        let (h_i, ctx_i) = (to_i32(OP, "heads", heads)?, to_i32(OP, "max_ctx", max_ctx)?);
        let cfg = LaunchConfig {
            grid_dim: (max_ctx.div_ceil(128) as u32, batch as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream().launch_builder(self.model_fn(name)?);
        b.arg(q).arg(w).arg(keys).arg(lens).arg(out).arg(&h_i).arg(&ctx_i);
        // SAFETY: matches `indexer_mma_bf16_d{dim}` / `indexer_scores_bf16_d{dim}` (same
        // parameters); every buffer was checked against batch,
        // heads ≤ 64 (the shared q tile), dim and max_ctx; the kernel reads key s only for
        // s < min(lens[b], max_ctx) (keys rows are 16-byte aligned: dim % 8 == 0).
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("launch indexer_scores_bf16"))?;
        Ok(())
    }

    /// Top-k of each row: scores `[rows, stride]` f32 of which the first `lens[r]` are valid
    /// (device i32, clamped to `[0, stride]`); out `[rows, k]` i32 = the `min(k, len)` selected
    /// positions ascending, then −1. Larger score first, −0.0 == +0.0, NaN last, equal scores →
    /// lower position. One CTA per row (radix select, 4 passes + one ordered emission pass).
    pub fn topk_rows_f32(
        &self,
        scores: &CudaSlice<f32>,
        lens: &CudaSlice<i32>,
        out: &mut CudaSlice<i32>,
        rows: usize,
        stride: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "topk_rows_f32";
        check_len(OP, "scores", scores.len(), rows * stride)?;
        check_len(OP, "lens", lens.len(), rows)?;
        check_len(OP, "out", out.len(), rows * k)?;
        if rows == 0 || k == 0 {
            return Ok(());
        }
        let (stride_i, k_i) = (to_i32(OP, "stride", stride)?, to_i32(OP, "k", k)?);
        let grid = u32::try_from(rows).map_err(|_| CudaError::shape(OP, "too many rows"))?;
        let cfg =
            LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream().launch_builder(self.model_fn(OP)?);
        b.arg(scores).arg(lens).arg(out).arg(&stride_i).arg(&k_i);
        // SAFETY: matches `topk_rows_f32`; scores rows × stride, lens rows and out rows × k were
        // checked; the kernel clamps each len to [0, stride] and writes exactly k per row.
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("launch topk_rows_f32"))?;
        Ok(())
    }
}
