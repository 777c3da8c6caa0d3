//! The sharded executor (W > 1): this rank's shard of the model ([`RankModel`]) under the
//! epoch's plan, driven one step at a time by the Worker service.
//!
//! Owns: rebuilding the [`ParallelPlan`] from the wire [`Plan`] (the coordinator's expert
//! placement, checked against the model), loading the shard through the mmap
//! [`CheckpointReader`], the group's KV cache, and one forward per step.
//! Does not own: joining the collectives (the service builds the world communicator from the
//! rendezvous and splits the group one before calling the factory), sampling and result
//! encoding (shared with the single-rank executor: `super::seq_results`).
//!
//! Invariants: every rank runs [`RankModel::forward`] exactly once per step, with its group's
//! sequences (empty when the step has none for its group), so the world's MoE all-to-alls stay
//! paired; only the group's rank 0 samples and returns results (the other ranks of the group
//! hold identical logits and return nothing).

use super::{EpochContext, ExecError, Executor, ExecutorFactory};
use crate::kv::PagedKvCache;
use crate::metrics::StepReport;
use crate::parallel::{RankForwardOptions, RankModel};
use crate::weights::CheckpointReader;
use fathom_common::ModelConfig;
use fathom_common::ids::{Epoch, Rank};
use fathom_common::plan::{ParallelPlan, PlanSpec, Slot};
use fathom_kernels::comm::Collective;
use fathom_proto::v1::{Plan, SeqResult, StepRequest};
use std::path::Path;
use std::time::Instant;

/// Loads this rank's shard of the checkpoint named by the plan (`plan.model_path`).
#[derive(Debug, Default)]
pub struct ShardedFactory;

/// The [`ParallelPlan`] the wire `plan` describes for `cfg`: the layout of W and T with the
/// coordinator's expert placement, validated against the model.
pub fn parallel_plan(plan: &Plan, cfg: &ModelConfig) -> Result<ParallelPlan, ExecError> {
    let bad = |e: String| ExecError::Plan(e);
    let (w, t) = (plan.world_size as usize, plan.tp as usize);
    let mut layout = ParallelPlan::build(&PlanSpec::new(Epoch(plan.epoch), w, t), cfg)
        .map_err(|e| bad(format!("W={w} T={t}: {e}")))?;
    if !plan.placement.is_empty() {
        if plan.placement.len() != layout.placement.layers.len() {
            return Err(bad(format!(
                "placement has {} MoE layers, the model has {}",
                plan.placement.len(),
                layout.placement.layers.len()
            )));
        }
        for (wire, mine) in plan.placement.iter().zip(layout.placement.layers.iter_mut()) {
            if wire.layer as usize != mine.layer {
                return Err(bad(format!(
                    "placement layer {} where {} expected",
                    wire.layer, mine.layer
                )));
            }
            mine.replicas = wire
                .experts
                .iter()
                .map(|set| {
                    set.slots
                        .iter()
                        .map(|s| Slot { rank: Rank(s.rank), slot: s.local_slot })
                        .collect()
                })
                .collect();
        }
        let redundant = plan.redundant_slots_per_rank as usize;
        layout.placement.redundant_slots_per_rank = redundant;
        layout.placement.slots_per_rank = cfg.n_routed_experts.div_ceil(w) + redundant;
        layout.placement.version = plan.placement_version;
    }
    layout.validate_for(cfg).map_err(|e| bad(e.to_string()))?;
    Ok(layout)
}

impl ExecutorFactory for ShardedFactory {
    fn prepare(&self, ctx: EpochContext) -> Result<Box<dyn Executor>, ExecError> {
        let EpochContext { plan, rank, world, group } = ctx;
        let (Some(world), Some(group)) = (world, group) else {
            return Err(ExecError::Comm(format!(
                "rank {rank} of world {} was prepared without its world and group communicators",
                plan.world_size
            )));
        };
        let reader = CheckpointReader::open(Path::new(&plan.model_path))
            .map_err(|e| ExecError::Load(e.to_string()))?;
        let cfg = reader.config().clone();
        let layout = parallel_plan(&plan, &cfg)?;
        // This rank's share of the checkpoint is not known up front: progress without a total.
        let progress = super::progress::ProgressSource::new(&reader, "loading weights", 0);
        let counting = crate::parallel::CountingSource::new(&progress);
        let model = RankModel::load(cfg, &counting, &layout, rank as usize)
            .map_err(|e| ExecError::Load(e.to_string()))?;
        progress.finish();
        let weight_bytes = counting.total_bytes();
        let cache = model
            .new_cache(plan.kv_block_size as usize, plan.kv_blocks as usize)
            .map_err(|e| ExecError::Load(format!("KV cache: {e}")))?;
        let stager = crate::experts::PlacementStager::new(plan.model_path.clone().into());
        Ok(Box::new(ShardedExecutor {
            model,
            cache,
            world,
            group,
            weight_bytes,
            report: StepReport::default(),
            carry: Default::default(),
            stager,
            experts_report: Default::default(),
        }))
    }
}

/// This rank's shard, its group's KV cache and the epoch's communicators.
#[derive(Debug)]
pub struct ShardedExecutor {
    model: RankModel,
    cache: PagedKvCache,
    world: Box<dyn Collective>,
    group: Box<dyn Collective>,
    weight_bytes: u64,
    report: StepReport,
    /// Routed experts of non-final prefill chunks (group rank 0 only).
    carry: super::routing::RoutingCarry,
    /// Live expert-placement changes (issue 9).
    stager: crate::experts::PlacementStager,
    /// The last step's load counters and placement versions.
    experts_report: crate::experts::StepReport,
}

impl Executor for ShardedExecutor {
    fn execute(&mut self, step: &StepRequest) -> Result<Vec<SeqResult>, ExecError> {
        let fail = |reason: String| ExecError::Step { step_id: step.step_id, reason };
        self.stager.before_step(&mut self.model, step)?;
        let my_group = self.model.group() as u32;
        let mine = step.groups.iter().find(|g| g.group == my_group);
        let seqs = mine.map(|g| g.seqs.as_slice()).unwrap_or(&[]);
        if let Some(g) = mine {
            self.carry.release(&g.released_seq_ids);
        }
        let inputs = super::seq_inputs(seqs);
        let opts = RankForwardOptions::from(super::forward_options(seqs));
        let t0 = Instant::now();
        let (world, group) = (self.world.as_mut(), self.group.as_mut());
        let (out, load) = tracing::trace_span!("forward", tokens = inputs.len())
            .in_scope(|| self.model.forward_counted(&inputs, &mut self.cache, world, group, &opts))
            .map_err(|e| fail(e.to_string()))?;
        self.report.forward = Some(t0.elapsed());
        // Every rank counts the tokens of its own slice (metrics sum over ranks).
        self.report.experts = super::expert_tally_of_load(self.model.config(), &load.routed);
        self.experts_report =
            crate::experts::StepReport::with_load(load, self.model.placement_version());
        if self.model.group_rank() != 0 || seqs.is_empty() {
            return Ok(Vec::new());
        }
        let t1 = Instant::now();
        let results = tracing::trace_span!("sample").in_scope(|| {
            super::seq_results(step.step_id, seqs, &out, self.model.config(), &mut self.carry)
        });
        self.report.sample = Some(t1.elapsed());
        results
    }

    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn step_phase(&self) -> Option<std::sync::Arc<crate::model::StepPhase>> {
        Some(self.model.step_phase())
    }

    fn take_report(&mut self) -> StepReport {
        std::mem::take(&mut self.report)
    }

    fn step_report(&mut self) -> crate::experts::StepReport {
        let mut r = std::mem::take(&mut self.experts_report);
        (r.staged_placement_version, r.staging_error) = self.stager.poll();
        r
    }
}
