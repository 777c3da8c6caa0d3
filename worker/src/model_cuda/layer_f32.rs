//! One decoder block at [`Precision::F32`](super::Precision::F32): the same steps as
//! `layer.rs` with every weight, activation and the latent cache in fp32 (glue kernels for the
//! GEMMs, attention and experts). The routed experts run in two launches with no host sync.
//! Used for f32 checkpoints (the golden fixtures), where it must follow the CPU reference's
//! discrete indexer and router decisions exactly.

use fathom_kernels::cuda::cudarc::driver::CudaSlice;
use fathom_kernels::cuda::{RopeLayout, RopeShape};
use half::bf16;

use super::layer::DeviceStep;
use super::seams::{FfnInput, OneGpu, Seams};
use super::weights::{FfnW, LayerW, MlpW};
use super::{CudaKvCache, CudaModel, CudaModelError};

impl CudaModel {
    /// `y [m, n] = x [m, k] · w [n, k]ᵀ` in f32 into a new buffer.
    fn mm_f32(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<CudaSlice<f32>, CudaModelError> {
        let mut y = self.dev.zeros::<f32>(m * n)?;
        self.blas.gemm_f32(x, w, &mut y, m, n, k, 1.0)?;
        Ok(y)
    }

    pub(crate) fn mlp_f32(
        &self,
        w: &MlpW,
        x: &CudaSlice<f32>,
        n: usize,
    ) -> Result<CudaSlice<f32>, CudaModelError> {
        let hd = self.cfg.hidden_size;
        let gu = self.mm_f32(x, w.gate_up.f32()?, n, 2 * w.inner, hd)?; // [n, 2·inner]
        let mut act = self.dev.zeros::<f32>(n * w.inner)?; // [n, inner]
        self.glue.swiglu_f32(&gu, &mut act, n, w.inner)?;
        self.mm_f32(&act, w.down.f32()?, n, hd, w.inner) // [n, hidden]
    }

    pub(crate) fn layer_forward_f32(
        &self,
        lw: &LayerW,
        li: usize,
        h: &mut CudaSlice<f32>,
        n: usize,
        st: &DeviceStep,
        cache: &mut CudaKvCache,
    ) -> Result<(), CudaModelError> {
        self.layer_forward_f32_with(lw, li, h, n, st, cache, &mut OneGpu::default())
    }

    /// [`Self::layer_forward_f32`] with the sharded seams of a rank (`seams.rs`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer_forward_f32_with(
        &self,
        lw: &LayerW,
        li: usize,
        h: &mut CudaSlice<f32>,
        n: usize,
        st: &DeviceStep,
        cache: &mut CudaKvCache,
        seams: &mut dyn Seams,
    ) -> Result<(), CudaModelError> {
        let c = &self.cfg;
        let (dev, ops, g) = (&self.dev, self.dev.ops(), &self.glue);
        let hd = c.hidden_size;
        let eps = c.rms_norm_eps as f32;
        let (ql, kl) = (c.q_lora_rank, c.kv_lora_rank);
        let (nope, rope, v) = (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim);
        let (nh, qk, lat) = (c.num_attention_heads, nope + rope, kl + rope);
        let topk = c.index_topk;
        let cache_rows = cache.slots() * cache.max_ctx();
        let (freqs, af) = (&self.freqs, self.attention_factor);
        let a = &lw.attn;

        // ---- attention
        let mut xb = dev.zeros::<bf16>(n * hd)?; // unused bf16 copy of the normed input
        let mut xf = dev.zeros::<f32>(n * hd)?; // [n, hidden]
        g.rmsnorm_f32_rows(h, &lw.attn_norm, &mut xb, &mut xf, n, hd, eps)?;
        let cq = self.mm_f32(&xf, &a.q_a, n, ql, hd)?; // [n, q_lora]
        let mut qrb = dev.zeros::<bf16>(n * ql)?;
        let mut qrf = dev.zeros::<f32>(n * ql)?;
        g.rmsnorm_f32_rows(&cq, &a.q_a_norm, &mut qrb, &mut qrf, n, ql, eps)?;
        let mut q = self.mm_f32(&qrf, a.q_b.f32()?, n, nh * qk, ql)?; // [n, nh, nope + rope]
        let shape = RopeShape { tokens: n, heads: nh, head_dim: qk, offset: nope };
        ops.rope_f32(&mut q, &st.pos, freqs, shape, af, RopeLayout::Interleaved)?;
        let mut ckv = self.mm_f32(&xf, a.kv_a.f32()?, n, lat, hd)?; // [n, kv_lora + rope]
        g.rmsnorm_f32_inplace(&mut ckv, &a.kv_norm, n, lat, kl, eps)?;
        let shape = RopeShape { tokens: n, heads: 1, head_dim: lat, offset: kl };
        ops.rope_f32(&mut ckv, &st.pos, freqs, shape, af, RopeLayout::Interleaved)?;
        g.scatter_rows_f32(&ckv, &mut cache.latent_f32[li], cache_rows, &st.row, n, lat)?;
        let sel = self.select_f32(a, li, &xf, &qrf, n, st, cache)?; // [n, topk] cache rows

        let mut qa = dev.zeros::<f32>(n * nh * lat)?; // [n, nh, kv_lora + rope]
        g.absorb_q_f32(&q, a.kv_b.f32()?, &mut qa, n, nh, (nope, rope, v, kl))?;
        let mut ol = dev.zeros::<f32>(n * nh * kl)?; // [n, nh, kv_lora]
        let dims = (kl, rope, topk, cache_rows);
        g.mla_sparse_f32(&qa, &cache.latent_f32[li], &sel, &mut ol, n, nh, dims, self.scale)?;
        let mut oh = dev.zeros::<f32>(n * nh * v)?; // [n, nh, v]
        g.unabsorb_o_f32(&ol, a.kv_b.f32()?, &mut oh, n, nh, (nope, v, kl))?;
        let attn = self.mm_f32(&oh, a.o_proj.f32()?, n, hd, nh * v)?; // [n, hidden]
        seams.add_reduced_f32(self, h, &attn, n)?;

        // ---- FFN
        g.rmsnorm_f32_rows(h, &lw.ffn_norm, &mut xb, &mut xf, n, hd, eps)?;
        match &lw.ffn {
            FfnW::Dense(w) => {
                let f = self.mlp_f32(w, &xf, n)?;
                seams.add_reduced_f32(self, h, &f, n)?;
            }
            FfnW::Ep(w) => {
                seams.expert_parallel(self, li, w, FfnInput { xb: &xb, xf: &xf }, h, n)?
            }
            FfnW::Moe { gate, bias, w13, w2, inner, shared } => {
                let (e, k) = (self.router.n_experts, self.router.top_k);
                let logits = self.mm_f32(&xf, gate, n, e, hd)?; // [n, E]
                let mut ids = dev.zeros::<i32>(n * k)?; // [n, k]
                let mut wts = dev.zeros::<f32>(n * k)?;
                ops.router_select(&logits, bias, &mut ids, &mut wts, n, &self.router)?;
                if let Some(r) = seams.recorder() {
                    r.push_device_ids(self, &ids, n)?;
                }
                let mut act = dev.zeros::<f32>(n * k * inner)?; // [n, k, inner]
                let mut routed = dev.zeros::<f32>(n * hd)?; // [n, hidden]
                let shape = (n, k, hd, *inner, e);
                g.moe_f32(&xf, &ids, &wts, w13.f32()?, w2.f32()?, &mut act, &mut routed, shape)?;
                g.add_f32_into(h, &routed, n * hd)?;
                if let Some(s) = shared {
                    let f = self.mlp_f32(s, &xf, n)?;
                    g.add_f32_into(h, &f, n * hd)?;
                }
            }
        }
        Ok(())
    }
}
