//! The sharded executor (W > 1): this rank's shard of the model ([`RankModel`]) under the
//! epoch's plan, driven one step at a time by the Worker service.
//!
//! Owns: rebuilding the [`ParallelPlan`] from the wire [`Plan`] (the coordinator's expert
//! placement, checked against the model), loading the shard through the mmap
//! [`CheckpointReader`] — or, given the previous epoch's weights ([`HeldWeights`], elastic
//! epochs), only the tensors whose slice changed ([`RankModel::reload`]) — the group's KV cache
//! (always new), and one forward per step. It records what each preparation read and kept
//! ([`PrepareCost`], per tensor name, so a later epoch knows which bytes it reuses).
//! Does not own: joining the collectives (the service builds the world communicator from the
//! rendezvous and splits the group one before calling the factory), sampling and result
//! encoding (shared with the single-rank executor: `super::seq_results`).
//!
//! Invariants: every rank runs [`RankModel::forward`] exactly once per step, with its group's
//! sequences (empty when the step has none for its group), so the world's MoE all-to-alls stay
//! paired; only the group's rank 0 samples and returns results (the other ranks of the group
//! hold identical logits and return nothing).

use super::{EpochContext, ExecError, Executor, ExecutorFactory, HeldWeights, PrepareCost};
use crate::kv::PagedKvCache;
use crate::metrics::StepReport;
use crate::parallel::{RankForwardOptions, RankModel};
use crate::weights::CheckpointReader;
use fathom_common::ModelConfig;
use fathom_common::ids::{Epoch, Rank};
use fathom_common::plan::{ParallelPlan, PlanSpec, Slot};
use fathom_kernels::comm::Collective;
use fathom_proto::v1::{Plan, SeqResult, StepRequest};
use std::collections::BTreeMap;
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
        self.prepare_with(ctx, None)
    }

    fn prepare_with(
        &self,
        ctx: EpochContext,
        held: Option<HeldWeights>,
    ) -> Result<Box<dyn Executor>, ExecError> {
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
        let held = held.filter(|h| h.model_path == plan.model_path && *h.model.config() == cfg);
        let (model, kept) = match held {
            Some(h) => {
                let (model, report) = RankModel::reload(h.model, &counting, &layout, rank as usize)
                    .map_err(|e| ExecError::Load(e.to_string()))?;
                // Bytes kept: the previous tensors minus the experts dropped.
                let mut kept = h.bytes;
                let dropped: Vec<String> = report
                    .dropped_experts
                    .iter()
                    .map(|(l, e)| format!("model.layers.{l}.mlp.experts.{e}."))
                    .collect();
                kept.retain(|name, _| !dropped.iter().any(|d| name.starts_with(d.as_str())));
                (model, kept)
            }
            None => {
                let model = RankModel::load(cfg, &counting, &layout, rank as usize)
                    .map_err(|e| ExecError::Load(e.to_string()))?;
                (model, BTreeMap::new())
            }
        };
        progress.finish();
        let loaded = counting.bytes_by_tensor();
        // A tensor loaded again (its slice changed) replaces its previous entry.
        let reused = kept.iter().filter(|(n, _)| !loaded.contains_key(*n)).map(|(_, b)| b).sum();
        let cost = PrepareCost::of(&loaded, reused);
        let mut bytes = kept;
        bytes.extend(loaded);
        let weight_bytes = bytes.values().sum();
        tracing::info!(
            rank,
            loaded_bytes = cost.loaded_bytes,
            loaded_expert_bytes = cost.loaded_expert_bytes,
            reused_bytes = cost.reused_bytes,
            "shard prepared"
        );
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
            cost,
            bytes,
            model_path: plan.model_path.clone(),
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
    cost: PrepareCost,
    /// Bytes held per checkpoint tensor (what a next epoch may keep).
    bytes: BTreeMap<String, u64>,
    model_path: String,
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

    fn prepare_cost(&self) -> PrepareCost {
        self.cost
    }

    fn into_weights(self: Box<Self>) -> Option<HeldWeights> {
        // A live placement change applied while serving changed the experts held: the byte
        // map follows the model's tables.
        let mut bytes = self.bytes;
        let model = self.model;
        bytes.retain(|name, _| {
            expert_of(name)
                .is_none_or(|(l, e)| model.experts_held(l).is_some_and(|held| held.contains(&e)))
        });
        Some(HeldWeights { model_path: self.model_path, model, bytes })
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

/// `(layer, expert)` of a routed-expert tensor name (`model.layers.L.mlp.experts.E.*`).
fn expert_of(name: &str) -> Option<(usize, u32)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let rest = rest.strip_prefix("mlp.experts.")?;
    let (expert, _) = rest.split_once('.')?;
    Some((layer.parse().ok()?, expert.parse().ok()?))
}
