//! Changing an [`ExpertPlacement`] while serving: operator-set replica counts
//! ([`set_replicas`]) and EPLB-style rebalancing from measured load ([`rebalance`]).
//!
//! Owns: the choice of replica counts and of the ranks that hold them, the slot numbering of
//! the new placement (a replica that stays on its rank keeps its slot; new ones take the
//! rank's lowest free slot), and counting the weights that must move. Pure and deterministic
//! (ties: lower expert id, lower rank). Does not own: measuring load ([`super::load`]),
//! writing the new plan epoch or switching at a step boundary (cluster runtime).
//!
//! Algorithm per MoE layer (docs/experts.md has the reasoning and complexity):
//! 1. **Counts**: every expert starts at 1 replica; each free slot (`Σ capacity − E`) goes in
//!    turn to the expert with the highest load per replica that has fewer than W replicas
//!    (rebalance stops when that load is 0: an idle expert needs no extra copy).
//! 2. **Placement**: replicas by load per replica, highest first (LPT), each on the least
//!    loaded rank with a free slot that does not hold that expert; if LPT gets stuck, a
//!    feasibility-first fill (most replicas first, onto ranks with most free slots). Then a
//!    local-improvement pass moves or swaps replicas off the most loaded rank while that
//!    lowers it. A second, *sticky* LPT run prefers a rank that already holds the expert when
//!    that keeps the rank under the first run's maximum; it wins when its maximum is no worse
//!    and it moves no more replicas. Finally the ranks of the result are relabelled (a
//!    permutation changes no rank's load) so each new rank set lands on the old rank sharing
//!    most experts with it.
//! 3. **Never worse**: a rebalanced layer whose measured max rank load (integer split of
//!    [`super::load::rank_loads`]) is not below the current one keeps its current placement.
//!
//! [`set_replicas`] keeps every replica it can (the first `count` of each expert, primary
//! first) and adds missing ones on the least loaded rank with a free slot that lacks the
//! expert; only if that gets stuck does it re-place the layer as above.
//!
//! Invariants of every result (checked by [`ParallelPlan::validate`] in the tests): every
//! expert has ≥ 1 replica, no rank holds two replicas of one expert, each rank holds at most
//! its capacity (even share + redundant slots), slots are unique and below `slots_per_rank`;
//! the version is the old one + 1.

use super::load::{ExpertError, LayerCounts, balance, find_layer, rank_loads};
use super::{ExpertPlacement, LayerPlacement, ParallelPlan, Slot};
use crate::ids::Rank;
use std::collections::BTreeMap;

/// What an operator asks `experts set` for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaRequest {
    /// `(layer, expert) → total replicas` (primary included); unlisted experts keep theirs.
    Explicit(BTreeMap<(usize, usize), usize>),
    /// N extra replicas per layer beyond one each, given by the automatic policy to the
    /// experts with the highest measured load per replica (uniform load where none measured).
    Redundant(usize),
}

impl ReplicaRequest {
    /// From the Admin form: per layer, the replica count of every expert (index = expert id).
    pub fn from_layer_counts(layers: &BTreeMap<usize, Vec<usize>>) -> Self {
        Self::Explicit(
            layers
                .iter()
                .flat_map(|(&l, counts)| counts.iter().enumerate().map(move |(e, &c)| ((l, e), c)))
                .collect(),
        )
    }
}

/// A new placement and what it costs to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementChange {
    /// The new placement, `version` = old + 1; apply it at a step boundary.
    pub placement: ExpertPlacement,
    /// Replicas on a rank that did not hold that expert before: expert weights to load.
    pub moved: usize,
    /// Replicas removed from a rank: weights that may be freed.
    pub dropped: usize,
    /// `moved` per MoE layer (every layer listed).
    pub moved_per_layer: BTreeMap<usize, usize>,
}

/// Result of [`rebalance`].
#[derive(Debug, Clone, PartialEq)]
pub struct RebalanceReport {
    pub change: PlacementChange,
    /// Overall balancedness (mean over the measured layers of mean/max rank load) of the
    /// measured load under the old and the new placement.
    pub balancedness_before: f64,
    pub balancedness_after: f64,
}

/// Applies an operator's replica counts to `plan`'s placement, moving as few replicas as
/// possible. `load` (may be empty) weighs experts for [`ReplicaRequest::Redundant`] and for
/// where new replicas go.
pub fn set_replicas(
    plan: &ParallelPlan,
    req: &ReplicaRequest,
    load: &LayerCounts,
) -> Result<PlacementChange, ExpertError> {
    plan.validate()?;
    check_load(&plan.placement, load)?;
    let p = &plan.placement;
    let (e_count, world) = (p.n_experts, plan.world_size);
    let available = e_count + world * p.redundant_slots_per_rank;
    if let ReplicaRequest::Explicit(map) = req {
        for (&(layer, expert), &count) in map {
            find_layer(p, layer)?;
            if expert >= e_count {
                return Err(ExpertError::UnknownExpert { layer, expert, n_experts: e_count });
            }
            if count == 0 {
                return Err(ExpertError::ZeroReplicas { layer, expert });
            }
            if count > world {
                return Err(ExpertError::MoreReplicasThanRanks { layer, expert, count, world });
            }
        }
    }
    let mut layers = Vec::with_capacity(p.layers.len());
    for old in &p.layers {
        let layer = old.layer;
        let weights = weights_of(load.get(&layer), e_count);
        let counts: Vec<usize> = match req {
            ReplicaRequest::Explicit(map) => {
                if !map.keys().any(|&(l, _)| l == layer) {
                    layers.push(old.clone());
                    continue;
                }
                (0..e_count)
                    .map(|e| map.get(&(layer, e)).copied().unwrap_or(old.replicas[e].len()))
                    .collect()
            }
            ReplicaRequest::Redundant(n) => {
                let mut counts = vec![1; e_count];
                let given = grow_counts(&mut counts, &weights, world, *n, true);
                if given < *n || e_count + n > available {
                    return Err(ExpertError::NotEnoughSlots {
                        layer,
                        needed: e_count + n,
                        available: available.min(e_count + given),
                    });
                }
                counts
            }
        };
        let needed: usize = counts.iter().sum();
        if needed > available {
            return Err(ExpertError::NotEnoughSlots { layer, needed, available });
        }
        let ctx = Ctx::new(plan, old);
        let per: Vec<f64> = weights.iter().zip(&counts).map(|(&w, &c)| w / c as f64).collect();
        let assign = match place_minimal(&ctx, &counts, &per) {
            Some(a) => a,
            None => place_full(&ctx, &counts, &per)?,
        };
        layers.push(ctx.to_layer(&assign));
    }
    Ok(change(p, layers))
}

/// Recomputes the placement of every layer that has measured load (others are kept) to
/// minimise the most loaded rank, within the slots every rank has. See the module doc.
pub fn rebalance(plan: &ParallelPlan, load: &LayerCounts) -> Result<RebalanceReport, ExpertError> {
    plan.validate()?;
    check_load(&plan.placement, load)?;
    let p = &plan.placement;
    let (e_count, world) = (p.n_experts, plan.world_size);
    let mut layers = Vec::with_capacity(p.layers.len());
    for old in &p.layers {
        let Some(measured) = load.get(&old.layer) else {
            layers.push(old.clone());
            continue;
        };
        let ctx = Ctx::new(plan, old);
        let weights: Vec<f64> = measured.iter().map(|&c| c as f64).collect();
        let mut counts = vec![1; e_count];
        let free = ctx.cap.iter().sum::<usize>() - e_count;
        grow_counts(&mut counts, &weights, world, free, false);
        let per: Vec<f64> = weights.iter().zip(&counts).map(|(&w, &c)| w / c as f64).collect();
        let new = ctx.to_layer(&place_full(&ctx, &counts, &per)?);
        let max = |l: &LayerPlacement| rank_loads(l, world, measured).map(|v| v.into_iter().max());
        layers.push(if max(&new)? < max(old)? { new } else { old.clone() });
    }
    let change = change(p, layers);
    Ok(RebalanceReport {
        balancedness_before: balance(p, world, load)?.overall,
        balancedness_after: balance(&change.placement, world, load)?.overall,
        change,
    })
}

fn check_load(p: &ExpertPlacement, load: &LayerCounts) -> Result<(), ExpertError> {
    for (&layer, counts) in load {
        find_layer(p, layer)?;
        if counts.len() != p.n_experts {
            return Err(ExpertError::CountsLength { layer, got: counts.len(), want: p.n_experts });
        }
    }
    Ok(())
}

fn weights_of(load: Option<&Vec<u64>>, e_count: usize) -> Vec<f64> {
    match load {
        Some(l) => l.iter().map(|&c| c as f64).collect(),
        None => vec![1.0; e_count],
    }
}

/// Gives up to `budget` extra replicas, one at a time, to the expert with the highest
/// `load / replicas` below `world` replicas (ties: lowest id). Experts with zero load get
/// extras only if `idle_too`. Returns how many were given.
fn grow_counts(
    counts: &mut [usize],
    load: &[f64],
    world: usize,
    budget: usize,
    idle_too: bool,
) -> usize {
    for given in 0..budget {
        let best = (0..counts.len())
            .filter(|&e| counts[e] < world && (idle_too || load[e] > 0.0))
            .max_by(|&a, &b| {
                let per = |e: usize| load[e] / counts[e] as f64;
                per(a).total_cmp(&per(b)).then(b.cmp(&a))
            });
        match best {
            Some(e) => counts[e] += 1,
            None => return given,
        }
    }
    budget
}

/// `assign[e]`: the ranks holding expert `e`, in replica order.
type Assign = Vec<Vec<usize>>;

/// One layer being re-placed.
struct Ctx<'a> {
    world: usize,
    /// Replicas each rank may hold: even share + redundant slots.
    cap: Vec<usize>,
    slots_per_rank: usize,
    old: &'a LayerPlacement,
}

impl<'a> Ctx<'a> {
    fn new(plan: &ParallelPlan, old: &'a LayerPlacement) -> Self {
        let p = &plan.placement;
        let w = plan.world_size;
        let cap = (0..w)
            .map(|r| ParallelPlan::even_share(p.n_experts, w, r).len() + p.redundant_slots_per_rank)
            .collect();
        Self { world: w, cap, slots_per_rank: p.slots_per_rank, old }
    }

    fn old_ranks(&self) -> Assign {
        self.old.replicas.iter().map(|r| r.iter().map(|s| s.rank.0 as usize).collect()).collect()
    }

    /// Replicas of `assign` on a rank that did not hold that expert before.
    fn moves(&self, assign: &Assign) -> usize {
        let old = self.old_ranks();
        assign.iter().zip(&old).map(|(n, o)| n.iter().filter(|r| !o.contains(r)).count()).sum()
    }

    /// Numbers the slots of `assign`: kept replicas keep theirs, new ones take the lowest free.
    fn to_layer(&self, assign: &Assign) -> LayerPlacement {
        let mut used = vec![vec![false; self.slots_per_rank]; self.world];
        let mut replicas: Vec<Vec<Slot>> = Vec::with_capacity(assign.len());
        for (e, ranks) in assign.iter().enumerate() {
            let kept: Vec<Slot> = self.old.replicas[e]
                .iter()
                .filter(|s| ranks.contains(&(s.rank.0 as usize)))
                .copied()
                .collect();
            for s in &kept {
                used[s.rank.0 as usize][s.slot as usize] = true;
            }
            replicas.push(kept);
        }
        for (e, ranks) in assign.iter().enumerate() {
            let mut new: Vec<usize> = ranks
                .iter()
                .copied()
                .filter(|&r| !replicas[e].iter().any(|s| s.rank.0 as usize == r))
                .collect();
            new.sort_unstable();
            for r in new {
                // Capacity <= slots_per_rank, so a free slot exists.
                let slot = used[r].iter().position(|u| !u).unwrap_or(self.slots_per_rank);
                if let Some(u) = used[r].get_mut(slot) {
                    *u = true;
                }
                replicas[e].push(Slot { rank: Rank(r as u32), slot: slot as u32 });
            }
        }
        LayerPlacement { layer: self.old.layer, replicas }
    }
}

/// Per-rank load (sum of load per replica) and replica count of `assign`.
fn loads_of(world: usize, assign: &Assign, per: &[f64]) -> (Vec<f64>, Vec<usize>) {
    let (mut load, mut held) = (vec![0f64; world], vec![0usize; world]);
    for (e, ranks) in assign.iter().enumerate() {
        for &r in ranks {
            load[r] += per[e];
            held[r] += 1;
        }
    }
    (load, held)
}

fn max_load(world: usize, assign: &Assign, per: &[f64]) -> f64 {
    loads_of(world, assign, per).0.into_iter().fold(0.0, f64::max)
}

/// Experts by load per replica, highest first (ties: lowest id).
fn lpt_order(per: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..per.len()).collect();
    order.sort_by(|&a, &b| per[b].total_cmp(&per[a]).then(a.cmp(&b)));
    order
}

/// Keeps up to `counts[e]` of each expert's current replicas, then adds the missing ones on
/// the least loaded rank with a free slot lacking the expert. `None` when stuck.
fn place_minimal(ctx: &Ctx, counts: &[usize], per: &[f64]) -> Option<Assign> {
    let mut assign: Assign = ctx.old_ranks();
    for (ranks, &c) in assign.iter_mut().zip(counts) {
        ranks.truncate(c);
    }
    let (mut load, mut held) = loads_of(ctx.world, &assign, per);
    for e in lpt_order(per) {
        while assign[e].len() < counts[e] {
            let r = (0..ctx.world)
                .filter(|&r| held[r] < ctx.cap[r] && !assign[e].contains(&r))
                .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))?;
            assign[e].push(r);
            load[r] += per[e];
            held[r] += 1;
        }
    }
    Some(assign)
}

/// LPT, optionally preferring a rank in `sticky.0[e]` that stays within `sticky.1`.
fn lpt(ctx: &Ctx, counts: &[usize], per: &[f64], sticky: Option<(&Assign, f64)>) -> Option<Assign> {
    let mut assign: Assign = vec![Vec::new(); counts.len()];
    let (mut load, mut held) = (vec![0f64; ctx.world], vec![0usize; ctx.world]);
    for e in lpt_order(per) {
        for _ in 0..counts[e] {
            let free = |r: &usize| held[*r] < ctx.cap[*r] && !assign[e].contains(r);
            let least = |a: &usize, b: &usize| load[*a].total_cmp(&load[*b]).then(a.cmp(b));
            let kept = sticky.and_then(|(old, bound)| {
                let tol = 1e-9 * bound.max(1.0);
                old[e]
                    .iter()
                    .filter(|r| free(r) && load[**r] + per[e] <= bound + tol)
                    .min_by(|a, b| least(a, b))
                    .copied()
            });
            let r = kept.or_else(|| (0..ctx.world).filter(free).min_by(least))?;
            assign[e].push(r);
            load[r] += per[e];
            held[r] += 1;
        }
    }
    Some(assign)
}

/// Feasibility first: experts with most replicas first, each on the ranks with most free
/// slots (ties: lower rank). Fails only with the expert that found too few ranks.
fn fill(ctx: &Ctx, counts: &[usize]) -> Result<Assign, (usize, usize)> {
    let mut assign: Assign = vec![Vec::new(); counts.len()];
    let mut free = ctx.cap.clone();
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    for e in order {
        let mut ranks: Vec<usize> = (0..ctx.world).filter(|&r| free[r] > 0).collect();
        if ranks.len() < counts[e] {
            return Err((e, counts[e]));
        }
        ranks.sort_by(|&a, &b| free[b].cmp(&free[a]).then(a.cmp(&b)));
        for &r in &ranks[..counts[e]] {
            free[r] -= 1;
            assign[e].push(r);
        }
    }
    Ok(assign)
}

/// Moves or swaps replicas off the most loaded rank while that strictly lowers it and the
/// other rank stays below the old maximum (the sorted load vector decreases, so it ends).
fn improve(ctx: &Ctx, assign: &mut Assign, per: &[f64]) {
    let w = ctx.world;
    let (mut load, _) = loads_of(w, assign, per);
    let mut on: Vec<Vec<usize>> = vec![Vec::new(); w];
    for (e, ranks) in assign.iter().enumerate() {
        for &r in ranks {
            on[r].push(e);
        }
    }
    let limit = 4 * assign.iter().map(Vec::len).sum::<usize>() + 16;
    for _ in 0..limit {
        let hot = (0..w).max_by(|&a, &b| load[a].total_cmp(&load[b]).then(b.cmp(&a))).unwrap_or(0);
        let cur = load[hot];
        let mut best: Option<(f64, usize, usize, Option<usize>)> = None;
        let mut consider = |new: f64, e, s, f| {
            if new < cur - 1e-9 * cur.max(1.0) && best.is_none_or(|b| new < b.0) {
                best = Some((new, e, s, f));
            }
        };
        for &e in &on[hot] {
            for s in (0..w).filter(|&s| s != hot && !assign[e].contains(&s)) {
                if on[s].len() < ctx.cap[s] {
                    consider((cur - per[e]).max(load[s] + per[e]), e, s, None);
                }
                for &f in on[s].iter().filter(|&&f| per[f] < per[e] && !assign[f].contains(&hot)) {
                    let new = (cur - per[e] + per[f]).max(load[s] - per[f] + per[e]);
                    consider(new, e, s, Some(f));
                }
            }
        }
        let Some((_, e, s, f)) = best else { break };
        relocate(assign, &mut on, e, hot, s);
        load[hot] -= per[e];
        load[s] += per[e];
        if let Some(f) = f {
            relocate(assign, &mut on, f, s, hot);
            load[s] -= per[f];
            load[hot] += per[f];
        }
    }
}

fn relocate(assign: &mut Assign, on: &mut [Vec<usize>], e: usize, from: usize, to: usize) {
    if let Some(r) = assign[e].iter_mut().find(|r| **r == from) {
        *r = to;
    }
    on[from].retain(|&x| x != e);
    on[to].push(e);
}

/// LPT (or the feasibility fill) + improvement; the sticky variant when it is no worse and
/// moves fewer replicas; then ranks relabelled to keep as many replicas in place as possible.
fn place_full(ctx: &Ctx, counts: &[usize], per: &[f64]) -> Result<Assign, ExpertError> {
    let mut a = match lpt(ctx, counts, per, None) {
        Some(a) => a,
        None => fill(ctx, counts).map_err(|(expert, count)| ExpertError::Unplaceable {
            layer: ctx.old.layer,
            expert,
            count,
        })?,
    };
    improve(ctx, &mut a, per);
    let a = relabel(ctx, a);
    let bound = max_load(ctx.world, &a, per);
    if let Some(mut b) = lpt(ctx, counts, per, Some((&ctx.old_ranks(), bound))) {
        improve(ctx, &mut b, per);
        let b = relabel(ctx, b);
        if max_load(ctx.world, &b, per) <= bound + 1e-9 * bound.max(1.0)
            && ctx.moves(&b) <= ctx.moves(&a)
        {
            return Ok(b);
        }
    }
    Ok(a)
}

/// Renames the ranks of `assign` (which only permutes rank loads) so that each new rank set
/// lands on the old rank sharing most experts with it (greedy, ties: lower ids), within
/// capacity. Returns `assign` unchanged if the greedy matching strands a set.
fn relabel(ctx: &Ctx, assign: Assign) -> Assign {
    let w = ctx.world;
    let mut sets: Vec<Vec<usize>> = vec![Vec::new(); w];
    for (e, ranks) in assign.iter().enumerate() {
        for &r in ranks {
            sets[r].push(e);
        }
    }
    let old = ctx.old_ranks();
    let mut pairs: Vec<(usize, usize, usize)> = Vec::with_capacity(w * w);
    for (i, set) in sets.iter().enumerate() {
        for r in 0..w {
            pairs.push((set.iter().filter(|&&e| old[e].contains(&r)).count(), i, r));
        }
    }
    pairs.sort_by(|x, y| y.0.cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let (mut to, mut taken) = (vec![usize::MAX; w], vec![false; w]);
    for (_, i, r) in pairs {
        if to[i] == usize::MAX && !taken[r] && sets[i].len() <= ctx.cap[r] {
            to[i] = r;
            taken[r] = true;
        }
    }
    if to.contains(&usize::MAX) {
        return assign;
    }
    assign.into_iter().map(|ranks| ranks.into_iter().map(|r| to[r]).collect()).collect()
}

/// The placement of `layers` with version + 1, and the replicas it moves and drops.
fn change(old: &ExpertPlacement, layers: Vec<LayerPlacement>) -> PlacementChange {
    let (mut moved, mut dropped) = (0, 0);
    let mut moved_per_layer = BTreeMap::new();
    for (o, n) in old.layers.iter().zip(&layers) {
        let mut m = 0;
        for (or, nr) in o.replicas.iter().zip(&n.replicas) {
            m += nr.iter().filter(|s| !or.iter().any(|x| x.rank == s.rank)).count();
            dropped += or.iter().filter(|s| !nr.iter().any(|x| x.rank == s.rank)).count();
        }
        moved += m;
        moved_per_layer.insert(o.layer, m);
    }
    PlacementChange {
        placement: ExpertPlacement { version: old.version + 1, layers, ..old.clone() },
        moved,
        dropped,
        moved_per_layer,
    }
}
