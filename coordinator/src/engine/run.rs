//! The engine loop: epochs (form → prepare → serve → fail over) and steps.
//!
//! One task owns all scheduler state. Each iteration: take new submissions; drop sequences whose
//! client went away or whose deadline passed (blocks freed); admit; build one step (per group);
//! send it to every rank; wait for every rank's result (bounded by the step timeout); stream the
//! sampled tokens. Any rank failure (or a drain) ends the epoch: its requests migrate to the
//! next epoch formed from the live workers (`recovery.rs`), and stalled steps are reported by
//! the watchdog (`watchdog.rs`).
//!
//! Elastic epochs (`crate::planner::choose_ranks`): the next epoch keeps every surviving rank's
//! position, replaces lost ranks with spares, shrinks onto the survivors when no spare can and
//! every expert is still covered, and grows by registered spares — while serving, a background
//! check ([`JOIN_POLL`]) finds spares that answer their health check; once T of them can join
//! below `max_world_size` the epoch ends at a step boundary (sequences migrate) and the next one
//! includes them. The number of attention groups follows the world (queued sequences are
//! redistributed).

use super::detok::TextCodec;
use super::link::{LinkError, WorkerLink};
use super::sched::{GroupSched, Limits, Seq};
use super::{
    EngineConfig, EngineError, EngineHandle, Event, GroupUsage, RankStatus, ServingState,
    StatusSnapshot, StepStats, Submission,
};
use crate::metrics::{CoordinatorMetrics, status};
use crate::planner::{Elastic, Member, PlanInputs, Previous, choose_ranks, plan_over};
use crate::telemetry::{RequestTrace, step_span, trace_context};
use crate::text::{IncrementalDecoder, SpecialTokenMode};
use fathom_common::ModelConfig;
use fathom_proto::v1::{
    FinishReason, GenerateChunk, GenerateFinal, GroupStep, Plan, StepFlags, StepRequest,
    StepResult, Usage,
};
use futures::future::BoxFuture;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

#[path = "recovery.rs"]
mod recovery;
#[path = "watchdog.rs"]
mod watchdog;
pub(crate) use recovery::Control;

/// Where the engine learns which workers are live.
pub trait WorkerDirectory: Send + Sync + std::fmt::Debug {
    /// The live workers (any order).
    fn live_workers(&self) -> BoxFuture<'_, Result<Vec<Member>, String>>;

    /// The newest epoch already used (a new plan takes the next one). Default: none stored.
    fn current_epoch(&self) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async { Ok(0) })
    }

    /// Records `plan` before its ranks are prepared. Default: nowhere.
    fn publish_plan(&self, _plan: &Plan) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// How long PrepareEpoch may take (shard loading of a big checkpoint).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often an idle engine looks at operator requests.
const IDLE_CONTROL_POLL: Duration = Duration::from_millis(100);
const RETRY: Duration = Duration::from_millis(300);
const MAX_STAT_SAMPLES: usize = 200_000;
/// How often a blocked engine (nothing runnable) re-checks cancellations and deadlines.
const IDLE_POLL: Duration = Duration::from_millis(20);
/// How often a serving engine below its maximum world looks for spares that could join.
const JOIN_POLL: Duration = Duration::from_millis(1000);

/// Per-request state the engine attaches to a scheduler sequence.
#[derive(Debug)]
struct Tag {
    tx: mpsc::Sender<Event>,
    request_id: String,
    deadline: Option<Instant>,
    /// Text deltas (`None` without a tokenizer).
    detok: Option<IncrementalDecoder>,
    return_prompt_ids: bool,
    stop_ids: Vec<u32>,
    /// Spans and metrics of the request (no prompt text).
    trace: RequestTrace,
}

type S = GroupSched<Tag>;

struct Engine {
    cfg: EngineConfig,
    model: ModelConfig,
    codec: Option<TextCodec>,
    directory: Arc<dyn WorkerDirectory>,
    rx: mpsc::UnboundedReceiver<Submission>,
    pending: Arc<AtomicUsize>,
    status: Arc<Mutex<StatusSnapshot>>,
    stats: Arc<Mutex<StepStats>>,
    state_tx: watch::Sender<ServingState>,
    groups: Vec<S>,
    epoch: u64,
    /// Last epoch number of a failed W > 1 preparation (never reused: stale rendezvous).
    burned_epoch: u64,
    step_id: u64,
    next_seq: u64,
    metrics: Arc<CoordinatorMetrics>,
    /// Expert load counters and live placement changes (issue 9).
    experts: crate::experts::ExpertsHandle,
    control_rx: mpsc::UnboundedReceiver<Control>,
    /// Workers being drained (left out of plans, see `recovery.rs`).
    draining: HashSet<String>,
    /// Drains waiting for an epoch without their worker.
    drain_replies: Vec<(String, oneshot::Sender<Result<u64, EngineError>>)>,
    /// Addresses of drained workers to shut down once they are out of the plan.
    drained_addrs: HashMap<String, String>,
    /// When the requests now waiting for a new epoch started waiting (the hold window).
    held_since: Option<Instant>,
    /// Worker ids by rank of the epoch that served last (empty before the first).
    serving_workers: Vec<String>,
    /// What each rank of the serving epoch reported preparing it (by rank).
    prepare_costs: HashMap<u32, super::PrepareCost>,
    /// A running check for spares that could join (answers how many answered their probe).
    join_check: Option<tokio::task::JoinHandle<usize>>,
    last_join_check: Instant,
}

/// Starts the engine task. Returns the clients' handle and a receiver of the serving state
/// (for health reporting). Its metrics are registered nowhere
/// (see [`spawn_engine_with_metrics`]).
pub fn spawn_engine(
    cfg: EngineConfig,
    model: ModelConfig,
    codec: Option<TextCodec>,
    directory: Arc<dyn WorkerDirectory>,
) -> (EngineHandle, watch::Receiver<ServingState>) {
    let metrics = Arc::new(CoordinatorMetrics::detached());
    spawn_engine_with_metrics(cfg, model, codec, directory, metrics)
}

/// [`spawn_engine`] updating `metrics` (registered by the caller in its registry).
pub fn spawn_engine_with_metrics(
    cfg: EngineConfig,
    model: ModelConfig,
    codec: Option<TextCodec>,
    directory: Arc<dyn WorkerDirectory>,
    metrics: Arc<CoordinatorMetrics>,
) -> (EngineHandle, watch::Receiver<ServingState>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let pending = Arc::new(AtomicUsize::new(0));
    let status = Arc::new(Mutex::new(StatusSnapshot {
        state: ServingState::WaitingForWorkers,
        epoch: 0,
        world_size: cfg.world_size as u32,
        tp: cfg.tp as u32,
        ranks: Vec::new(),
        kv_blocks_total: cfg.kv_blocks as u32,
        kv_blocks_used: 0,
        kv_block_size: cfg.kv_block_size as u32,
        running: 0,
        groups: Vec::new(),
        queue_depth: 0,
        overhead_us_ewma: 0.0,
        steps: 0,
        watchdog: Vec::new(),
        watchdog_reports: 0,
        epochs_failed: 0,
        sequences_migrated: 0,
        draining: Vec::new(),
    }));
    let (control, control_rx) = mpsc::unbounded_channel();
    let stats = Arc::new(Mutex::new(StepStats::default()));
    let experts = crate::experts::ExpertsHandle::new(cfg.experts.clone(), model.clone());
    let (state_tx, state_rx) = watch::channel(ServingState::WaitingForWorkers);
    let handle = EngineHandle {
        tx,
        pending: pending.clone(),
        max_queue: cfg.max_queue,
        status: status.clone(),
        stats: stats.clone(),
        experts: experts.clone(),
        control,
        hold: !cfg.migrate_timeout.is_zero(),
        metrics: metrics.clone(),
    };
    let d = (cfg.world_size / cfg.tp).max(1);
    let limits = Limits {
        max_step_tokens: cfg.max_step_tokens,
        max_batch: cfg.max_batch,
        block_size: cfg.kv_block_size,
    };
    let engine = Engine {
        groups: (0..d).map(|_| GroupSched::new(limits, cfg.kv_blocks)).collect(),
        cfg,
        model,
        codec,
        directory,
        rx,
        pending,
        status,
        stats,
        state_tx,
        epoch: 0,
        burned_epoch: 0,
        step_id: 0,
        next_seq: 1,
        metrics,
        experts,
        control_rx,
        draining: HashSet::new(),
        drain_replies: Vec::new(),
        drained_addrs: HashMap::new(),
        held_since: None,
        serving_workers: Vec::new(),
        prepare_costs: HashMap::new(),
        join_check: None,
        last_join_check: Instant::now(),
    };
    tokio::spawn(engine.run());
    (handle, state_rx)
}

impl Engine {
    fn set_state(&self, state: ServingState) {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).state = state;
        self.state_tx.send_replace(state);
    }

    async fn run(mut self) {
        loop {
            self.set_state(if self.epoch == 0 {
                ServingState::WaitingForWorkers
            } else {
                ServingState::Reconfiguring
            });
            let mut links = loop {
                match self.form_epoch().await {
                    Ok(links) => break links,
                    Err(e) => {
                        tracing::info!("{e}");
                        if self.rx.is_closed() {
                            return;
                        }
                        let _ = self.control(&[]);
                        self.hold_or_fail(&e);
                        tokio::time::sleep(RETRY).await;
                    }
                }
            };
            self.held_since = None;
            self.set_state(ServingState::Serving);
            tracing::info!(epoch = self.epoch, "serving");
            let plan: Vec<(String, String)> =
                links.iter().map(|l| (l.worker_id.clone(), l.address.clone())).collect();
            self.drains_done(&plan);
            match self.serve(&mut links).await {
                Ok(()) => return, // all handles dropped: shutting down
                Err(e) if e.worker_id.is_empty() => {
                    // Spares join: not a failure (sequences migrate as for a drain).
                    tracing::info!(epoch = self.epoch, "epoch ends: {}", e.reason);
                    let msg = format!("epoch {} ended: {}", self.epoch, e.reason);
                    self.set_state(ServingState::Reconfiguring);
                    self.migrate(&msg);
                    self.publish_status(&links, 0.0);
                }
                Err(e) => {
                    tracing::warn!(epoch = self.epoch, "epoch failed: {e}");
                    // Before any request hears of the failure (publish_status below keeps it).
                    self.metrics.worker_up.with_label_values(&[e.worker_id.as_str()]).set(0);
                    let msg = format!("epoch {} failed: {e}", self.epoch);
                    self.set_state(ServingState::Reconfiguring);
                    self.migrate(&msg);
                    self.shutdown_drained();
                    self.publish_status(&links, 0.0);
                }
            }
        }
    }

    /// Answers every queued, not yet scheduled submission UNAVAILABLE.
    fn fail_queued(&mut self, why: &str) {
        while let Ok(sub) = self.rx.try_recv() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            self.metrics.request_ended(status::UNAVAILABLE);
            let _ = sub.tx.try_send(Event::Error(EngineError::Unavailable(why.to_string())));
        }
        for g in &mut self.groups {
            while let Some(mut s) = g.waiting.pop_front() {
                s.tag.trace.finish(status::UNAVAILABLE);
                self.pending.fetch_sub(1, Ordering::SeqCst);
                let _ = s.tag.tx.try_send(Event::Error(EngineError::Unavailable(why.into())));
            }
        }
    }

    /// Plans a new epoch over the live workers and prepares every rank.
    async fn form_epoch(&mut self) -> Result<Vec<WorkerLink>, String> {
        let members = self.directory.live_workers().await?;
        let mut probed = self.probe_members(members).await;
        let members: Vec<Member> = probed.iter().map(|p| p.member.clone()).collect();
        let stored = self.directory.current_epoch().await?;
        let inputs = PlanInputs {
            epoch: self.epoch.max(stored).max(self.burned_epoch) + 1,
            world_size: self.cfg.world_size,
            tp: self.cfg.tp,
            model: &self.model,
            model_path: self.cfg.model_path.clone(),
            kv_block_size: self.cfg.kv_block_size,
            kv_blocks: self.cfg.kv_blocks,
            comm: self.cfg.comm.clone(),
        };
        let elastic = Elastic {
            world_size: self.cfg.world_size,
            tp: self.cfg.tp,
            min_world: self.cfg.min_world_size,
            max_world: self.cfg.max_world_size,
        };
        let active = self.experts.active_plan();
        let prev = active
            .as_ref()
            .filter(|_| !self.serving_workers.is_empty())
            .map(|plan| Previous { workers: &self.serving_workers, plan });
        let (ranks, layout) = choose_ranks(&elastic, prev, &members).map_err(|e| e.to_string())?;
        let mut plan = plan_over(&inputs, ranks).map_err(|e| e.to_string())?;
        self.experts.shape_plan(&mut plan, &layout)?;
        tracing::info!(epoch = plan.epoch, world = plan.world_size, ?layout, "plan formed");
        let mut links = Vec::new();
        for r in &plan.ranks {
            let i = probed
                .iter()
                .position(|p| p.member.worker_id == r.worker_id)
                .ok_or_else(|| format!("worker {} of the plan was not probed", r.worker_id))?;
            let client = probed.swap_remove(i).client;
            links.push(WorkerLink::new(r.rank, r.worker_id.clone(), r.address.clone(), client));
        }
        self.directory.publish_plan(&plan).await?;
        self.set_state(ServingState::Preparing);
        tracing::info!(epoch = plan.epoch, world = plan.world_size, "preparing epoch");
        let rendezvous = if plan.world_size > 1 {
            let rank0 = plan.ranks.first().ok_or("the plan has no ranks")?;
            Some(super::link::rendezvous_address(&rank0.address)?)
        } else {
            None
        };
        // All ranks prepare at once: rank 0 binds the rendezvous and waits for the others.
        // The first failure ends the attempt at once (rank 0 may be blocked in the rendezvous
        // waiting for a rank that failed); a W > 1 epoch number is never reused, so a stale
        // preparation still running on a worker is superseded by the next attempt's epoch.
        let span =
            tracing::info_span!("prepare_epoch", epoch = plan.epoch, world = plan.world_size);
        let prepared = futures::future::try_join_all(
            links.iter_mut().map(|l| l.prepare(plan.clone(), rendezvous.clone(), PREPARE_TIMEOUT)),
        )
        .instrument(span.clone())
        .await;
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                if plan.world_size > 1 {
                    self.burned_epoch = plan.epoch;
                }
                return Err(e.to_string());
            }
        };
        self.prepare_costs = prepared
            .iter()
            .map(|r| {
                let cost = super::PrepareCost {
                    loaded_bytes: r.loaded_bytes,
                    loaded_expert_bytes: r.loaded_expert_bytes,
                    reused_bytes: r.reused_bytes,
                };
                tracing::info!(
                    epoch = plan.epoch,
                    rank = r.rank,
                    loaded_bytes = r.loaded_bytes,
                    loaded_expert_bytes = r.loaded_expert_bytes,
                    reused_bytes = r.reused_bytes,
                    "rank prepared"
                );
                (r.rank, cost)
            })
            .collect();
        for l in &mut links {
            l.open_steps(CONNECT_TIMEOUT)
                .instrument(span.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        self.epoch = plan.epoch;
        self.step_id = 0;
        self.experts.epoch_started();
        self.serving_workers = plan.ranks.iter().map(|r| r.worker_id.clone()).collect();
        self.resize_groups(plan.world_size as usize / self.cfg.tp.max(1));
        self.publish_status(&links, 0.0);
        Ok(links)
    }

    /// Steps until a rank fails (`Err`) or every client handle is gone (`Ok`).
    async fn serve(&mut self, links: &mut [WorkerLink]) -> Result<(), LinkError> {
        let mut ewma = 0.0;
        let plan: Vec<(String, String)> =
            links.iter().map(|l| (l.worker_id.clone(), l.address.clone())).collect();
        loop {
            self.control(&plan)?;
            self.spares_join(&plan)?;
            let idle = self.groups.iter().all(|g| g.running.is_empty() && g.waiting.is_empty());
            if idle && !self.experts.wants_step() {
                tokio::select! {
                    sub = self.rx.recv() => match sub {
                        Some(sub) => self.enqueue(sub),
                        None => return Ok(()),
                    },
                    _ = self.experts.wake() => {}
                    // Operator requests (drains) are looked at even while idle.
                    _ = tokio::time::sleep(IDLE_CONTROL_POLL) => continue,
                }
            }
            while let Ok(sub) = self.rx.try_recv() {
                self.enqueue(sub);
            }
            let t0 = Instant::now();
            self.reap();
            let mut any = false;
            let mut nseqs = 0;
            let mut groups = Vec::with_capacity(self.groups.len());
            for (gi, g) in self.groups.iter_mut().enumerate() {
                let before = g.waiting.len();
                g.admit();
                self.pending.fetch_sub(before - g.waiting.len(), Ordering::SeqCst);
                for s in &mut g.running {
                    s.tag.trace.scheduled();
                }
                let seqs = g.build();
                any |= !seqs.is_empty();
                nseqs += seqs.len();
                groups.push(GroupStep {
                    group: gi as u32,
                    seqs,
                    released_seq_ids: std::mem::take(&mut g.released),
                });
            }
            if !any && !self.experts.wants_step() {
                // Nothing runnable (all cancelled, or waiting on blocks that nothing frees).
                // Wait briefly for a submission so cancellations and deadlines are still seen.
                self.publish_status(links, ewma);
                match tokio::time::timeout(IDLE_POLL, self.rx.recv()).await {
                    Ok(Some(sub)) => self.enqueue(sub),
                    Ok(None) => return Ok(()),
                    Err(_) => {}
                }
                continue;
            }
            self.step_id += 1;
            let span = self.step_span(&groups, nseqs);
            let mut step = StepRequest {
                epoch: self.epoch,
                step_id: self.step_id,
                trace_context: trace_context(&span),
                groups,
                flags: Some(StepFlags::default()),
                ..Default::default()
            };
            self.experts.prepare_step(&mut step);
            let (last, rest) = links.split_last().expect("a plan has at least one rank");
            for l in rest {
                l.send(step.clone()).await?;
            }
            last.send(step).await?;
            let sent = t0.elapsed();
            let t1 = Instant::now();
            let results = self.collect_results(links, self.step_id).await?;
            let waited = t1.elapsed();
            let t2 = Instant::now();
            let mut ok = Vec::with_capacity(results.len());
            for (l, r) in links.iter().zip(results) {
                if !r.error.is_empty() {
                    return Err(LinkError {
                        worker_id: l.worker_id.clone(),
                        address: l.address.clone(),
                        reason: format!("step {}: {}", self.step_id, r.error),
                    });
                }
                ok.push(r);
            }
            self.experts.record_results(&ok);
            let tp = self.cfg.tp as u32;
            for r in ok.into_iter().filter(|r| r.rank % tp == 0) {
                self.apply(r);
            }
            drop(span);
            let phases = &self.metrics.step_seconds;
            phases.with_label_values(&["schedule"]).observe(sent.as_secs_f64());
            phases.with_label_values(&["execute"]).observe(waited.as_secs_f64());
            phases.with_label_values(&["stream"]).observe(t2.elapsed().as_secs_f64());
            let overhead = sent + t2.elapsed();
            let us = overhead.as_secs_f64() * 1e6;
            ewma = if ewma == 0.0 { us } else { 0.95 * ewma + 0.05 * us };
            {
                let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                if st.samples.len() < MAX_STAT_SAMPLES {
                    st.samples.push((
                        nseqs as u32,
                        overhead.as_micros() as u64,
                        waited.as_micros() as u64,
                    ));
                }
            }
            self.publish_status(links, ewma);
        }
    }

    fn enqueue(&mut self, sub: Submission) {
        let id = self.next_seq;
        self.next_seq += 1;
        let mut stop_ids = sub.sampling.stop_token_ids.clone();
        if !sub.sampling.ignore_eos {
            stop_ids.extend(self.cfg.eos_ids.iter().copied());
        }
        let trace = RequestTrace::new(
            self.metrics.clone(),
            &sub.request_id,
            sub.prompt.len(),
            sub.max_tokens,
        );
        let seq = Seq {
            id,
            prompt: sub.prompt,
            generated: Vec::new(),
            prefilled: 0,
            resumed: 0,
            max_tokens: sub.max_tokens,
            sampling: sub.sampling,
            seed: sub.seed,
            outputs: sub.outputs,
            blocks: Vec::new(),
            tag: Tag {
                trace,
                tx: sub.tx,
                request_id: sub.request_id,
                deadline: sub.deadline,
                detok: self.codec.as_ref().map(|c| c.decoder(SpecialTokenMode::Keep)),
                return_prompt_ids: sub.return_prompt_ids,
                stop_ids,
            },
        };
        // The group with the most free blocks takes it.
        let g = (0..self.groups.len())
            .max_by_key(|&i| (self.groups[i].pool.free(), std::cmp::Reverse(i)))
            .unwrap_or(0);
        self.groups[g].waiting.push_back(seq);
    }

    /// Removes cancelled (client gone) and expired sequences; their blocks return to the pool.
    fn reap(&mut self) {
        let now = Instant::now();
        for g in &mut self.groups {
            let waiting_before = g.waiting.len();
            let gone = g
                .remove_where(|s| s.tag.tx.is_closed() || s.tag.deadline.is_some_and(|d| now >= d));
            let left_waiting = waiting_before - g.waiting.len();
            self.pending.fetch_sub(left_waiting, Ordering::SeqCst);
            for mut s in gone {
                if !s.tag.tx.is_closed() {
                    s.tag.trace.finish(status::DEADLINE_EXCEEDED);
                    let generated = s.generated.len();
                    let _ = s
                        .tag
                        .tx
                        .try_send(Event::Error(EngineError::DeadlineExceeded { generated }));
                }
            }
        }
    }

    /// Applies one group rank 0's results: append tokens, stream them, finish sequences.
    fn apply(&mut self, result: StepResult) {
        let gi = (result.rank / self.cfg.tp as u32) as usize;
        let g = &mut self.groups[gi];
        for r in result.seqs {
            let Some(i) = g.position(r.seq_id) else { continue };
            let s = &mut g.running[i];
            s.generated.push(r.token_id);
            s.tag.trace.token();
            let stop = s.tag.stop_ids.contains(&r.token_id);
            let done = stop || s.generated.len() >= s.max_tokens;
            // An id the tokenizer does not define (the model's vocabulary is larger) adds no text.
            let text_delta = match s.tag.detok.as_mut() {
                Some(d) => {
                    let mut t = d.step(r.token_id).unwrap_or_default();
                    if done {
                        t.push_str(&d.finish().unwrap_or_default());
                    }
                    t
                }
                None => String::new(),
            };
            let chunk = GenerateChunk {
                token_ids: vec![r.token_id],
                text_delta,
                logprobs: r.logprob.into_iter().collect(),
                sampling_masks: r.sampling_mask.into_iter().collect(),
                top_logits: r.top_logits.into_iter().collect(),
                routed_experts: r.routed_experts,
            };
            let _ = s.tag.tx.try_send(Event::Chunk(chunk));
            if done {
                let mut s = g.finish(i);
                s.tag.trace.finish(status::OK);
                let final_ = GenerateFinal {
                    finish_reason: if stop { FinishReason::Stop } else { FinishReason::Length }
                        as i32,
                    usage: Some(Usage {
                        prompt_tokens: s.prompt.len() as u32,
                        completion_tokens: s.generated.len() as u32,
                        ..Default::default()
                    }),
                    request_id: s.tag.request_id.clone(),
                    stop_token_id: stop.then_some(r.token_id),
                    seed: s.seed,
                    prompt_token_ids: if s.tag.return_prompt_ids {
                        s.prompt.clone()
                    } else {
                        Vec::new()
                    },
                    truncated: false,
                };
                let _ = s.tag.tx.try_send(Event::Final(final_));
            }
        }
    }

    /// The `step` span of the step being built: under the phase span of its first sequence's
    /// request, linked to the others' requests.
    fn step_span(&self, groups: &[GroupStep], nseqs: usize) -> tracing::Span {
        let mut traces = groups.iter().flat_map(|gs| {
            let g = &self.groups[gs.group as usize];
            gs.seqs
                .iter()
                .filter_map(move |s| g.position(s.seq_id).map(|i| &g.running[i].tag.trace))
        });
        let first = traces.next();
        step_span(
            first.map(|t| t.step_parent()),
            traces.map(|t| t.span()),
            self.epoch,
            self.step_id,
            nseqs,
        )
    }

    fn publish_status(&self, links: &[WorkerLink], ewma: f64) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let new_epoch = st.epoch != self.epoch;
        st.epoch = self.epoch;
        if st.state != ServingState::Reconfiguring {
            st.world_size = links.len() as u32;
        }
        st.kv_blocks_used = self.groups.iter().map(|g| g.pool.used() as u32).sum();
        st.kv_blocks_total = self.groups.iter().map(|g| g.pool.total() as u32).sum();
        st.running = self.groups.iter().map(|g| g.running.len() as u32).sum();
        st.groups = self
            .groups
            .iter()
            .map(|g| GroupUsage {
                total: g.pool.total() as u32,
                used: g.pool.used() as u32,
                running: g.running.len() as u32,
            })
            .collect();
        st.overhead_us_ewma = ewma;
        st.steps = self.step_id;
        let m = &self.metrics;
        m.epoch.set(self.epoch as i64);
        m.running_sequences.set(st.running as i64);
        m.queue_depth.set(self.pending.load(Ordering::SeqCst) as i64);
        m.kv_blocks.with_label_values(&["used"]).set(st.kv_blocks_used as i64);
        m.kv_blocks
            .with_label_values(&["free"])
            .set((st.kv_blocks_total - st.kv_blocks_used) as i64);
        if st.state != ServingState::Reconfiguring {
            // The links of a prepared epoch (not those of one that just failed).
            for l in links {
                m.worker_up.with_label_values(&[l.worker_id.as_str()]).set(1);
            }
        }
        if new_epoch
            || st.ranks.len() != links.len()
            || st
                .ranks
                .iter()
                .zip(links)
                .any(|(a, b)| a.rank != b.rank || a.worker_id != b.worker_id)
        {
            for gone in st.ranks.iter().filter(|r| links.iter().all(|l| l.worker_id != r.worker_id))
            {
                m.worker_up.with_label_values(&[gone.worker_id.as_str()]).set(0);
            }
            st.ranks = links
                .iter()
                .map(|l| RankStatus {
                    rank: l.rank,
                    worker_id: l.worker_id.clone(),
                    address: l.address.clone(),
                    healthy: true,
                    last_seen: Instant::now(),
                    detail: String::new(),
                    prepared: self.prepare_costs.get(&l.rank).copied().unwrap_or_default(),
                })
                .collect();
        } else {
            let now = Instant::now();
            for r in &mut st.ranks {
                r.last_seen = now;
            }
        }
    }
}
