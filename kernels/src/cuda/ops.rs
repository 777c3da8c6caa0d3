//! [`Ops`]: the device's own kernels with shape-checked launch wrappers. This file: loading,
//! RMSNorm, FP8 quantisation/dequantisation, random fills. The model ops (one CPU twin each in
//! `crate::cpu`) live in `ops_model.rs` (embedding, LayerNorm, RoPE, SiLU·mul, argmax, router),
//! `ops_select.rs` (indexer scoring, top-k), `ops_attn.rs` (sparse MLA decode) and `ops_moe.rs`
//! (expert permutation, grouped expert GEMM, combine). All launches go to the device stream
//! given at load time; wrappers check every length they can see and return
//! [`CudaError::Shape`], never panic. Device-resident indices (ids, positions, lengths) cannot be
//! checked on the host: each kernel documents what it does with an out-of-range one.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use half::bf16;

use crate::cuda::gemm::ActScaleLayout;
use crate::cuda::sources::{self, KernelSource};
use crate::cuda::{CudaError, KernelCache, compile_cubin};

/// Loaded kernels of every source in [`sources::ALL`].
#[derive(Debug)]
pub struct Ops {
    stream: Arc<CudaStream>,
    rmsnorm: CudaFunction,
    rmsnorm_v8: CudaFunction,
    act_quant: CudaFunction,
    dequant: CudaFunction,
    dequant_v16: CudaFunction,
    fill_bf16: CudaFunction,
    fill_e4m3: CudaFunction,
    fill_f32: CudaFunction,
    copy: CudaFunction,
    /// Kernels of the model-op sources, by name.
    model: HashMap<&'static str, CudaFunction>,
}

pub(crate) fn check_len(
    op: &'static str,
    what: &str,
    got: usize,
    want: usize,
) -> Result<(), CudaError> {
    if got != want {
        return Err(CudaError::shape(op, format!("{what} has {got} elements, expected {want}")));
    }
    Ok(())
}

pub(crate) fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::shape(op, format!("{what} = {v} exceeds i32")))
}

/// Grid-stride launch over `n` elements: 256 threads, at most 4 blocks per SM-ish cap.
/// Public so kernels compiled outside this crate (the worker's model glue) launch the same way.
pub fn grid_stride(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 132 * 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

impl Ops {
    /// Compiles (or loads from `cache`) every source for `arch` and loads it into `ctx`.
    pub fn load(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        arch: &str,
        cache: Option<&KernelCache>,
    ) -> Result<Self, CudaError> {
        let load = |src: &KernelSource| -> Result<Vec<CudaFunction>, CudaError> {
            let cubin = match cache {
                Some(c) => c.get_or_compile(src, arch)?.0,
                None => compile_cubin(src, arch)?,
            };
            let module = ctx
                .load_module(Ptx::from_binary(cubin))
                .map_err(CudaError::driver("cuModuleLoadData"))?;
            src.kernels
                .iter()
                .map(|k| module.load_function(k).map_err(CudaError::driver("cuModuleGetFunction")))
                .collect()
        };
        let norm = load(&sources::NORM)?;
        let quant = load(&sources::QUANT)?;
        let fill = load(&sources::FILL)?;
        let mut model = HashMap::new();
        for src in [
            &sources::ELEMENTWISE,
            &sources::ROUTER,
            &sources::TOPK,
            &sources::INDEXER,
            &sources::INDEXER_FP8,
            &sources::MLA,
            &sources::MOE,
        ] {
            for (name, f) in src.kernels.iter().zip(load(src)?) {
                model.insert(*name, f);
            }
        }
        Ok(Self {
            stream: stream.clone(),
            rmsnorm: norm[0].clone(),
            rmsnorm_v8: norm[1].clone(),
            act_quant: quant[0].clone(),
            dequant: quant[1].clone(),
            dequant_v16: quant[2].clone(),
            fill_bf16: fill[0].clone(),
            fill_e4m3: fill[1].clone(),
            fill_f32: fill[2].clone(),
            copy: fill[3].clone(),
            model,
        })
    }

    /// A model-op kernel by its `extern "C"` name (every name of the model sources is loaded).
    pub(crate) fn model_fn(&self, name: &'static str) -> Result<&CudaFunction, CudaError> {
        self.model
            .get(name)
            .ok_or_else(|| CudaError::shape("Ops", format!("kernel {name} is not loaded")))
    }

    /// The stream every launch goes to.
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `y = w ⊙ x / sqrt(mean(x²) + eps)` per row, fp32 math.
    /// x, y: [rows, dim] bf16; w: [dim] f32.
    pub fn rmsnorm_bf16(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<bf16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "rmsnorm_bf16";
        check_len(OP, "x", x.len(), rows * dim)?;
        check_len(OP, "y", y.len(), rows * dim)?;
        check_len(OP, "w", w.len(), dim)?;
        if rows == 0 {
            return Ok(());
        }
        let rows_u = u32::try_from(rows).map_err(|_| CudaError::shape(OP, "too many rows"))?;
        let dim_i = to_i32(OP, "dim", dim)?;
        // The vectorised kernel holds a row in registers: 4 × 8 elements per thread.
        let (func, threads) = match dim {
            d if d % 8 == 0 && d <= 8 * 4 * 256 => (&self.rmsnorm_v8, 256),
            d if d % 8 == 0 && d <= 8 * 4 * 1024 => (&self.rmsnorm_v8, 1024),
            _ => (&self.rmsnorm, 256),
        };
        let cfg = LaunchConfig {
            grid_dim: (rows_u, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(func);
        b.arg(x).arg(w).arg(y).arg(&dim_i).arg(&eps);
        // SAFETY: argument types and order match `rmsnorm_bf16` and `rmsnorm_bf16_v8` in
        // norm.cu; lengths were checked against rows × dim above, which is all the kernels
        // index; the v8 kernel is chosen only for dim % 8 == 0 (16-byte aligned rows of x, y
        // and w, cudarc allocations being 256-byte aligned) and dim ≤ 32 × threads.
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("launch rmsnorm_bf16"))?;
        Ok(())
    }

    /// FP8 activation quantisation in 1×128 groups with ue8m0 scales (spec §4.3).
    /// x: [rows, k] bf16, k % 128 == 0; q: [padded_rows, k] e4m3 bits; s: padded_rows × k/128
    /// f32 in `layout`. `padded_rows >= rows` is the row count the FP8 GEMM runs with
    /// ([`crate::cuda::Fp8Gemm::padded_rows`]); only the first `rows` rows are written, so pad
    /// rows keep what the caller put there (zeros: finite, and their outputs are ignored).
    pub fn act_quant_fp8(
        &self,
        x: &CudaSlice<bf16>,
        q: &mut CudaSlice<u8>,
        s: &mut CudaSlice<f32>,
        rows: usize,
        padded_rows: usize,
        k: usize,
        layout: ActScaleLayout,
    ) -> Result<(), CudaError> {
        const OP: &str = "act_quant_fp8";
        if k % 128 != 0 {
            return Err(CudaError::shape(OP, format!("k = {k} is not a multiple of 128")));
        }
        if padded_rows < rows {
            return Err(CudaError::shape(OP, format!("padded_rows {padded_rows} < rows {rows}")));
        }
        check_len(OP, "x", x.len(), rows * k)?;
        check_len(OP, "q", q.len(), padded_rows * k)?;
        check_len(OP, "scales", s.len(), padded_rows * (k / 128))?;
        if rows == 0 {
            return Ok(());
        }
        let groups = rows * (k / 128);
        let blocks =
            u32::try_from(groups.div_ceil(16)).map_err(|_| CudaError::shape(OP, "too large"))?;
        let cfg =
            LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (rows_i, k_i) = (to_i32(OP, "rows", rows)?, to_i32(OP, "k", k)?);
        let token_major = i32::from(layout == ActScaleLayout::TokenContiguous);
        let pitch = to_i32(OP, "padded_rows", padded_rows)?;
        let mut b = self.stream.launch_builder(&self.act_quant);
        b.arg(x).arg(q).arg(s).arg(&rows_i).arg(&k_i).arg(&token_major).arg(&pitch);
        // SAFETY: matches `act_quant_fp8` in quant.cu; x was checked against rows × k, q and s
        // against padded_rows ≥ rows (k % 128 == 0 and 256-byte aligned allocations, so every
        // 16-byte load and 8-byte store is aligned and in bounds).
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("launch act_quant_fp8"))?;
        Ok(())
    }

    /// `out[i, j] = w[i, j] · s[i/128, j/128]` as bf16. w: [n, k] e4m3 bits;
    /// s: [ceil(n/128), ceil(k/128)] f32 row-major (the checkpoint's `weight_scale_inv`).
    pub fn dequant_fp8_block(
        &self,
        w: &CudaSlice<u8>,
        s: &CudaSlice<f32>,
        out: &mut CudaSlice<bf16>,
        n: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "dequant_fp8_block";
        check_len(OP, "w", w.len(), n * k)?;
        check_len(OP, "out", out.len(), n * k)?;
        check_len(OP, "scales", s.len(), n.div_ceil(128) * k.div_ceil(128))?;
        if n * k == 0 {
            return Ok(());
        }
        let (n_i, k_i) = (to_i32(OP, "n", n)?, to_i32(OP, "k", k)?);
        let (func, per_thread) =
            if k % 16 == 0 { (&self.dequant_v16, 16) } else { (&self.dequant, 1) };
        let mut b = self.stream.launch_builder(func);
        b.arg(w).arg(s).arg(out).arg(&n_i).arg(&k_i);
        // SAFETY: matches `dequant_fp8_block(_v16)` in quant.cu; lengths checked above; the v16
        // kernel only for k % 16 == 0 (16-byte aligned rows; 256-byte aligned allocations).
        unsafe { b.launch(grid_stride(n * k / per_thread)) }
            .map_err(CudaError::driver("launch dequant_fp8_block"))?;
        Ok(())
    }

    /// Fills `out` with uniform values in [-scale, scale) (deterministic in `seed`).
    pub fn fill_uniform_bf16(
        &self,
        out: &mut CudaSlice<bf16>,
        seed: u32,
        scale: f32,
    ) -> Result<(), CudaError> {
        let n = out.len() as u64;
        let mut b = self.stream.launch_builder(&self.fill_bf16);
        b.arg(out).arg(&n).arg(&seed).arg(&scale);
        // SAFETY: matches `fill_uniform_bf16` in fill.cu; the kernel writes exactly n elements.
        unsafe { b.launch(grid_stride(n as usize)) }
            .map_err(CudaError::driver("launch fill_uniform_bf16"))?;
        Ok(())
    }

    /// Fills `out` with e4m3 bits of uniform values in [-scale, scale) (saturating).
    pub fn fill_uniform_e4m3(
        &self,
        out: &mut CudaSlice<u8>,
        seed: u32,
        scale: f32,
    ) -> Result<(), CudaError> {
        let n = out.len() as u64;
        let mut b = self.stream.launch_builder(&self.fill_e4m3);
        b.arg(out).arg(&n).arg(&seed).arg(&scale);
        // SAFETY: matches `fill_uniform_e4m3` in fill.cu; the kernel writes exactly n elements.
        unsafe { b.launch(grid_stride(n as usize)) }
            .map_err(CudaError::driver("launch fill_uniform_e4m3"))?;
        Ok(())
    }

    /// Fills `out` with uniform values in [lo, hi).
    pub fn fill_uniform_f32(
        &self,
        out: &mut CudaSlice<f32>,
        seed: u32,
        lo: f32,
        hi: f32,
    ) -> Result<(), CudaError> {
        let n = out.len() as u64;
        let mut b = self.stream.launch_builder(&self.fill_f32);
        b.arg(out).arg(&n).arg(&seed).arg(&lo).arg(&hi);
        // SAFETY: matches `fill_uniform_f32` in fill.cu; the kernel writes exactly n elements.
        unsafe { b.launch(grid_stride(n as usize)) }
            .map_err(CudaError::driver("launch fill_uniform_f32"))?;
        Ok(())
    }

    /// `dst = src` through a 16-byte-vector kernel (for bandwidth measurements); both lengths
    /// must be equal multiples of 16 bytes.
    pub fn copy_16b(&self, src: &CudaSlice<u8>, dst: &mut CudaSlice<u8>) -> Result<(), CudaError> {
        const OP: &str = "copy_16b";
        if src.len() != dst.len() || src.len() % 16 != 0 {
            return Err(CudaError::shape(
                OP,
                format!("src {} and dst {} must be equal multiples of 16", src.len(), dst.len()),
            ));
        }
        let n16 = (src.len() / 16) as u64;
        let mut b = self.stream.launch_builder(&self.copy);
        b.arg(src).arg(dst).arg(&n16);
        // SAFETY: matches `copy_16b` in fill.cu; cudarc allocations are 256-byte aligned and both
        // buffers hold n16 × 16 bytes.
        unsafe { b.launch(grid_stride(n16 as usize)) }
            .map_err(CudaError::driver("launch copy_16b"))?;
        Ok(())
    }
}
