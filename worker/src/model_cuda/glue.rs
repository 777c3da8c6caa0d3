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
        "rmsnorm_bf16_inplace",
        "add_bf16_into_f32",
        "bf16_to_f32_k",
        "f32_to_bf16_k",
        "scatter_rows_bf16",
        "absorb_rope_pad",
        "add_base",
        "layernorm_f32_rows",
        "scatter_rows_f32",
        "indexer_scores_rows_f32",
        "gather_rows_f32",
        "rmsnorm_f32_inplace",
        "add_f32_into",
        "swiglu_f32",
        "absorb_q_f32",
        "unabsorb_o_f32",
        "mla_sparse_f32",
        "moe_up_f32",
        "moe_down_f32",
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

    /// The rope columns of the absorbed queries `qa [n, nh_pad, kl + rope]` from q `[n, nh,
    /// nope + rope]`, and zeros in the pad heads (the nope columns come from a batched GEMM).
    #[allow(clippy::too_many_arguments)]
    pub fn absorb_rope_pad(
        &self,
        q: &CudaSlice<bf16>,
        qa: &mut CudaSlice<bf16>,
        n: usize,
        nh: usize,
        nh_pad: usize,
        dims: (usize, usize, usize),
    ) -> Result<(), CudaError> {
        const OP: &str = "absorb_rope_pad";
        let (nope, rope, kl) = dims;
        check(OP, "q", q.len(), n * nh * (nope + rope))?;
        check(OP, "qa", qa.len(), n * nh_pad * (kl + rope))?;
        let a = [n, nh, nh_pad, nope, rope, kl].map(|x| x as i32);
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(q).arg(qa);
        for x in &a {
            b.arg(x);
        }
        // SAFETY: matches `absorb_rope_pad`; both buffers checked against the shapes it indexes.
        unsafe { b.launch(grid_stride(n * nh_pad * (kl + rope))) }.map_err(launched(OP))?;
        Ok(())
    }

    /// out[i] = bf16(a[i]) for i < n.
    pub fn to_bf16(
        &self,
        a: &CudaSlice<f32>,
        out: &mut CudaSlice<bf16>,
        n: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "f32_to_bf16_k";
        check(OP, "a", a.len(), n)?;
        check(OP, "out", out.len(), n)?;
        let n64 = n as u64;
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(a).arg(out).arg(&n64);
        // SAFETY: matches `f32_to_bf16_k`; both hold n (checked).
        unsafe { b.launch(grid_stride(n)) }.map_err(launched(OP))?;
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

    /// Indexer scores `[n, max_ctx]` of each f32 query row over keys `base[r] .. base[r] +
    /// lens[r]` of the f32 key cache `[key_rows, dim]` (−∞ beyond `lens[r]`).
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
        // SAFETY: matches `indexer_scores_rows_f32`; q, w, out checked; the kernel reads keys
        // rows base[r] + s for s < min(lens[r], max_ctx), inside the sequence's cache region by
        // the forward's construction (base = slot · max_ctx, lens ≤ max_ctx).
        unsafe { b.launch(cfg) }.map_err(launched(OP))?;
        Ok(())
    }

    // ---- f32 path (`Precision::F32`); CPU twins in `kernels::cpu`, parity in
    // worker/tests/cuda_model_glue.rs.

    /// out[r, :] = table[ids[r], :] (f32 rows of `dim`); ids outside `[0, vocab)` give zero rows
    /// and are counted in `bad[0]`.
    #[allow(clippy::too_many_arguments)]
    pub fn gather_rows_f32(
        &self,
        table: &CudaSlice<f32>,
        ids: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        bad: &mut CudaSlice<i32>,
        n: usize,
        dim: usize,
        vocab: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "gather_rows_f32";
        check(OP, "table", table.len(), vocab * dim)?;
        check(OP, "ids", ids.len(), n)?;
        check(OP, "out", out.len(), n * dim)?;
        check(OP, "bad", bad.len(), 1)?;
        let (ni, di, vi) = (i32_of(OP, n)?, i32_of(OP, dim)?, i32_of(OP, vocab)?);
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(table).arg(ids).arg(out).arg(bad).arg(&ni).arg(&di).arg(&vi);
        // SAFETY: matches `gather_rows_f32`; table holds vocab rows, ids n, out n rows (checked);
        // ids outside the table are not read (the kernel checks them).
        unsafe { b.launch(grid_stride(n * dim)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// In place: x[r, :dim] = RMSNorm(x[r, :dim]) for f32 rows of stride `stride` ≥ dim.
    pub fn rmsnorm_f32_inplace(
        &self,
        x: &mut CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        stride: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "rmsnorm_f32_inplace";
        if stride < dim {
            return Err(shape(OP, format!("stride {stride} < dim {dim}")));
        }
        check(OP, "x", x.len(), rows * stride)?;
        check(OP, "w", w.len(), dim)?;
        let (s, d) = (i32_of(OP, stride)?, i32_of(OP, dim)?);
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(x).arg(&s).arg(w).arg(&d).arg(&eps);
        // SAFETY: matches `rmsnorm_f32_inplace`; rows × stride checked, dim ≤ stride.
        unsafe { b.launch(rows_cfg(rows)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// h[i] += a[i] for i < n, f32.
    pub fn add_f32_into(
        &self,
        h: &mut CudaSlice<f32>,
        a: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "add_f32_into";
        check(OP, "h", h.len(), n)?;
        check(OP, "a", a.len(), n)?;
        let n64 = n as u64;
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(h).arg(a).arg(&n64);
        // SAFETY: matches `add_f32_into`; both hold n (checked).
        unsafe { b.launch(grid_stride(n)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// act[r, i] = SiLU(gu[r, i]) · gu[r, inner + i]; gu `[n, 2·inner]`, act `[n, inner]`.
    pub fn swiglu_f32(
        &self,
        gu: &CudaSlice<f32>,
        act: &mut CudaSlice<f32>,
        n: usize,
        inner: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "swiglu_f32";
        check(OP, "gu", gu.len(), n * 2 * inner)?;
        check(OP, "act", act.len(), n * inner)?;
        let (ni, ii) = (i32_of(OP, n)?, i32_of(OP, inner)?);
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(gu).arg(act).arg(&ni).arg(&ii);
        // SAFETY: matches `swiglu_f32`; gu holds n × 2·inner, act n × inner (checked).
        unsafe { b.launch(grid_stride(n * inner)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// Absorbed f32 queries `[n, nh, kl + rope]` from q `[n, nh, nope + rope]` and kv_b
    /// `[nh·(nope + v), kl]`.
    #[allow(clippy::too_many_arguments)]
    pub fn absorb_q_f32(
        &self,
        q: &CudaSlice<f32>,
        kv_b: &CudaSlice<f32>,
        qa: &mut CudaSlice<f32>,
        n: usize,
        nh: usize,
        dims: (usize, usize, usize, usize),
    ) -> Result<(), CudaError> {
        const OP: &str = "absorb_q_f32";
        let (nope, rope, v, kl) = dims;
        check(OP, "q", q.len(), n * nh * (nope + rope))?;
        check(OP, "kv_b", kv_b.len(), nh * (nope + v) * kl)?;
        check(OP, "qa", qa.len(), n * nh * (kl + rope))?;
        let a = [n, nh, nope, rope, v, kl].map(|x| x as i32);
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(q).arg(kv_b).arg(qa);
        for x in &a {
            b.arg(x);
        }
        // SAFETY: matches `absorb_q_f32`; every buffer checked against the shapes it indexes.
        unsafe { b.launch(grid_stride(n * nh * (kl + rope))) }.map_err(launched(OP))?;
        Ok(())
    }

    /// Per-head f32 outputs `[n, nh, v]` from latent outputs `[n, nh, kl]` through W_UV.
    #[allow(clippy::too_many_arguments)]
    pub fn unabsorb_o_f32(
        &self,
        ol: &CudaSlice<f32>,
        kv_b: &CudaSlice<f32>,
        oh: &mut CudaSlice<f32>,
        n: usize,
        nh: usize,
        dims: (usize, usize, usize),
    ) -> Result<(), CudaError> {
        const OP: &str = "unabsorb_o_f32";
        let (nope, v, kl) = dims;
        check(OP, "ol", ol.len(), n * nh * kl)?;
        check(OP, "kv_b", kv_b.len(), nh * (nope + v) * kl)?;
        check(OP, "oh", oh.len(), n * nh * v)?;
        let a = [n, nh, nope, v, kl].map(|x| x as i32);
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(ol).arg(kv_b).arg(oh);
        for x in &a {
            b.arg(x);
        }
        // SAFETY: matches `unabsorb_o_f32`; every buffer checked against the shapes it indexes.
        unsafe { b.launch(grid_stride(n * nh * v)) }.map_err(launched(OP))?;
        Ok(())
    }

    /// Sparse MLA attention in f32 (absorbed form): per row r and head h, softmax over the
    /// selected latent rows `sel[r, :]` (−1 = no key) of `scale · qa[r, h]·kv[row]`, output the
    /// weighted sum of their first `kl` columns. qa `[n, nh, kl + rope]`, kv `[kv_rows, kl +
    /// rope]`, sel `[n, topk]`, out `[n, nh, kl]`. Twin: `cpu::attention::mla_sparse_attention`.
    #[allow(clippy::too_many_arguments)]
    pub fn mla_sparse_f32(
        &self,
        qa: &CudaSlice<f32>,
        kv: &CudaSlice<f32>,
        sel: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        n: usize,
        nh: usize,
        dims: (usize, usize, usize, usize),
        scale: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "mla_sparse_f32";
        let (kl, rope, topk, kv_rows) = dims;
        check(OP, "qa", qa.len(), n * nh * (kl + rope))?;
        check(OP, "kv", kv.len(), kv_rows * (kl + rope))?;
        check(OP, "sel", sel.len(), n * topk)?;
        check(OP, "out", out.len(), n * nh * kl)?;
        if n * nh == 0 {
            return Ok(());
        }
        let smem = topk * 4;
        if smem > 48 * 1024 {
            return Err(shape(OP, format!("topk {topk} needs more than 48 KiB of shared memory")));
        }
        let a = [nh, kl, rope, topk].map(|x| x as i32);
        let cfg = LaunchConfig {
            grid_dim: (i32_of(OP, n * nh)? as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut b = self.stream.launch_builder(self.func(OP));
        b.arg(qa).arg(kv).arg(sel).arg(out);
        for x in &a {
            b.arg(x);
        }
        b.arg(&scale);
        // SAFETY: matches `mla_sparse_f32`; qa, sel, out checked; every sel entry ≥ 0 is a kv
        // row (the forward builds them from validated positions: base + position < kv_rows).
        unsafe { b.launch(cfg) }.map_err(launched(OP))?;
        Ok(())
    }

    /// Routed experts in f32, in two launches without host sync: act `[n, k, inner]` =
    /// SwiGLU of each (token, chosen expert), then out `[n, dim]` = Σ_j wts[t, j] · down(act).
    /// ids `[n, k]` outside `[0, n_exp)` contribute nothing. w13 `[E, 2·inner, dim]` (gate |
    /// up), w2 `[E, dim, inner]`.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_f32(
        &self,
        x: &CudaSlice<f32>,
        ids: &CudaSlice<i32>,
        wts: &CudaSlice<f32>,
        w13: &CudaSlice<f32>,
        w2: &CudaSlice<f32>,
        act: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        shape4: (usize, usize, usize, usize, usize),
    ) -> Result<(), CudaError> {
        const OP: &str = "moe_f32";
        let (n, k, dim, inner, n_exp) = shape4;
        check(OP, "x", x.len(), n * dim)?;
        check(OP, "ids", ids.len(), n * k)?;
        check(OP, "wts", wts.len(), n * k)?;
        check(OP, "w13", w13.len(), n_exp * 2 * inner * dim)?;
        check(OP, "w2", w2.len(), n_exp * dim * inner)?;
        check(OP, "act", act.len(), n * k * inner)?;
        check(OP, "out", out.len(), n * dim)?;
        let a = [n, k, dim, inner, n_exp].map(|v| v as i32);
        let mut b = self.stream.launch_builder(self.func("moe_up_f32"));
        b.arg(x).arg(ids).arg(w13).arg(&mut *act);
        for v in &a {
            b.arg(v);
        }
        // SAFETY: matches `moe_up_f32`; buffers checked; expert ids are range-checked on device.
        unsafe { b.launch(grid_stride(n * k * inner)) }.map_err(launched("moe_up_f32"))?;
        let mut b = self.stream.launch_builder(self.func("moe_down_f32"));
        b.arg(&*act).arg(ids).arg(wts).arg(w2).arg(out);
        for v in &a {
            b.arg(v);
        }
        // SAFETY: matches `moe_down_f32`; as above.
        unsafe { b.launch(grid_stride(n * dim)) }.map_err(launched("moe_down_f32"))?;
        Ok(())
    }
}
