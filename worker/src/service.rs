//! The `fathom.v1.Worker` gRPC service of one worker process (one rank).
//!
//! Owns the worker's lifecycle: IDLE → PrepareEpoch (validate the plan, build the epoch's
//! executor through the [`ExecutorFactory`] on a blocking thread) → READY → the Step stream
//! (every step executed in order, answered with one `StepResult`) → Shutdown (signals the
//! process to exit via [`WorkerService::shutdown_signal`]).
//!
//! Elastic epochs: a new PrepareEpoch takes the previous epoch's executor (waiting at most
//! [`REUSE_WAIT`] for a step still holding it), drops its collectives and KV cache, and hands its
//! weights to the factory ([`ExecutorFactory::prepare_with`]), which keeps every unchanged
//! tensor; the response reports the bytes loaded and reused.
//!
//! Invariants: at most one executor exists (the prepared epoch's); a step naming another epoch is
//! fenced (answered with `StepResult.error`, not executed); step ids are strictly increasing per
//! epoch; a second PrepareEpoch of the same epoch is a no-op, of an older epoch ABORTED.
//!
//! Does not own: registration in the membership store and process exit (the binary's `worker`
//! command), the model math (`executor`).

use crate::executor::{EpochContext, ExecError, Executor, ExecutorFactory, HeldWeights};
use crate::metrics::WorkerMetrics;
use fathom_kernels::comm::{Collective, CommOptions, TcpComm};
use fathom_proto::v1::worker_server::Worker;
use fathom_proto::v1::{
    PrepareEpochRequest, PrepareEpochResponse, ShutdownRequest, ShutdownResponse, StepEvent,
    StepProgress, StepRequest, StepResult, WorkerHealthRequest, WorkerHealthResponse, WorkerState,
    rendezvous, step_event,
};
use futures::StreamExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// Mutable state of the worker, behind one lock (never held across an await or a step).
#[derive(Debug)]
struct Inner {
    state: WorkerState,
    epoch: u64,
    rank: Option<u32>,
    last_step_id: u64,
    detail: String,
    executor: Option<SharedExecutor>,
    /// The prepared executor's phase cell, taken when it was installed: reading it never waits
    /// for (or races with) the executor's lock.
    phase: Option<Arc<crate::model::StepPhase>>,
}

/// The Worker service. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct WorkerService {
    worker_id: String,
    device: String,
    factory: Arc<dyn ExecutorFactory>,
    inner: Arc<Mutex<Inner>>,
    shutdown: watch::Sender<bool>,
    /// Whether the membership lease is held (set by whoever registered the worker; stays false
    /// without a membership store).
    lease_held: Arc<std::sync::atomic::AtomicBool>,
    metrics: Arc<WorkerMetrics>,
}

impl WorkerService {
    pub fn new(worker_id: String, device: String, factory: Arc<dyn ExecutorFactory>) -> Self {
        Self {
            worker_id,
            device,
            factory,
            inner: Arc::new(Mutex::new(Inner {
                state: WorkerState::Idle,
                epoch: 0,
                rank: None,
                last_step_id: 0,
                detail: String::new(),
                executor: None,
                phase: None,
            })),
            shutdown: watch::channel(false).0,
            lease_held: Arc::default(),
            metrics: Arc::new(WorkerMetrics::detached()),
        }
    }

    /// Updates `metrics` (registered by the caller, who serves them) instead of unregistered
    /// ones.
    pub fn with_metrics(mut self, metrics: Arc<WorkerMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The flag reported as `WorkerHealthResponse.lease_held`.
    pub fn lease_flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.lease_held.clone()
    }

    /// Becomes `true` when a Shutdown RPC was received; the binary exits on it.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Answers one step: fenced, out of order, or executed.
fn run_step(
    inner: &Mutex<Inner>,
    step: &StepRequest,
    rank: u32,
    metrics: &WorkerMetrics,
) -> Result<(Vec<fathom_proto::v1::SeqResult>, crate::experts::StepReport), String> {
    let executor = {
        let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.state != WorkerState::Ready || g.epoch != step.epoch {
            return Err(format!(
                "step {} of epoch {} fenced: this rank is prepared for epoch {}",
                step.step_id, step.epoch, g.epoch
            ));
        }
        if step.step_id <= g.last_step_id {
            return Err(format!(
                "step {} out of order (last executed {})",
                step.step_id, g.last_step_id
            ));
        }
        g.last_step_id = step.step_id;
        g.executor.clone().ok_or_else(|| "no executor prepared".to_string())?
    };
    let _ = rank;
    let mut ex = executor.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let result = ex.execute(step).map_err(|e| e.to_string());
    metrics.observe_step(started.elapsed(), &ex.take_report());
    Ok((result?, ex.step_report()))
}

/// How long a new epoch's preparation waits for a step of the old epoch that still holds the
/// executor (e.g. failing on a dead peer) before loading everything instead of reusing weights.
const REUSE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

type SharedExecutor = Arc<Mutex<Box<dyn Executor>>>;

/// The weights of the previous epoch's executor, once no step holds it (`None`: none, not
/// reusable, or still busy after [`REUSE_WAIT`]). Drops its collectives and KV cache.
fn take_weights(previous: Option<SharedExecutor>) -> Option<HeldWeights> {
    let mut shared = previous?;
    let deadline = Instant::now() + REUSE_WAIT;
    let executor = loop {
        match Arc::try_unwrap(shared) {
            Ok(m) => break m.into_inner().unwrap_or_else(|p| p.into_inner()),
            Err(still) if Instant::now() < deadline => {
                shared = still;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(_) => {
                tracing::warn!("the previous epoch's executor is still busy: loading everything");
                return None;
            }
        }
    };
    executor.into_weights()
}

/// The prepared executor's phase cell (`None` when there is none).
fn step_phase(inner: &Mutex<Inner>) -> Option<Arc<crate::model::StepPhase>> {
    inner.lock().unwrap_or_else(|p| p.into_inner()).phase.clone()
}

type BoxedComm = Box<dyn Collective>;

/// Joins the epoch's TCP world communicator (rank 0 binds `rendezvous`, the others connect to
/// it) and splits this rank's attention-group communicator from it.
fn join_collectives(
    plan: &fathom_proto::v1::Plan,
    rank: u32,
    rendezvous: Option<&str>,
) -> Result<(BoxedComm, BoxedComm), ExecError> {
    if !plan.comm.is_empty() && plan.comm != "tcp" {
        return Err(ExecError::Unsupported(format!("collective backend {:?}", plan.comm)));
    }
    let addr = rendezvous.ok_or_else(|| {
        ExecError::Comm(format!(
            "world size {} needs a TCP rendezvous address in PrepareEpoch",
            plan.world_size
        ))
    })?;
    let (w, t) = (plan.world_size as usize, plan.tp.max(1) as usize);
    if w % t != 0 {
        return Err(ExecError::Plan(format!("tp {t} does not divide world size {w}")));
    }
    let mut world = TcpComm::connect(addr, rank as usize, w, CommOptions::default())
        .map_err(|e| ExecError::Comm(format!("joining {addr} as rank {rank} of {w}: {e}")))?;
    let groups: Vec<Vec<usize>> = (0..w / t).map(|g| (g * t..(g + 1) * t).collect()).collect();
    let group = world
        .split(&groups)
        .map_err(|e| ExecError::Comm(format!("splitting the attention groups: {e}")))?
        .ok_or_else(|| ExecError::Comm(format!("rank {rank} is in no attention group")))?;
    Ok((Box::new(world), group))
}

type StepStream = Pin<Box<dyn futures::Stream<Item = Result<StepEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn prepare_epoch(
        &self,
        request: Request<PrepareEpochRequest>,
    ) -> Result<Response<PrepareEpochResponse>, Status> {
        let span = tracing::info_span!(
            "prepare_epoch",
            epoch = tracing::field::Empty,
            rank = request.get_ref().rank
        );
        crate::telemetry::parent_from_metadata(&span, request.metadata());
        let req = request.into_inner();
        let plan = req.plan.ok_or_else(|| Status::invalid_argument("plan is missing"))?;
        span.record("epoch", plan.epoch);
        let rank = req.rank;
        let entry = plan.ranks.iter().find(|r| r.rank == rank).ok_or_else(|| {
            Status::failed_precondition(format!("rank {rank} is not in the plan"))
        })?;
        if entry.worker_id != self.worker_id {
            return Err(Status::failed_precondition(format!(
                "rank {rank} belongs to worker {}, not {}",
                entry.worker_id, self.worker_id
            )));
        }
        if plan.world_size as usize != plan.ranks.len() || plan.tp == 0 {
            return Err(Status::invalid_argument(format!(
                "plan epoch {}: world_size {} with {} ranks, tp {}",
                plan.epoch,
                plan.world_size,
                plan.ranks.len(),
                plan.tp
            )));
        }
        let previous;
        {
            let mut g = self.lock();
            if plan.epoch < g.epoch {
                return Err(Status::aborted(format!(
                    "epoch {} is older than the prepared epoch {}",
                    plan.epoch, g.epoch
                )));
            }
            if plan.epoch == g.epoch && g.state == WorkerState::Ready {
                return Ok(Response::new(PrepareEpochResponse {
                    epoch: g.epoch,
                    rank,
                    ready: true,
                    ..Default::default()
                }));
            }
            g.state = WorkerState::Preparing;
            g.epoch = plan.epoch;
            g.rank = Some(rank);
            previous = g.executor.take();
            g.phase = None;
            g.last_step_id = 0;
            g.detail = format!("preparing epoch {}", plan.epoch);
        }
        let epoch = plan.epoch;
        let factory = self.factory.clone();
        let started = Instant::now();
        let rendezvous = match req.rendezvous.and_then(|r| r.kind) {
            Some(rendezvous::Kind::TcpAddress(a)) => Some(a),
            _ => None,
        };
        let load_span = span.clone();
        let built = tokio::task::spawn_blocking(move || {
            let _in_span = load_span.enter();
            // Before joining: the old executor's collectives are dropped with it.
            let held = take_weights(previous);
            let comm_started = Instant::now();
            let (world, group) = if plan.world_size > 1 {
                let (w, g) = join_collectives(&plan, rank, rendezvous.as_deref())?;
                (Some(w), Some(g))
            } else {
                (None, None)
            };
            let comm_ms = comm_started.elapsed().as_millis() as u64;
            let ctx = EpochContext { plan, rank, world, group };
            factory.prepare_with(ctx, held).map(|ex| (ex, comm_ms))
        })
        .instrument(span.clone())
        .await
        .map_err(|e| Status::internal(format!("prepare task: {e}")))?;
        let load_ms = started.elapsed().as_millis() as u64;
        let mut g = self.lock();
        if g.epoch != epoch {
            return Err(Status::aborted(format!("epoch {} superseded by {}", epoch, g.epoch)));
        }
        match built {
            Ok((ex, comm_init_ms)) => {
                let weight_bytes = ex.weight_bytes();
                let cost = ex.prepare_cost();
                g.phase = ex.step_phase();
                g.executor = Some(Arc::new(Mutex::new(ex)));
                g.state = WorkerState::Ready;
                g.detail = format!("ready for epoch {epoch} as rank {rank}");
                self.metrics.set_epoch(epoch, true);
                tracing::info!(
                    parent: &span,
                    epoch,
                    rank,
                    load_ms,
                    weight_bytes,
                    loaded_bytes = cost.loaded_bytes,
                    loaded_expert_bytes = cost.loaded_expert_bytes,
                    reused_bytes = cost.reused_bytes,
                    "epoch prepared"
                );
                Ok(Response::new(PrepareEpochResponse {
                    epoch,
                    rank,
                    ready: true,
                    load_ms,
                    comm_init_ms,
                    weight_bytes,
                    loaded_bytes: cost.loaded_bytes,
                    loaded_expert_bytes: cost.loaded_expert_bytes,
                    reused_bytes: cost.reused_bytes,
                }))
            }
            Err(e) => {
                self.metrics.set_epoch(epoch, false);
                g.state = WorkerState::Failed;
                g.detail = e.to_string();
                Err(Status::failed_precondition(format!("preparing epoch {epoch}: {e}")))
            }
        }
    }

    type StepStream = StepStream;

    async fn step(
        &self,
        request: Request<Streaming<StepRequest>>,
    ) -> Result<Response<Self::StepStream>, Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<StepEvent, Status>>(16);
        let inner = self.inner.clone();
        let metrics = self.metrics.clone();
        let rank = self.lock().rank.unwrap_or(0);
        tokio::spawn(async move {
            while let Some(msg) = incoming.next().await {
                let step = match msg {
                    Ok(s) => s,
                    Err(_) => break, // the coordinator went away
                };
                let started = Instant::now();
                let inner2 = inner.clone();
                let (epoch, step_id) = (step.epoch, step.step_id);
                // The coordinator's watchdog tells "never started" from "stuck executing".
                let progress =
                    StepProgress { epoch, step_id, rank, layer: -1, phase: "started".into() };
                let event = StepEvent { kind: Some(step_event::Kind::Progress(progress)) };
                if tx.send(Ok(event)).await.is_err() {
                    break;
                }
                let span = tracing::debug_span!("step", epoch, step_id, rank);
                crate::telemetry::parent_from_carrier(&span, &step.trace_context);
                let metrics = metrics.clone();
                // Layer and phase while the step runs, for the watchdog (step_progress.rs):
                // reset before the step starts, so no phase it enters is overwritten.
                let phase = step_phase(&inner);
                if let Some(p) = &phase {
                    p.reset();
                }
                let work = tokio::task::spawn_blocking(move || {
                    span.in_scope(|| run_step(&inner2, &step, rank, &metrics))
                });
                let base = StepProgress { epoch, step_id, rank, ..Default::default() };
                let every = crate::executor::step_progress::EVERY;
                let outcome =
                    crate::executor::step_progress::report_while(work, phase, &tx, base, every)
                        .await;
                let mut result = StepResult {
                    epoch,
                    step_id,
                    rank,
                    elapsed_us: started.elapsed().as_micros() as u64,
                    ..Default::default()
                };
                match outcome {
                    Ok(Ok((seqs, report))) => {
                        result.seqs = seqs;
                        report.fill(&mut result);
                    }
                    Ok(Err(e)) => result.error = e,
                    Err(e) => result.error = format!("step task failed: {e}"),
                }
                let event = StepEvent { kind: Some(step_event::Kind::Result(result)) };
                if tx.send(Ok(event)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn health(
        &self,
        _request: Request<WorkerHealthRequest>,
    ) -> Result<Response<WorkerHealthResponse>, Status> {
        let g = self.lock();
        Ok(Response::new(WorkerHealthResponse {
            worker_id: self.worker_id.clone(),
            state: g.state as i32,
            epoch: g.epoch,
            rank: g.rank,
            device: self.device.clone(),
            last_step_id: g.last_step_id,
            lease_held: self.lease_held.load(std::sync::atomic::Ordering::Relaxed),
            detail: g.detail.clone(),
            ..Default::default()
        }))
    }

    async fn shutdown(
        &self,
        request: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        let reason = request.into_inner().reason;
        tracing::info!(%reason, "shutdown requested");
        self.metrics.set_down();
        {
            let mut g = self.lock();
            g.state = WorkerState::Stopping;
            g.detail = format!("stopping: {reason}");
        }
        let _ = self.shutdown.send(true);
        Ok(Response::new(ShutdownResponse {}))
    }
}
