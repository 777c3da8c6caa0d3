//! DeepSeek-V3.2 forward on one GPU (W = 1), composed from the device ops of
//! `fathom_kernels::cuda` plus a few glue kernels (`glue.cu`).
//!
//! Owns: the device weights ([`CudaModel::load`] from any [`TensorSource`]), a device-resident
//! cache ([`CudaKvCache`]: per layer a bf16 latent `[c | k_pe]` and an f32 indexer-key buffer,
//! one contiguous region of `max_ctx` rows per sequence slot), and the batched forward
//! ([`CudaModel::forward`], mirroring `Model::forward`: prefill chunks and decodes mix freely).
//! Does not own: sampling, slot allocation (callers pick slots), MTP; the sharded forward of one
//! rank (W > 1) is `rank.rs` (it reuses these layers through the `seams.rs` hooks).
//!
//! Numerics ([`Precision`]): under `F32` (an f32 checkpoint at its own precision, what the golden
//! test runs) every weight, activation, cache entry and op is fp32 (`layer_f32.rs`): the GPU
//! forward then equals the CPU reference up to fp32 summation order, so the discrete indexer and
//! router decisions agree. Under `Bf16` (what fits a real checkpoint) the residual stream is f32
//! on the device; GEMM weights and activations between ops are bf16 (cuBLAS, fp32
//! accumulation); norms, the q-LoRA down projection, router logits,
//! and the indexer's projections run in fp32 (cuBLAS SGEMM); the indexer then takes the FP8
//! path of spec §2.3 (Hadamard rotation, e4m3 with ue8m0 scales, e4m3 tensor-core scoring with
//! fp32 accumulation: `indexer_rotate_quant_fp8`, `indexer_scores_fp8_rows`); the
//! MLA absorption and un-absorption are bf16 strided-batched GEMMs over the heads (`kv_b_proj`
//! in bf16). Attention is the absorbed sparse form for every row
//! (prefill too): each query row gets its own `index_topk` selection (all causal keys when the
//! context is ≤ `index_topk`, the indexer's top-k otherwise — exactly the CPU rule) and goes
//! through the sparse MLA decode kernel. The MoE experts op synchronises the stream once per MoE
//! layer (expert offsets); nothing else leaves the device until the logits are downloaded.
//! No host round trips of activations.
//!
//! Invariants: a sequence in slot `s` owns cache rows `[s·max_ctx, (s+1)·max_ctx)`; position p
//! is row `s·max_ctx + p`; positions below `start_pos` must have been written by earlier calls.

mod device;
pub mod executor;
mod glue;
mod layer;
mod layer_f32;
pub mod rank;
mod rank_moe;
mod rank_weights;
mod seams;
pub mod sharded;
mod weights;

use fathom_common::{ConfigError, ModelConfig};
use fathom_kernels::cpu::router::RouterParams;
use fathom_kernels::cuda::cudarc::driver::CudaSlice;
use fathom_kernels::cuda::{BlasGemm, CudaDevice, CudaError, KernelCache};
use half::bf16;
use std::sync::Arc;

use crate::model::{ForwardOptions, ForwardOutput, LogitsMode, ModelError};
use crate::weights::TensorSource;
pub use device::{DeviceChoice, OpenError, open_gpu, precision_for};
pub use glue::{GLUE, Glue};
use weights::{LayerW, Mat};

/// Storage and arithmetic precision of the GPU forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// bf16 GEMM weights and activations (fp32 accumulation), bf16 latent cache; f32 residual
    /// stream, norms, router and indexer. What a real (bf16/FP8) checkpoint runs at.
    #[default]
    Bf16,
    /// Everything fp32: an f32 checkpoint (the golden fixtures) at its own precision.
    F32,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" => Ok(Precision::Bf16),
            "f32" => Ok(Precision::F32),
            other => Err(format!("unknown GPU precision {other:?}: expected bf16 or f32")),
        }
    }
}

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
    #[error("a weight was loaded at another precision than the {want:?} forward needs")]
    Precision { want: Precision },
    #[error(transparent)]
    Parallel(#[from] crate::parallel::ParallelError),
}

/// One sequence's part of a step: new `tokens` at positions `start_pos ..`, in cache slot `slot`.
#[derive(Debug, Clone, Copy)]
pub struct CudaSeqInput<'a> {
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub slot: usize,
}

/// Device cache: per layer a latent `[slots·max_ctx, kv_lora + rope]` and indexer keys
/// `[slots·max_ctx, index_head_dim]`. Under [`Precision::Bf16`] the latent is bf16 (`latent`) and
/// the keys are the FP8 path's Hadamard-rotated e4m3 codes with one ue8m0 scale per key
/// (`index_fp8`, `index_scale`: 132 B per key at d = 128, as DeepSeek's inference stores them);
/// under [`Precision::F32`] both are f32 (`latent_f32`, `index`). The other set is empty.
#[derive(Debug)]
pub struct CudaKvCache {
    pub(crate) latent: Vec<CudaSlice<bf16>>,
    pub(crate) latent_f32: Vec<CudaSlice<f32>>,
    pub(crate) index: Vec<CudaSlice<f32>>,
    pub(crate) index_fp8: Vec<CudaSlice<u8>>,
    pub(crate) index_scale: Vec<CudaSlice<f32>>,
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
    precision: Precision,
    embed: Mat,
    norm: CudaSlice<f32>,
    head: Mat,
    layers: Vec<LayerW>,
    /// RoPE frequencies `[qk_rope_head_dim / 2]`.
    freqs: CudaSlice<f32>,
    attention_factor: f32,
    scale: f32,
    router: RouterParams,
    /// Routed experts through one grouped cuBLAS call per GEMM (default) or a call per expert.
    grouped_experts: bool,
}

impl CudaModel {
    /// [`Self::load_with`] at [`Precision::Bf16`].
    pub fn load(
        dev: Arc<CudaDevice>,
        src: &dyn TensorSource,
        cfg: ModelConfig,
        kernel_cache: Option<&KernelCache>,
    ) -> Result<Self, CudaModelError> {
        Self::load_with(dev, src, cfg, kernel_cache, Precision::Bf16)
    }

    /// Uploads every tensor of the main model (no MTP) from `src` at `precision`, checking
    /// shapes against `cfg`; compiles the glue kernels (through `kernel_cache` when given).
    pub fn load_with(
        dev: Arc<CudaDevice>,
        src: &dyn TensorSource,
        cfg: ModelConfig,
        kernel_cache: Option<&KernelCache>,
        precision: Precision,
    ) -> Result<Self, CudaModelError> {
        cfg.validate()?;
        let glue = Glue::load(&dev, kernel_cache)?;
        let top = weights::load_top(&dev, src, &cfg, precision)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LayerW::load(&dev, src, &cfg, i, precision))
            .collect::<Result<Vec<_>, _>>()?;
        Self::assemble(dev, cfg, glue, precision, top, layers)
    }

    /// The model from its loaded parts: cuBLAS handle, RoPE table, router parameters and
    /// attention constants derived from `cfg` (shared by every way of loading one).
    pub(crate) fn assemble(
        dev: Arc<CudaDevice>,
        cfg: ModelConfig,
        glue: Glue,
        precision: Precision,
        (embed, norm, head): weights::Top,
        layers: Vec<LayerW>,
    ) -> Result<Self, CudaModelError> {
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
            blas: BlasGemm::new(&dev)?,
            glue,
            precision,
            embed,
            norm,
            head,
            layers,
            router,
            grouped_experts: true,
            cfg,
            dev,
        })
    }

    /// Routed experts (bf16 forward) through one grouped cuBLAS GEMM per projection (the default:
    /// 1.2–1.4× faster at decode batch 64–256 on the H200, docs/perf/gpu-layer.md) or one call
    /// per expert (`MoeScratch::grouped`).
    pub fn set_grouped_experts(&mut self, on: bool) {
        self.grouped_experts = on;
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn precision(&self) -> Precision {
        self.precision
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
        let id = c.index_head_dim;
        let (mut latent, mut latent_f32) = (Vec::new(), Vec::new());
        let (mut index, mut index_fp8, mut index_scale) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..c.num_hidden_layers {
            match self.precision {
                Precision::Bf16 => {
                    latent.push(self.dev.zeros::<bf16>(rows * lat)?);
                    index_fp8.push(self.dev.zeros::<u8>(rows * id)?);
                    index_scale.push(self.dev.zeros::<f32>(rows)?);
                }
                Precision::F32 => {
                    latent_f32.push(self.dev.zeros::<f32>(rows * lat)?);
                    index.push(self.dev.zeros::<f32>(rows * id)?);
                }
            }
        }
        Ok(CudaKvCache { latent, latent_f32, index, index_fp8, index_scale, slots, max_ctx })
    }

    fn validate(&self, seqs: &[CudaSeqInput], cache: &CudaKvCache) -> Result<(), CudaModelError> {
        let (latents, keys) = match self.precision {
            Precision::Bf16 => {
                (cache.latent.len(), cache.index_fp8.len().min(cache.index_scale.len()))
            }
            Precision::F32 => (cache.latent_f32.len(), cache.index.len()),
        };
        if latents != self.cfg.num_hidden_layers || keys != latents {
            return Err(CudaModelError::Cache(format!(
                "cache has {latents} {:?} layers, the model {}",
                self.precision, self.cfg.num_hidden_layers
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
    /// every layer's residual stream (downloads); `record_routing` records each row's routed
    /// experts per MoE layer (one download per MoE layer, only when asked).
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
        let mut h = dev.zeros::<f32>(n * hd)?; // [n, hidden] residual stream
        match &self.embed {
            Mat::Bf16(table) => {
                let mut emb = dev.zeros::<bf16>(n * hd)?; // [n, hidden]
                dev.ops().embedding_gather_bf16(table, &ids_d, &mut emb, &mut bad, n, hd, vocab)?;
                self.glue.to_f32(&emb, &mut h, n * hd)?;
            }
            Mat::F32(table) => {
                self.glue.gather_rows_f32(table, &ids_d, &mut h, &mut bad, n, hd, vocab)?
            }
        }
        let dstep = step.upload(dev)?;

        let mut out = ForwardOutput::default();
        if opts.record_hidden {
            out.layer_hidden.push(dev.download(&h)?);
        }
        let routing = opts.record_routing.then(|| seams::RoutingRecorder::new(n));
        let mut seams = seams::OneGpu { routing };
        for (i, lw) in self.layers.iter().enumerate() {
            let s = &mut seams;
            match self.precision {
                Precision::Bf16 => self.layer_forward_with(lw, i, &mut h, n, &dstep, cache, s)?,
                Precision::F32 => {
                    self.layer_forward_f32_with(lw, i, &mut h, n, &dstep, cache, s)?
                }
            }
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
            let mut lf = dev.zeros::<f32>(n * vocab)?; // [n, vocab]
            match &self.head {
                Mat::Bf16(w) => {
                    let mut lb = dev.zeros::<bf16>(n * vocab)?;
                    self.blas.gemm_bf16(&xb, w, &mut lb, n, vocab, hd)?;
                    self.glue.to_f32(&lb, &mut lf, n * vocab)?;
                }
                Mat::F32(w) => self.blas.gemm_f32(&xf, w, &mut lf, n, vocab, hd, 1.0)?,
            }
            let all = dev.download(&lf)?;
            for &r in &out.logit_rows {
                out.logits.extend_from_slice(&all[r * vocab..(r + 1) * vocab]);
            }
        }
        out.hidden = dev.download(&h)?;
        if let Some(r) = seams.routing {
            out.routed_experts = r.rows;
        }
        Ok(out)
    }
}

/// Full-width benchmarks: random bf16 weights made on the device, decode of one layer timed.
impl CudaModel {
    /// A model of `cfg` at [`Precision::Bf16`] with random weights generated on the device
    /// (seeded; nothing crosses PCIe), for layer benchmarks at full width.
    pub fn random(
        dev: Arc<CudaDevice>,
        cfg: ModelConfig,
        kernel_cache: Option<&KernelCache>,
        seed: u32,
    ) -> Result<Self, CudaModelError> {
        cfg.validate()?;
        let glue = Glue::load(&dev, kernel_cache)?;
        let mut init = weights::RandomInit { dev: &dev, seed };
        let top = init.top(&cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| init.layer(&cfg, i))
            .collect::<Result<Vec<_>, _>>()?;
        dev.synchronize()?;
        Self::assemble(dev, cfg, glue, Precision::Bf16, top, layers)
    }

    /// Fills every cache row with random values (a context as if prefilled).
    pub fn fill_cache_random(
        &self,
        cache: &mut CudaKvCache,
        seed: u32,
    ) -> Result<(), CudaModelError> {
        let ops = self.dev.ops();
        for (l, lat) in cache.latent.iter_mut().enumerate() {
            ops.fill_uniform_bf16(lat, seed.wrapping_add(2 * l as u32), 1.0)?;
        }
        for (l, lat) in cache.latent_f32.iter_mut().enumerate() {
            ops.fill_uniform_f32(lat, seed.wrapping_add(2 * l as u32), -1.0, 1.0)?;
        }
        for (l, idx) in cache.index.iter_mut().enumerate() {
            ops.fill_uniform_f32(idx, seed.wrapping_add(2 * l as u32 + 1), -1.0, 1.0)?;
        }
        for (l, idx) in cache.index_fp8.iter_mut().enumerate() {
            ops.fill_uniform_e4m3(idx, seed.wrapping_add(2 * l as u32 + 1), 448.0)?;
        }
        for (l, sc) in cache.index_scale.iter_mut().enumerate() {
            ops.fill_uniform_f32(sc, seed.wrapping_add(2 * l as u32 + 1), 0.01, 0.02)?;
        }
        Ok(self.dev.synchronize()?)
    }

    /// Decode of layer `li` alone for `cache.slots()` sequences, each at position `ctx` (its
    /// keys `0..=ctx` in the cache): `warmup` untimed runs, then the mean wall time (µs) of
    /// `iters` runs, the stream synchronised around them (host launch overhead included).
    pub fn time_decode_layer(
        &self,
        li: usize,
        cache: &mut CudaKvCache,
        ctx: usize,
        warmup: usize,
        iters: usize,
    ) -> Result<f64, CudaModelError> {
        let b = cache.slots();
        if li >= self.layers.len() || ctx >= cache.max_ctx() || iters == 0 {
            return Err(CudaModelError::Cache(format!(
                "layer {li} of {}, position {ctx} of max_ctx {}, {iters} iterations",
                self.layers.len(),
                cache.max_ctx()
            )));
        }
        let mut step = layer::Step::default();
        for s in 0..b {
            let base = (s * cache.max_ctx()) as i32;
            step.pos.push(ctx as i32);
            step.row.push(base + ctx as i32);
            step.base.push(base);
            step.len.push(ctx as i32 + 1);
        }
        let dstep = step.upload(&self.dev)?;
        let mut h = self.dev.zeros::<f32>(b * self.cfg.hidden_size)?; // [B, hidden]
        self.dev.ops().fill_uniform_f32(&mut h, 7, -1.0, 1.0)?;
        let run = |h: &mut CudaSlice<f32>, cache: &mut CudaKvCache| match self.precision {
            Precision::Bf16 => self.layer_forward(&self.layers[li], li, h, b, &dstep, cache),
            Precision::F32 => self.layer_forward_f32(&self.layers[li], li, h, b, &dstep, cache),
        };
        for _ in 0..warmup {
            run(&mut h, cache)?;
        }
        self.dev.synchronize()?;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            run(&mut h, cache)?;
        }
        self.dev.synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e6 / iters as f64)
    }
}
