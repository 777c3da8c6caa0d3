//! Model ops on the device, part 1: embedding gather, LayerNorm with bias, YaRN RoPE (both
//! layouts), SiLU·mul, greedy argmax and the MoE router. Kernels: `kernels/cuda/elementwise.cu`,
//! `kernels/cuda/router.cu`. CPU twins: `crate::cpu::{norm, rope, activation, router}`.
//!
//! Every wrapper checks the lengths of the buffers it is given against the dims and returns
//! [`CudaError::Shape`] on a mismatch; nothing here panics or allocates.

use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cpu::router::RouterParams;
use crate::cuda::CudaError;
use crate::cuda::ops::{Ops, check_len, grid_stride, to_i32};

/// Which pairs RoPE rotates (spec §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// `(x[2i], x[2i+1])`: MLA `q_pe` and `k_pe`.
    Interleaved,
    /// `(x[i], x[i + half])`: the indexer's q and k.
    HalfSplit,
}

/// Shape of a RoPE application: `x` is `[tokens, heads, head_dim]`, the rotated slice is
/// `offset .. offset + 2·freqs.len()` of each head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeShape {
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub offset: usize,
}

fn blocks(op: &'static str, n: usize) -> Result<u32, CudaError> {
    u32::try_from(n).map_err(|_| CudaError::shape(op, format!("{n} blocks exceed u32")))
}

impl Ops {
    /// `out[i, :] = table[ids[i], :]`. table `[vocab, dim]`, ids `[n]`, out `[n, dim]`. An id
    /// outside `[0, vocab)` writes a zero row and adds 1 to `bad[0]` (a device counter the caller
    /// zeroes and checks: device ids cannot be validated without a host sync).
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_gather_bf16(
        &self,
        table: &CudaSlice<bf16>,
        ids: &CudaSlice<i32>,
        out: &mut CudaSlice<bf16>,
        bad: &mut CudaSlice<i32>,
        n: usize,
        dim: usize,
        vocab: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "embedding_gather_bf16";
        check_len(OP, "table", table.len(), vocab * dim)?;
        check_len(OP, "ids", ids.len(), n)?;
        check_len(OP, "out", out.len(), n * dim)?;
        if bad.is_empty() {
            return Err(CudaError::shape(OP, "bad counter needs 1 element"));
        }
        if n == 0 || dim == 0 {
            return Ok(());
        }
        let (dim_i, vocab_i) = (to_i32(OP, "dim", dim)?, to_i32(OP, "vocab", vocab)?);
        let vec8 = i32::from(dim % 8 == 0);
        let cfg = LaunchConfig {
            grid_dim: (blocks(OP, n)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream().launch_builder(self.model_fn(OP)?);
        b.arg(table).arg(ids).arg(out).arg(&dim_i).arg(&vocab_i).arg(&vec8).arg(bad);
        // SAFETY: matches `embedding_gather_bf16` in elementwise.cu; table, ids and out were
        // checked against vocab × dim, n, n × dim; ids outside the table are not read through
        // (the kernel bounds-checks them); vec8 only when rows are 16-byte aligned.
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("launch embedding_gather_bf16"))?;
        Ok(())
    }

    /// `y = (x − mean) / sqrt(var + eps) · w + b` per row (biased variance), fp32 math.
    /// x, y `[rows, dim]` bf16; w, b `[dim]` f32. Twin: `cpu::norm::layer_norm`.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_bf16(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        y: &mut CudaSlice<bf16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "layernorm_bf16";
        check_len(OP, "x", x.len(), rows * dim)?;
        check_len(OP, "y", y.len(), rows * dim)?;
        check_len(OP, "w", w.len(), dim)?;
        check_len(OP, "bias", bias.len(), dim)?;
        if rows == 0 {
            return Ok(());
        }
        if dim == 0 {
            return Err(CudaError::shape(OP, "dim is 0"));
        }
        let dim_i = to_i32(OP, "dim", dim)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks(OP, rows)?, 1, 1),
            block_dim: (if dim <= 1024 { 128 } else { 512 }, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream().launch_builder(self.model_fn(OP)?);
        b.arg(x).arg(w).arg(bias).arg(y).arg(&dim_i).arg(&eps);
        // SAFETY: matches `layernorm_bf16`; lengths checked against rows × dim and dim.
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("launch layernorm_bf16"))?;
        Ok(())
    }

    fn rope<T: DeviceRepr>(
        &self,
        op: &'static str,
        x: &mut CudaSlice<T>,
        positions: &CudaSlice<i32>,
        freqs: &CudaSlice<f32>,
        s: RopeShape,
        attention_factor: f32,
        layout: RopeLayout,
    ) -> Result<(), CudaError> {
        let half = freqs.len();
        check_len(op, "x", x.len(), s.tokens * s.heads * s.head_dim)?;
        check_len(op, "positions", positions.len(), s.tokens)?;
        if half == 0 || s.offset + 2 * half > s.head_dim {
            return Err(CudaError::shape(
                op,
                format!(
                    "rope slice [{}, +2·{half}) does not fit head dim {} (or no freqs)",
                    s.offset, s.head_dim
                ),
            ));
        }
        if s.tokens == 0 || s.heads == 0 {
            return Ok(());
        }
        let heads = to_i32(op, "heads", s.heads)?;
        let head_dim = to_i32(op, "head_dim", s.head_dim)?;
        let offset = to_i32(op, "offset", s.offset)?;
        let half_i = to_i32(op, "half", half)?;
        to_i32(op, "tokens × heads × head_dim", s.tokens * s.heads * s.head_dim)?;
        let split = i32::from(layout == RopeLayout::HalfSplit);
        let cfg = LaunchConfig {
            grid_dim: (blocks(op, s.tokens)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream().launch_builder(self.model_fn(op)?);
        b.arg(x).arg(positions).arg(freqs).arg(&heads).arg(&head_dim).arg(&offset);
        b.arg(&half_i).arg(&attention_factor).arg(&split);
        // SAFETY: matches `rope_bf16`/`rope_f32` (T is bf16 or f32 by the public wrappers); x
        // holds tokens × heads × head_dim and offset + 2·half ≤ head_dim, so every pair is in
        // bounds; positions has one entry per token (any value is a valid angle).
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("launch rope"))?;
        Ok(())
    }

    /// RoPE in place on bf16 `x` `[tokens, heads, head_dim]` at `offset` (see [`RopeShape`]):
    /// angle `pos[t] · freqs[i]` in fp32, accurate cos/sin, both × `attention_factor`.
    /// Twins: `cpu::rope::{rope_cos_sin, rope_interleaved, rope_half_split}`.
    pub fn rope_bf16(
        &self,
        x: &mut CudaSlice<bf16>,
        positions: &CudaSlice<i32>,
        freqs: &CudaSlice<f32>,
        shape: RopeShape,
        attention_factor: f32,
        layout: RopeLayout,
    ) -> Result<(), CudaError> {
        self.rope("rope_bf16", x, positions, freqs, shape, attention_factor, layout)
    }

    /// [`Self::rope_bf16`] on f32 data.
    pub fn rope_f32(
        &self,
        x: &mut CudaSlice<f32>,
        positions: &CudaSlice<i32>,
        freqs: &CudaSlice<f32>,
        shape: RopeShape,
        attention_factor: f32,
        layout: RopeLayout,
    ) -> Result<(), CudaError> {
        self.rope("rope_f32", x, positions, freqs, shape, attention_factor, layout)
    }

    #[allow(clippy::too_many_arguments)]
    fn silu_mul_launch<T: DeviceRepr>(
        &self,
        op: &'static str,
        gate: &CudaView<'_, T>,
        gs: usize,
        up: &CudaView<'_, T>,
        us: usize,
        out: &mut CudaSlice<T>,
        rows: usize,
        cols: usize,
    ) -> Result<(), CudaError> {
        if rows * cols == 0 {
            return Ok(());
        }
        let (gs, us, os) =
            (to_i32(op, "stride", gs)?, to_i32(op, "stride", us)?, to_i32(op, "cols", cols)?);
        let (rows_i, cols_i) = (to_i32(op, "rows", rows)?, os);
        let mut b = self.stream().launch_builder(self.model_fn(op)?);
        b.arg(gate).arg(&gs).arg(up).arg(&us).arg(out).arg(&os).arg(&rows_i).arg(&cols_i);
        // SAFETY: matches `silu_mul_bf16`/`silu_mul_f32`; the public wrappers checked that gate
        // and up hold rows rows of their stride covering cols columns, and out rows × cols.
        unsafe { b.launch(grid_stride(rows * cols)) }
            .map_err(CudaError::driver("launch silu_mul"))?;
        Ok(())
    }

    /// `out[i] = SiLU(gate[i]) · up[i]` over `n` bf16 elements. Twin: `cpu::activation::silu_mul`.
    pub fn silu_mul_bf16(
        &self,
        gate: &CudaSlice<bf16>,
        up: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
        n: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "silu_mul_bf16";
        check_len(OP, "gate", gate.len(), n)?;
        check_len(OP, "up", up.len(), n)?;
        check_len(OP, "out", out.len(), n)?;
        self.silu_mul_launch(OP, &gate.slice(..), n, &up.slice(..), n, out, 1, n)
    }

    /// [`Self::silu_mul_bf16`] on f32.
    pub fn silu_mul_f32(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "silu_mul_f32";
        check_len(OP, "gate", gate.len(), n)?;
        check_len(OP, "up", up.len(), n)?;
        check_len(OP, "out", out.len(), n)?;
        self.silu_mul_launch(OP, &gate.slice(..), n, &up.slice(..), n, out, 1, n)
    }

    /// SwiGLU of a fused gate|up GEMM output: `gu` `[rows, 2·cols]` (gate columns first),
    /// `out[r, c] = SiLU(gu[r, c]) · gu[r, cols + c]`, out `[rows, cols]`.
    pub fn swiglu_fused_bf16(
        &self,
        gu: &CudaSlice<bf16>,
        out: &mut CudaSlice<bf16>,
        rows: usize,
        cols: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "silu_mul_bf16";
        check_len(OP, "gu", gu.len(), rows * 2 * cols)?;
        check_len(OP, "out", out.len(), rows * cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        let up = gu.slice(cols..);
        self.silu_mul_launch(OP, &gu.slice(..), 2 * cols, &up, 2 * cols, out, rows, cols)
    }

    /// Greedy sampling: `out[r]` = the lowest index of the largest logit of row r (−0.0 == +0.0,
    /// NaN ranks last). logits `[rows, vocab]` f32, out `[rows]` i32.
    pub fn argmax_f32(
        &self,
        logits: &CudaSlice<f32>,
        out: &mut CudaSlice<i32>,
        rows: usize,
        vocab: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "argmax_f32";
        if vocab == 0 {
            return Err(CudaError::shape(OP, "vocab is 0"));
        }
        check_len(OP, "logits", logits.len(), rows * vocab)?;
        check_len(OP, "out", out.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let vocab_i = to_i32(OP, "vocab", vocab)?;
        let cfg = LaunchConfig {
            grid_dim: (blocks(OP, rows)?, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream().launch_builder(self.model_fn(OP)?);
        b.arg(logits).arg(out).arg(&vocab_i);
        // SAFETY: matches `argmax_f32`; logits rows × vocab and out rows were checked.
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("launch argmax_f32"))?;
        Ok(())
    }

    /// DeepSeek-V3.2 router selection for `tokens` tokens, one warp each. logits `[tokens, E]`
    /// f32, bias `[E]` f32; writes ids `[tokens, top_k]` i32 and weights `[tokens, top_k]` f32 in
    /// rank order (best first). Twin: `cpu::router::route_token`. Limits: E ≤ 256, n_group ≤ 32
    /// dividing E, 1 ≤ topk_group ≤ n_group, 1 ≤ top_k ≤ min(32, experts of topk_group groups).
    pub fn router_select(
        &self,
        logits: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        ids: &mut CudaSlice<i32>,
        weights: &mut CudaSlice<f32>,
        tokens: usize,
        p: &RouterParams,
    ) -> Result<(), CudaError> {
        const OP: &str = "router_select";
        let e = p.n_experts;
        if e == 0 || e > 256 || p.n_group == 0 || p.n_group > 32 || e % p.n_group != 0 {
            return Err(CudaError::shape(
                OP,
                format!(
                    "{e} experts in {} groups: need ≤ 256 experts, ≤ 32 groups dividing them",
                    p.n_group
                ),
            ));
        }
        let kept = p.topk_group * (e / p.n_group);
        if p.topk_group == 0
            || p.topk_group > p.n_group
            || p.top_k == 0
            || p.top_k > 32
            || p.top_k > kept
        {
            return Err(CudaError::shape(
                OP,
                format!(
                    "top_k {} of topk_group {} (of {} groups): need 1 ≤ top_k ≤ min(32, {kept})",
                    p.top_k, p.topk_group, p.n_group
                ),
            ));
        }
        check_len(OP, "logits", logits.len(), tokens * e)?;
        check_len(OP, "bias", bias.len(), e)?;
        check_len(OP, "ids", ids.len(), tokens * p.top_k)?;
        check_len(OP, "weights", weights.len(), tokens * p.top_k)?;
        if tokens == 0 {
            return Ok(());
        }
        let t_i = to_i32(OP, "tokens", tokens)?;
        let (e_i, g_i, tg_i, k_i) =
            (e as i32, p.n_group as i32, p.topk_group as i32, p.top_k as i32);
        let norm = i32::from(p.norm_topk_prob);
        let cfg = LaunchConfig {
            grid_dim: (blocks(OP, tokens.div_ceil(4))?, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream().launch_builder(self.model_fn(OP)?);
        b.arg(logits).arg(bias).arg(ids).arg(weights).arg(&t_i).arg(&e_i).arg(&g_i).arg(&tg_i);
        b.arg(&k_i).arg(&p.routed_scaling_factor).arg(&norm);
        // SAFETY: matches `router_select` in router.cu; the limits its shared arrays and warp
        // lanes assume (E ≤ 256, groups ≤ 32, top_k ≤ 32) and every length were checked above.
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("launch router_select"))?;
        Ok(())
    }
}
