//! Launch wrappers of `glue.cu`: the model forward's small kernels that the shared op set of
//! `fathom_kernels::cuda` does not have (f32 residual stream, RMSNorm variants, cache-row
//! scatter, MLA absorption / un-absorption, indexer scores over per-sequence caches, f32 GEMM
//! for the router and indexer head weights). Compiled by NVRTC for the device's arch at
//! [`Glue::load`] (through the kernels crate's compiler and cache). Every wrapper checks the
//! lengths it can see and returns [`CudaError::Shape`]; device-resident indices (cache rows,
//! bases, lengths) are the caller's invariant (`CudaModel::forward` builds them).

use std::collections::HashMap;
use std::sync::Arc;

use fathom_kernels::cuda::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use fathom_kernels::cuda::cudarc::nvrtc::Ptx;
use fathom_kernels::cuda::{
    CudaDevice, CudaError, KernelCache, KernelSource, compile_cubin, grid_stride,
};
use half::bf16;

/// The glue source and its kernels.
pub const GLUE: KernelSource = KernelSource {
    name: "model_glue",
    code: include_str!("glue.cu"),
    kernels: &[
        "rmsnorm_f32_rows",
        "rmsnorm_bf16_strided",
        "rmsnorm_bf16_inplace",
        "add_bf16_into_f32",
        "bf16_to_f32_k",
        "f32_to_bf16_k",
        "gemm_f32_nt",
        "scatter_rows_bf16",
        "absorb_q",
        "unabsorb_o",
        "indexer_scores_rows",
        "add_base",
        "layernorm_f32_rows",
        "scatter_rows_f32",
        "indexer_scores_rows_f32",
    ],
};

fn shape(op: &'static str, detail: impl Into<String>) -> CudaError {
    CudaError::Shape { op, detail: detail.into() }
}

fn check(op: &'static str, what: &str, got: usize, want: usize) -> Result<(), CudaError> {
    if got < want {
        return Err(shape(op, format!("{what} has {got} elements, needs at least {want}")));
    }
    Ok(())
}

fn i32_of(op: &'static str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| shape(op, format!("{v} exceeds i32")))
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn launched(
    op: &'static str,
) -> impl FnOnce(fathom_kernels::cuda::cudarc::driver::DriverError) -> CudaError {
    move |source| CudaError::Driver { op, source }
}

/// The loaded glue kernels, launching on the device stream.
#[derive(Debug)]
pub struct Glue {
    stream: Arc<CudaStream>,
    f: HashMap<&'static str, CudaFunction>,
}

impl Glue {
    /// Compiles (or loads from `cache`) `glue.cu` for the device's architecture.
    pub fn load(dev: &CudaDevice, cache: Option<&KernelCache>) -> Result<Self, CudaError> {
        let arch = dev.info().arch.clone();
        let cubin = match cache {
            Some(c) => c.get_or_compile(&GLUE, &arch)?.0,
            None => compile_cubin(&GLUE, &arch)?,
        };
        let module = dev
            .context()
            .load_module(Ptx::from_binary(cubin))
            .map_err(launched("cuModuleLoadData"))?;
        let mut f = HashMap::new();
        for &k in GLUE.kernels {
            f.insert(k, module.load_function(k).map_err(launched("cuModuleGetFunction"))?);
        }
        Ok(Self { stream: dev.stream().clone(), f })
    }

    fn func(&self, name: &'static str) -> &CudaFunction {
        &self.f[name] // every name of GLUE.kernels was loaded in `load`
    }

    /// y (bf16) and optionally yf (f32) = RMSNorm(x) per row. x: [rows, dim] f32.
    pub fn rmsnorm_f32_rows(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<bf16>,
        yf: &mut CudaSlice<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "rmsnorm_f32_rows";
        check(OP, "x", x.len(), rows * dim)?;
        check(OP, "y", y.len(), rows * dim)?;
        check(OP, "yf", yf.len(), rows * dim)?;
        check(OP, "w", w.len(), dim)?;
        let d = i32_of(OP, dim)?;
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(x).arg(w).arg(y).arg(yf).arg(&d).arg(&eps);
        // SAFETY: matches `rmsnorm_f32_rows` in glue.cu; every buffer holds rows × dim (checked).
        unsafe { b.launch(rows_cfg(rows)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// y[r, :dim] = RMSNorm(x[r, :dim]); x, y: [rows, dim] bf16 (dense rows).
    pub fn rmsnorm_bf16(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<bf16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "rmsnorm_bf16_strided";
        check(OP, "x", x.len(), rows * dim)?;
        check(OP, "y", y.len(), rows * dim)?;
        check(OP, "w", w.len(), dim)?;
        let d = i32_of(OP, dim)?;
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(x).arg(&d).arg(w).arg(y).arg(&d).arg(&d).arg(&eps);
        // SAFETY: matches `rmsnorm_bf16_strided`; strides = dim, rows × dim checked.
        unsafe { b.launch(rows_cfg(rows)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// In place: x[r, :dim] = RMSNorm(x[r, :dim]) for rows of stride `stride` ≥ dim.
    pub fn rmsnorm_bf16_inplace(
        &self,
        x: &mut CudaSlice<bf16>,
        w: &CudaSlice<f32>,
        rows: usize,
        stride: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "rmsnorm_bf16_inplace";
        if stride < dim {
            return Err(shape(OP, format!("stride {stride} < dim {dim}")));
        }
        check(OP, "x", x.len(), rows * stride)?;
        check(OP, "w", w.len(), dim)?;
        let (s, d) = (i32_of(OP, stride)?, i32_of(OP, dim)?);
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(x).arg(&s).arg(w).arg(&d).arg(&eps);
        // SAFETY: matches `rmsnorm_bf16_inplace`; rows × stride checked, dim ≤ stride.
        unsafe { b.launch(rows_cfg(rows)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// h[i] += a[i] for i < n.
    pub fn add_into(
        &self,
        h: &mut CudaSlice<f32>,
        a: &CudaSlice<bf16>,
        n: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "add_bf16_into_f32";
        check(OP, "h", h.len(), n)?;
        check(OP, "a", a.len(), n)?;
        let n64 = n as u64;
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(h).arg(a).arg(&n64);
        // SAFETY: matches `add_bf16_into_f32`; both hold n (checked).
        unsafe { b.launch(grid_stride(n)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// out[i] = a[i] as f32 for i < n.
    pub fn to_f32(
        &self,
        a: &CudaSlice<bf16>,
        out: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "bf16_to_f32_k";
        check(OP, "a", a.len(), n)?;
        check(OP, "out", out.len(), n)?;
        let n64 = n as u64;
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(a).arg(out).arg(&n64);
        // SAFETY: matches `bf16_to_f32_k`; both hold n (checked).
        unsafe { b.launch(grid_stride(n)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// y[m, n] = c · x[m, k] · w[n, k]ᵀ, all f32.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_f32(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        m: usize,
        n: usize,
        k: usize,
        c: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "gemm_f32_nt";
        check(OP, "x", x.len(), m * k)?;
        check(OP, "w", w.len(), n * k)?;
        check(OP, "y", y.len(), m * n)?;
        let (mi, ni, ki) = (i32_of(OP, m)?, i32_of(OP, n)?, i32_of(OP, k)?);
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(x).arg(w).arg(y).arg(&mi).arg(&ni).arg(&ki).arg(&c);
        // SAFETY: matches `gemm_f32_nt`; x, w, y checked against m × k, n × k, m × n.
        unsafe { b.launch(grid_stride(m * n)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// dst[rows[r], :width] = src[r, :width] (row strides `src_stride`, `dst_stride`).
    /// `rows` are device cache rows below `dst_rows` (the caller's invariant).
    #[allow(clippy::too_many_arguments)]
    pub fn scatter_rows(
        &self,
        src: &CudaSlice<bf16>,
        src_stride: usize,
        dst: &mut CudaSlice<bf16>,
        dst_stride: usize,
        dst_rows: usize,
        rows: &CudaSlice<i32>,
        n: usize,
        width: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "scatter_rows_bf16";
        if width > src_stride || width > dst_stride {
            return Err(shape(OP, format!("width {width} exceeds a stride")));
        }
        check(OP, "src", src.len(), n * src_stride)?;
        check(OP, "dst", dst.len(), dst_rows * dst_stride)?;
        check(OP, "rows", rows.len(), n)?;
        let (ss, ds, ni, wi) =
            (i32_of(OP, src_stride)?, i32_of(OP, dst_stride)?, i32_of(OP, n)?, i32_of(OP, width)?);
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(src).arg(&ss).arg(dst).arg(&ds).arg(rows).arg(&ni).arg(&wi);
        // SAFETY: matches `scatter_rows_bf16`; src holds n rows, rows holds n entries, every
        // entry is a row of dst (built by the forward from validated positions and slots).
        unsafe { b.launch(grid_stride(n * width)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// Absorbed queries `[n, nh_pad, kl + rope]` from q `[n, nh, nope + rope]` and kv_b
    /// `[nh·(nope + v), kl]` f32 (pad heads zero).
    #[allow(clippy::too_many_arguments)]
    pub fn absorb_q(
        &self,
        q: &CudaSlice<bf16>,
        kv_b: &CudaSlice<f32>,
        qa: &mut CudaSlice<bf16>,
        n: usize,
        nh: usize,
        nh_pad: usize,
        dims: (usize, usize, usize, usize),
    ) -> Result<(), CudaError> {
        const OP: &str = "absorb_q";
        let (nope, rope, v, kl) = dims;
        check(OP, "q", q.len(), n * nh * (nope + rope))?;
        check(OP, "kv_b", kv_b.len(), nh * (nope + v) * kl)?;
        check(OP, "qa", qa.len(), n * nh_pad * (kl + rope))?;
        let a = [n, nh, nh_pad, nope, rope, v, kl].map(|x| x as i32);
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(q).arg(kv_b).arg(qa);
        for x in &a {
            b.arg(x);
        }
        // SAFETY: matches `absorb_q`; every buffer checked against the shapes it indexes.
        unsafe { b.launch(grid_stride(n * nh_pad * (kl + rope))) }.map_err(launched(OP))?;
        Ok(())
    }

    /// Per-head outputs `[n, nh, v]` from latent outputs `[n, nh_pad, kl]` through kv_b's W_UV.
    #[allow(clippy::too_many_arguments)]
    pub fn unabsorb_o(
        &self,
        ol: &CudaSlice<bf16>,
        kv_b: &CudaSlice<f32>,
        oh: &mut CudaSlice<bf16>,
        n: usize,
        nh: usize,
        nh_pad: usize,
        dims: (usize, usize, usize),
    ) -> Result<(), CudaError> {
        const OP: &str = "unabsorb_o";
        let (nope, v, kl) = dims;
        check(OP, "ol", ol.len(), n * nh_pad * kl)?;
        check(OP, "kv_b", kv_b.len(), nh * (nope + v) * kl)?;
        check(OP, "oh", oh.len(), n * nh * v)?;
        let a = [n, nh, nh_pad, nope, v, kl].map(|x| x as i32);
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(ol).arg(kv_b).arg(oh);
        for x in &a {
            b.arg(x);
        }
        // SAFETY: matches `unabsorb_o`; every buffer checked against the shapes it indexes.
        unsafe { b.launch(grid_stride(n * nh * v)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// Indexer scores `[n, max_ctx]` of each query row over keys `base[r] ..
    /// base[r] + lens[r]` of the key cache `[key_rows, dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn indexer_scores(
        &self,
        q: &CudaSlice<bf16>,
        w: &CudaSlice<f32>,
        keys: &CudaSlice<bf16>,
        base: &CudaSlice<i32>,
        lens: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        n: usize,
        heads: usize,
        dim: usize,
        max_ctx: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "indexer_scores_rows";
        check(OP, "q", q.len(), n * heads * dim)?;
        check(OP, "w", w.len(), n * heads)?;
        check(OP, "base", base.len(), n)?;
        check(OP, "lens", lens.len(), n)?;
        check(OP, "out", out.len(), n * max_ctx)?;
        if n == 0 {
            return Ok(());
        }
        let (h, d, c) = (i32_of(OP, heads)?, i32_of(OP, dim)?, i32_of(OP, max_ctx)?);
        let cfg = LaunchConfig {
            grid_dim: (max_ctx.div_ceil(128) as u32, n as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(q).arg(w).arg(keys).arg(base).arg(lens).arg(out).arg(&h).arg(&d).arg(&c);
        // SAFETY: matches `indexer_scores_rows`; q, w, out checked; the kernel reads keys rows
        // base[r] + s for s < min(lens[r], max_ctx), inside the sequence's cache region by the
        // forward's construction (base = slot · max_ctx, lens ≤ max_ctx).
        unsafe { b.launch(cfg) }.map_err(launched(OP))?;
        Ok(())
    }

    /// idx[r, j] += base[r] where idx[r, j] ≥ 0. idx `[n, k]`.
    pub fn add_base(
        &self,
        idx: &mut CudaSlice<i32>,
        base: &CudaSlice<i32>,
        n: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "add_base";
        check(OP, "idx", idx.len(), n * k)?;
        check(OP, "base", base.len(), n)?;
        let (ni, ki) = (i32_of(OP, n)?, i32_of(OP, k)?);
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(idx).arg(base).arg(&ni).arg(&ki);
        // SAFETY: matches `add_base`; idx holds n × k, base n (checked).
        unsafe { b.launch(grid_stride(n * k)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// y = LayerNorm(x) per row with weight and bias, f32. x, y: [rows, dim].
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_f32(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "layernorm_f32_rows";
        check(OP, "x", x.len(), rows * dim)?;
        check(OP, "y", y.len(), rows * dim)?;
        check(OP, "w", w.len(), dim)?;
        check(OP, "bias", bias.len(), dim)?;
        let d = i32_of(OP, dim)?;
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(x).arg(w).arg(bias).arg(y).arg(&d).arg(&eps);
        // SAFETY: matches `layernorm_f32_rows`; every buffer checked against rows × dim / dim.
        unsafe { b.launch(rows_cfg(rows)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// dst[rows[r], :] = src[r, :], f32 rows of `width`; `rows` below `dst_rows` (caller's
    /// invariant).
    pub fn scatter_rows_f32(
        &self,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        dst_rows: usize,
        rows: &CudaSlice<i32>,
        n: usize,
        width: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "scatter_rows_f32";
        check(OP, "src", src.len(), n * width)?;
        check(OP, "dst", dst.len(), dst_rows * width)?;
        check(OP, "rows", rows.len(), n)?;
        let (ni, wi) = (i32_of(OP, n)?, i32_of(OP, width)?);
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(src).arg(dst).arg(rows).arg(&ni).arg(&wi);
        // SAFETY: matches `scatter_rows_f32`; src holds n rows; every rows entry is a row of dst
        // (built by the forward from validated positions and slots).
        unsafe { b.launch(grid_stride(n * width)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// [`Self::indexer_scores`] with f32 queries and an f32 key cache.
    #[allow(clippy::too_many_arguments)]
    pub fn indexer_scores_f32(
        &self,
        q: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        keys: &CudaSlice<f32>,
        base: &CudaSlice<i32>,
        lens: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        n: usize,
        heads: usize,
        dim: usize,
        max_ctx: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "indexer_scores_rows_f32";
        check(OP, "q", q.len(), n * heads * dim)?;
        check(OP, "w", w.len(), n * heads)?;
        check(OP, "base", base.len(), n)?;
        check(OP, "lens", lens.len(), n)?;
        check(OP, "out", out.len(), n * max_ctx)?;
        if n == 0 {
            return Ok(());
        }
        let (h, d, c) = (i32_of(OP, heads)?, i32_of(OP, dim)?, i32_of(OP, max_ctx)?);
        let cfg = LaunchConfig {
            grid_dim: (max_ctx.div_ceil(128) as u32, n as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(q).arg(w).arg(keys).arg(base).arg(lens).arg(out).arg(&h).arg(&d).arg(&c);
        // SAFETY: as `indexer_scores`: keys rows base[r] + s, s < min(lens[r], max_ctx), lie in
        // the sequence's cache region by the forward's construction.
        unsafe { b.launch(cfg) }.map_err(launched(OP))?;
        Ok(())
    }
}
