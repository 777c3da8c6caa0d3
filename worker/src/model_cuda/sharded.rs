//! The sharded GPU executor (`fathom worker --device cuda[:N]`, W > 1): this rank's shard on its
//! GPU ([`CudaRankModel`]) under the epoch's plan, stepped exactly as the CPU sharded executor
//! (`executor::sharded`) steps `parallel::RankModel`: same plan rebuilding
//! (`executor::sharded::parallel_plan`: the coordinator's expert placement), same inputs, same
//! sampling (`executor::seq_results`, on the group's rank 0 only).
//!
//! KV: as the single-GPU executor — per-sequence cache slots, sequence ids mapped to slots on
//! first sight and freed by `released_seq_ids`; every rank of a group sees the same steps, so
//! they allocate the same slots. Does not own: building the communicators (the service joins the
//! world and splits the group before `prepare`), live expert-placement changes and expert
//! counters (the GPU rank keeps the epoch's placement: a `stage_placement` is answered with a
//! `staging_error`, so the coordinator abandons the change and the Admin call says why),
//! routed-expert recording.
//!
//! Invariant: every rank runs [`CudaRankModel::forward`] exactly once per step, with its group's
//! sequences or none, so the world's MoE all-to-alls pair up.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fathom_kernels::comm::Collective;
use fathom_kernels::cuda::{CudaDevice, KernelCache};
use fathom_proto::v1::{SeqResult, StepRequest};

use super::executor::MAX_CTX_CAP;
use super::rank::CudaRankModel;
use super::{CudaKvCache, CudaSeqInput, precision_for};
use crate::executor::{EpochContext, ExecError, Executor};
use crate::weights::CheckpointReader;

/// Loads this rank's shard onto `dev` and builds its executor (called by
/// [`super::executor::CudaFactory`] for W > 1).
pub(crate) fn prepare(
    dev: &Arc<CudaDevice>,
    kernel_cache: Option<&KernelCache>,
    ctx: EpochContext,
) -> Result<Box<dyn Executor>, ExecError> {
    let EpochContext { plan, rank, world, group } = ctx;
    let (Some(world), Some(group)) = (world, group) else {
        return Err(ExecError::Comm(format!(
            "rank {rank} of world {} was prepared without its world and group communicators",
            plan.world_size
        )));
    };
    let load = |e: String| ExecError::Load(e);
    let reader =
        CheckpointReader::open(Path::new(&plan.model_path)).map_err(|e| load(e.to_string()))?;
    let cfg = reader.config().clone();
    let layout = crate::executor::sharded::parallel_plan(&plan, &cfg)?;
    let prec = precision_for(&reader);
    let counting = crate::parallel::CountingSource::new(&reader);
    let model = CudaRankModel::load(
        dev.clone(),
        &counting,
        cfg.clone(),
        &layout,
        rank as usize,
        kernel_cache,
        prec,
    )
    .map_err(|e| load(e.to_string()))?;
    let max_ctx = cfg.max_position_embeddings.min(MAX_CTX_CAP).max(cfg.index_topk);
    let positions = plan.kv_blocks as usize * plan.kv_block_size as usize;
    let slots = (positions / max_ctx).max(1);
    let cache = model.new_cache(slots, max_ctx).map_err(|e| load(format!("KV cache: {e}")))?;
    Ok(Box::new(CudaShardedExecutor {
        model,
        cache,
        world,
        group,
        slot_of: HashMap::new(),
        free: (0..slots).rev().collect(),
        weight_bytes: counting.total_bytes(),
        carry: Default::default(),
        staging_refused: None,
    }))
}

/// This rank's shard, its group's cache slots and the epoch's communicators.
#[derive(Debug)]
pub struct CudaShardedExecutor {
    model: CudaRankModel,
    cache: CudaKvCache,
    world: Box<dyn Collective>,
    group: Box<dyn Collective>,
    slot_of: HashMap<u64, usize>,
    free: Vec<usize>,
    weight_bytes: u64,
    /// Routed experts of non-final prefill chunks (group rank 0 only).
    carry: crate::executor::routing::RoutingCarry,
    /// Why the last `stage_placement` was refused, reported once in the step's result (the
    /// coordinator then abandons the change and the Admin call reports it).
    staging_refused: Option<String>,
}

impl Executor for CudaShardedExecutor {
    fn execute(&mut self, step: &StepRequest) -> Result<Vec<SeqResult>, ExecError> {
        let fail = |reason: String| ExecError::Step { step_id: step.step_id, reason };
        if let Some(update) = &step.stage_placement {
            self.staging_refused = Some(format!(
                "placement version {}: live expert placement changes are not supported on GPU \
                 workers yet (the sharded GPU executor keeps the epoch's placement); change \
                 replicas on CPU workers or restart the epoch with the new policy",
                update.version
            ));
        }
        let my_group = self.model.group() as u32;
        let mine = step.groups.iter().find(|g| g.group == my_group);
        let seqs = mine.map(|g| g.seqs.as_slice()).unwrap_or(&[]);
        if let Some(g) = mine {
            self.carry.release(&g.released_seq_ids);
            for id in &g.released_seq_ids {
                if let Some(s) = self.slot_of.remove(id) {
                    self.free.push(s);
                }
            }
        }
        let mut inputs = Vec::with_capacity(seqs.len());
        for s in seqs {
            let slot = match self.slot_of.get(&s.seq_id) {
                Some(&slot) => slot,
                None => {
                    let slot = self.free.pop().ok_or_else(|| {
                        fail(format!(
                            "sequence {}: all {} GPU cache slots are in use",
                            s.seq_id,
                            self.cache.slots()
                        ))
                    })?;
                    self.slot_of.insert(s.seq_id, slot);
                    slot
                }
            };
            inputs.push(CudaSeqInput {
                tokens: &s.token_ids,
                start_pos: s.start_position as usize,
                slot,
            });
        }
        let opts = crate::executor::forward_options(seqs);
        let (world, group) = (self.world.as_mut(), self.group.as_mut());
        let out = self
            .model
            .forward(&inputs, &mut self.cache, world, group, &opts)
            .map_err(|e| fail(e.to_string()))?;
        if self.model.group_rank() != 0 || seqs.is_empty() {
            return Ok(Vec::new());
        }
        crate::executor::seq_results(step.step_id, seqs, &out, self.model.config(), &mut self.carry)
    }

    fn step_report(&mut self) -> crate::experts::StepReport {
        crate::experts::StepReport {
            staging_error: self.staging_refused.take().unwrap_or_default(),
            ..Default::default()
        }
    }

    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }
}
