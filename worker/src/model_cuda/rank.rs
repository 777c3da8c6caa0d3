//! One rank of a sharded plan (W > 1) on its GPU: [`CudaRankModel`], the GPU twin of
//! `parallel::RankModel` — the same shard (see `rank_weights.rs`: the rank's heads, its slice of
//! the dense FFN, its routed experts by the plan's placement, its vocabulary rows) and the same
//! collectives at the same seams:
//! - vocab-parallel embedding: each group rank gathers the rows it holds (zeros elsewhere), the
//!   group all-reduces;
//! - after `o_proj` and after the dense FFN: the group all-reduces the partial sums (`seams.rs`
//!   hooks of `layer.rs`/`layer_f32.rs`, which otherwise run unchanged);
//! - routed experts: EP dispatch/combine over the world (`rank_moe.rs`);
//! - LM head: local vocabulary columns, all-gathered in the group.
//!
//! The layer math is the one-GPU model's: the rank holds a [`CudaModel`] whose config says
//! `num_attention_heads = heads / T` (the only field the layer math reads that the shard
//! changes; everything else — vocabulary included, for input validation — is the model's).
//!
//! First version, staged through the host: every collective downloads its device buffer, runs the
//! `Collective` on host slices (any implementation: `LocalComm`, `TcpComm`, `NcclComm`) and
//! uploads the result. With T = 1 the group collectives are skipped (identity).
//!
//! Invariants (as `parallel::RankModel`): every rank of the world calls [`CudaRankModel::forward`]
//! once per step, also with no sequences (its MoE layers then only serve the other groups'
//! tokens); the ranks of a group get identical inputs and keep identical caches; group sums run in
//! rank order (the `Collective` contract), so the residual stream is bit-identical on the ranks
//! of a group and the replicated indexer selects the same keys everywhere.

use fathom_common::ModelConfig;
use fathom_common::ids::Rank;
use fathom_common::plan::ParallelPlan;
use fathom_kernels::comm::Collective;
use fathom_kernels::cuda::cudarc::driver::CudaSlice;
use fathom_kernels::cuda::{CudaDevice, KernelCache};
use half::bf16;
use std::ops::Range;
use std::sync::Arc;

use super::layer::Step;
use super::rank_moe::{EpComms, EpW, ep_forward};
use super::seams::{FfnInput, RoutingRecorder, Seams};
use super::weights::{FfnW, Mat};
use super::{CudaKvCache, CudaModel, CudaModelError, CudaSeqInput, Glue, Precision};
use crate::model::{ForwardOptions, ForwardOutput, LogitsMode, ModelError};
use crate::parallel::{ParallelError, even_range, gather_vocab_parts};
use crate::weights::TensorSource;

/// One rank's shard of DeepSeek-V3.2 on one GPU.
#[derive(Debug)]
pub struct CudaRankModel {
    /// The layer math over this rank's heads (see the module doc).
    inner: CudaModel,
    cfg: ModelConfig,
    plan: ParallelPlan,
    rank: usize,
    group_rank: usize,
    /// Vocabulary rows held by the embedding and the LM head.
    vocab: Range<usize>,
}

impl CudaRankModel {
    /// Loads rank `rank`'s tensors of `src` under `plan` onto `dev` at `precision` (only its
    /// bytes: see `rank_weights.rs`).
    pub fn load(
        dev: Arc<CudaDevice>,
        src: &dyn TensorSource,
        cfg: ModelConfig,
        plan: &ParallelPlan,
        rank: usize,
        kernel_cache: Option<&KernelCache>,
        precision: Precision,
    ) -> Result<Self, CudaModelError> {
        cfg.validate()?;
        plan.validate_for(&cfg).map_err(ParallelError::from)?;
        if rank >= plan.world_size {
            return Err(ParallelError::Layout {
                what: "rank below world_size",
                expected: plan.world_size,
                got: rank,
            }
            .into());
        }
        let t = plan.tp;
        let group_rank = plan.rank_in_group(Rank(rank as u32));
        if cfg.vocab_size < t || cfg.intermediate_size < t {
            return Err(ModelError::Shard(format!(
                "tp {t} exceeds vocab_size {} or intermediate_size {}",
                cfg.vocab_size, cfg.intermediate_size
            ))
            .into());
        }
        let vocab = even_range(cfg.vocab_size, t, group_rank);
        let glue = Glue::load(&dev, kernel_cache)?;
        let top = super::rank_weights::load_top(&dev, src, &cfg, vocab.clone(), precision)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| super::rank_weights::load_layer(&dev, src, &cfg, plan, rank, i, precision))
            .collect::<Result<Vec<_>, _>>()?;
        // The layers see this rank's heads; nothing else the layer code reads changes.
        let mut local_cfg = cfg.clone();
        local_cfg.num_attention_heads = plan.head_range(Rank(rank as u32)).len();
        let inner = CudaModel::assemble(dev, local_cfg, glue, precision, top, layers)?;
        Ok(Self { inner, cfg, plan: plan.clone(), rank, group_rank, vocab })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn plan(&self) -> &ParallelPlan {
        &self.plan
    }

    pub fn precision(&self) -> Precision {
        self.inner.precision
    }

    /// This rank in the world.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// This rank's attention group.
    pub fn group(&self) -> usize {
        self.plan.group_of(Rank(self.rank as u32))
    }

    /// This rank's position in its group.
    pub fn group_rank(&self) -> usize {
        self.group_rank
    }

    /// Heads this rank computes.
    pub fn heads(&self) -> Range<usize> {
        self.plan.head_range(Rank(self.rank as u32))
    }

    /// Vocabulary rows of the embedding and LM head held here.
    pub fn vocab_rows(&self) -> Range<usize> {
        self.vocab.clone()
    }

    /// Logical routed experts held in MoE layer `layer` (slot order; `None`: not a MoE layer).
    pub fn experts_held(&self, layer: usize) -> Option<Vec<u32>> {
        match &self.inner.layers.get(layer)?.ffn {
            FfnW::Ep(w) => Some(w.experts.clone()),
            _ => None,
        }
    }

    /// A zeroed cache (the latent is shared by all heads: every rank of a group keeps the same
    /// full-width cache, as on the CPU). Same rules as [`CudaModel::new_cache`].
    pub fn new_cache(&self, slots: usize, max_ctx: usize) -> Result<CudaKvCache, CudaModelError> {
        self.inner.new_cache(slots, max_ctx)
    }

    /// One step of this rank's group: `seqs` are the group's sequences (identical on every rank
    /// of the group; empty when the group has nothing to do — the call is still required).
    /// Returns the same [`ForwardOutput`] on every rank of the group (full-vocabulary logits;
    /// with `record_routing`, every row's routed experts per MoE layer).
    pub fn forward(
        &self,
        seqs: &[CudaSeqInput],
        cache: &mut CudaKvCache,
        world: &mut dyn Collective,
        group: &mut dyn Collective,
        opts: &ForwardOptions,
    ) -> Result<ForwardOutput, CudaModelError> {
        crate::parallel::check_comms(&self.plan, (self.rank, self.group_rank), world, group)?;
        let m = &self.inner;
        let mut comms = EpComms { world, group, plan: &self.plan };
        if seqs.is_empty() {
            for (li, lw) in m.layers.iter().enumerate() {
                if let FfnW::Ep(w) = &lw.ffn {
                    ep_forward(m, li, w, None, 0, &mut comms, None)?;
                }
            }
            return Ok(ForwardOutput::default());
        }
        m.validate(seqs, cache)?;
        let c = &self.cfg;
        let (hd, vocab) = (c.hidden_size, c.vocab_size);
        let mut ids = Vec::new(); // local vocabulary rows, −1 = held by another group rank
        let mut step = Step::default();
        let mut seq_ends = Vec::new();
        for seq in seqs {
            let base = (seq.slot * cache.max_ctx()) as i32;
            for (i, &t) in seq.tokens.iter().enumerate() {
                let p = (seq.start_pos + i) as i32;
                let t = t as usize;
                let held = self.vocab.contains(&t);
                ids.push(if held { (t - self.vocab.start) as i32 } else { -1 });
                step.pos.push(p);
                step.row.push(base + p);
                step.base.push(base);
                step.len.push(p + 1);
            }
            seq_ends.push(ids.len());
        }
        let n = ids.len();
        let foreign = ids.iter().filter(|&&i| i < 0).count() as i32;
        let dev = &m.dev;
        let vl = self.vocab.len();
        let ids_d = dev.upload(&ids)?;
        let mut bad = dev.zeros::<i32>(1)?;
        let mut h = dev.zeros::<f32>(n * hd)?; // [n, hidden] residual stream
        match &m.embed {
            Mat::Bf16(table) => {
                let mut emb = dev.zeros::<bf16>(n * hd)?; // [n, hidden]
                dev.ops().embedding_gather_bf16(table, &ids_d, &mut emb, &mut bad, n, hd, vl)?;
                m.glue.to_f32(&emb, &mut h, n * hd)?;
            }
            Mat::F32(table) => {
                m.glue.gather_rows_f32(table, &ids_d, &mut h, &mut bad, n, hd, vl)?
            }
        }
        let bad = dev.download(&bad)?[0];
        if bad != foreign {
            return Err(CudaModelError::BadTokens { count: bad - foreign });
        }
        if self.plan.tp > 1 {
            h = all_reduce(dev, &h, comms.group)?; // the group's rows summed: full embeddings
        }
        let dstep = step.upload(dev)?;

        let mut out = ForwardOutput::default();
        if opts.record_hidden {
            out.layer_hidden.push(dev.download(&h)?);
        }
        let routing = opts.record_routing.then(|| RoutingRecorder::new(n));
        let mut seams = RankSeams { comms, routing };
        for (i, lw) in m.layers.iter().enumerate() {
            match m.precision {
                Precision::Bf16 => {
                    m.layer_forward_with(lw, i, &mut h, n, &dstep, cache, &mut seams)?
                }
                Precision::F32 => {
                    m.layer_forward_f32_with(lw, i, &mut h, n, &dstep, cache, &mut seams)?
                }
            }
            if opts.record_hidden {
                out.layer_hidden.push(dev.download(&h)?);
            }
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
            m.glue.rmsnorm_f32_rows(&h, &m.norm, &mut xb, &mut xf, n, hd, eps)?;
            let mut lf = dev.zeros::<f32>(n * vl)?; // [n, local vocab]
            match &m.head {
                Mat::Bf16(w) => {
                    let mut lb = dev.zeros::<bf16>(n * vl)?;
                    m.blas.gemm_bf16(&xb, w, &mut lb, n, vl, hd)?;
                    m.glue.to_f32(&lb, &mut lf, n * vl)?;
                }
                Mat::F32(w) => m.blas.gemm_f32(&xf, w, &mut lf, n, vl, hd, 1.0)?,
            }
            let all = dev.download(&lf)?;
            let mut local = Vec::with_capacity(out.logit_rows.len() * vl);
            for &r in &out.logit_rows {
                local.extend_from_slice(&all[r * vl..(r + 1) * vl]);
            }
            let rows = out.logit_rows.len();
            out.logits = gather_vocab_parts(&local, rows, vocab, seams.comms.group)?;
        }
        out.hidden = dev.download(&h)?;
        if let Some(r) = seams.routing {
            out.routed_experts = r.rows;
        }
        Ok(out)
    }
}

/// `Σ_group x` of a device buffer, staged through the host (rank-order sum).
fn all_reduce(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    group: &mut dyn Collective,
) -> Result<CudaSlice<f32>, CudaModelError> {
    let mut host = dev.download(x)?;
    group.all_reduce_sum_f32(&mut host).map_err(ParallelError::from)?;
    Ok(dev.upload(&host)?)
}

/// The seams of a sharded rank: group all-reduces (skipped at T = 1), EP over the world.
struct RankSeams<'a> {
    comms: EpComms<'a>,
    routing: Option<RoutingRecorder>,
}

impl Seams for RankSeams<'_> {
    fn recorder(&mut self) -> Option<&mut RoutingRecorder> {
        self.routing.as_mut()
    }

    fn add_reduced_bf16(
        &mut self,
        m: &CudaModel,
        h: &mut CudaSlice<f32>,
        part: &CudaSlice<bf16>,
        n: usize,
    ) -> Result<(), CudaModelError> {
        let len = n * m.cfg.hidden_size;
        if self.comms.group.world_size() == 1 {
            return Ok(m.glue.add_into(h, part, len)?);
        }
        // The bf16 parts are summed in f32 and added without rounding the sum to bf16.
        let mut f = m.dev.zeros::<f32>(len)?;
        m.glue.to_f32(part, &mut f, len)?;
        let sum = all_reduce(&m.dev, &f, self.comms.group)?;
        Ok(m.glue.add_f32_into(h, &sum, len)?)
    }

    fn add_reduced_f32(
        &mut self,
        m: &CudaModel,
        h: &mut CudaSlice<f32>,
        part: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaModelError> {
        let len = n * m.cfg.hidden_size;
        if self.comms.group.world_size() == 1 {
            return Ok(m.glue.add_f32_into(h, part, len)?);
        }
        let sum = all_reduce(&m.dev, part, self.comms.group)?;
        Ok(m.glue.add_f32_into(h, &sum, len)?)
    }

    fn expert_parallel(
        &mut self,
        m: &CudaModel,
        li: usize,
        w: &EpW,
        x: FfnInput,
        h: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaModelError> {
        ep_forward(m, li, w, Some((x, h)), n, &mut self.comms, self.routing.as_mut())
    }
}
