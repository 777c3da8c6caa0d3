//! Building an [`ExpertPlacement`]: the even default plus redundant replicas.
//!
//! Policy, per MoE layer (deterministic; O(X·(E·R + S)) for X extra replicas, E experts,
//! R replicas per expert, S placed replicas):
//! 1. **Even default**: expert `e` on the rank whose contiguous share holds it (module doc of
//!    [`super`]).
//! 2. **Pinned counts** ([`PinnedReplicas`], from the cluster config's `pinned_replicas`): an
//!    expert pinned to `c` gets exactly `c` replicas (pinned experts by expected load, highest
//!    first); the greedy step never touches them. Not enough free slots is an error.
//! 3. **Greedy** (EPLB-like): while a rank has a free redundant slot, give one more replica to
//!    the unpinned expert with the highest expected load *per replica* (ties: lowest expert id)
//!    that some rank with a free slot does not hold yet, on the least-loaded such rank (rank
//!    load = Σ load/replicas of the experts it holds; ties: lowest rank). Without expected loads
//!    every expert counts 1.0, so extra replicas go to experts 0, 1, 2, … in turn.

use super::{ExpertPlacement, LayerPlacement, ParallelPlan, PlanError, Slot, moe_layers};
use crate::cluster::ParallelSection;
use crate::config::ModelConfig;
use crate::ids::{Epoch, Rank};
use std::collections::BTreeMap;

/// Operator-pinned replica counts (total replicas, primary included).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PinnedReplicas {
    /// expert → count, for every MoE layer (`"*:E"`).
    pub every_layer: BTreeMap<usize, usize>,
    /// (layer, expert) → count (`"L:E"`); overrides `every_layer`.
    pub per_layer: BTreeMap<(usize, usize), usize>,
}

impl PinnedReplicas {
    /// Parses the cluster config form: keys `"L:E"` (absolute layer, expert) or `"*:E"`.
    pub fn from_config(map: &BTreeMap<String, usize>) -> Result<Self, PlanError> {
        let mut out = Self::default();
        for (key, &count) in map {
            let bad = |reason: &str| PlanError::Pinned { key: key.clone(), reason: reason.into() };
            let (layer, expert) = key.split_once(':').ok_or_else(|| bad("expected L:E or *:E"))?;
            let expert: usize = expert.trim().parse().map_err(|_| bad("expert is not a number"))?;
            match layer.trim() {
                "*" => out.every_layer.insert(expert, count),
                l => {
                    let l: usize = l.parse().map_err(|_| bad("layer is not a number or *"))?;
                    out.per_layer.insert((l, expert), count)
                }
            };
        }
        Ok(out)
    }

    /// The pinned count of `expert` in `layer`, if any.
    pub fn count(&self, layer: usize, expert: usize) -> Option<usize> {
        self.per_layer.get(&(layer, expert)).or_else(|| self.every_layer.get(&expert)).copied()
    }

    /// The config key a pin of `expert` in `layer` came from (for errors).
    fn key(&self, layer: usize, expert: usize) -> String {
        if self.per_layer.contains_key(&(layer, expert)) {
            format!("{layer}:{expert}")
        } else {
            format!("*:{expert}")
        }
    }
}

/// What a plan is built from: the layout, redundancy settings and (optionally) measured load.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanSpec {
    pub epoch: Epoch,
    pub world_size: usize,
    pub tp: usize,
    pub redundant_slots_per_rank: usize,
    pub pinned: PinnedReplicas,
    /// Expected tokens per expert, by absolute MoE layer; layers not listed count as uniform.
    pub expected_load: BTreeMap<usize, Vec<f64>>,
    pub placement_version: u64,
}

impl PlanSpec {
    /// W ranks in groups of T, no redundancy.
    pub fn new(epoch: Epoch, world_size: usize, tp: usize) -> Self {
        Self {
            epoch,
            world_size,
            tp,
            redundant_slots_per_rank: 0,
            pinned: PinnedReplicas::default(),
            expected_load: BTreeMap::new(),
            placement_version: 0,
        }
    }

    /// From the cluster config's `[parallel]` section.
    pub fn from_cluster(p: &ParallelSection, epoch: Epoch) -> Result<Self, PlanError> {
        Ok(Self {
            redundant_slots_per_rank: p.redundant_slots_per_rank,
            pinned: PinnedReplicas::from_config(&p.pinned_replicas)?,
            ..Self::new(epoch, p.world_size, p.tp)
        })
    }
}

pub(super) fn build(spec: &PlanSpec, model: &ModelConfig) -> Result<ParallelPlan, PlanError> {
    let (w, t, e_count) = (spec.world_size, spec.tp, model.n_routed_experts);
    if w == 0 {
        return Err(PlanError::EmptyWorld);
    }
    for (what, value) in [("world_size", w), ("heads", model.num_attention_heads)] {
        if t == 0 || value % t != 0 {
            return Err(PlanError::TpDoesNotDivide { tp: t, what, value });
        }
    }
    let layers = moe_layers(model);
    check_inputs(spec, &layers, e_count)?;
    let placement = ExpertPlacement {
        version: spec.placement_version,
        n_experts: e_count,
        redundant_slots_per_rank: spec.redundant_slots_per_rank,
        slots_per_rank: e_count.div_ceil(w) + spec.redundant_slots_per_rank,
        layers: layers.iter().map(|&l| place_layer(spec, l, e_count)).collect::<Result<_, _>>()?,
    };
    let plan = ParallelPlan {
        epoch: spec.epoch,
        world_size: w,
        tp: t,
        num_heads: model.num_attention_heads,
        placement,
    };
    plan.validate_for(model)?;
    Ok(plan)
}

fn check_inputs(spec: &PlanSpec, layers: &[usize], e_count: usize) -> Result<(), PlanError> {
    let pins = spec.pinned.every_layer.iter().map(|(&e, &c)| (None, e, c));
    let pins = pins.chain(spec.pinned.per_layer.iter().map(|(&(l, e), &c)| (Some(l), e, c)));
    for (layer, expert, count) in pins {
        let key = match layer {
            Some(l) => format!("{l}:{expert}"),
            None => format!("*:{expert}"),
        };
        let bad = |reason: String| Err(PlanError::Pinned { key: key.clone(), reason });
        if expert >= e_count {
            return bad(format!("expert {expert} does not exist (the model has {e_count})"));
        }
        if layer.is_some_and(|l| !layers.contains(&l)) {
            return bad(format!("layer is not a MoE layer (those are {layers:?})"));
        }
        if count == 0 || count > spec.world_size {
            return bad(format!(
                "{count} replicas: must be 1..={} (no rank holds two replicas)",
                spec.world_size
            ));
        }
    }
    for (&layer, loads) in &spec.expected_load {
        let bad = |reason: String| Err(PlanError::ExpectedLoad { layer, reason });
        if !layers.contains(&layer) {
            return bad(format!("not a MoE layer (those are {layers:?})"));
        }
        if loads.len() != e_count {
            return bad(format!("{} values for {e_count} experts", loads.len()));
        }
        if let Some((e, x)) = loads.iter().enumerate().find(|(_, x)| !x.is_finite() || **x < 0.0) {
            return bad(format!("expert {e} has load {x}; loads must be finite and >= 0"));
        }
    }
    Ok(())
}

/// One layer: even default, then pinned replicas, then greedy redundant replicas.
fn place_layer(spec: &PlanSpec, layer: usize, e_count: usize) -> Result<LayerPlacement, PlanError> {
    let w = spec.world_size;
    let uniform;
    let load: &[f64] = match spec.expected_load.get(&layer) {
        Some(l) => l,
        None => {
            uniform = vec![1.0; e_count];
            &uniform
        }
    };
    let mut st = LayerState {
        replicas: vec![Vec::new(); e_count],
        next_slot: vec![0; w],
        free_extra: vec![spec.redundant_slots_per_rank; w],
    };
    for r in 0..w {
        for e in ParallelPlan::even_share(e_count, w, r) {
            st.replicas[e].push(Slot { rank: Rank(r as u32), slot: st.next_slot[r] });
            st.next_slot[r] += 1;
        }
    }
    // Pinned experts, hottest first.
    let mut pinned: Vec<(usize, usize)> =
        (0..e_count).filter_map(|e| spec.pinned.count(layer, e).map(|c| (e, c))).collect();
    pinned.sort_by(|a, b| load[b.0].total_cmp(&load[a.0]).then(a.0.cmp(&b.0)));
    for &(e, count) in &pinned {
        while st.replicas[e].len() < count {
            if !st.add_replica(e, load) {
                return Err(PlanError::Pinned {
                    key: spec.pinned.key(layer, e),
                    reason: format!(
                        "layer {layer}: expert {e} needs {count} replicas but only {} fit \
                         (raise redundant_slots_per_rank)",
                        st.replicas[e].len()
                    ),
                });
            }
        }
    }
    // Greedy for the rest.
    loop {
        let free: Vec<usize> = (0..w).filter(|&r| st.free_extra[r] > 0).collect();
        let best = (0..e_count)
            .filter(|&e| spec.pinned.count(layer, e).is_none() && st.fits(e, &free))
            .max_by(|&a, &b| {
                let per = |e: usize| load[e] / st.replicas[e].len() as f64;
                per(a).total_cmp(&per(b)).then(b.cmp(&a)) // ties: lowest id wins
            });
        match best {
            Some(e) => {
                st.add_replica(e, load);
            }
            None => break,
        }
    }
    Ok(LayerPlacement { layer, replicas: st.replicas })
}

struct LayerState {
    replicas: Vec<Vec<Slot>>,
    next_slot: Vec<u32>,
    free_extra: Vec<usize>,
}

impl LayerState {
    fn holds(&self, e: usize, r: usize) -> bool {
        self.replicas[e].iter().any(|s| s.rank.0 as usize == r)
    }

    /// Some rank in `free` does not hold `e` yet.
    fn fits(&self, e: usize, free: &[usize]) -> bool {
        free.iter().any(|&r| !self.holds(e, r))
    }

    /// Adds a replica of `e` on the least-loaded rank with a free slot that lacks it.
    fn add_replica(&mut self, e: usize, load: &[f64]) -> bool {
        let mut rank_load = vec![0f64; self.next_slot.len()];
        for (x, reps) in self.replicas.iter().enumerate() {
            for s in reps {
                rank_load[s.rank.0 as usize] += load[x] / reps.len() as f64;
            }
        }
        let target = (0..rank_load.len())
            .filter(|&r| self.free_extra[r] > 0 && !self.holds(e, r))
            .min_by(|&a, &b| rank_load[a].total_cmp(&rank_load[b]).then(a.cmp(&b)));
        let Some(r) = target else { return false };
        self.replicas[e].push(Slot { rank: Rank(r as u32), slot: self.next_slot[r] });
        self.next_slot[r] += 1;
        self.free_extra[r] -= 1;
        true
    }
}
