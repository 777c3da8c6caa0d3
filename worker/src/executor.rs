//! The step executor: what one rank does with one `StepRequest` of a prepared epoch.
//!
//! Owns the [`Executor`] trait (one per prepared epoch, driven by the Worker service one step at
//! a time) and the [`ExecutorFactory`] that builds it from an [`EpochContext`] (the plan, this
//! rank, and the collectives it may use). Does not own: the gRPC service (`service.rs`), the
//! model math (`model/`), KV block allocation (the coordinator decides block tables; executors
//! only write where they are told).
//!
//! Invariants every implementation keeps:
//! - every rank executes every step of its epoch, in order, also when its group has no
//!   sequences (sharded executors enter their collectives regardless);
//! - only rank 0 of a group returns [`SeqResult`]s, one per sequence with `sample = true`;
//! - a step that fails leaves no partial result: the error names what was wrong (no prompt
//!   data) and the coordinator decides what happens to the affected requests.
//!
//! Implementations: [`single`] (W = 1, the whole model) and [`sharded`] (W > 1, TP attention + EP
//! MoE over the world and group [`Collective`]s of [`EpochContext`]); [`DefaultFactory`] picks by
//! world size. Both sample and encode results through the shared [`seq_results`].

use crate::model::{ForwardOptions, ForwardOutput, LogitsMode, SeqInput};
use crate::sampling::{self, SamplingParams};
use fathom_common::ModelConfig;
use fathom_kernels::comm::Collective;
use fathom_proto::v1::{
    GeneratedLogprob, Plan, RoutedExperts, SamplingMask, SeqResult, SeqStep, StepRequest,
    TokenLogit, TokenLogprob, TopLogits,
};

/// Why an epoch could not be prepared or a step could not run. Messages never carry prompt data.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("plan: {0}")]
    Plan(String),
    #[error("loading the shard: {0}")]
    Load(String),
    #[error("communicator: {0}")]
    Comm(String),
    #[error("step {step_id}: {reason}")]
    Step { step_id: u64, reason: String },
    #[error("{0} is not supported by this executor")]
    Unsupported(String),
}

/// Everything an executor of one epoch needs to know about its place in the cluster.
#[derive(Debug)]
pub struct EpochContext {
    /// The plan being prepared (validated by the service: W entries, this rank in it).
    pub plan: Plan,
    /// This worker's rank in `plan`.
    pub rank: u32,
    /// A communicator over the whole world (`None` when W = 1).
    pub world: Option<Box<dyn Collective>>,
    /// A communicator over this rank's attention group (`None` when W = 1; a one-rank
    /// communicator when T = 1 < W).
    pub group: Option<Box<dyn Collective>>,
}

impl EpochContext {
    /// Attention group of this rank (`rank / T`).
    pub fn group_index(&self) -> u32 {
        self.rank / self.plan.tp.max(1)
    }

    /// Position of this rank inside its group (`rank % T`); 0 returns the sampled tokens.
    pub fn group_rank(&self) -> u32 {
        self.rank % self.plan.tp.max(1)
    }
}

/// Executes the steps of one epoch on one rank.
pub trait Executor: Send + std::fmt::Debug {
    /// Runs `step` (already checked to belong to this epoch, in order). Returns the results of
    /// this rank's group's sampling sequences when this rank is its group's rank 0, else empty.
    fn execute(&mut self, step: &StepRequest) -> Result<Vec<SeqResult>, ExecError>;

    /// Bytes of weights this rank holds (reported in `PrepareEpochResponse`).
    fn weight_bytes(&self) -> u64;

    /// What preparing this epoch read from the checkpoint and kept from the previous epoch
    /// (reported in `PrepareEpochResponse`). Default: everything held was loaded, expert bytes
    /// not counted.
    fn prepare_cost(&self) -> PrepareCost {
        PrepareCost { loaded_bytes: self.weight_bytes(), ..PrepareCost::default() }
    }

    /// Elastic epochs: gives up this executor's weights so that the next epoch's executor can
    /// keep the unchanged ones ([`ExecutorFactory::prepare_with`]); its collectives and KV cache
    /// are dropped. Default: nothing reusable.
    fn into_weights(self: Box<Self>) -> Option<HeldWeights> {
        None
    }

    /// What the last executed step adds to its `StepResult`: expert-load counters and
    /// placement versions (issue 9, `crate::experts`). Default: nothing. An executor whose MoE
    /// layers count ([`StepLoad`](crate::model::StepLoad), e.g. from `forward_counted`) returns
    /// [`crate::experts::StepReport::with_load`] here and the same counts as
    /// [`expert_tally_of_load`] in [`take_report`](Self::take_report).
    fn step_report(&mut self) -> crate::experts::StepReport {
        crate::experts::StepReport::default()
    }
    /// Where the running step is (layer and phase, written by the forward while
    /// [`execute`](Self::execute) runs), for the service to report to the coordinator's
    /// watchdog (`step_progress`). Fetched before each step, so it must not need `execute` to
    /// have returned. Default: not tracked (the watchdog then only knows `started`).
    fn step_phase(&self) -> Option<std::sync::Arc<crate::model::StepPhase>> {
        None
    }

    /// What the last [`execute`](Self::execute) measured (phase times, expert routing counts);
    /// taken once per step by the service for its metrics. Default: nothing measured.
    fn take_report(&mut self) -> crate::metrics::StepReport {
        crate::metrics::StepReport::default()
    }
}

/// The expert tally of a rank's step counters (`routed`: `[moe_layers][experts]` flattened, as
/// [`StepLoad::routed`](crate::model::StepLoad)); `None` for a model without MoE layers. Every
/// executor that counts in its MoE layers (one-rank, sharded; the GPU executor once its layers
/// count) feeds its metrics through this, and its `StepResult` through
/// [`crate::experts::StepReport::with_load`].
pub(crate) fn expert_tally_of_load(
    cfg: &ModelConfig,
    routed: &[u32],
) -> Option<crate::metrics::ExpertTally> {
    let mut t = crate::metrics::ExpertTally::for_model(cfg)?;
    t.add_counts(routed);
    Some(t)
}

/// Builds the executor of an epoch: loads this rank's shard, takes ownership of its collectives.
/// Called on a blocking thread (loading can take long).
pub trait ExecutorFactory: Send + Sync + std::fmt::Debug {
    fn prepare(&self, ctx: EpochContext) -> Result<Box<dyn Executor>, ExecError>;

    /// [`Self::prepare`] given the weights of this worker's previous epoch (elastic epochs):
    /// tensors whose slice is unchanged under the new plan are kept instead of loaded again.
    /// Default: the weights are dropped and everything is loaded.
    fn prepare_with(
        &self,
        ctx: EpochContext,
        held: Option<HeldWeights>,
    ) -> Result<Box<dyn Executor>, ExecError> {
        drop(held);
        self.prepare(ctx)
    }
}

/// Bytes one preparation read from the checkpoint (values delivered × 4, as
/// `parallel::CountingSource` counts) and kept from the previous epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrepareCost {
    pub loaded_bytes: u64,
    /// Routed experts (`*.mlp.experts.*`) among `loaded_bytes`.
    pub loaded_expert_bytes: u64,
    pub reused_bytes: u64,
}

impl PrepareCost {
    /// The cost of a load whose delivered bytes per tensor are `loaded`, keeping `reused` bytes.
    pub fn of(loaded: &std::collections::BTreeMap<String, u64>, reused: u64) -> Self {
        Self {
            loaded_bytes: loaded.values().sum(),
            loaded_expert_bytes: loaded
                .iter()
                .filter(|(name, _)| is_routed_expert(name))
                .map(|(_, b)| b)
                .sum(),
            reused_bytes: reused,
        }
    }
}

/// Whether checkpoint tensor `name` belongs to a routed expert (`model.layers.L.mlp.experts.E.*`).
pub fn is_routed_expert(name: &str) -> bool {
    name.contains(".mlp.experts.")
}

/// The weights an executor gives up at the end of its epoch ([`Executor::into_weights`]): a
/// sharded rank's model, the checkpoint it came from and the bytes it holds per tensor name.
#[derive(Debug)]
pub struct HeldWeights {
    pub model_path: String,
    pub model: crate::parallel::RankModel,
    pub bytes: std::collections::BTreeMap<String, u64>,
}

/// The model inputs of one group's sequences (every rank of the group passes the same).
pub(crate) fn seq_inputs(seqs: &[SeqStep]) -> Vec<SeqInput<'_>> {
    seqs.iter()
        .map(|s| SeqInput {
            tokens: &s.token_ids,
            start_pos: s.start_position as usize,
            block_table: &s.block_table,
        })
        .collect()
}

/// What a forward of `seqs` must compute: last-row logits when any sequence samples, routing
/// when any asks for it.
pub(crate) fn forward_options(seqs: &[SeqStep]) -> ForwardOptions {
    let any_sample = seqs.iter().any(|s| s.sample);
    let routing = seqs.iter().any(|s| s.outputs.is_some_and(|o| o.routed_experts));
    ForwardOptions {
        logits: if any_sample { LogitsMode::LastPerSeq } else { LogitsMode::None },
        record_hidden: false,
        record_routing: routing,
    }
}

fn params(s: &SeqStep) -> SamplingParams {
    let p = s.sampling.clone().unwrap_or_default();
    let o = s.outputs.unwrap_or_default();
    SamplingParams {
        temperature: p.temperature,
        top_p: if p.top_p == 0.0 { 1.0 } else { p.top_p },
        top_k: p.top_k,
        seed: s.seed,
        return_mask: o.sampling_mask,
        top_logprobs: if o.logprobs { o.top_logprobs } else { 0 },
    }
}

/// Samples every `sample = true` sequence of `seqs` from `out` (a forward with
/// [`forward_options`]`(seqs)`: one full-vocabulary logits row per sequence) and builds its
/// [`SeqResult`] with the extras it asked for. Shared by every executor, so a sharded group's
/// rank 0 samples exactly as the single-rank executor does.
pub(crate) fn seq_results(
    step_id: u64,
    seqs: &[SeqStep],
    out: &ForwardOutput,
    cfg: &ModelConfig,
    carry: &mut routing::RoutingCarry,
) -> Result<Vec<SeqResult>, ExecError> {
    let fail = |reason: String| ExecError::Step { step_id, reason };
    let vocab = cfg.vocab_size;
    let moe_layers = cfg.num_moe_layers() as u32;
    let top_k = cfg.num_experts_per_tok as u32;
    let bytes_per_id = if cfg.n_routed_experts <= 256 { 1 } else { 2 };
    if seqs.iter().any(|s| s.sample) && out.logits.len() != seqs.len() * vocab {
        return Err(fail(format!(
            "forward returned {} logits, expected {} sequences x vocab {vocab}",
            out.logits.len(),
            seqs.len()
        )));
    }
    let mut results = Vec::new();
    let mut row0 = 0;
    for (i, s) in seqs.iter().enumerate() {
        let rows = row0..row0 + s.token_ids.len();
        row0 = rows.end;
        let o = s.outputs.unwrap_or_default();
        let routed = (o.routed_experts && !out.routed_experts.is_empty()).then(|| {
            pack_routing(s, &out.routed_experts[rows.clone()], moe_layers, top_k, bytes_per_id)
        });
        if !s.sample {
            // A non-final prefill chunk: its rows go out with the sequence's next sample.
            if let Some(r) = routed {
                carry.stash(s.seq_id, r);
            }
            continue;
        }
        let logits = &out.logits[i * vocab..(i + 1) * vocab];
        let p = params(s);
        let picked = sampling::sample(logits, &p, s.generated as u64)
            .map_err(|e| fail(format!("sequence {}: {e}", s.seq_id)))?;
        let mut r = SeqResult { seq_id: s.seq_id, token_id: picked.token, ..Default::default() };
        if o.logprobs {
            r.logprob = Some(GeneratedLogprob {
                logprob: picked.logprob,
                top: picked
                    .top_logprobs
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(token_id, logprob)| TokenLogprob { token_id, logprob })
                    .collect(),
            });
        }
        if o.sampling_mask {
            let ids = picked.mask.unwrap_or_default();
            let all = ids.len() == vocab;
            r.sampling_mask =
                Some(SamplingMask { all, token_ids: if all { Vec::new() } else { ids } });
        }
        if o.logits_top_k > 0 {
            let mut idx: Vec<u32> = (0..vocab as u32).collect();
            let k = (o.logits_top_k as usize).min(vocab);
            idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
            r.top_logits = Some(TopLogits {
                entries: idx[..k]
                    .iter()
                    .map(|&t| TokenLogit { token_id: t, logit: logits[t as usize] })
                    .collect(),
            });
        }
        r.routed_experts = routed.map(|rows| carry.take(s.seq_id, rows));
        results.push(r);
    }
    Ok(results)
}

/// Packs `rows` (`[positions][moe_layers][top_k]`, this step's rows of `s`) as
/// [`RoutedExperts`] (u8 ids, or u16 little-endian above 256 experts).
fn pack_routing(
    s: &SeqStep,
    rows: &[Vec<Vec<u32>>],
    moe_layers: u32,
    top_k: u32,
    bytes_per_id: u32,
) -> RoutedExperts {
    let mut ids = Vec::with_capacity(rows.len() * (moe_layers * top_k * bytes_per_id) as usize);
    for &e in rows.iter().flatten().flatten() {
        if bytes_per_id == 1 {
            ids.push(e as u8);
        } else {
            ids.extend_from_slice(&(e as u16).to_le_bytes());
        }
    }
    RoutedExperts {
        start_position: s.start_position,
        positions: rows.len() as u32,
        moe_layers,
        top_k,
        bytes_per_id,
        ids,
    }
}

/// Picks the executor by world size: [`single::SingleRankFactory`] for W = 1,
/// [`sharded::ShardedFactory`] for W > 1. What the `fathom worker` binary serves.
#[derive(Debug, Default)]
pub struct DefaultFactory;

impl ExecutorFactory for DefaultFactory {
    fn prepare(&self, ctx: EpochContext) -> Result<Box<dyn Executor>, ExecError> {
        self.prepare_with(ctx, None)
    }

    fn prepare_with(
        &self,
        ctx: EpochContext,
        held: Option<HeldWeights>,
    ) -> Result<Box<dyn Executor>, ExecError> {
        if ctx.plan.world_size > 1 {
            sharded::ShardedFactory.prepare_with(ctx, held)
        } else {
            // One rank holds the whole model: nothing of a shard is reused.
            single::SingleRankFactory.prepare_with(ctx, held)
        }
    }
}

pub mod expert_wire;
pub mod progress;
pub mod routing;
pub mod sharded;
pub mod step_progress;

/// Values of the main model's tensors (MTP layers and FP8 scales excluded): the weight-loading
/// progress total of a whole-model load.
pub(crate) fn main_model_values(cfg: &ModelConfig) -> u64 {
    fathom_common::tensors::checkpoint_tensors(cfg)
        .iter()
        .filter(|t| !t.is_mtp(cfg))
        .map(|t| t.numel() as u64)
        .sum()
}

/// The single-rank executor over the reference model (W = 1): the whole model on this rank.
pub mod single {
    use super::{EpochContext, ExecError, Executor, ExecutorFactory};
    use crate::kv::PagedKvCache;
    use crate::metrics::StepReport;
    use crate::model::{Model, ShardSpec};
    use crate::weights::CheckpointReader;
    use fathom_proto::v1::{SeqResult, StepRequest};
    use std::path::Path;
    use std::time::Instant;

    /// Loads the whole checkpoint named by the plan (`plan.model_path`).
    #[derive(Debug, Default)]
    pub struct SingleRankFactory;

    impl ExecutorFactory for SingleRankFactory {
        fn prepare(&self, ctx: EpochContext) -> Result<Box<dyn Executor>, ExecError> {
            let plan = &ctx.plan;
            if plan.world_size != 1 {
                return Err(ExecError::Unsupported(format!(
                    "world size {} (the single-rank executor runs W = 1)",
                    plan.world_size
                )));
            }
            let reader = CheckpointReader::open(Path::new(&plan.model_path))
                .map_err(|e| ExecError::Load(e.to_string()))?;
            let cfg = reader.config().clone();
            let progress = super::progress::ProgressSource::new(
                &reader,
                "loading weights",
                super::main_model_values(&cfg),
            );
            let counting = crate::parallel::CountingSource::new(&progress);
            let model = Model::load(&counting, cfg.clone(), ShardSpec::full(&cfg))
                .map_err(|e| ExecError::Load(e.to_string()))?;
            progress.finish();
            let cost = super::PrepareCost::of(&counting.bytes_by_tensor(), 0);
            let cache = model
                .new_cache(plan.kv_block_size as usize, plan.kv_blocks as usize)
                .map_err(|e| ExecError::Load(format!("KV cache: {e}")))?;
            // The whole checkpoint is this rank's shard at W = 1.
            let weight_bytes = std::fs::read_dir(&plan.model_path)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                        .filter_map(|e| e.metadata().ok())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0);
            Ok(Box::new(SingleRankExecutor {
                model,
                cache,
                weight_bytes,
                cost,
                report: StepReport::default(),
                carry: Default::default(),
                placement_version: plan.placement_version,
                experts_report: Default::default(),
            }))
        }
    }

    /// The whole model and its KV cache on one rank.
    #[derive(Debug)]
    pub struct SingleRankExecutor {
        model: Model,
        cache: PagedKvCache,
        weight_bytes: u64,
        cost: super::PrepareCost,
        report: StepReport,
        carry: super::routing::RoutingCarry,
        /// The plan's placement version (one rank holds every expert: it never changes).
        placement_version: u64,
        /// The last step's load counters, for its `StepResult`.
        experts_report: crate::experts::StepReport,
    }

    impl Executor for SingleRankExecutor {
        fn execute(&mut self, step: &StepRequest) -> Result<Vec<SeqResult>, ExecError> {
            let fail = |reason: String| ExecError::Step { step_id: step.step_id, reason };
            let Some(group) = step.groups.first() else { return Ok(Vec::new()) };
            self.carry.release(&group.released_seq_ids);
            if group.seqs.is_empty() {
                return Ok(Vec::new());
            }
            let inputs = super::seq_inputs(&group.seqs);
            // Routing is recorded only when a sequence asked for it; the load counters come
            // from the MoE layers themselves.
            let opts = super::forward_options(&group.seqs);
            let t0 = Instant::now();
            let (out, load) = tracing::trace_span!("forward", tokens = inputs.len())
                .in_scope(|| self.model.forward_counted(&inputs, &mut self.cache, &opts))
                .map_err(|e| fail(e.to_string()))?;
            self.report.forward = Some(t0.elapsed());
            self.report.experts = super::expert_tally_of_load(self.model.config(), &load.routed);
            self.experts_report =
                crate::experts::StepReport::with_load(load, self.placement_version);
            self.model.step_phase().set(None, crate::model::Phase::Sample);
            let t1 = Instant::now();
            let results = tracing::trace_span!("sample").in_scope(|| {
                super::seq_results(
                    step.step_id,
                    &group.seqs,
                    &out,
                    self.model.config(),
                    &mut self.carry,
                )
            });
            self.report.sample = Some(t1.elapsed());
            results
        }

        fn weight_bytes(&self) -> u64 {
            self.weight_bytes
        }

        fn prepare_cost(&self) -> super::PrepareCost {
            self.cost
        }

        fn take_report(&mut self) -> StepReport {
            std::mem::take(&mut self.report)
        }

        fn step_report(&mut self) -> crate::experts::StepReport {
            std::mem::take(&mut self.experts_report)
        }

        fn step_phase(&self) -> Option<std::sync::Arc<crate::model::StepPhase>> {
            Some(self.model.step_phase())
        }
    }
}
