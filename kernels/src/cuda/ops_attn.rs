//! Model ops on the device, part 3: sparse MLA decode in the absorbed (MQA) form over a bf16
//! latent cache (`kernels/cuda/mla.cu`). CPU twin: `crate::cpu::attention::mla_sparse_attention`.
//!
//! One query token per sequence; all heads read the same gathered latent rows. Invalid slots
//! (index < 0 or ≥ n_rows) are skipped; a sequence with no valid slot gets zeros, never NaN.
//! Split-KV: `splits > 1` divides each index list into contiguous pieces computed by separate
//! CTAs (fp32 partial output + running max/sum in a caller-owned workspace), merged by a combine
//! kernel; [`MlaDecodeShape::default_splits`] fills the GPU at small batch.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use crate::cuda::CudaError;
use crate::cuda::ops::{Ops, check_len, to_i32};

/// Dims of one sparse MLA decode call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaDecodeShape {
    /// Query tokens (one per sequence).
    pub batch: usize,
    /// Query heads; a multiple of 16.
    pub heads: usize,
    /// Latent width (512); even, ≤ 512.
    pub kv_lora: usize,
    /// RoPE width of the key (64); kv_lora + rope even and ≤ 576.
    pub rope: usize,
    /// Index slots per query (2048).
    pub topk: usize,
    /// Rows of the latent cache `kv`.
    pub n_rows: usize,
}

impl MlaDecodeShape {
    /// Splits that give ≥ 2 CTAs per SM of `sms` with ≥ 64 keys per split (at least 1).
    pub fn default_splits(&self, sms: usize) -> usize {
        let ctas = self.batch * self.heads / 16;
        let want = (2 * sms).div_ceil(ctas.max(1));
        want.min(self.topk.div_ceil(64)).max(1)
    }

    /// Workspace lengths (f32 elements) for `splits`: (partial outputs, max/sum pairs).
    pub fn workspace_len(&self, splits: usize) -> (usize, usize) {
        let rows = self.batch * splits * self.heads;
        (rows * self.kv_lora, rows * 2)
    }
}

impl Ops {
    /// `out[b, h, :] = Σ_j softmax_j(scale · q[b, h] · kv[idx[b, j]]) · kv[idx[b, j], :kv_lora]`.
    /// q `[batch, heads, kv_lora + rope]` bf16 (absorbed query), kv `[n_rows, kv_lora + rope]`
    /// bf16, indices `[batch, topk]` i32, out `[batch, heads, kv_lora]` bf16. With `splits > 1`,
    /// `ws_o` and `ws_ml` must hold [`MlaDecodeShape::workspace_len`]; with 1 they are unused.
    /// Runs the bf16 tensor-core kernel when `(kv_lora + rope) % 16 == 0` and
    /// `kv_lora % 32 == 0` (DeepSeek-V3.2's 512 + 64), else the SIMT kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn mla_sparse_decode_bf16(
        &self,
        q: &CudaSlice<bf16>,
        kv: &CudaSlice<bf16>,
        indices: &CudaSlice<i32>,
        out: &mut CudaSlice<bf16>,
        ws_o: &mut CudaSlice<f32>,
        ws_ml: &mut CudaSlice<f32>,
        s: &MlaDecodeShape,
        scale: f32,
        splits: usize,
    ) -> Result<(), CudaError> {
        let mma = (s.kv_lora + s.rope) % 16 == 0 && s.kv_lora % 32 == 0;
        self.mla(mma, q, kv, indices, out, ws_o, ws_ml, s, scale, splits)
    }

    /// [`Self::mla_sparse_decode_bf16`] on CUDA cores only (the SIMT reference kernel).
    #[allow(clippy::too_many_arguments)]
    pub fn mla_sparse_decode_bf16_simt(
        &self,
        q: &CudaSlice<bf16>,
        kv: &CudaSlice<bf16>,
        indices: &CudaSlice<i32>,
        out: &mut CudaSlice<bf16>,
        ws_o: &mut CudaSlice<f32>,
        ws_ml: &mut CudaSlice<f32>,
        s: &MlaDecodeShape,
        scale: f32,
        splits: usize,
    ) -> Result<(), CudaError> {
        self.mla(false, q, kv, indices, out, ws_o, ws_ml, s, scale, splits)
    }

    #[allow(clippy::too_many_arguments)]
    fn mla(
        &self,
        mma: bool,
        q: &CudaSlice<bf16>,
        kv: &CudaSlice<bf16>,
        indices: &CudaSlice<i32>,
        out: &mut CudaSlice<bf16>,
        ws_o: &mut CudaSlice<f32>,
        ws_ml: &mut CudaSlice<f32>,
        s: &MlaDecodeShape,
        scale: f32,
        splits: usize,
    ) -> Result<(), CudaError> {
        const OP: &str = "mla_sparse_decode_bf16";
        let width = s.kv_lora + s.rope;
        if s.kv_lora == 0 || s.kv_lora % 2 != 0 || s.kv_lora > 512 || width % 2 != 0 || width > 576
        {
            return Err(CudaError::shape(
                OP,
                format!(
                    "kv_lora {} + rope {}: need even kv_lora ≤ 512, even width ≤ 576",
                    s.kv_lora, s.rope
                ),
            ));
        }
        if s.heads == 0 || s.heads % 16 != 0 {
            return Err(CudaError::shape(OP, format!("heads {} is not a multiple of 16", s.heads)));
        }
        if splits == 0 || splits > 1024 {
            return Err(CudaError::shape(OP, format!("splits {splits} not in 1..=1024")));
        }
        check_len(OP, "q", q.len(), s.batch * s.heads * width)?;
        check_len(OP, "kv", kv.len(), s.n_rows * width)?;
        check_len(OP, "indices", indices.len(), s.batch * s.topk)?;
        check_len(OP, "out", out.len(), s.batch * s.heads * s.kv_lora)?;
        if splits > 1 {
            let (o, ml) = s.workspace_len(splits);
            if ws_o.len() < o || ws_ml.len() < ml {
                return Err(CudaError::shape(
                    OP,
                    format!("workspace {} + {} elements, need {o} + {ml}", ws_o.len(), ws_ml.len()),
                ));
            }
        }
        if s.batch == 0 {
            return Ok(());
        }
        if s.batch > 65_535 {
            return Err(CudaError::shape(OP, format!("batch {} exceeds 65535", s.batch)));
        }
        let heads = to_i32(OP, "heads", s.heads)?;
        let (lora, rope) = (s.kv_lora as i32, s.rope as i32);
        let topk = to_i32(OP, "topk", s.topk)?;
        let n_rows = to_i32(OP, "n_rows", s.n_rows)?;
        let cfg = LaunchConfig {
            grid_dim: ((s.heads / 16) as u32, s.batch as u32, splits as u32),
            block_dim: (if mma { 128 } else { 256 }, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = if mma { "mla_sparse_decode_mma_bf16" } else { OP };
        let mut b = self.stream().launch_builder(self.model_fn(name)?);
        b.arg(q).arg(kv).arg(indices).arg(&mut *out).arg(&mut *ws_o).arg(&mut *ws_ml);
        b.arg(&heads).arg(&lora).arg(&rope).arg(&topk).arg(&n_rows).arg(&scale);
        // SAFETY: matches `mla_sparse_decode_bf16` and `mla_sparse_decode_mma_bf16` (same
        // parameters; the MMA one only for width % 16 == 0, kv_lora % 32 == 0); dims are within the kernel's shared-memory
        // tiles (width ≤ 576, kv_lora ≤ 512, 16 heads per CTA); q, kv, indices and out were
        // checked; kv rows are read only for 0 ≤ index < n_rows; the workspace (splits > 1) was
        // checked against workspace_len.
        unsafe { b.launch(cfg) }.map_err(CudaError::driver("launch mla_sparse_decode_bf16"))?;
        if splits > 1 {
            let sp = splits as i32;
            let cfg = LaunchConfig {
                grid_dim: (s.heads as u32, s.batch as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream().launch_builder(self.model_fn("mla_combine")?);
            b.arg(&*ws_o).arg(&*ws_ml).arg(out).arg(&heads).arg(&lora).arg(&sp);
            // SAFETY: matches `mla_combine`; the workspace holds batch × splits × heads rows
            // written by the decode kernel above (same stream), out was checked.
            unsafe { b.launch(cfg) }.map_err(CudaError::driver("launch mla_combine"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::MlaDecodeShape;

    #[test]
    fn splits_fill_the_gpu_at_small_batch_and_keep_64_keys_per_split() {
        let s =
            MlaDecodeShape { batch: 1, heads: 128, kv_lora: 512, rope: 64, topk: 2048, n_rows: 1 };
        // 8 CTAs of 16 heads: 2 × 132 / 8 = 33 splits, capped at 2048 / 64 = 32.
        assert_eq!(s.default_splits(132), 32);
        assert_eq!(MlaDecodeShape { batch: 64, ..s }.default_splits(132), 1);
        assert_eq!(MlaDecodeShape { topk: 100, ..s }.default_splits(132), 2);
        assert_eq!(MlaDecodeShape { batch: 0, ..s }.default_splits(132), 32);
        assert_eq!(s.workspace_len(4), (4 * 128 * 512, 4 * 128 * 2));
    }
}
