//! Expert replicas while serving (issue 9, docs/experts.md): the coordinator's expert-load
//! window, the current expert placement, and live placement changes.
//!
//! Owns: [`ExpertsHandle`] — shared by the engine loop (which calls the step hooks
//! [`ExpertsHandle::shape_plan`], [`ExpertsHandle::epoch_started`],
//! [`ExpertsHandle::prepare_step`], [`ExpertsHandle::record_results`]) and the Admin API / metrics
//! (which call [`ExpertsHandle::snapshot`], [`ExpertsHandle::set_replicas`],
//! [`ExpertsHandle::rebalance`]). The pure algorithms live in `fathom_common::plan`.
//!
//! How a change is applied (inside the epoch, KV caches untouched):
//! 1. an Admin call computes the new placement (version + 1) and stores it as *pending*;
//! 2. the next step carries it as `stage_placement`; every rank loads the experts it gains in
//!    the background while serving with the old placement;
//! 3. once every rank reported `staged_placement_version` = the new version, the next step
//!    names it in `placement_version`: each rank switches before executing that step and frees
//!    the experts it lost. Requests in flight continue; outputs do not change (an expert's
//!    output does not depend on where it runs).
//!
//! While a change is pending the engine keeps stepping (empty steps every [`POLL`] when idle) so
//! acknowledgements arrive; a second change is refused until the first is in effect.
//!
//! Counters: every rank reports per step the tokens of its slice routed to each logical expert
//! (summed into a [`LoadWindow`] over `window_steps` steps with tokens) and the tokens its own
//! expert slots computed (a second window, indexed by rank, restarted when the placement
//! changes: the measured per-rank load of the placement in effect).
//!
//! Invariants: the placement in effect only changes in [`ExpertsHandle::prepare_step`] (a step
//! boundary) or with a new epoch; at most one change is pending; the lock is never held across
//! an await.

use crate::engine::EngineError;
use crate::planner::Layout;
use fathom_common::ModelConfig;
use fathom_common::cluster::ClusterConfig;
use fathom_common::ids::Epoch;
use fathom_common::plan::elastic::reshape;
use fathom_common::plan::load::{balance, balancedness};
use fathom_common::plan::rebalance::{rebalance, set_replicas};
use fathom_common::plan::{
    ExpertError, ExpertPlacement, LayerCounts, LoadWindow, ParallelPlan, PlanSpec, ReplicaRequest,
};
use fathom_proto::v1::{
    ExpertReplicaSet, ExpertSlot, LayerPlacement, PlacementUpdate, Plan, StepRequest, StepResult,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How often an idle engine steps while a placement change is loading (to collect the ranks'
/// acknowledgements).
pub const POLL: Duration = Duration::from_millis(10);

/// Expert settings of the coordinator (from the cluster config).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertsConfig {
    /// Extra expert slots per rank beyond the even share.
    pub redundant_slots_per_rank: usize,
    /// Redundant replicas per layer the first plan places (`None`: fill every redundant slot).
    pub redundant_experts: Option<usize>,
    /// Pinned replica counts (`parallel.pinned_replicas`).
    pub pinned_replicas: BTreeMap<String, usize>,
    /// Steps (with tokens) the load window covers.
    pub window_steps: usize,
}

impl Default for ExpertsConfig {
    fn default() -> Self {
        Self {
            redundant_slots_per_rank: 0,
            redundant_experts: None,
            pinned_replicas: BTreeMap::new(),
            window_steps: 256,
        }
    }
}

impl ExpertsConfig {
    /// From the `[parallel]` and `[coordinator]` sections.
    pub fn from_cluster(cfg: &ClusterConfig) -> Self {
        Self {
            redundant_slots_per_rank: cfg.parallel.redundant_slots_per_rank,
            redundant_experts: cfg.parallel.redundant_experts,
            pinned_replicas: cfg.parallel.pinned_replicas.clone(),
            window_steps: cfg.coordinator.expert_load_window_steps.max(1),
        }
    }
}

/// Why an expert operation was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExpertsError {
    #[error("{0}")]
    Invalid(#[from] ExpertError),
    #[error("{0}")]
    Request(String),
    #[error("no expert placement yet: the cluster is not serving an epoch")]
    NotServing,
    #[error(
        "placement version {version} is still being loaded by the workers; retry once it is in effect"
    )]
    Busy { version: u64 },
}

impl From<ExpertsError> for EngineError {
    fn from(e: ExpertsError) -> Self {
        match e {
            ExpertsError::Invalid(ExpertError::InvalidPlan(p)) => {
                EngineError::Internal(format!("current placement: {p}"))
            }
            ExpertsError::Invalid(_) | ExpertsError::Request(_) => {
                EngineError::InvalidArgument { field: "expert replicas", reason: e.to_string() }
            }
            ExpertsError::NotServing | ExpertsError::Busy { .. } => {
                EngineError::Unavailable(e.to_string())
            }
        }
    }
}

/// One MoE layer's load (the metrics API reads these).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerLoadSnapshot {
    pub layer: usize,
    /// Tokens routed to each logical expert over the window.
    pub tokens: Vec<u64>,
    /// Replicas of each logical expert in the placement in effect.
    pub replicas: Vec<u32>,
    /// Tokens each rank's expert slots computed since the placement took effect (window).
    pub rank_tokens: Vec<u64>,
}

/// Expert load and placement state: what `ExpertLoad` and the metrics report.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSnapshot {
    pub placement_version: u64,
    /// A change being loaded by the workers.
    pub pending_version: Option<u64>,
    pub world_size: usize,
    pub layers: Vec<LayerLoadSnapshot>,
    /// Per rank, summed over layers (measured).
    pub rank_tokens: Vec<u64>,
    /// Mean over layers of mean/max rank load: measured when any rank tokens were counted,
    /// else modelled from the expert counts and the placement (1.0 without load).
    pub balancedness: f64,
    /// Mean over layers of max/mean measured rank load (0 without measurements).
    pub max_over_mean: f64,
    /// Steps the expert counts cover, and steps measured under the placement in effect.
    pub window_steps: u64,
    pub placement_steps: u64,
    /// Wall time the expert counts cover.
    pub window: Duration,
    /// Why the last placement change failed on a worker, if it did.
    pub last_error: Option<String>,
}

/// Result of `experts set` / `experts rebalance`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeSummary {
    /// The version that will be (or already is, when nothing changed) in effect.
    pub placement_version: u64,
    /// Replicas to load on ranks that did not hold the expert, and replicas removed.
    pub moved: usize,
    pub dropped: usize,
    /// Modelled balancedness of the measured load before and after.
    pub balancedness_before: f64,
    pub balancedness_after: f64,
    /// Whether a change was queued (false: nothing to change, or a dry run).
    pub applied: bool,
}

#[derive(Debug)]
struct Pending {
    plan: ParallelPlan,
    sent: bool,
    ready: BTreeSet<u32>,
}

#[derive(Debug)]
struct State {
    cfg: ExpertsConfig,
    model: ModelConfig,
    /// The placement in effect (`None` before the first epoch serves).
    active: Option<ParallelPlan>,
    /// The plan of the epoch being prepared.
    preparing: Option<ParallelPlan>,
    pending: Option<Pending>,
    load: Option<LoadWindow>,
    ranks: Option<LoadWindow>,
    /// End time of each step in `load` (oldest first).
    times: VecDeque<Instant>,
    placement_steps: u64,
    last_poll: Instant,
    last_error: Option<String>,
}

/// The expert runtime shared by the engine loop and the Admin API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ExpertsHandle {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

/// The placement of `p` as wire layers.
pub fn placement_to_wire(p: &ExpertPlacement) -> Vec<LayerPlacement> {
    p.layers
        .iter()
        .map(|l| LayerPlacement {
            layer: l.layer as u32,
            experts: l
                .replicas
                .iter()
                .map(|slots| ExpertReplicaSet {
                    slots: slots
                        .iter()
                        .map(|s| ExpertSlot { rank: s.rank.0, local_slot: s.slot })
                        .collect(),
                })
                .collect(),
        })
        .collect()
}

fn same_replicas(a: &ExpertPlacement, b: &ExpertPlacement) -> bool {
    a.layers.len() == b.layers.len()
        && a.layers
            .iter()
            .zip(&b.layers)
            .all(|(x, y)| x.layer == y.layer && x.replicas == y.replicas)
}

impl State {
    fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
        state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The initial plan of an epoch of W ranks in groups of T.
    fn initial_plan(&self, epoch: u64, w: usize, t: usize) -> Result<ParallelPlan, String> {
        let mut spec = PlanSpec::new(Epoch(epoch), w, t);
        spec.redundant_slots_per_rank = self.cfg.redundant_slots_per_rank;
        spec.pinned = fathom_common::plan::PinnedReplicas::from_config(&self.cfg.pinned_replicas)
            .map_err(|e| format!("parallel.pinned_replicas: {e}"))?;
        let mut plan = ParallelPlan::build(&spec, &self.model).map_err(|e| e.to_string())?;
        if let Some(n) = self.cfg.redundant_experts {
            let change = set_replicas(&plan, &ReplicaRequest::Redundant(n), &LayerCounts::new())
                .map_err(|e| format!("parallel.redundant_experts = {n}: {e}"))?;
            plan.placement = change.placement;
            plan.placement.version = 0;
        }
        Ok(plan)
    }

    fn totals(&self) -> LayerCounts {
        self.load.as_ref().map(LoadWindow::totals).unwrap_or_default()
    }

    fn active(&self) -> Result<&ParallelPlan, ExpertsError> {
        self.active.as_ref().ok_or(ExpertsError::NotServing)
    }

    fn check_idle(&self) -> Result<(), ExpertsError> {
        match &self.pending {
            Some(p) => Err(ExpertsError::Busy { version: p.plan.placement.version }),
            None => Ok(()),
        }
    }

    /// Queues `placement` (a successor of the active one) unless it changes nothing.
    fn queue(&mut self, placement: ExpertPlacement) -> bool {
        let Some(active) = &self.active else { return false };
        if same_replicas(&active.placement, &placement) {
            return false;
        }
        let mut plan = active.clone();
        plan.placement = placement;
        tracing::info!(version = plan.placement.version, "expert placement change queued");
        self.pending = Some(Pending { plan, sent: false, ready: BTreeSet::new() });
        self.last_error = None;
        true
    }

    fn reset_windows(&mut self, plan: &ParallelPlan) {
        let layers: Vec<usize> = plan.placement.layers.iter().map(|l| l.layer).collect();
        let keep_load = self.load.is_some()
            && self.active.as_ref().is_some_and(|a| {
                a.placement.layers.len() == layers.len()
                    && a.placement.n_experts == plan.placement.n_experts
            });
        if !keep_load {
            self.load = LoadWindow::for_placement(&plan.placement, self.cfg.window_steps).ok();
            self.times.clear();
        }
        self.ranks = LoadWindow::new(layers, plan.world_size, self.cfg.window_steps).ok();
        self.placement_steps = 0;
    }
}

impl ExpertsHandle {
    pub fn new(cfg: ExpertsConfig, model: ModelConfig) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                cfg,
                model,
                active: None,
                preparing: None,
                pending: None,
                load: None,
                ranks: None,
                times: VecDeque::new(),
                placement_steps: 0,
                last_poll: Instant::now(),
                last_error: None,
            })),
            notify: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        State::lock(&self.state)
    }

    // ---- engine hooks -------------------------------------------------------------------

    /// Puts the expert placement into a freshly formed `plan` according to `layout` (chosen by
    /// `crate::planner::choose_ranks`): the configured initial policy for [`Layout::Fresh`];
    /// the placement in effect for [`Layout::Same`] (operator changes survive a new epoch); for
    /// [`Layout::Reshaped`] the placement in effect carried onto the new world
    /// (`fathom_common::plan::elastic::reshape`: continued ranks keep their replicas and slots,
    /// new ranks get as many slots as an existing rank, filled from the measured load). A
    /// pending change is dropped (the new epoch starts from a known state).
    pub fn shape_plan(&self, plan: &mut Plan, layout: &Layout) -> Result<(), String> {
        let mut st = self.lock();
        let (w, t) = (plan.world_size as usize, plan.tp as usize);
        let active = st.active.as_ref().filter(|a| a.tp == t);
        let mut layout = match (layout, active) {
            (Layout::Same, Some(a)) if a.world_size == w => a.clone(),
            (Layout::Reshaped { origins }, Some(a)) if origins.len() == w => {
                let totals = st.totals();
                reshape(a, origins, Epoch(plan.epoch), a.placement.slots_per_rank, &totals)
                    .map_err(|e| format!("elastic placement for W={w}: {e}"))?
            }
            _ => st.initial_plan(plan.epoch, w, t)?,
        };
        layout.epoch = Epoch(plan.epoch);
        plan.placement = placement_to_wire(&layout.placement);
        plan.redundant_slots_per_rank = layout.placement.redundant_slots_per_rank as u32;
        plan.placement_version = layout.placement.version;
        st.pending = None;
        st.preparing = Some(layout);
        Ok(())
    }

    /// The plan (layout and placement) in effect, if an epoch served.
    pub fn active_plan(&self) -> Option<ParallelPlan> {
        self.lock().active.clone()
    }

    /// The epoch whose plan [`Self::shape_plan`] shaped serves now.
    pub fn epoch_started(&self) {
        let mut st = self.lock();
        if let Some(plan) = st.preparing.take() {
            st.reset_windows(&plan);
            st.active = Some(plan);
        }
    }

    /// Whether the engine should step even without sequences (a change is loading).
    pub fn wants_step(&self) -> bool {
        let st = self.lock();
        match &st.pending {
            Some(p) => !p.sent || st.last_poll.elapsed() >= POLL,
            None => false,
        }
    }

    /// Completes when the engine should re-check [`Self::wants_step`]: at once-ish while a change
    /// is loading ([`POLL`]), else when a change is queued.
    pub async fn wake(&self) {
        let loading = self.lock().pending.is_some();
        if loading {
            tokio::time::sleep(POLL).await;
        } else {
            self.notify.notified().await;
        }
    }

    /// Fills the expert fields of the next step: the placement to run with (switching to a
    /// pending one that every rank has loaded) and a placement to start loading.
    pub fn prepare_step(&self, step: &mut StepRequest) {
        let mut st = self.lock();
        st.last_poll = Instant::now();
        let Some(world) = st.active.as_ref().map(|a| a.world_size) else { return };
        if let Some(p) = &mut st.pending {
            if !p.sent {
                p.sent = true;
                step.stage_placement = Some(PlacementUpdate {
                    version: p.plan.placement.version,
                    placement: placement_to_wire(&p.plan.placement),
                });
            } else if p.ready.len() == world {
                let plan = st.pending.take().map(|p| p.plan).expect("pending checked above");
                tracing::info!(version = plan.placement.version, "expert placement switched");
                st.reset_windows(&plan);
                st.active = Some(plan);
            }
        }
        step.placement_version = st.active.as_ref().map_or(0, |a| a.placement.version);
    }

    /// Takes every rank's result of one step: staging acknowledgements and load counters.
    pub fn record_results(&self, results: &[StepResult]) {
        let mut st = self.lock();
        let Some(active) = st.active.as_ref() else { return };
        let (version, world) = (active.placement.version, active.world_size);
        let layers: Vec<usize> = active.placement.layers.iter().map(|l| l.layer).collect();
        let e = active.placement.n_experts;
        if let Some(p) = &mut st.pending
            && p.sent
        {
            let v = p.plan.placement.version;
            for r in results {
                if r.staged_placement_version == v {
                    p.ready.insert(r.rank);
                }
            }
            if let Some(r) = results.iter().find(|r| !r.staging_error.is_empty()) {
                let msg = format!("rank {}: {}", r.rank, r.staging_error);
                tracing::warn!(version = v, "placement change abandoned: {msg}");
                st.last_error = Some(msg);
                st.pending = None;
            }
        }
        let mut routed = vec![0u64; layers.len() * e];
        let mut per_rank = vec![vec![0u64; world]; layers.len()];
        let mut any = false;
        for r in results {
            match add_step_expert_tokens(r, &mut routed) {
                Ok(added) => any |= added,
                Err(e) => tracing::warn!(rank = r.rank, "expert counters ignored: {e}"),
            }
            if r.placement_version == version
                && r.rank_expert_tokens.len() == layers.len()
                && (r.rank as usize) < world
            {
                for (li, &c) in r.rank_expert_tokens.iter().enumerate() {
                    per_rank[li][r.rank as usize] += c;
                }
            }
        }
        if !any {
            return;
        }
        if let Some(w) = st.load.as_mut() {
            for (li, &l) in layers.iter().enumerate() {
                let _ = w.record_step(l, &routed[li * e..(li + 1) * e]);
            }
            w.end_step();
            let cap = w.window();
            st.times.push_back(Instant::now());
            while st.times.len() > cap {
                st.times.pop_front();
            }
        }
        if let Some(w) = st.ranks.as_mut() {
            for (li, &l) in layers.iter().enumerate() {
                let _ = w.record_step(l, &per_rank[li]);
            }
            w.end_step();
        }
        st.placement_steps += 1;
    }

    // ---- Admin / metrics ----------------------------------------------------------------

    /// Expert load and placement now. The counter API for metrics: cheap (O(layers · (E + W))),
    /// takes the lock briefly.
    pub fn snapshot(&self) -> LoadSnapshot {
        let st = self.lock();
        let totals = st.totals();
        let rank_totals = st.ranks.as_ref().map(LoadWindow::totals).unwrap_or_default();
        let Some(active) = st.active.as_ref() else {
            return LoadSnapshot {
                placement_version: 0,
                pending_version: None,
                world_size: 0,
                layers: Vec::new(),
                rank_tokens: Vec::new(),
                balancedness: 1.0,
                max_over_mean: 0.0,
                window_steps: 0,
                placement_steps: 0,
                window: Duration::ZERO,
                last_error: st.last_error.clone(),
            };
        };
        let w = active.world_size;
        let mut layers = Vec::new();
        let mut rank_tokens = vec![0u64; w];
        let (mut measured, mut ratio, mut n_measured) = (0.0, 0.0, 0usize);
        for lp in &active.placement.layers {
            let ranks = rank_totals.get(&lp.layer).cloned().unwrap_or_else(|| vec![0; w]);
            rank_tokens.iter_mut().zip(&ranks).for_each(|(s, &c)| *s += c);
            if ranks.iter().any(|&c| c > 0) {
                let b = balancedness(&ranks);
                measured += b;
                ratio += 1.0 / b;
                n_measured += 1;
            }
            layers.push(LayerLoadSnapshot {
                layer: lp.layer,
                tokens: totals
                    .get(&lp.layer)
                    .cloned()
                    .unwrap_or_else(|| vec![0; lp.replicas.len()]),
                replicas: lp.replicas.iter().map(|r| r.len() as u32).collect(),
                rank_tokens: ranks,
            });
        }
        let (balancedness, max_over_mean) = if n_measured > 0 {
            (measured / n_measured as f64, ratio / n_measured as f64)
        } else {
            let modelled = balance(&active.placement, w, &totals).map(|b| b.overall).unwrap_or(1.0);
            (modelled, 0.0)
        };
        LoadSnapshot {
            placement_version: active.placement.version,
            pending_version: st.pending.as_ref().map(|p| p.plan.placement.version),
            world_size: w,
            layers,
            rank_tokens,
            balancedness,
            max_over_mean,
            window_steps: st.load.as_ref().map_or(0, |l| st.times.len().min(l.window()) as u64),
            placement_steps: st.placement_steps,
            window: st.times.front().map_or(Duration::ZERO, |t| t.elapsed()),
            last_error: st.last_error.clone(),
        }
    }

    /// `experts set`: applies `req` to the placement in effect (validated first; errors name
    /// the layer/expert/count). Per-layer count vectors must have one entry per expert.
    pub fn set_replicas(&self, req: &ReplicaRequest) -> Result<ChangeSummary, ExpertsError> {
        let summary = {
            let mut st = self.lock();
            st.check_idle()?;
            let totals = st.totals();
            let active = st.active()?;
            let before = balance(&active.placement, active.world_size, &totals)?.overall;
            let change = set_replicas(active, req, &totals)?;
            let after = balance(&change.placement, active.world_size, &totals)?.overall;
            let version = change.placement.version;
            let current = active.placement.version;
            let applied = st.queue(change.placement);
            ChangeSummary {
                placement_version: if applied { version } else { current },
                moved: if applied { change.moved } else { 0 },
                dropped: if applied { change.dropped } else { 0 },
                balancedness_before: before,
                balancedness_after: if applied { after } else { before },
                applied,
            }
        };
        if summary.applied {
            self.notify.notify_one();
        }
        Ok(summary)
    }

    /// Checks per-layer count vectors (one entry per expert) and builds the request.
    pub fn explicit_request(
        &self,
        layers: &BTreeMap<usize, Vec<usize>>,
        sparse: &[(usize, usize, usize)],
    ) -> Result<ReplicaRequest, ExpertsError> {
        let st = self.lock();
        let active = st.active()?;
        let n = active.placement.n_experts;
        let mut map = BTreeMap::new();
        for (&layer, counts) in layers {
            if counts.len() != n {
                return Err(ExpertError::CountsLength { layer, got: counts.len(), want: n }.into());
            }
            map.extend(counts.iter().enumerate().map(|(e, &c)| ((layer, e), c)));
        }
        for &(layer, expert, count) in sparse {
            map.insert((layer, expert), count);
        }
        if map.is_empty() {
            return Err(ExpertsError::Request("no replica counts given".into()));
        }
        Ok(ReplicaRequest::Explicit(map))
    }

    /// `experts rebalance`: recomputes the placement from the measured load (EPLB-style, see
    /// `fathom_common::plan::rebalance`); queues it unless `dry_run` or nothing changes.
    pub fn rebalance(&self, dry_run: bool) -> Result<ChangeSummary, ExpertsError> {
        let summary = {
            let mut st = self.lock();
            st.check_idle()?;
            let totals = st.totals();
            let active = st.active()?;
            let report = rebalance(active, &totals)?;
            let current = active.placement.version;
            let change = report.change;
            let version = change.placement.version;
            let applied = !dry_run && st.queue(change.placement);
            let changes = applied || dry_run;
            ChangeSummary {
                placement_version: if applied { version } else { current },
                moved: if changes { change.moved } else { 0 },
                dropped: if changes { change.dropped } else { 0 },
                balancedness_before: report.balancedness_before,
                balancedness_after: report.balancedness_after,
                applied,
            }
        };
        if summary.applied {
            self.notify.notify_one();
        }
        Ok(summary)
    }
}

/// Adds one rank's expert counters of one step (worker.proto `StepResult`: dense
/// `expert_tokens`, or sparse `(gap, count)` pairs in `expert_token_runs` over
/// `expert_token_cells` cells) into `routed` (`[moe_layers][experts]` flattened). Returns whether
/// any token was counted; a result with neither field adds nothing. Counters of another shape, a
/// result carrying both encodings, or malformed pairs are refused whole (nothing is added).
pub(crate) fn add_step_expert_tokens(r: &StepResult, routed: &mut [u64]) -> Result<bool, String> {
    let (dense, runs) = (&r.expert_tokens, &r.expert_token_runs);
    match (dense.is_empty(), runs.is_empty()) {
        (true, true) => Ok(false),
        (false, false) => Err("both expert_tokens and expert_token_runs are set".into()),
        (false, true) => {
            if dense.len() != routed.len() {
                return Err(format!("{} dense cells, expected {}", dense.len(), routed.len()));
            }
            let mut any = false;
            for (s, &c) in routed.iter_mut().zip(dense) {
                *s += u64::from(c);
                any |= c > 0;
            }
            Ok(any)
        }
        (true, false) => {
            if r.expert_token_cells as usize != routed.len() {
                return Err(format!(
                    "expert_token_runs over {} cells, expected {}",
                    r.expert_token_cells,
                    routed.len()
                ));
            }
            if runs.len() % 2 != 0 {
                return Err(format!("expert_token_runs has odd length {}", runs.len()));
            }
            // Validate every pair before adding any.
            let mut cells = Vec::with_capacity(runs.len() / 2);
            let mut next = 0usize;
            for (pair, gc) in runs.chunks_exact(2).enumerate() {
                let index = next + gc[0] as usize;
                if index >= routed.len() || gc[1] == 0 {
                    return Err(format!(
                        "expert_token_runs pair {pair}: cell {index} count {} (cells {})",
                        gc[1],
                        routed.len()
                    ));
                }
                cells.push((index, gc[1]));
                next = index + 1;
            }
            for (index, c) in cells {
                routed[index] += u64::from(c);
            }
            Ok(true)
        }
    }
}

#[cfg(test)]
#[path = "experts_tests.rs"]
mod tests;
