//! DeepSeek-V3.2 forward on one GPU (W = 1), composed from the device ops of
//! `fathom_kernels::cuda` plus a few glue kernels (`glue.cu`).
//!
//! Owns: the device weights ([`CudaModel::load`] from any [`TensorSource`]), a device-resident
//! cache ([`CudaKvCache`]: per layer a bf16 latent `[c | k_pe]` and an f32 indexer-key buffer,
//! one contiguous region of `max_ctx` rows per sequence slot), and the batched forward
//! ([`CudaModel::forward`], mirroring `Model::forward`: prefill chunks and decodes mix freely).
//! Does not own: sampling, slot allocation (callers pick slots), multi-GPU layouts, MTP.
//!
//! Numerics: the residual stream is f32 on the device; GEMM weights and activations between
//! ops are bf16 (cuBLAS, fp32 accumulation); norms, the q-LoRA down projection, router logits,
//! the whole indexer (its top-k is discrete: bf16 noise would flip selections the f32 reference
//! makes with margins of 1e-4) and the MLA absorption (`kv_b_proj`) run in fp32. Attention is the absorbed sparse form for every row
//! (prefill too): each query row gets its own `index_topk` selection (all causal keys when the
//! context is ≤ `index_topk`, the indexer's top-k otherwise — exactly the CPU rule) and goes
//! through the sparse MLA decode kernel. The MoE experts op synchronises the stream once per MoE
//! layer (expert offsets); nothing else leaves the device until the logits are downloaded.
//! No host round trips of activations.
//!
//! Invariants: a sequence in slot `s` owns cache rows `[s·max_ctx, (s+1)·max_ctx)`; position p
//! is row `s·max_ctx + p`; positions below `start_pos` must have been written by earlier calls.

mod glue;
mod layer;
mod weights;

use fathom_common::{ConfigError, ModelConfig};
use fathom_kernels::cpu::router::RouterParams;
use fathom_kernels::cuda::cudarc::driver::CudaSlice;
use fathom_kernels::cuda::{BlasGemm, CudaDevice, CudaError, KernelCache};
use half::bf16;
use std::sync::Arc;

use crate::model::{ForwardOptions, ForwardOutput, LogitsMode, ModelError};
use crate::weights::TensorSource;
pub use glue::{GLUE, Glue};
use weights::LayerW;

/// Why the GPU model could not be built or run. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum CudaModelError {
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("sequence {seq}: {detail}")]
    Input { seq: usize, detail: String },
    #[error("KV cache: {0}")]
    Cache(String),
    #[error("embedding: {count} token id(s) outside the vocabulary reached the device")]
    BadTokens { count: i32 },
}

/// One sequence's part of a step: new `tokens` at positions `start_pos ..`, in cache slot `slot`.
#[derive(Debug, Clone, Copy)]
pub struct CudaSeqInput<'a> {
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub slot: usize,
}

/// Device cache: per layer a latent `[slots·max_ctx, kv_lora + rope]` and indexer keys
/// `[slots·max_ctx, index_head_dim]` f32.
#[derive(Debug)]
pub struct CudaKvCache {
    pub(crate) latent: Vec<CudaSlice<bf16>>,
    pub(crate) index: Vec<CudaSlice<f32>>,
    slots: usize,
    max_ctx: usize,
}

impl CudaKvCache {
    pub fn slots(&self) -> usize {
        self.slots
    }
    pub fn max_ctx(&self) -> usize {
        self.max_ctx
    }
}

/// DeepSeek-V3.2 on one GPU.
#[derive(Debug)]
pub struct CudaModel {
    dev: Arc<CudaDevice>,
    blas: BlasGemm,
    glue: Glue,
    cfg: ModelConfig,
    embed: CudaSlice<bf16>,
    norm: CudaSlice<f32>,
    head: CudaSlice<bf16>,
    layers: Vec<LayerW>,
    /// RoPE frequencies `[qk_rope_head_dim / 2]`.
    freqs: CudaSlice<f32>,
    attention_factor: f32,
    scale: f32,
    router: RouterParams,
}

impl CudaModel {
    /// Uploads every tensor of the main model (no MTP) from `src`, checking shapes against
    /// `cfg`; compiles the glue kernels (through `kernel_cache` when given).
    pub fn load(
        dev: Arc<CudaDevice>,
        src: &dyn TensorSource,
        cfg: ModelConfig,
        kernel_cache: Option<&KernelCache>,
    ) -> Result<Self, CudaModelError> {
        cfg.validate()?;
        let blas = BlasGemm::new(&dev)?;
        let glue = Glue::load(&dev, kernel_cache)?;
        let (embed, norm, head) = weights::load_top(&dev, src, &cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LayerW::load(&dev, src, &cfg, i))
            .collect::<Result<Vec<_>, _>>()?;
        let freqs: Vec<f32> = cfg.rope_frequencies()?.iter().map(|&f| f as f32).collect();
        let router = RouterParams {
            n_experts: cfg.n_routed_experts,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            top_k: cfg.num_experts_per_tok,
            routed_scaling_factor: cfg.routed_scaling_factor as f32,
            norm_topk_prob: cfg.norm_topk_prob,
        };
        Ok(Self {
            freqs: dev.upload(&freqs)?,
            attention_factor: cfg.rope_attention_factor()? as f32,
            scale: cfg.softmax_scale()? as f32,
            blas,
            glue,
            embed,
            norm,
            head,
            layers,
            router,
            cfg,
            dev,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// A zeroed cache of `slots` sequences of up to `max_ctx` positions each
    /// (`index_topk ≤ max_ctx ≤ max_position_embeddings`).
    pub fn new_cache(&self, slots: usize, max_ctx: usize) -> Result<CudaKvCache, CudaModelError> {
        let c = &self.cfg;
        if slots == 0 || max_ctx < c.index_topk || max_ctx > c.max_position_embeddings {
            return Err(CudaModelError::Cache(format!(
                "{slots} slots of {max_ctx} positions: need ≥ 1 slot and index_topk {} ≤ \
                 max_ctx ≤ max_position_embeddings {}",
                c.index_topk, c.max_position_embeddings
            )));
        }
        let rows = slots * max_ctx;
        let lat = c.kv_lora_rank + c.qk_rope_head_dim;
        let mut latent = Vec::new();
        let mut index = Vec::new();
        for _ in 0..c.num_hidden_layers {
            latent.push(self.dev.zeros::<bf16>(rows * lat)?);
            index.push(self.dev.zeros::<f32>(rows * c.index_head_dim)?);
        }
        Ok(CudaKvCache { latent, index, slots, max_ctx })
    }

    fn validate(&self, seqs: &[CudaSeqInput], cache: &CudaKvCache) -> Result<(), CudaModelError> {
        if cache.latent.len() != self.cfg.num_hidden_layers {
            return Err(CudaModelError::Cache(format!(
                "cache has {} layers, the model {}",
                cache.latent.len(),
                self.cfg.num_hidden_layers
            )));
        }
        let mut used = vec![false; cache.slots];
        for (s, seq) in seqs.iter().enumerate() {
            let bad = |detail: String| CudaModelError::Input { seq: s, detail };
            if seq.tokens.is_empty() {
                return Err(bad("no new tokens".into()));
            }
            if seq.slot >= cache.slots || std::mem::replace(&mut used[seq.slot], true) {
                return Err(bad(format!(
                    "slot {} is outside the cache's {} slots or used twice in one step",
                    seq.slot, cache.slots
                )));
            }
            let end = seq.start_pos + seq.tokens.len();
            if end > cache.max_ctx {
                return Err(bad(format!("context of {end} exceeds max_ctx {}", cache.max_ctx)));
            }
            if let Some(&id) = seq.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                return Err(bad(format!(
                    "token id {id} is not below vocab_size {}",
                    self.cfg.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// One step over a batch: writes the new tokens' latents and indexer keys into `cache`,
    /// returns the requested logits (f32) and the final residual stream. `record_hidden` records
    /// every layer's residual stream (downloads); `record_routing` is not supported here (the
    /// routing stays on the device) and leaves `routed_experts` empty.
    pub fn forward(
        &self,
        seqs: &[CudaSeqInput],
        cache: &mut CudaKvCache,
        opts: &ForwardOptions,
    ) -> Result<ForwardOutput, CudaModelError> {
        self.validate(seqs, cache)?;
        let c = &self.cfg;
        let (hd, vocab) = (c.hidden_size, c.vocab_size);
        let mut ids = Vec::new();
        let mut step = layer::Step::default();
        let mut seq_ends = Vec::new();
        for seq in seqs {
            let base = (seq.slot * cache.max_ctx) as i32;
            for (i, &t) in seq.tokens.iter().enumerate() {
                let p = (seq.start_pos + i) as i32;
                ids.push(t as i32);
                step.pos.push(p);
                step.row.push(base + p);
                step.base.push(base);
                step.len.push(p + 1);
            }
            seq_ends.push(ids.len());
        }
        let n = ids.len();
        let dev = &self.dev;
        let ids_d = dev.upload(&ids)?;
        let mut bad = dev.zeros::<i32>(1)?;
        let mut emb = dev.zeros::<bf16>(n * hd)?; // [n, hidden]
        dev.ops().embedding_gather_bf16(&self.embed, &ids_d, &mut emb, &mut bad, n, hd, vocab)?;
        let mut h = dev.zeros::<f32>(n * hd)?; // [n, hidden] residual stream
        self.glue.to_f32(&emb, &mut h, n * hd)?;
        let dstep = step.upload(dev)?;

        let mut out = ForwardOutput::default();
        if opts.record_hidden {
            out.layer_hidden.push(dev.download(&h)?);
        }
        for (i, lw) in self.layers.iter().enumerate() {
            self.layer_forward(lw, i, &mut h, n, &dstep, cache)?;
            if opts.record_hidden {
                out.layer_hidden.push(dev.download(&h)?);
            }
        }
        let bad = dev.download(&bad)?[0];
        if bad != 0 {
            return Err(CudaModelError::BadTokens { count: bad });
        }
        out.logit_rows = match opts.logits {
            LogitsMode::None => Vec::new(),
            LogitsMode::LastPerSeq => seq_ends.iter().map(|&e| e - 1).collect(),
            LogitsMode::All => (0..n).collect(),
        };
        if !out.logit_rows.is_empty() {
            let mut xb = dev.zeros::<bf16>(n * hd)?;
            let mut xf = dev.zeros::<f32>(n * hd)?;
            let eps = c.rms_norm_eps as f32;
            self.glue.rmsnorm_f32_rows(&h, &self.norm, &mut xb, &mut xf, n, hd, eps)?;
            let mut lb = dev.zeros::<bf16>(n * vocab)?; // [n, vocab]
            self.blas.gemm_bf16(&xb, &self.head, &mut lb, n, vocab, hd)?;
            let mut lf = dev.zeros::<f32>(n * vocab)?;
            self.glue.to_f32(&lb, &mut lf, n * vocab)?;
            let all = dev.download(&lf)?;
            for &r in &out.logit_rows {
                out.logits.extend_from_slice(&all[r * vocab..(r + 1) * vocab]);
            }
        }
        out.hidden = dev.download(&h)?;
        Ok(out)
    }
}
