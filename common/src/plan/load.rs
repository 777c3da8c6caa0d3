//! Expert load statistics: tokens per logical expert over a sliding window of steps, and how
//! that load lands on the ranks under a given [`ExpertPlacement`].
//!
//! Owns: [`LoadWindow`] (a ring of per-step count vectors, one slot per step of the window,
//! each `layers × experts` counters, plus running totals), the per-rank split of an expert's
//! tokens over its replicas ([`replica_share`]: the deterministic replica choice sends token
//! `i` to replica `i mod n`, so replica `j` of an expert with `c` tokens gets `⌈c/n⌉` if
//! `j < c mod n` else `⌊c/n⌋`), per-rank load ([`rank_loads`]) and balancedness
//! ([`balance`]: mean/max per-rank load, 1.0 = perfect; overall = mean over layers, as the
//! Admin `ExpertLoad` response defines it). Also the error type of the expert admin core
//! ([`ExpertError`]), shared with [`super::rebalance`].
//!
//! Does not own: collecting counts from workers (runtime), wall-clock windows (the runtime maps
//! milliseconds to steps), choosing placements ([`super::rebalance`]).
//!
//! Invariants: `totals()` always equals the sum of the ring slots (the open step and the last
//! `window - 1` closed ones); memory is `window · layers · experts` counters, fixed at creation.

use super::{ExpertPlacement, LayerPlacement, PlanError};
use std::collections::BTreeMap;

/// Tokens per logical expert, by absolute MoE layer (`layer → counts[expert]`).
pub type LayerCounts = BTreeMap<usize, Vec<u64>>;

/// Why a load, replica-count or rebalance request was refused. Every variant names the layer,
/// expert or count that was wrong; the Admin service maps them to `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExpertError {
    #[error("layer {layer} is not a MoE layer of the placement (those are {moe_layers:?})")]
    UnknownLayer { layer: usize, moe_layers: Vec<usize> },
    #[error("layer {layer}: expert {expert} does not exist (the model has {n_experts} experts)")]
    UnknownExpert { layer: usize, expert: usize, n_experts: usize },
    #[error("layer {layer}: {got} expert counts given, the model has {want} experts")]
    CountsLength { layer: usize, got: usize, want: usize },
    #[error("the load window must hold at least one step")]
    ZeroWindow,
    #[error("layer {layer}: expert {expert} would have zero replicas (every expert needs >= 1)")]
    ZeroReplicas { layer: usize, expert: usize },
    #[error(
        "layer {layer}: expert {expert} asks for {count} replicas, more than the {world} ranks \
         (no rank holds two replicas of one expert)"
    )]
    MoreReplicasThanRanks { layer: usize, expert: usize, count: usize, world: usize },
    #[error(
        "layer {layer}: {needed} replicas do not fit in the {available} expert slots of the world \
         (raise redundant_slots_per_rank)"
    )]
    NotEnoughSlots { layer: usize, needed: usize, available: usize },
    #[error(
        "layer {layer}: no layout places {count} replicas of expert {expert} on distinct ranks \
         with free slots"
    )]
    Unplaceable { layer: usize, expert: usize, count: usize },
    #[error("the current plan is not valid: {0}")]
    InvalidPlan(#[from] PlanError),
}

/// Sliding window of expert token counts: a ring of `window` steps.
///
/// Per step, call [`record_step`](Self::record_step) once per MoE layer (counts of that step,
/// added to the open step), then [`end_step`](Self::end_step) to close it: the oldest step
/// falls out once the window is full.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadWindow {
    layers: Vec<usize>,
    n_experts: usize,
    /// `ring[slot][li * n_experts + e]`.
    ring: Vec<Vec<u64>>,
    /// The open step's slot.
    head: usize,
    /// Steps in the window, the open one included (1..=window).
    steps: usize,
    totals: Vec<u64>,
}

impl LoadWindow {
    /// A window of `window_steps` steps over the absolute MoE layers `layers`.
    pub fn new(
        layers: Vec<usize>,
        n_experts: usize,
        window_steps: usize,
    ) -> Result<Self, ExpertError> {
        if window_steps == 0 {
            return Err(ExpertError::ZeroWindow);
        }
        let cells = layers.len() * n_experts;
        Ok(Self {
            layers,
            n_experts,
            ring: vec![vec![0; cells]; window_steps],
            head: 0,
            steps: 1,
            totals: vec![0; cells],
        })
    }

    /// A window over the MoE layers and experts of `placement`.
    pub fn for_placement(p: &ExpertPlacement, window_steps: usize) -> Result<Self, ExpertError> {
        Self::new(p.layers.iter().map(|l| l.layer).collect(), p.n_experts, window_steps)
    }

    /// The window length in steps.
    pub fn window(&self) -> usize {
        self.ring.len()
    }

    /// Steps the totals cover now, the open one included (`1..=window`).
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Adds `counts[e]` (tokens routed to expert `e` in `layer`) to the open step.
    pub fn record_step(&mut self, layer: usize, counts: &[u64]) -> Result<(), ExpertError> {
        let li =
            self.layers.iter().position(|&l| l == layer).ok_or_else(|| {
                ExpertError::UnknownLayer { layer, moe_layers: self.layers.clone() }
            })?;
        if counts.len() != self.n_experts {
            return Err(ExpertError::CountsLength {
                layer,
                got: counts.len(),
                want: self.n_experts,
            });
        }
        let range = li * self.n_experts..(li + 1) * self.n_experts;
        let slot = &mut self.ring[self.head][range.clone()];
        for ((s, t), &c) in slot.iter_mut().zip(&mut self.totals[range]).zip(counts) {
            // Saturating: absurd counts must not panic; `t >= s` still holds.
            *s = s.saturating_add(c);
            *t = t.saturating_add(c);
        }
        Ok(())
    }

    /// Closes the open step; the oldest step leaves the totals once the window is full.
    pub fn end_step(&mut self) {
        self.head = (self.head + 1) % self.ring.len();
        let old = &mut self.ring[self.head];
        for (t, o) in self.totals.iter_mut().zip(old.iter_mut()) {
            *t -= *o;
            *o = 0;
        }
        self.steps = (self.steps + 1).min(self.ring.len());
    }

    /// Forgets every step (after a placement change, say).
    pub fn reset(&mut self) {
        self.ring.iter_mut().for_each(|s| s.fill(0));
        self.totals.fill(0);
        self.head = 0;
        self.steps = 1;
    }

    /// Tokens per expert over the window, by layer.
    pub fn totals(&self) -> LayerCounts {
        self.layers
            .iter()
            .enumerate()
            .map(|(li, &l)| {
                (l, self.totals[li * self.n_experts..(li + 1) * self.n_experts].to_vec())
            })
            .collect()
    }
}

/// Tokens that replica `j` (0-based, list order) of an expert with `count` tokens and `n`
/// replicas receives under the replica choice `token mod n`.
pub fn replica_share(count: u64, n: usize, j: usize) -> u64 {
    let n = n.max(1) as u64;
    count / n + u64::from((j as u64) < count % n)
}

/// Tokens each of `world` ranks processes in one layer: every expert's `counts[e]` split over
/// its replicas by [`replica_share`].
pub fn rank_loads(
    layer: &LayerPlacement,
    world: usize,
    counts: &[u64],
) -> Result<Vec<u64>, ExpertError> {
    if counts.len() != layer.replicas.len() {
        return Err(ExpertError::CountsLength {
            layer: layer.layer,
            got: counts.len(),
            want: layer.replicas.len(),
        });
    }
    let mut out = vec![0u64; world];
    for (expert, (reps, &c)) in layer.replicas.iter().zip(counts).enumerate() {
        if reps.is_empty() {
            return Err(PlanError::NoReplica { layer: layer.layer, expert }.into());
        }
        for (j, s) in reps.iter().enumerate() {
            let r = s.rank.0 as usize;
            let slot = out.get_mut(r).ok_or(PlanError::RankOutOfRange {
                layer: layer.layer,
                expert,
                rank: s.rank.0,
                world,
            })?;
            *slot = slot.saturating_add(replica_share(c, reps.len(), j));
        }
    }
    Ok(out)
}

/// Mean over max of per-rank loads: 1.0 is perfect balance (also for no load at all).
pub fn balancedness(rank_loads: &[u64]) -> f64 {
    let max = rank_loads.iter().copied().max().unwrap_or(0);
    if max == 0 {
        return 1.0;
    }
    let mean = rank_loads.iter().map(|&x| x as f64).sum::<f64>() / rank_loads.len() as f64;
    mean / max as f64
}

/// Balancedness of measured load under one placement.
#[derive(Debug, Clone, PartialEq)]
pub struct Balance {
    /// Per MoE layer with counts: mean/max per-rank load.
    pub per_layer: BTreeMap<usize, f64>,
    /// Mean of `per_layer` (1.0 when no layer has counts).
    pub overall: f64,
}

/// Balancedness of `counts` under `placement` on `world` ranks. Layers absent from `counts` are
/// left out; a layer in `counts` that the placement lacks is an error.
pub fn balance(
    placement: &ExpertPlacement,
    world: usize,
    counts: &LayerCounts,
) -> Result<Balance, ExpertError> {
    let mut per_layer = BTreeMap::new();
    for (&layer, c) in counts {
        let lp = find_layer(placement, layer)?;
        per_layer.insert(layer, balancedness(&rank_loads(lp, world, c)?));
    }
    let overall = if per_layer.is_empty() {
        1.0
    } else {
        per_layer.values().sum::<f64>() / per_layer.len() as f64
    };
    Ok(Balance { per_layer, overall })
}

/// The placement of absolute layer `layer`, or [`ExpertError::UnknownLayer`].
pub(super) fn find_layer(
    p: &ExpertPlacement,
    layer: usize,
) -> Result<&LayerPlacement, ExpertError> {
    p.layers.iter().find(|l| l.layer == layer).ok_or_else(|| ExpertError::UnknownLayer {
        layer,
        moe_layers: p.layers.iter().map(|l| l.layer).collect(),
    })
}
