//! The single-rank GPU executor (`fathom worker --device cuda[:N]`, W = 1): the whole model on
//! one GPU ([`CudaModel`]), stepping the coordinator's [`StepRequest`]s exactly as the CPU
//! single-rank executor does (same inputs, same sampling code: `executor::seq_results`).
//!
//! KV: the GPU cache is per-sequence contiguous ([`CudaKvCache`] slots), not the coordinator's
//! paged blocks, so the block tables of the step are ignored and each sequence id is mapped to a
//! slot on first sight and freed when the step lists it in `released_seq_ids`. Capacity: the
//! plan's `kv_blocks × kv_block_size` positions cut into slots of `max_ctx` positions
//! (`max_position_embeddings`, capped at [`MAX_CTX_CAP`]). Does not own: W > 1 (the factory
//! hands those plans to `sharded.rs`), routed-expert recording (the GPU model keeps routing on
//! the device).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fathom_kernels::cuda::{CudaDevice, KernelCache};
use fathom_proto::v1::{SeqResult, StepRequest};

use super::{CudaKvCache, CudaModel, CudaSeqInput, precision_for};
use crate::executor::{EpochContext, ExecError, Executor, ExecutorFactory};
use crate::weights::CheckpointReader;

/// Longest sequence a slot holds when the model allows more.
pub const MAX_CTX_CAP: usize = 8192;

/// Builds a [`CudaExecutor`] (W = 1) or a `sharded::CudaShardedExecutor` (W > 1, with the
/// context's world and group communicators) on an already opened GPU.
#[derive(Debug)]
pub struct CudaFactory {
    dev: Arc<CudaDevice>,
    kernel_cache: Option<KernelCache>,
}

impl CudaFactory {
    pub fn new(dev: Arc<CudaDevice>, kernel_cache: Option<KernelCache>) -> Self {
        Self { dev, kernel_cache }
    }
}

impl ExecutorFactory for CudaFactory {
    fn prepare(&self, ctx: EpochContext) -> Result<Box<dyn Executor>, ExecError> {
        if ctx.plan.world_size != 1 {
            return super::sharded::prepare(&self.dev, self.kernel_cache.as_ref(), ctx);
        }
        let plan = &ctx.plan;
        let load = |e: String| ExecError::Load(e);
        let reader =
            CheckpointReader::open(Path::new(&plan.model_path)).map_err(|e| load(e.to_string()))?;
        let cfg = reader.config().clone();
        let prec = precision_for(&reader);
        let model = CudaModel::load_with(
            self.dev.clone(),
            &reader,
            cfg.clone(),
            self.kernel_cache.as_ref(),
            prec,
        )
        .map_err(|e| load(e.to_string()))?;
        let max_ctx = cfg.max_position_embeddings.min(MAX_CTX_CAP).max(cfg.index_topk);
        let positions = plan.kv_blocks as usize * plan.kv_block_size as usize;
        let slots = (positions / max_ctx).max(1);
        let cache = model.new_cache(slots, max_ctx).map_err(|e| load(format!("KV cache: {e}")))?;
        let weight_bytes: u64 = reader
            .files()
            .into_iter()
            .filter_map(|f| std::fs::metadata(Path::new(&plan.model_path).join(f)).ok())
            .map(|m| m.len())
            .sum();
        Ok(Box::new(CudaExecutor {
            model,
            cache,
            slot_of: HashMap::new(),
            free: (0..slots).rev().collect(),
            weight_bytes,
            carry: Default::default(),
        }))
    }
}

/// The whole model and its cache on one GPU.
#[derive(Debug)]
pub struct CudaExecutor {
    model: CudaModel,
    cache: CudaKvCache,
    slot_of: HashMap<u64, usize>,
    free: Vec<usize>,
    weight_bytes: u64,
    /// Routed experts of non-final prefill chunks, sent with the sequence's next sample.
    carry: crate::executor::routing::RoutingCarry,
}

impl Executor for CudaExecutor {
    fn execute(&mut self, step: &StepRequest) -> Result<Vec<SeqResult>, ExecError> {
        let fail = |reason: String| ExecError::Step { step_id: step.step_id, reason };
        let Some(group) = step.groups.first() else { return Ok(Vec::new()) };
        self.carry.release(&group.released_seq_ids);
        for id in &group.released_seq_ids {
            if let Some(s) = self.slot_of.remove(id) {
                self.free.push(s);
            }
        }
        if group.seqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut inputs = Vec::with_capacity(group.seqs.len());
        for s in &group.seqs {
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
        let opts = crate::executor::forward_options(&group.seqs);
        let out =
            self.model.forward(&inputs, &mut self.cache, &opts).map_err(|e| fail(e.to_string()))?;
        crate::executor::seq_results(
            step.step_id,
            &group.seqs,
            &out,
            self.model.config(),
            &mut self.carry,
        )
    }

    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }
}
