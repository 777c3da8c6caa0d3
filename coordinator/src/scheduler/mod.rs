//! The scheduler's pure bookkeeping: KV block pools per attention group ([`BlockPool`]), the
//! bounded request queue and the continuous-batching policy ([`Scheduler`]) that turns waiting
//! and running sequences into one step plan per iteration.
//!
//! Owns: which sequences run in each step, how many of their tokens, and which KV blocks they
//! use. Does not own: I/O, clocks, tokenization, sampling or gRPC; the caller sends the
//! [`StepPlan`] to the workers (as `fathom.v1.StepRequest`) and feeds the sampled tokens back
//! with [`Scheduler::complete`]. Everything here is synchronous and deterministic.

mod batch;
mod block_pool;

pub use batch::{
    FinishReason, GroupBatch, ScheduledSeq, Scheduler, SchedulerConfig, SeqRequest, SeqUpdate,
    StepPlan,
};
pub use block_pool::{BlockId, BlockPool, BlockTable};

use fathom_common::ids::SeqId;

/// Errors of the scheduler's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    /// The admission queue holds `capacity` requests already.
    #[error("request queue full ({capacity} waiting)")]
    QueueFull { capacity: usize },
    /// The request can never fit one group's KV cache.
    #[error("request needs {tokens} tokens of KV cache but a group holds {capacity}")]
    TooLong { tokens: usize, capacity: usize },
    /// A request field is invalid.
    #[error("invalid request: {what}: {reason}")]
    InvalidRequest { what: &'static str, reason: String },
    /// A configuration value is invalid.
    #[error("invalid scheduler config: {what}: {reason}")]
    InvalidConfig { what: &'static str, reason: String },
    /// Fewer free blocks than requested.
    #[error("out of KV blocks: {requested} requested, {free} free")]
    OutOfBlocks { requested: usize, free: usize },
    /// A block was freed that is not allocated (or twice in one call).
    #[error("KV block {block} freed but not allocated")]
    DoubleFree { block: u32 },
    /// A block id beyond the pool.
    #[error("KV block {block} does not exist (pool of {total})")]
    UnknownBlock { block: u32, total: usize },
    /// `schedule` was called while the previous step is still outstanding.
    #[error("step {step_id} is still in flight")]
    StepInFlight { step_id: u64 },
    /// `complete` named a step that is not the one in flight.
    #[error("completion for step {got} but step {expected:?} is in flight")]
    StepMismatch { expected: Option<u64>, got: u64 },
    /// A sequence that had to sample got no token, or a token came for one that did not sample.
    #[error("step result for sequence {seq}: {reason}")]
    BadResult { seq: SeqId, reason: &'static str },
}

impl SchedulerError {
    /// Whether repeating the same call later can succeed without the caller changing anything.
    pub fn retryable(&self) -> bool {
        match self {
            SchedulerError::QueueFull { .. } => true,
            SchedulerError::OutOfBlocks { .. } => true,
            SchedulerError::StepInFlight { .. } => true,
            SchedulerError::TooLong { .. } => false,
            SchedulerError::InvalidRequest { .. } => false,
            SchedulerError::InvalidConfig { .. } => false,
            SchedulerError::DoubleFree { .. } => false,
            SchedulerError::UnknownBlock { .. } => false,
            SchedulerError::StepMismatch { .. } => false,
            SchedulerError::BadResult { .. } => false,
        }
    }
}
