//! The serving engine: the coordinator's loop from admitted requests to streamed tokens.
//!
//! Owns: the cluster lifecycle as seen by serving (wait for the configured world → plan →
//! PrepareEpoch on every rank → serve → on a worker failure end affected requests UNAVAILABLE and
//! form a new epoch), the step loop (admission at step boundaries, building one `StepRequest`,
//! sending it to every rank, collecting results, streaming chunks), cancellation (a dropped
//! client stream leaves at the next step boundary, its blocks freed), deadlines and the
//! status snapshot the Admin API reads.
//!
//! Layout: `sched.rs` (pure bookkeeping and batching policy), `link.rs` (gRPC to one worker),
//! `run.rs` (the loop), `recovery.rs` (probing workers, migrating requests to a new epoch, the
//! hold window, drains), `watchdog.rs` (stalled-step reports), `detok.rs` (text deltas).
//!
//! Does not own: request validation and error → status mapping (`api/`), plans (`planner/`).
//!
//! Invariants: exactly one task (the loop) mutates scheduler state; clients only talk to it
//! through [`EngineHandle`]; every accepted request ends with exactly one [`Event::Final`] or
//! [`Event::Error`] unless its client went away first.

pub mod detok;
pub mod link;
mod run;
pub mod sched;

use fathom_proto::v1::{GenerateChunk, GenerateFinal, SamplingParams, SeqOutputs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use run::Control;
pub use run::{WorkerDirectory, spawn_engine, spawn_engine_with_metrics};

/// Why a request failed (mapped to a gRPC status in `api/status.rs` only).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("admission queue is full ({depth} requests waiting)")]
    QueueFull { depth: usize },
    #[error("{0}")]
    Unavailable(String),
    #[error("deadline exceeded after {generated} generated tokens")]
    DeadlineExceeded { generated: usize },
    #[error("internal error: {0}")]
    Internal(String),
}

/// Static settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_queue: usize,
    pub max_step_tokens: usize,
    pub max_batch: usize,
    pub kv_block_size: usize,
    pub kv_blocks: usize,
    /// A step not answered by every rank within this time fails its epoch.
    pub step_timeout: Duration,
    /// A step outstanding this long is reported by the watchdog (ranks and phases missing).
    pub watchdog: Duration,
    /// How long requests of a failed epoch wait for a new one (they resume there); zero: they
    /// end UNAVAILABLE at once.
    pub migrate_timeout: Duration,
    /// World size and TP of the plans to form.
    pub world_size: usize,
    pub tp: usize,
    /// Elastic epochs (`parallel.min_world_size` / `max_world_size`, docs/cluster.md): the
    /// smallest world a shrunk epoch may have, the largest a grown one may have.
    pub min_world_size: usize,
    pub max_world_size: usize,
    /// Model checkpoint directory (sent in the plan).
    pub model_path: String,
    /// Collective backend named in the plan.
    pub comm: String,
    pub eos_ids: Vec<u32>,
    pub cluster: String,
    /// Expert placement policy and load window (issue 9).
    pub experts: crate::experts::ExpertsConfig,
}

/// One message to a client stream.
#[derive(Debug)]
pub enum Event {
    Chunk(GenerateChunk),
    Final(GenerateFinal),
    Error(EngineError),
}

/// A validated request handed to the engine.
#[derive(Debug)]
pub struct Submission {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub outputs: SeqOutputs,
    pub return_prompt_ids: bool,
    pub deadline: Option<Instant>,
    pub tx: mpsc::Sender<Event>,
}

/// Serving state (mirrors `fathom.v1.ClusterState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServingState {
    WaitingForWorkers,
    Preparing,
    Serving,
    Reconfiguring,
}

/// One rank as the engine last saw it.
#[derive(Debug, Clone)]
pub struct RankStatus {
    pub rank: u32,
    pub worker_id: String,
    pub address: String,
    pub healthy: bool,
    pub last_seen: Instant,
    pub detail: String,
    /// What preparing the current epoch cost the rank (its `PrepareEpochResponse`).
    pub prepared: PrepareCost,
}

/// Bytes one rank read from the checkpoint to prepare its epoch, and kept from its previous one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrepareCost {
    pub loaded_bytes: u64,
    pub loaded_expert_bytes: u64,
    pub reused_bytes: u64,
}

/// A rank that had not answered a step when the watchdog fired.
#[derive(Debug, Clone, PartialEq)]
pub struct RankStalled {
    pub rank: u32,
    pub worker_id: String,
    /// The layer the rank last reported being in (-1: none, e.g. `queued`, `started`, `head`).
    pub layer: i32,
    /// Last phase it reported for this step (`queued`: none).
    pub phase: String,
}

/// One watchdog report (mirrors `fathom.v1.WatchdogReport`).
#[derive(Debug, Clone, PartialEq)]
pub struct WatchdogEntry {
    pub epoch: u64,
    pub step_id: u64,
    pub stalled_ms: u64,
    pub missing: Vec<RankStalled>,
    pub reported_at_unix_ms: u64,
}

/// What the Admin API and health reporting read.
#[derive(Debug, Clone)]
pub struct StatusSnapshot {
    pub state: ServingState,
    pub epoch: u64,
    pub world_size: u32,
    pub tp: u32,
    pub ranks: Vec<RankStatus>,
    /// Sums over groups.
    pub kv_blocks_total: u32,
    pub kv_blocks_used: u32,
    pub kv_block_size: u32,
    pub running: u32,
    /// Per attention group.
    pub groups: Vec<GroupUsage>,
    pub queue_depth: u32,
    /// Coordinator time per step excluding the wait for ranks (scheduling + messaging), EWMA.
    pub overhead_us_ewma: f64,
    pub steps: u64,
    /// Recent watchdog reports, newest first.
    pub watchdog: Vec<WatchdogEntry>,
    /// Watchdog reports since start (a metric).
    pub watchdog_reports: u64,
    /// Epochs that ended on a failure, drain or joining spares, and the sequences migrated out
    /// of them.
    pub epochs_failed: u64,
    pub sequences_migrated: u64,
    /// Workers being drained.
    pub draining: Vec<String>,
}

/// KV and batch usage of one attention group.
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupUsage {
    pub total: u32,
    pub used: u32,
    pub running: u32,
}

/// Per-step coordinator overhead samples (for `fathom bench serve`), bounded.
#[derive(Debug, Default)]
pub struct StepStats {
    /// (sequences in step, coordinator overhead µs, rank wait µs).
    pub samples: Vec<(u32, u64, u64)>,
}

/// The clients' side of the engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Submission>,
    pending: Arc<AtomicUsize>,
    max_queue: usize,
    status: Arc<Mutex<StatusSnapshot>>,
    stats: Arc<Mutex<StepStats>>,
    experts: crate::experts::ExpertsHandle,
    control: mpsc::UnboundedSender<Control>,
    /// Whether submissions are held (queued) while the cluster reconfigures.
    hold: bool,
    /// Counts requests refused here or by the front ends (`requests_total{status}`).
    metrics: Arc<crate::metrics::CoordinatorMetrics>,
}

impl EngineHandle {
    /// Expert load counters and placement changes (Admin API, metrics).
    pub fn experts(&self) -> &crate::experts::ExpertsHandle {
        &self.experts
    }

    /// Queues a request. Fails with `QueueFull` when `max_queue` requests already wait for
    /// admission, `Unavailable` when the engine is not serving or has stopped.
    /// Queues a request for the engine; a refusal is counted in `requests_total`.
    pub fn submit(&self, sub: Submission) -> Result<(), EngineError> {
        self.try_submit(sub).inspect_err(|e| self.refused(crate::metrics::status::of(e)))
    }

    /// Counts a request a front end refused before submitting it (e.g. it failed validation),
    /// so `requests_total{status}` covers every request received.
    pub fn refused(&self, status: &str) {
        self.metrics.request_ended(status);
    }

    fn try_submit(&self, sub: Submission) -> Result<(), EngineError> {
        let status = self.status();
        let state = status.state;
        // While a failed epoch is being replaced, requests are held (queued) too.
        let held = self.hold
            && (state == ServingState::Reconfiguring
                || (state == ServingState::Preparing && status.epoch > 0));
        if state != ServingState::Serving && !held {
            return Err(EngineError::Unavailable("the cluster is not serving yet".into()));
        }
        let depth = self.pending.fetch_add(1, Ordering::SeqCst);
        if depth >= self.max_queue {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull { depth });
        }
        self.tx.send(sub).map_err(|_| {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            EngineError::Unavailable("the coordinator is shutting down".into())
        })
    }

    /// Drains `worker_id`: no new work goes to it, the epoch containing it ends at a step
    /// boundary, its sequences resume on an epoch without it, and it is asked to shut down.
    /// Resolves with the epoch that excludes it once that epoch serves.
    pub async fn drain(&self, worker_id: String) -> Result<u64, EngineError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.control
            .send(Control::Drain { worker_id, reply })
            .map_err(|_| EngineError::Unavailable("the coordinator is shutting down".into()))?;
        rx.await.map_err(|_| EngineError::Unavailable("the coordinator is shutting down".into()))?
    }

    /// The latest status.
    pub fn status(&self) -> StatusSnapshot {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.queue_depth = self.pending.load(Ordering::SeqCst) as u32;
        s
    }

    /// Takes the recorded per-step samples.
    pub fn take_step_stats(&self) -> StepStats {
        std::mem::take(&mut *self.stats.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
