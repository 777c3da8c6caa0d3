//! One decoder block on the device: `h += Attn(RMSNorm(h))`, `h += FFN(RMSNorm(h))`, with the
//! step's per-token device indices ([`DeviceStep`]). Attention: q-LoRA, kv-LoRA (norm + RoPE),
//! indexer (q, k, head weights), cache writes, per-row selection (indexer scores → top-k),
//! absorbed sparse MLA decode kernel, un-absorption, o_proj. FFN: dense SwiGLU or router +
//! routed experts + shared expert.

use fathom_kernels::cuda::cudarc::driver::CudaSlice;
use fathom_kernels::cuda::{
    CudaDevice, CudaError, MlaDecodeShape, MoeScratch, MoeShape, RopeLayout, RopeShape,
    StridedGemm, moe_experts_bf16,
};
use half::bf16;

use super::seams::{FfnInput, OneGpu, Seams};
use super::weights::{AttnW, FfnW, LayerW, MlpW};
use super::{CudaKvCache, CudaModel, CudaModelError};

/// LayerNorm epsilon of `indexer.k_norm` (spec §2.3).
const K_NORM_EPS: f32 = 1e-6;

/// The indexer's f32 queries `[n, H_I, d]`, keys `[n, d]` and head weights `[n, H_I]`.
type IndexerQkw = (CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>);

/// Per token row of a step (host side): position, cache row, its sequence's first cache row,
/// and its causal length `position + 1`.
#[derive(Debug, Default)]
pub(crate) struct Step {
    pub pos: Vec<i32>,
    pub row: Vec<i32>,
    pub base: Vec<i32>,
    pub len: Vec<i32>,
}

/// [`Step`] on the device.
pub(crate) struct DeviceStep {
    pub(crate) pos: CudaSlice<i32>,
    pub(crate) row: CudaSlice<i32>,
    pub(crate) base: CudaSlice<i32>,
    pub(crate) len: CudaSlice<i32>,
}

impl Step {
    pub(crate) fn upload(&self, dev: &CudaDevice) -> Result<DeviceStep, CudaError> {
        Ok(DeviceStep {
            pos: dev.upload(&self.pos)?,
            row: dev.upload(&self.row)?,
            base: dev.upload(&self.base)?,
            len: dev.upload(&self.len)?,
        })
    }
}

impl CudaModel {
    /// `y [m, n] = x [m, k] · w [n, k]ᵀ` into a new buffer.
    fn mm(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<CudaSlice<bf16>, CudaError> {
        let mut y = self.dev.zeros::<bf16>(m * n)?;
        self.blas.gemm_bf16(x, w, &mut y, m, n, k)?;
        Ok(y)
    }

    pub(crate) fn mlp(
        &self,
        w: &MlpW,
        x: &CudaSlice<bf16>,
        n: usize,
    ) -> Result<CudaSlice<bf16>, CudaModelError> {
        let hd = self.cfg.hidden_size;
        let gu = self.mm(x, w.gate_up.bf16()?, n, 2 * w.inner, hd)?; // [n, 2·inner]
        let mut act = self.dev.zeros::<bf16>(n * w.inner)?; // [n, inner]
        self.dev.ops().swiglu_fused_bf16(&gu, &mut act, n, w.inner)?;
        Ok(self.mm(&act, w.down.bf16()?, n, hd, w.inner)?) // [n, hidden]
    }

    /// The indexer of layer `li` for the step's rows (f32 keys and scores, the
    /// [`Precision::F32`] forward): writes the new keys into the cache, then selects per row the
    /// top-`index_topk` causal keys (all of them, ascending, when there are ≤ index_topk) as
    /// cache rows `[n, topk]` (−1 = none). `xf` `[n, hidden]` and `qrf` `[n, q_lora]` are the f32
    /// normed input and q-LoRA latent.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn select_f32(
        &self,
        a: &AttnW,
        li: usize,
        xf: &CudaSlice<f32>,
        qrf: &CudaSlice<f32>,
        n: usize,
        st: &DeviceStep,
        cache: &mut CudaKvCache,
    ) -> Result<CudaSlice<i32>, CudaModelError> {
        let c = &self.cfg;
        let (ih, id, max_ctx) = (c.index_n_heads, c.index_head_dim, cache.max_ctx());
        let cache_rows = cache.slots() * max_ctx;
        let (iq, ik, iw) = self.indexer_qkw(a, xf, qrf, n, st)?;
        let g = &self.glue;
        g.scatter_rows_f32(&ik, &mut cache.index[li], cache_rows, &st.row, n, id)?;
        let mut scores = self.dev.zeros::<f32>(n * max_ctx)?; // [n, max_ctx]
        let keys = &cache.index[li];
        g.indexer_scores_f32(&iq, &iw, keys, &st.base, &st.len, &mut scores, n, ih, id, max_ctx)?;
        self.top_rows(&scores, n, st, max_ctx)
    }

    /// [`Self::select_f32`] on the FP8 path (the [`Precision::Bf16`] forward): queries and the
    /// new keys Hadamard-rotated and quantised to e4m3 (keys straight into the cache rows), then
    /// the e4m3 tensor-core scorer over the slot cache, fp32 accumulation and weights.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn select_fp8(
        &self,
        a: &AttnW,
        li: usize,
        xf: &CudaSlice<f32>,
        qrf: &CudaSlice<f32>,
        n: usize,
        st: &DeviceStep,
        cache: &mut CudaKvCache,
    ) -> Result<CudaSlice<i32>, CudaModelError> {
        let c = &self.cfg;
        let (dev, ops) = (&self.dev, self.dev.ops());
        let (ih, id, max_ctx) = (c.index_n_heads, c.index_head_dim, cache.max_ctx());
        let cache_rows = cache.slots() * max_ctx;
        let (iq, ik, iw) = self.indexer_qkw(a, xf, qrf, n, st)?;
        let mut q8 = dev.zeros::<u8>(n * ih * id)?; // [n, H_I, d] e4m3
        let mut sq = dev.zeros::<f32>(n * ih)?; // [n, H_I]
        ops.indexer_rotate_quant_fp8(&iq, None, &mut q8, &mut sq, n * ih, id, n * ih)?;
        let (k8, ks) = (&mut cache.index_fp8[li], &mut cache.index_scale[li]);
        ops.indexer_rotate_quant_fp8(&ik, Some(&st.row), k8, ks, n, id, cache_rows)?;
        let mut scores = dev.zeros::<f32>(n * max_ctx)?; // [n, max_ctx]
        ops.indexer_scores_fp8_rows(
            &q8,
            &sq,
            &iw,
            &cache.index_fp8[li],
            &cache.index_scale[li],
            cache_rows,
            &st.base,
            &st.len,
            &mut scores,
            (n, ih, id, max_ctx),
        )?;
        self.top_rows(&scores, n, st, max_ctx)
    }

    /// The indexer's f32 queries `[n, H_I, d]` (RoPE'd), keys `[n, d]` (LayerNorm + RoPE) and
    /// head weights `[n, H_I]` (scaled by `H_I^-½ · d^-½`).
    fn indexer_qkw(
        &self,
        a: &AttnW,
        xf: &CudaSlice<f32>,
        qrf: &CudaSlice<f32>,
        n: usize,
        st: &DeviceStep,
    ) -> Result<IndexerQkw, CudaModelError> {
        let c = &self.cfg;
        let (dev, ops, g, blas) = (&self.dev, self.dev.ops(), &self.glue, &self.blas);
        let (hd, ql) = (c.hidden_size, c.q_lora_rank);
        let (ih, id) = (c.index_n_heads, c.index_head_dim);
        let mut iq = dev.zeros::<f32>(n * ih * id)?;
        blas.gemm_f32(qrf, &a.idx_wq_b, &mut iq, n, ih * id, ql, 1.0)?;
        let shape = RopeShape { tokens: n, heads: ih, head_dim: id, offset: 0 };
        let (freqs, af) = (&self.freqs, self.attention_factor);
        ops.rope_f32(&mut iq, &st.pos, freqs, shape, af, RopeLayout::HalfSplit)?;
        let mut ik_raw = dev.zeros::<f32>(n * id)?;
        blas.gemm_f32(xf, &a.idx_wk, &mut ik_raw, n, id, hd, 1.0)?;
        let mut ik = dev.zeros::<f32>(n * id)?;
        g.layernorm_f32(&ik_raw, &a.idx_k_norm_w, &a.idx_k_norm_b, &mut ik, n, id, K_NORM_EPS)?;
        let shape = RopeShape { tokens: n, heads: 1, head_dim: id, offset: 0 };
        ops.rope_f32(&mut ik, &st.pos, freqs, shape, af, RopeLayout::HalfSplit)?;
        let mut iw = dev.zeros::<f32>(n * ih)?;
        let wscale = (ih as f32).powf(-0.5) * (id as f32).powf(-0.5);
        blas.gemm_f32(xf, &a.idx_weights_proj, &mut iw, n, ih, hd, wscale)?;
        Ok((iq, ik, iw))
    }

    /// Per row the top-`index_topk` of `scores [n, max_ctx]` as cache rows `[n, topk]`.
    fn top_rows(
        &self,
        scores: &CudaSlice<f32>,
        n: usize,
        st: &DeviceStep,
        max_ctx: usize,
    ) -> Result<CudaSlice<i32>, CudaModelError> {
        let topk = self.cfg.index_topk;
        let mut sel = self.dev.zeros::<i32>(n * topk)?; // [n, topk]
        self.dev.ops().topk_rows_f32(scores, &st.len, &mut sel, n, max_ctx, topk)?;
        self.glue.add_base(&mut sel, &st.base, n, topk)?;
        Ok(sel)
    }

    pub(crate) fn layer_forward(
        &self,
        lw: &LayerW,
        li: usize,
        h: &mut CudaSlice<f32>,
        n: usize,
        st: &DeviceStep,
        cache: &mut CudaKvCache,
    ) -> Result<(), CudaModelError> {
        self.layer_forward_with(lw, li, h, n, st, cache, &mut OneGpu::default())
    }

    /// [`Self::layer_forward`] with the sharded seams of a rank (`seams.rs`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer_forward_with(
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
        let nh_pad = nh.div_ceil(16) * 16;
        let topk = c.index_topk;
        let max_ctx = cache.max_ctx();
        let cache_rows = cache.slots() * max_ctx;
        let a = &lw.attn;

        // ---- attention
        let mut xb = dev.zeros::<bf16>(n * hd)?; // [n, hidden]
        let mut xf = dev.zeros::<f32>(n * hd)?;
        g.rmsnorm_f32_rows(h, &lw.attn_norm, &mut xb, &mut xf, n, hd, eps)?;
        let mut cq = dev.zeros::<f32>(n * ql)?; // [n, q_lora] f32
        self.blas.gemm_f32(&xf, &a.q_a, &mut cq, n, ql, hd, 1.0)?;
        let mut qr = dev.zeros::<bf16>(n * ql)?;
        let mut qrf = dev.zeros::<f32>(n * ql)?;
        g.rmsnorm_f32_rows(&cq, &a.q_a_norm, &mut qr, &mut qrf, n, ql, eps)?;
        let mut q = self.mm(&qr, a.q_b.bf16()?, n, nh * qk, ql)?; // [n, nh, nope + rope]
        let shape = RopeShape { tokens: n, heads: nh, head_dim: qk, offset: nope };
        ops.rope_bf16(
            &mut q,
            &st.pos,
            &self.freqs,
            shape,
            self.attention_factor,
            RopeLayout::Interleaved,
        )?;
        let mut ckv = self.mm(&xb, a.kv_a.bf16()?, n, lat, hd)?; // [n, kv_lora + rope]
        g.rmsnorm_bf16_inplace(&mut ckv, &a.kv_norm, n, lat, kl, eps)?;
        let shape = RopeShape { tokens: n, heads: 1, head_dim: lat, offset: kl };
        ops.rope_bf16(
            &mut ckv,
            &st.pos,
            &self.freqs,
            shape,
            self.attention_factor,
            RopeLayout::Interleaved,
        )?;

        // Cache the latent, then select (the indexer writes its keys first).
        g.scatter_rows(&ckv, lat, &mut cache.latent[li], lat, cache_rows, &st.row, n, lat)?;
        let sel = self.select_fp8(a, li, &xf, &qrf, n, st, cache)?;

        // Absorbed sparse attention → [n, nh_pad, kv_lora] → per-head [n, nh, v] → o_proj.
        let kv_b = a.kv_b.bf16()?; // [nh·(nope + v), kv_lora]: per head W_UK [nope, kl], W_UV [v, kl]
        let mut qa = dev.zeros::<bf16>(n * nh_pad * lat)?; // [n, nh_pad, kv_lora + rope]
        g.absorb_rope_pad(&q, &mut qa, n, nh, nh_pad, (nope, rope, kl))?;
        // Per head h (column-major, as cuBLAS sees it): qa_h[kl, n] = W_UK_hᵀ-as-stored · q_h.
        let absorb = StridedGemm {
            trans_a: false,
            trans_b: false,
            m: kl,
            n,
            k: nope,
            lda: kl,
            ldb: nh * qk,
            ldc: nh_pad * lat,
            stride_a: (nope + v) * kl,
            stride_b: qk,
            stride_c: lat,
            batch: nh,
        };
        self.blas.gemm_bf16_strided_batched(&absorb, kv_b, &q, &mut qa)?;
        let mut ol = dev.zeros::<bf16>(n * nh_pad * kl)?;
        let shape =
            MlaDecodeShape { batch: n, heads: nh_pad, kv_lora: kl, rope, topk, n_rows: cache_rows };
        let (mut ws_o, mut ws_ml) = (dev.zeros::<f32>(1)?, dev.zeros::<f32>(1)?);
        ops.mla_sparse_decode_bf16(
            &qa,
            &cache.latent[li],
            &sel,
            &mut ol,
            &mut ws_o,
            &mut ws_ml,
            &shape,
            self.scale,
            1,
        )?;
        let mut oh = dev.zeros::<bf16>(n * nh * v)?; // [n, nh, v]
        // Per head: oh_h[v, n] = W_UV_h (stored [v, kl] row-major, op T) · ol_h[kl, n].
        let unabsorb = StridedGemm {
            trans_a: true,
            trans_b: false,
            m: v,
            n,
            k: kl,
            lda: kl,
            ldb: nh_pad * kl,
            ldc: nh * v,
            stride_a: (nope + v) * kl,
            stride_b: kl,
            stride_c: v,
            batch: nh,
        };
        self.blas.gemm_bf16_strided_batched(&unabsorb, &kv_b.slice(nope * kl..), &ol, &mut oh)?;
        let attn = self.mm(&oh, a.o_proj.bf16()?, n, hd, nh * v)?; // [n, hidden]
        seams.add_reduced_bf16(self, h, &attn, n)?;

        // ---- FFN
        g.rmsnorm_f32_rows(h, &lw.ffn_norm, &mut xb, &mut xf, n, hd, eps)?;
        match &lw.ffn {
            FfnW::Dense(w) => {
                let f = self.mlp(w, &xb, n)?;
                seams.add_reduced_bf16(self, h, &f, n)?;
            }
            FfnW::Ep(w) => {
                seams.expert_parallel(self, li, w, FfnInput { xb: &xb, xf: &xf }, h, n)?
            }
            FfnW::Moe { gate, bias, w13, w2, inner, shared } => {
                let (e, k) = (self.router.n_experts, self.router.top_k);
                let mut logits = dev.zeros::<f32>(n * e)?; // [n, E] f32
                self.blas.gemm_f32(&xf, gate, &mut logits, n, e, hd, 1.0)?;
                let mut ids = dev.zeros::<i32>(n * k)?;
                let mut wts = dev.zeros::<f32>(n * k)?;
                ops.router_select(&logits, bias, &mut ids, &mut wts, n, &self.router)?;
                if let Some(r) = seams.recorder() {
                    r.push_device_ids(self, &ids, n)?;
                }
                let shape = MoeShape { tokens: n, top_k: k, n_experts: e, dim: hd, inter: *inner };
                let mut scratch = MoeScratch::new(dev, n * k, &shape)?;
                scratch.grouped = self.grouped_experts;
                let mut routed = dev.zeros::<bf16>(n * hd)?;
                moe_experts_bf16(
                    dev,
                    &self.blas,
                    &xb,
                    &ids,
                    &wts,
                    w13.bf16()?,
                    w2.bf16()?,
                    &mut routed,
                    &mut scratch,
                    &shape,
                )?;
                g.add_into(h, &routed, n * hd)?;
                if let Some(s) = shared {
                    let f = self.mlp(s, &xb, n)?;
                    g.add_into(h, &f, n * hd)?;
                }
            }
        }
        Ok(())
    }
}
