//! GEMMs for linear layers, `y[m, n] = x[m, k] · W[n, k]ᵀ` with row-major x, W, y:
//! bf16 through cuBLAS ([`BlasGemm`]), FP8 e4m3 with DeepSeek block scales through cuBLASLt
//! ([`Fp8Gemm`]: activations 1×128 ue8m0 scales, weights 128×128 fp32 scales).
//!
//! Row-major tensors are handed to the column-major libraries as their transposes: cuBLAS
//! computes `yᵀ [n, m] = W [n, k] · xᵀ [k, m]` with A = W (op T, lda k), B = x (op N, ldb k),
//! C = y (ldc n). cuBLASLt's FP8 kernels need exactly this "TN" form.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig, sys as blas_sys};
use cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig, result as lt, sys as lt_sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::cuda::{CudaDevice, CudaError};

fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::shape(op, format!("{what} = {v} exceeds i32")))
}

fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<(), CudaError> {
    if got != want {
        return Err(CudaError::shape(op, format!("{what} has {got} elements, expected {want}")));
    }
    Ok(())
}

/// bf16 GEMM through cuBLAS (fp32 accumulation), on the device stream.
#[derive(Debug)]
pub struct BlasGemm {
    blas: CudaBlas,
}

impl BlasGemm {
    pub fn new(dev: &CudaDevice) -> Result<Self, CudaError> {
        let blas = CudaBlas::new(dev.stream().clone())
            .map_err(|e| CudaError::Blas { op: "cublasCreate", status: format!("{e:?}") })?;
        Ok(Self { blas })
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ`, all bf16 row-major, fp32 accumulation.
    pub fn gemm_bf16(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        y: &mut CudaSlice<bf16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "gemm_bf16";
        check_len(OP, "x", x.len(), m * k)?;
        check_len(OP, "w", w.len(), n * k)?;
        check_len(OP, "y", y.len(), m * n)?;
        let cfg = GemmConfig {
            transa: blas_sys::cublasOperation_t::CUBLAS_OP_T,
            transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
            m: to_i32(OP, "n", n)?,
            n: to_i32(OP, "m", m)?,
            k: to_i32(OP, "k", k)?,
            alpha: bf16::ONE,
            lda: to_i32(OP, "k", k)?,
            ldb: to_i32(OP, "k", k)?,
            beta: bf16::ZERO,
            ldc: to_i32(OP, "n", n)?,
        };
        // SAFETY: the three buffers were checked against the shapes the config describes.
        unsafe { self.blas.gemm(cfg, w, x, y) }
            .map_err(|e| CudaError::Blas { op: "cublasGemmEx(bf16)", status: format!("{e:?}") })
    }

    /// [`Self::gemm_bf16`] over views (sub-ranges of larger buffers, e.g. one expert's rows of a
    /// permuted activation buffer and one expert's slice of a stacked weight).
    pub fn gemm_bf16_view<X, W, Y>(
        &self,
        x: &X,
        w: &W,
        y: &mut Y,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<(), CudaError>
    where
        X: DevicePtr<bf16>,
        W: DevicePtr<bf16>,
        Y: DevicePtrMut<bf16>,
    {
        const OP: &str = "gemm_bf16_view";
        check_len(OP, "x", x.len(), m * k)?;
        check_len(OP, "w", w.len(), n * k)?;
        check_len(OP, "y", y.len(), m * n)?;
        let cfg = GemmConfig {
            transa: blas_sys::cublasOperation_t::CUBLAS_OP_T,
            transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
            m: to_i32(OP, "n", n)?,
            n: to_i32(OP, "m", m)?,
            k: to_i32(OP, "k", k)?,
            alpha: bf16::ONE,
            lda: to_i32(OP, "k", k)?,
            ldb: to_i32(OP, "k", k)?,
            beta: bf16::ZERO,
            ldc: to_i32(OP, "n", n)?,
        };
        // SAFETY: the three views were checked against the shapes the config describes.
        unsafe { self.blas.gemm(cfg, w, x, y) }
            .map_err(|e| CudaError::Blas { op: "cublasGemmEx(bf16)", status: format!("{e:?}") })
    }
}

impl BlasGemm {
    /// `y[m, n] = alpha · x[m, k] · w[n, k]ᵀ`, all f32 row-major (cuBLAS SGEMM: fp32 FMA, no
    /// TF32 — the handle keeps cuBLAS's default math mode). The GPU forward's fp32 projections
    /// (q-LoRA down, indexer, router) run here.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_f32(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
    ) -> Result<(), CudaError> {
        const OP: &str = "gemm_f32";
        check_len(OP, "x", x.len(), m * k)?;
        check_len(OP, "w", w.len(), n * k)?;
        check_len(OP, "y", y.len(), m * n)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let cfg = GemmConfig {
            transa: blas_sys::cublasOperation_t::CUBLAS_OP_T,
            transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
            m: to_i32(OP, "n", n)?,
            n: to_i32(OP, "m", m)?,
            k: to_i32(OP, "k", k)?,
            alpha,
            lda: to_i32(OP, "k", k)?,
            ldb: to_i32(OP, "k", k)?,
            beta: 0.0f32,
            ldc: to_i32(OP, "n", n)?,
        };
        // SAFETY: the three buffers were checked against the shapes the config describes.
        unsafe { self.blas.gemm(cfg, w, x, y) }
            .map_err(|e| CudaError::Blas { op: "cublasSgemm", status: format!("{e:?}") })
    }

    /// A batch of bf16 GEMMs in cuBLAS's own column-major convention (fp32 accumulation):
    /// for `i < s.batch`, `C_i [m, n] = op(A_i) · op(B_i)` with `A_i = a + i·stride_a` etc.
    /// Every operand may be a strided view into a larger buffer (leading dimensions ≥ the
    /// rows they hold); the wrapper checks that the last element any batch touches lies inside
    /// each buffer, so no shape can make cuBLAS read or write out of bounds.
    pub fn gemm_bf16_strided_batched<A, B, C>(
        &self,
        s: &StridedGemm,
        a: &A,
        b: &B,
        c: &mut C,
    ) -> Result<(), CudaError>
    where
        A: DevicePtr<bf16>,
        B: DevicePtr<bf16>,
        C: DevicePtrMut<bf16>,
    {
        const OP: &str = "gemm_bf16_strided_batched";
        if s.batch == 0 || s.m == 0 || s.n == 0 {
            return Ok(());
        }
        let (ra, ca) = if s.trans_a { (s.k, s.m) } else { (s.m, s.k) };
        let (rb, cb) = if s.trans_b { (s.n, s.k) } else { (s.k, s.n) };
        for (what, rows, ld) in [("lda", ra, s.lda), ("ldb", rb, s.ldb), ("ldc", s.m, s.ldc)] {
            if ld < rows.max(1) {
                return Err(CudaError::shape(OP, format!("{what} {ld} < {rows} rows")));
            }
        }
        let need = |rows: usize, cols: usize, ld: usize, stride: usize| {
            (s.batch - 1) * stride + cols.saturating_sub(1) * ld + rows
        };
        let at_least = |what: &str, got: usize, want: usize| {
            if got < want {
                return Err(CudaError::shape(
                    OP,
                    format!("{what} has {got} elements, needs {want}"),
                ));
            }
            Ok(())
        };
        at_least("a", a.len(), need(ra, ca, s.lda, s.stride_a))?;
        at_least("b", b.len(), need(rb, cb, s.ldb, s.stride_b))?;
        at_least("c", c.len(), need(s.m, s.n, s.ldc, s.stride_c))?;
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let i64_of = |v: usize| {
            i64::try_from(v).map_err(|_| CudaError::shape(OP, format!("stride {v} exceeds i64")))
        };
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: op(s.trans_a),
                transb: op(s.trans_b),
                m: to_i32(OP, "m", s.m)?,
                n: to_i32(OP, "n", s.n)?,
                k: to_i32(OP, "k", s.k)?,
                alpha: bf16::ONE,
                lda: to_i32(OP, "lda", s.lda)?,
                ldb: to_i32(OP, "ldb", s.ldb)?,
                beta: bf16::ZERO,
                ldc: to_i32(OP, "ldc", s.ldc)?,
            },
            batch_size: to_i32(OP, "batch", s.batch)?,
            stride_a: i64_of(s.stride_a)?,
            stride_b: i64_of(s.stride_b)?,
            stride_c: i64_of(s.stride_c)?,
        };
        // SAFETY: every element the batch addresses lies inside a, b and c (checked above).
        unsafe { self.blas.gemm_strided_batched(cfg, a, b, c) }.map_err(|e| CudaError::Blas {
            op: "cublasGemmStridedBatchedEx(bf16)",
            status: format!("{e:?}"),
        })
    }
}

/// One problem of [`BlasGemm::gemm_bf16_grouped`]: `y[m, n] = x[m, k] · w[n, k]ᵀ` row-major,
/// at element offsets into the shared x, w, y buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupedProblem {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub x_at: usize,
    pub w_at: usize,
    pub y_at: usize,
}

impl BlasGemm {
    /// Many independent bf16 GEMMs in one `cublasGemmGroupedBatchedEx` call (each problem its
    /// own group; fp32 accumulation): the routed experts' per-expert GEMMs without a launch
    /// each. Every problem is checked to lie inside x, w and y. The pointer arrays go to the
    /// device through one upload on the stream.
    pub fn gemm_bf16_grouped(
        &self,
        dev: &CudaDevice,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        y: &mut CudaSlice<bf16>,
        problems: &[GroupedProblem],
    ) -> Result<(), CudaError> {
        const OP: &str = "gemm_bf16_grouped";
        let problems: Vec<GroupedProblem> =
            problems.iter().copied().filter(|p| p.m > 0 && p.n > 0).collect();
        if problems.is_empty() {
            return Ok(());
        }
        for (i, p) in problems.iter().enumerate() {
            for (what, at, len, have) in [
                ("x", p.x_at, p.m * p.k, x.len()),
                ("w", p.w_at, p.n * p.k, w.len()),
                ("y", p.y_at, p.m * p.n, y.len()),
            ] {
                if at + len > have {
                    return Err(CudaError::shape(
                        OP,
                        format!(
                            "problem {i}: {what} [{at}, {}) exceeds its {have} elements",
                            at + len
                        ),
                    ));
                }
            }
        }
        let count = problems.len();
        let stream = dev.stream();
        let (xp, _gx) = x.device_ptr(stream);
        let (wp, _gw) = w.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        let el = std::mem::size_of::<bf16>() as u64;
        // [A pointers (w) | B pointers (x) | C pointers (y)], each `count` long.
        let mut ptrs = Vec::with_capacity(3 * count);
        ptrs.extend(problems.iter().map(|p| wp + p.w_at as u64 * el));
        ptrs.extend(problems.iter().map(|p| xp + p.x_at as u64 * el));
        ptrs.extend(problems.iter().map(|p| yp + p.y_at as u64 * el));
        let ptrs_d = dev.upload(&ptrs)?;
        let (pd, _gp) = ptrs_d.device_ptr(stream);
        let i32s = |f: &dyn Fn(&GroupedProblem) -> usize, what: &str| {
            problems.iter().map(|p| to_i32(OP, what, f(p))).collect::<Result<Vec<i32>, _>>()
        };
        let ms = i32s(&|p| p.n, "n")?; // cuBLAS m = our n (column-major transpose)
        let ns = i32s(&|p| p.m, "m")?;
        let ks = i32s(&|p| p.k, "k")?;
        let ldc = ms.clone();
        let ta = vec![blas_sys::cublasOperation_t::CUBLAS_OP_T; count];
        let tb = vec![blas_sys::cublasOperation_t::CUBLAS_OP_N; count];
        let (alpha, beta) = (vec![1f32; count], vec![0f32; count]);
        let sizes = vec![1i32; count];
        let group_count = to_i32(OP, "problems", count)?;
        let ptr_at = |j: usize| (pd + (j * count) as u64 * 8) as *const *const std::ffi::c_void;
        // SAFETY: every problem lies inside x, w, y (checked); the pointer arrays (device) and
        // the per-group arrays (host, `count` entries each) outlive the call, which only
        // enqueues work on the stream that also owns the upload of the pointer arrays.
        unsafe {
            blas_sys::cublasGemmGroupedBatchedEx(
                *self.blas.handle(),
                ta.as_ptr(),
                tb.as_ptr(),
                ms.as_ptr(),
                ns.as_ptr(),
                ks.as_ptr(),
                alpha.as_ptr() as *const std::ffi::c_void,
                ptr_at(0),
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                ks.as_ptr(),
                ptr_at(1),
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                ks.as_ptr(),
                beta.as_ptr() as *const std::ffi::c_void,
                ptr_at(2) as *const *mut std::ffi::c_void,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                ldc.as_ptr(),
                group_count,
                sizes.as_ptr(),
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
        }
        .result()
        .map_err(|e| CudaError::Blas {
            op: "cublasGemmGroupedBatchedEx(bf16)",
            status: format!("{e:?}"),
        })?;
        // The device pointer array must live until the GEMMs ran: `ptrs_d` is dropped at the end
        // of this scope, and dropping a CudaSlice frees it stream-ordered (cuMemFreeAsync on this
        // stream, or a synchronize first without async allocation), after the queued GEMMs.
        Ok(())
    }
}

/// Shape of [`BlasGemm::gemm_bf16_strided_batched`], column-major as cuBLAS sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StridedGemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub batch: usize,
}

/// bf16 GEMM through cuBLASLt (32 MiB workspace, heuristic algorithm), on the device stream.
#[derive(Debug)]
pub struct LtBf16Gemm {
    lt: CudaBlasLT,
}

impl LtBf16Gemm {
    pub fn new(dev: &CudaDevice) -> Result<Self, CudaError> {
        let lt = CudaBlasLT::new(dev.stream().clone()).map_err(lt_err("cublasLtCreate"))?;
        Ok(Self { lt })
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ`, all bf16 row-major, fp32 accumulation.
    pub fn gemm_bf16(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        y: &mut CudaSlice<bf16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "gemm_bf16_lt";
        check_len(OP, "x", x.len(), m * k)?;
        check_len(OP, "w", w.len(), n * k)?;
        check_len(OP, "y", y.len(), m * n)?;
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha: 1.0,
            lda: k as i64,
            ldb: k as i64,
            beta: 0.0,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        // SAFETY: the three buffers were checked against the shapes the config describes.
        unsafe { self.lt.matmul(cfg, w, x, y, None, None) }.map_err(lt_err("cublasLtMatmul(bf16)"))
    }
}

/// Layout of the activation scales (rows × k/128 fp32) handed to [`Fp8Gemm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActScaleLayout {
    /// `[rows, k/128]` row-major: `s[row * (k/128) + kb]`.
    RowMajor,
    /// `[k/128, rows]`, token dimension contiguous: `s[kb * rows + row]`.
    TokenContiguous,
}

/// Layout of the weight scales (ceil(n/128) × ceil(k/128) fp32) handed to [`Fp8Gemm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightScaleLayout {
    /// `[n/128, k/128]` row-major, as the checkpoint's `weight_scale_inv` is stored.
    RowMajor,
    /// `[k/128, n/128]` row-major (the transpose).
    Transposed,
}

/// A cuBLASLt plan for one (m, n, k): descriptors and the heuristic's algorithm.
#[derive(Debug)]
struct Fp8Plan {
    desc: lt_sys::cublasLtMatmulDesc_t,
    a: lt_sys::cublasLtMatrixLayout_t,
    b: lt_sys::cublasLtMatrixLayout_t,
    d: lt_sys::cublasLtMatrixLayout_t,
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

impl Drop for Fp8Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created once in `Fp8Gemm::plan` and is destroyed once here;
        // errors on destruction cannot be acted on.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
        }
    }
}

/// Plans by padded (m, n, k), and the padded m chosen for each logical (m, n, k).
#[derive(Debug, Default)]
struct PlanCache {
    plans: HashMap<(usize, usize, usize), Fp8Plan>,
    padding: HashMap<(usize, usize, usize), usize>,
}

// SAFETY: the plan's handles are plain cuBLASLt descriptor objects; they are only used while the
// `Fp8Gemm` mutex is held.
unsafe impl Send for Fp8Plan {}

/// FP8 e4m3 GEMM with DeepSeek block scales through cuBLASLt (scale modes `BLK128x128_32F` for
/// the weights, `VEC128_32F` for the activations), bf16 output, fp32 accumulation.
#[derive(Debug)]
pub struct Fp8Gemm {
    handle: lt_sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    plans: Mutex<PlanCache>,
}

// SAFETY: the cuBLASLt handle is thread-safe for use with distinct descriptors; plans are
// guarded by the mutex.
unsafe impl Send for Fp8Gemm {}
unsafe impl Sync for Fp8Gemm {}

impl Drop for Fp8Gemm {
    fn drop(&mut self) {
        if let Ok(state) = self.plans.get_mut() {
            state.plans.clear();
        }
        // SAFETY: the handle was created in `new` and is destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

const WORKSPACE_BYTES: usize = 32 << 20;

fn lt_err(op: &'static str) -> impl Fn(lt::CublasError) -> CudaError {
    move |e| CudaError::Blas { op, status: format!("{e:?}") }
}

/// Points the plan's descriptor at this call's weight (A) and activation (B) scales.
fn set_scale_pointers(plan: &Fp8Plan, w_scale: u64, x_scale: u64) -> Result<(), CudaError> {
    use lt_sys::cublasLtMatmulDescAttributes_t as A;
    for (attr, ptr) in [
        (A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, w_scale),
        (A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, x_scale),
    ] {
        // SAFETY: scale-pointer attributes take a device pointer by value (8 bytes).
        unsafe { lt::set_matmul_desc_attribute(plan.desc, attr, (&ptr as *const u64).cast(), 8) }
            .map_err(lt_err("cublasLtMatmulDescSetAttribute(scale pointer)"))?;
    }
    Ok(())
}

impl Fp8Gemm {
    /// Layout of the activation scales cuBLASLt's `VEC128_32F` mode reads (checked on the H200 by
    /// the `cuda_gemm` parity test, which tries every combination).
    pub const ACT_SCALE_LAYOUT: ActScaleLayout = ActScaleLayout::TokenContiguous;
    /// Row pitch (in floats) of the weight-scale tensor: k/128 rounded up to a multiple of 4.
    /// cuBLASLt reads `BLK128x128_32F` scales with 16-byte-aligned rows (seen on the H200: k =
    /// 384 with unpadded rows of 3 gave garbage). For every DeepSeek-V3.2 weight k/128 is
    /// already a multiple of 4 (k ∈ {512, 1536, 2048, 7168, 16384}), so the checkpoint's
    /// `weight_scale_inv` is used as it is.
    pub fn weight_scale_pitch(k: usize) -> usize {
        (k / 128).next_multiple_of(4)
    }

    /// Layout of the weight scales cuBLASLt's `BLK128x128_32F` mode reads (same test).
    pub const WEIGHT_SCALE_LAYOUT: WeightScaleLayout = WeightScaleLayout::RowMajor;

    pub fn new(dev: &CudaDevice) -> Result<Self, CudaError> {
        let handle = lt::create_handle().map_err(lt_err("cublasLtCreate"))?;
        let workspace = dev.zeros::<u8>(WORKSPACE_BYTES)?;
        Ok(Self {
            handle,
            stream: dev.stream().clone(),
            workspace,
            plans: Mutex::new(PlanCache::default()),
        })
    }

    /// Builds the descriptors and asks the heuristic for an algorithm. The scale pointers must be
    /// set first: cuBLASLt rejects block-scale modes without them (CUBLAS_STATUS_INVALID_VALUE).
    fn plan(
        &self,
        m: usize,
        n: usize,
        k: usize,
        w_scale: u64,
        x_scale: u64,
    ) -> Result<Option<Fp8Plan>, CudaError> {
        use lt_sys::cublasLtMatmulDescAttributes_t as A;
        use lt_sys::cublasLtMatmulMatrixScale_t as S;
        let e4m3 = lt_sys::cudaDataType_t::CUDA_R_8F_E4M3;
        let desc = lt::create_matmul_desc(
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt_sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(lt_err("cublasLtMatmulDescCreate"))?;
        // Build the plan at once so that Drop releases whatever was created if a step fails.
        let a = lt::create_matrix_layout(e4m3, k as u64, n as u64, k as i64);
        let b = lt::create_matrix_layout(e4m3, k as u64, m as u64, k as i64);
        let d = lt::create_matrix_layout(
            lt_sys::cudaDataType_t::CUDA_R_16BF,
            n as u64,
            m as u64,
            n as i64,
        );
        let (a, b, d) = match (a, b, d) {
            (Ok(a), Ok(b), Ok(d)) => (a, b, d),
            (a, b, d) => {
                // SAFETY: destroy only what was created.
                unsafe {
                    let _ = lt::destroy_matmul_desc(desc);
                    for l in [a, b, d].into_iter().flatten() {
                        let _ = lt::destroy_matrix_layout(l);
                    }
                }
                return Err(CudaError::Blas {
                    op: "cublasLtMatrixLayoutCreate",
                    status: "failed".into(),
                });
            }
        };
        // SAFETY: zeroed is a valid bit pattern for the algo struct; it is overwritten below.
        let mut plan = Fp8Plan { desc, a, b, d, algo: unsafe { std::mem::zeroed() } };
        let set = |attr: A, v: i32| {
            // SAFETY: the attribute takes a 4-byte integer/enum; the pointer is valid for reads.
            unsafe { lt::set_matmul_desc_attribute(plan.desc, attr, (&v as *const i32).cast(), 4) }
                .map_err(lt_err("cublasLtMatmulDescSetAttribute"))
        };
        set(A::CUBLASLT_MATMUL_DESC_TRANSA, 1)?; // CUBLAS_OP_T
        set(A::CUBLASLT_MATMUL_DESC_TRANSB, 0)?; // CUBLAS_OP_N
        set(
            A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
            S::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F as i32,
        )?;
        set(
            A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
            S::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F as i32,
        )?;
        set_scale_pointers(&plan, w_scale, x_scale)?;
        let pref = lt::create_matmul_pref().map_err(lt_err("cublasLtMatmulPreferenceCreate"))?;
        let ws = WORKSPACE_BYTES;
        // SAFETY: MAX_WORKSPACE_BYTES takes a u64/usize; the pointer is valid for reads.
        let r = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws as *const usize).cast(),
                std::mem::size_of::<usize>(),
            )
        }
        .map_err(lt_err("cublasLtMatmulPreferenceSetAttribute"))
        .and_then(|()| {
            // SAFETY: all descriptors are live; D doubles as C (beta = 0).
            unsafe {
                lt::get_matmul_algo_heuristic(self.handle, plan.desc, plan.a, plan.b, plan.d, plan.d, pref)
            }
            .map(Some)
            .or_else(|e| {
                if e.0 == lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED {
                    Ok(None)
                } else {
                    Err(CudaError::Blas {
                        op: "cublasLtMatmulAlgoGetHeuristic(fp8 block-scaled)",
                        status: format!("{e:?} for m={m} n={n} k={k}"),
                    })
                }
            })
        });
        // SAFETY: created above, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        Ok(r?.map(|h| {
            plan.algo = h.algo;
            plan
        }))
    }

    /// The row count the GEMM runs with for `m` logical rows: the smallest of m rounded up to
    /// 4, 8, 16, 32, 64, 128 that cuBLASLt has a kernel for. At least a multiple of 4: the
    /// `VEC128_32F` scale tensor's token dimension is read with a pitch of m rounded up to 4
    /// (seen on the H200: m = 130 with pitch 130 gave garbage; m = 1 has no kernel at all).
    /// Activation, activation-scale and output buffers are sized with it.
    pub fn padded_rows(&self, m: usize, n: usize, k: usize) -> Result<usize, CudaError> {
        const OP: &str = "gemm_fp8";
        if k % 128 != 0 || n % 16 != 0 || m == 0 {
            return Err(CudaError::shape(
                OP,
                format!("needs k % 128 == 0, n % 16 == 0, m > 0; got m={m} n={n} k={k}"),
            ));
        }
        let mut state = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&p) = state.padding.get(&(m, n, k)) {
            return Ok(p);
        }
        // Any aligned, non-null device pointer will do for the heuristic: the workspace.
        let (dummy, _g) = self.workspace.device_ptr(&self.stream);
        let mut tried = Vec::new();
        for align in [4usize, 8, 16, 32, 64, 128] {
            let cand = m.next_multiple_of(align);
            if tried.contains(&cand) {
                continue;
            }
            tried.push(cand);
            if state.plans.contains_key(&(cand, n, k)) {
                state.padding.insert((m, n, k), cand);
                return Ok(cand);
            }
            if let Some(plan) = self.plan(cand, n, k, dummy, dummy)? {
                state.plans.insert((cand, n, k), plan);
                state.padding.insert((m, n, k), cand);
                return Ok(cand);
            }
        }
        Err(CudaError::Blas {
            op: "cublasLtMatmulAlgoGetHeuristic(fp8 block-scaled)",
            status: format!("no kernel for n={n} k={k} with m in {tried:?}"),
        })
    }

    /// `y[m, n] = (x_q · s_x) [m, k] · ((w_q · s_w) [n, k])ᵀ` as bf16, run with
    /// `p = self.padded_rows(m, n, k)` rows:
    /// - x_q: [p, k] e4m3 bits; x_s: p × k/128 f32 in [`Self::ACT_SCALE_LAYOUT`] (pitch p);
    /// - w_q: [n, k] e4m3 bits; w_s: [ceil(n/128), [`Self::weight_scale_pitch`]] f32 in
    ///   [`Self::WEIGHT_SCALE_LAYOUT`];
    /// - y: [p, n] bf16, of which the first m rows are the result.
    ///
    /// Pad rows must hold finite values (zeros). k % 128 == 0, n % 16 == 0.
    pub fn gemm(
        &self,
        x_q: &CudaSlice<u8>,
        x_s: &CudaSlice<f32>,
        w_q: &CudaSlice<u8>,
        w_s: &CudaSlice<f32>,
        y: &mut CudaSlice<bf16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "gemm_fp8";
        let p = self.padded_rows(m, n, k)?;
        check_len(OP, "x_q", x_q.len(), p * k)?;
        check_len(OP, "x_s", x_s.len(), p * (k / 128))?;
        check_len(OP, "w_q", w_q.len(), n * k)?;
        check_len(OP, "w_s", w_s.len(), n.div_ceil(128) * Self::weight_scale_pitch(k))?;
        check_len(OP, "y", y.len(), p * n)?;
        let stream = &self.stream;
        let (xq, _g1) = x_q.device_ptr(stream);
        let (xs, _g2) = x_s.device_ptr(stream);
        let (wq, _g3) = w_q.device_ptr(stream);
        let (ws, _g4) = w_s.device_ptr(stream);
        let (yp, _g5) = y.device_ptr_mut(stream);
        let (wsp, _g6) = self.workspace.device_ptr(stream);
        let state = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let plan = state.plans.get(&(p, n, k)).ok_or_else(|| CudaError::Blas {
            op: "gemm_fp8",
            status: format!("no plan for m={p} n={n} k={k}"),
        })?;
        set_scale_pointers(plan, ws, xs)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: all buffers were checked against the plan's shapes; the scale buffers have the
        // sizes the scale modes read; the workspace is WORKSPACE_BYTES long.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                wq as *const _,
                plan.a,
                xq as *const _,
                plan.b,
                yp as *const _,
                plan.d,
                yp as *mut _,
                plan.d,
                &plan.algo,
                wsp as *mut _,
                WORKSPACE_BYTES,
                stream.cu_stream() as *mut _,
            )
        }
        .map_err(lt_err("cublasLtMatmul(fp8 block-scaled)"))
    }
}
