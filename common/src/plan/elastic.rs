//! Elastic epochs (issues 9 and 10): the plan of a world that shrank onto its surviving ranks or
//! grew by new ranks, derived from the previous epoch's plan so that every rank that stays keeps
//! exactly the experts — in the same slots — it already holds (a new epoch then reloads nothing
//! on it).
//!
//! Owns: [`reshape`] (the placement of the new world from the old one and an [`Origins`] map),
//! the coverage check ([`uncovered`]), the greedy that gives new ranks redundant replicas, and
//! the slot sizing of a derived placement. Does not own: deciding *whether* to shrink, grow or
//! wait (the coordinator's planner), which workers take the ranks (membership).
//!
//! Rules:
//! - **Continued ranks**: new rank `i` with `origins[i] = Some(old)` holds every replica `old`
//!   held, in the same slots (minus handovers to new ranks, below); replicas of old ranks no new rank continues disappear. Within an
//!   expert's replica list the order is kept (the first surviving replica becomes the primary).
//!   Coverage: every expert of every MoE layer must keep ≥ 1 replica, else
//!   [`PlanError::NoReplica`] names the first uncovered (layer, expert).
//! - **New ranks** (`None`): start empty and get up to `new_rank_slots` redundant replicas per
//!   MoE layer from a greedy over the expected load (measured token counts; a layer without
//!   counts counts every expert 1.0): repeatedly apply the single move "one more replica of
//!   expert `e` on new rank `n`" that minimises the most-loaded rank's load (rank load =
//!   Σ load(e)/replicas(e) over the experts it holds; replica choice splits an expert's tokens
//!   evenly), ties broken by the smaller sum of squared rank loads, then lowest (n, e); a move is
//!   taken only if it lowers the maximum, or keeps it and lowers the sum of squares — so the
//!   modelled balance never gets worse and hot experts (high load per replica on the busiest
//!   ranks) are replicated first. A replica only takes its share of an expert's tokens, so with
//!   `new_rank_slots` = an old rank's slots the new rank could stay below the mean; once no
//!   addition helps, the greedy therefore also considers **handovers**: an old rank drops its
//!   replica of an expert a new rank holds (it frees a slot and loads nothing; the expert stays
//!   covered), under the same acceptance rule. Old ranks never gain an expert. Cost per layer:
//!   O(moves · N · E · R) for N new ranks, E experts, R replicas per expert (plus a sort of W
//!   rank loads per move).
//! - **Slots**: a derived placement keeps every held (rank, slot); its `redundant_slots_per_rank`
//!   is the smallest value ≥ the previous one for which the invariants of [`super`] hold over
//!   the new world (`slots_per_rank = ceil(E/W') + redundant`, each rank at most its even share
//!   plus `redundant`), so it can exceed the configured value after a resize (ranks keep the
//!   memory they already used). The placement version is the previous one + 1.

use super::{ExpertPlacement, LayerCounts, LayerPlacement, ParallelPlan, PlanError, Slot};
use crate::ids::{Epoch, Rank};
use std::collections::BTreeSet;

/// For each rank of the new world, the rank of the previous plan it continues (`None`: a new
/// rank that holds nothing yet).
pub type Origins = [Option<Rank>];

/// The first (layer, expert) that no rank in `kept` holds a replica of in `prev`, if any.
pub fn uncovered(prev: &ParallelPlan, kept: &[Rank]) -> Option<(usize, usize)> {
    let kept: BTreeSet<Rank> = kept.iter().copied().collect();
    prev.placement.layers.iter().find_map(|l| {
        l.replicas
            .iter()
            .position(|reps| !reps.iter().any(|s| kept.contains(&s.rank)))
            .map(|e| (l.layer, e))
    })
}

/// The plan of epoch `epoch` over `origins.len()` ranks (groups of `prev.tp`) derived from
/// `prev` (module doc): continued ranks keep their replicas and slots, new ranks get up to
/// `new_rank_slots` redundant replicas per layer from `load`. Validated.
pub fn reshape(
    prev: &ParallelPlan,
    origins: &Origins,
    epoch: Epoch,
    new_rank_slots: usize,
    load: &LayerCounts,
) -> Result<ParallelPlan, PlanError> {
    let w = origins.len();
    if w == 0 {
        return Err(PlanError::EmptyWorld);
    }
    if w % prev.tp != 0 {
        return Err(PlanError::TpDoesNotDivide { tp: prev.tp, what: "world_size", value: w });
    }
    // old rank -> new rank
    let mut to_new = vec![None; prev.world_size];
    for (new, o) in origins.iter().enumerate() {
        if let Some(old) = o {
            let slot = to_new.get_mut(old.0 as usize).ok_or(PlanError::RankOutOfRange {
                layer: 0,
                expert: 0,
                rank: old.0,
                world: prev.world_size,
            })?;
            if slot.is_some() {
                return Err(PlanError::Pinned {
                    key: format!("origins[{new}]"),
                    reason: format!("old rank {} is continued twice", old.0),
                });
            }
            *slot = Some(Rank(new as u32));
        }
    }
    let new_ranks: Vec<usize> = (0..w).filter(|&i| origins[i].is_none()).collect();
    let p = &prev.placement;
    let mut layers = Vec::with_capacity(p.layers.len());
    for l in &p.layers {
        let mut replicas: Vec<Vec<Slot>> = l
            .replicas
            .iter()
            .map(|reps| {
                reps.iter()
                    .filter_map(|s| {
                        to_new[s.rank.0 as usize].map(|r| Slot { rank: r, slot: s.slot })
                    })
                    .collect()
            })
            .collect();
        if let Some(expert) = replicas.iter().position(Vec::is_empty) {
            return Err(PlanError::NoReplica { layer: l.layer, expert });
        }
        if !new_ranks.is_empty() && new_rank_slots > 0 {
            let counts = load.get(&l.layer).filter(|c| c.len() == p.n_experts);
            let weights: Vec<f64> = match counts {
                Some(c) if c.iter().any(|&x| x > 0) => c.iter().map(|&x| x as f64).collect(),
                _ => vec![1.0; p.n_experts],
            };
            fill_new_ranks(&mut replicas, &weights, w, &new_ranks, new_rank_slots);
        }
        layers.push(LayerPlacement { layer: l.layer, replicas });
    }
    let redundant = fit_redundant(p.n_experts, w, &layers, p.redundant_slots_per_rank);
    let plan = ParallelPlan {
        epoch,
        world_size: w,
        tp: prev.tp,
        num_heads: prev.num_heads,
        placement: ExpertPlacement {
            version: p.version + 1,
            n_experts: p.n_experts,
            redundant_slots_per_rank: redundant,
            slots_per_rank: p.n_experts.div_ceil(w) + redundant,
            layers,
        },
    };
    plan.validate()?;
    Ok(plan)
}

/// The smallest `redundant_slots_per_rank >= floor` under which every rank's held experts and
/// slot indices fit over `w` ranks.
fn fit_redundant(n_experts: usize, w: usize, layers: &[LayerPlacement], floor: usize) -> usize {
    let base = n_experts.div_ceil(w);
    let mut r = floor;
    for l in layers {
        let mut held = vec![0usize; w];
        for s in l.replicas.iter().flatten() {
            let rank = s.rank.0 as usize;
            held[rank] += 1;
            r = r.max((s.slot as usize + 1).saturating_sub(base));
        }
        for (rank, &n) in held.iter().enumerate() {
            r = r.max(n.saturating_sub(ParallelPlan::even_share(n_experts, w, rank).len()));
        }
    }
    r
}

/// Rank loads of one layer (Σ load(e)/replicas(e) over the experts each rank holds).
fn rank_loads(replicas: &[Vec<Slot>], load: &[f64], w: usize) -> Vec<f64> {
    let mut out = vec![0f64; w];
    for (e, reps) in replicas.iter().enumerate() {
        for s in reps {
            out[s.rank.0 as usize] += load[e] / reps.len() as f64;
        }
    }
    out
}

/// A candidate move of the greedy: add a replica of `expert` on new rank `rank`, or drop the
/// replica an old `rank` holds of an expert a new rank also holds.
#[derive(Debug, Clone, Copy)]
enum Move {
    Add { rank: usize, expert: usize },
    Drop { rank: usize, expert: usize },
}

/// Max and sum of squares of the rank loads after changing `expert`'s replicas from the ranks
/// of `reps` to those plus `add` / minus `drop`.
fn after_move(
    rank_load: &[f64],
    order: &[usize],
    cur_ss: f64,
    reps: &[Slot],
    load: f64,
    add: Option<usize>,
    drop: Option<usize>,
) -> (f64, f64) {
    let k = reps.len() as f64;
    let k2 = k + add.map_or(0.0, |_| 1.0) - drop.map_or(0.0, |_| 1.0);
    let (old, new) = (load / k, load / k2);
    let holds = |r: usize| reps.iter().any(|s| s.rank.0 as usize == r);
    let affected = |r: usize| holds(r) || add == Some(r);
    let mut max = order.iter().find(|&&r| !affected(r)).map_or(0.0, |&r| rank_load[r]);
    let mut ss = cur_ss;
    let mut set = |r: usize, v: f64| {
        max = max.max(v);
        ss += v * v - rank_load[r] * rank_load[r];
    };
    for s in reps {
        let r = s.rank.0 as usize;
        set(r, if drop == Some(r) { rank_load[r] - old } else { rank_load[r] - old + new });
    }
    if let Some(n) = add {
        set(n, rank_load[n] + new);
    }
    (max, ss)
}

/// The greedy of the module doc for one layer: adds replicas on `new_ranks` (each starts empty,
/// at most `slots` of them, slots `0..slots`); once no addition helps, old ranks hand over
/// (drop) their replica of an expert a new rank holds while that lowers the balance further.
fn fill_new_ranks(
    replicas: &mut [Vec<Slot>],
    load: &[f64],
    w: usize,
    new_ranks: &[usize],
    slots: usize,
) {
    const EPS: f64 = 1e-9;
    let is_new = |r: usize| new_ranks.contains(&r);
    let mut used = vec![0usize; w];
    loop {
        let rank_load = rank_loads(replicas, load, w);
        let cur_max = rank_load.iter().copied().fold(0.0, f64::max);
        let cur_ss: f64 = rank_load.iter().map(|x| x * x).sum();
        // Ranks by load, highest first: the maximum outside a move's affected ranks.
        let mut order: Vec<usize> = (0..w).collect();
        order.sort_by(|&a, &b| rank_load[b].total_cmp(&rank_load[a]).then(a.cmp(&b)));
        let improves = |(max, ss): (f64, f64), than: (f64, f64)| {
            max < than.0 - EPS || (max <= than.0 + EPS && ss < than.1 - EPS)
        };
        let mut best: Option<((f64, f64), Move)> = None;
        // Additions first: a handover is considered only when no addition helps.
        for &n in new_ranks.iter().filter(|&&n| used[n] < slots) {
            for (e, reps) in replicas.iter().enumerate() {
                if load[e] <= 0.0 || reps.iter().any(|s| s.rank.0 as usize == n) {
                    continue;
                }
                let v = after_move(&rank_load, &order, cur_ss, reps, load[e], Some(n), None);
                if best.as_ref().is_none_or(|(b, _)| improves(v, *b)) {
                    best = Some((v, Move::Add { rank: n, expert: e }));
                }
            }
        }
        if best.as_ref().is_none_or(|(v, _)| !improves(*v, (cur_max, cur_ss))) {
            best = None;
            for (e, reps) in replicas.iter().enumerate() {
                if load[e] <= 0.0 || !reps.iter().any(|s| is_new(s.rank.0 as usize)) {
                    continue;
                }
                for r in reps.iter().map(|s| s.rank.0 as usize).filter(|&r| !is_new(r)) {
                    let v = after_move(&rank_load, &order, cur_ss, reps, load[e], None, Some(r));
                    if best.as_ref().is_none_or(|(b, _)| improves(v, *b)) {
                        best = Some((v, Move::Drop { rank: r, expert: e }));
                    }
                }
            }
        }
        match best {
            Some((v, m)) if improves(v, (cur_max, cur_ss)) => match m {
                Move::Add { rank, expert } => {
                    replicas[expert]
                        .push(Slot { rank: Rank(rank as u32), slot: used[rank] as u32 });
                    used[rank] += 1;
                }
                Move::Drop { rank, expert } => {
                    replicas[expert].retain(|s| s.rank.0 as usize != rank);
                }
            },
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::plan::PlanSpec;
    use crate::plan::load::balance;

    fn plan(w: usize, t: usize, redundant: usize) -> (ParallelPlan, ModelConfig) {
        let model = ModelConfig::tiny();
        let mut spec = PlanSpec::new(Epoch(1), w, t);
        spec.redundant_slots_per_rank = redundant;
        (ParallelPlan::build(&spec, &model).unwrap(), model)
    }

    fn held(p: &ParallelPlan, rank: u32) -> Vec<Vec<(u32, crate::ids::ExpertId)>> {
        p.placement.layers.iter().map(|l| p.experts_on(l.layer, Rank(rank))).collect()
    }

    /// Modelled max/mean rank load of `p` under `load` (mean over layers).
    fn max_over_mean(p: &ParallelPlan, load: &LayerCounts) -> f64 {
        1.0 / balance(&p.placement, p.world_size, load).unwrap().overall
    }

    /// The busiest rank's modelled load, summed over layers.
    fn max_load(p: &ParallelPlan, load: &LayerCounts) -> f64 {
        let mut ranks = vec![0f64; p.world_size];
        for l in &p.placement.layers {
            for (e, reps) in l.replicas.iter().enumerate() {
                for s in reps {
                    ranks[s.rank.0 as usize] += load[&l.layer][e] as f64 / reps.len() as f64;
                }
            }
        }
        ranks.into_iter().fold(0.0, f64::max)
    }

    #[test]
    fn shrink_keeps_every_survivors_slots_and_drops_the_lost_rank() {
        // 16 experts on 4 ranks, 5 redundant slots each: every expert has two or more replicas
        // (4 slots are not always enough: the greedy may give the last free slots to an expert
        // whose rank is the only one with room).
        let (prev, model) = plan(4, 1, 5);
        assert!(prev.placement.layers.iter().flat_map(|l| &l.replicas).all(|r| r.len() >= 2));
        for lost in 0..4u32 {
            let kept: Vec<Rank> = (0..4).filter(|&r| r != lost).map(Rank).collect();
            assert_eq!(uncovered(&prev, &kept), None, "losing rank {lost}");
            let origins: Vec<Option<Rank>> = kept.iter().copied().map(Some).collect();
            let next = reshape(&prev, &origins, Epoch(2), 0, &LayerCounts::new()).unwrap();
            next.validate_for(&model).unwrap();
            assert_eq!((next.world_size, next.epoch), (3, Epoch(2)));
            assert_eq!(next.placement.version, prev.placement.version + 1);
            for (new, old) in kept.iter().enumerate() {
                assert_eq!(held(&next, new as u32), held(&prev, old.0), "rank {old:?} -> {new}");
            }
            // Every expert still has a replica; the lost rank's replicas are gone.
            let replicas: usize =
                next.placement.layers.iter().flat_map(|l| &l.replicas).map(Vec::len).sum();
            let lost_held: usize = held(&prev, lost).iter().map(Vec::len).sum();
            let before: usize =
                prev.placement.layers.iter().flat_map(|l| &l.replicas).map(Vec::len).sum();
            assert_eq!(replicas, before - lost_held);
        }
    }

    #[test]
    fn coverage_is_checked_and_named() {
        let (prev, _) = plan(4, 1, 0);
        let kept = [Rank(0), Rank(2), Rank(3)];
        // Rank 1 held experts 4..8 alone.
        assert_eq!(uncovered(&prev, &kept), Some((1, 4)));
        let origins: Vec<Option<Rank>> = kept.iter().copied().map(Some).collect();
        let e = reshape(&prev, &origins, Epoch(2), 0, &LayerCounts::new()).unwrap_err();
        assert_eq!(e, PlanError::NoReplica { layer: 1, expert: 4 });
        // T = 2: the survivors must form whole groups.
        let (prev, _) = plan(4, 2, 8);
        assert_eq!(uncovered(&prev, &[Rank(2), Rank(3)]), None);
        let e = reshape(
            &prev,
            &[Some(Rank(0)), Some(Rank(1)), Some(Rank(2))],
            Epoch(2),
            0,
            &LayerCounts::new(),
        )
        .unwrap_err();
        assert!(matches!(e, PlanError::TpDoesNotDivide { tp: 2, .. }), "{e}");
        let next =
            reshape(&prev, &[Some(Rank(2)), Some(Rank(3))], Epoch(2), 0, &LayerCounts::new())
                .unwrap();
        assert_eq!(held(&next, 0), held(&prev, 2));
        assert_eq!(next.group_of(Rank(1)), 0);
    }

    #[test]
    fn grow_gives_the_new_rank_hot_experts_and_keeps_the_old_ones() {
        let (prev, model) = plan(2, 1, 0);
        // Experts 0..4 of every layer are hot (rank 0 holds them), the rest cold.
        let counts: Vec<u64> = (0..16).map(|e| if e < 4 { 100 } else { 10 }).collect();
        let load: LayerCounts =
            prev.placement.layers.iter().map(|l| (l.layer, counts.clone())).collect();
        let origins = [Some(Rank(0)), Some(Rank(1)), None];
        let next =
            reshape(&prev, &origins, Epoch(2), prev.placement.slots_per_rank, &load).unwrap();
        next.validate_for(&model).unwrap();
        assert_eq!(next.world_size, 3);
        for r in 0..2 {
            // Old ranks gain nothing and keep their slots (they may hand experts over).
            for (now, before) in held(&next, r).iter().zip(held(&prev, r)) {
                assert!(now.iter().all(|x| before.contains(x)), "rank {r}: {now:?} vs {before:?}");
            }
        }
        let new_held = held(&next, 2);
        assert!(
            new_held.iter().all(|l| !l.is_empty()),
            "the new rank holds replicas: {new_held:?}"
        );
        for l in &new_held {
            let ids: Vec<u32> = l.iter().map(|(_, e)| e.0).collect();
            assert!(ids.contains(&0), "hot expert 0 is replicated on the new rank: {ids:?}");
        }
        let (before, after) = (max_over_mean(&prev, &load), max_over_mean(&next, &load));
        assert!(after < before, "max/mean {before} -> {after}");
    }

    #[test]
    fn grow_under_uniform_load_never_gets_worse_and_respects_slots() {
        for (w, redundant, slots) in [(2, 0, 8), (2, 2, 3), (3, 1, 7), (4, 0, 1)] {
            let (prev, model) = plan(w, 1, redundant);
            let load: LayerCounts =
                prev.placement.layers.iter().map(|l| (l.layer, vec![1000; 16])).collect();
            let origins: Vec<Option<Rank>> =
                (0..w as u32).map(|r| Some(Rank(r))).chain([None]).collect();
            let next = reshape(&prev, &origins, Epoch(2), slots, &load).unwrap();
            next.validate_for(&model).unwrap();
            let n = held(&next, w as u32);
            assert!(n.iter().all(|l| l.len() <= slots), "W={w}: {n:?}");
            // The busiest rank never gets busier (uniform load cannot always keep max/mean, as
            // the mean drops by W/(W+1) while replicas move load in halves).
            let (before, after) = (max_load(&prev, &load), max_load(&next, &load));
            assert!(after <= before + 1e-9, "W={w}: {before} -> {after}");
            // A new rank with an old rank's slots: thanks to handovers max/mean stays within
            // the granularity of one expert's share.
            if slots == prev.placement.slots_per_rank {
                let (b, a) = (max_over_mean(&prev, &load), max_over_mean(&next, &load));
                assert!(a <= b + 0.05, "W={w}: max/mean {b} -> {a}");
            }
            assert!(n.iter().any(|l| !l.is_empty()), "W={w}: the new rank got replicas");
        }
    }
}
