//! The planner: turns the live workers and the cluster spec into the `fathom.v1.Plan` of a new
//! epoch.
//!
//! Owns rank assignment and the conversion of [`fathom_common::plan::ParallelPlan`] (groups,
//! expert placement) into the wire `Plan`. Does not own: who is live (the worker directory /
//! membership), the expert placement of a new epoch (`crate::experts::ExpertsHandle::shape_plan`,
//! from the [`Layout`] chosen here), preparing the ranks (engine).
//!
//! Rank assignment ([`choose_ranks`], elastic epochs — docs/cluster.md):
//! - **first epoch** (no previous plan): the first W live workers sorted by id take ranks 0..W
//!   ([`Layout::Fresh`]); fewer than W live: wait;
//! - afterwards every worker of the previous epoch that is still live **keeps its rank's
//!   position** (so it keeps its weights), and:
//!   - nobody lost: spares (live workers outside the plan) join as new ranks at the end, T at a
//!     time, up to `max_world` ([`Layout::Reshaped`], grow), else the same ranks
//!     ([`Layout::Same`]);
//!   - ranks lost and at least as many spares as lost ranks: the spares (sorted by id) take the
//!     lost positions ([`Layout::Same`]: full capacity kept, each spare loads its rank's share);
//!   - ranks lost and too few spares: **shrink** — the ranks of the groups that lost no member
//!     continue in order, if they are at least `min_world` and still hold a replica of every
//!     expert (`fathom_common::plan::elastic::uncovered`); the spares then join as new ranks
//!     as in a grow ([`Layout::Reshaped`]). Otherwise wait for a replacement
//!     ([`PlanError::Uncovered`], [`PlanError::BelowMinWorld`]).
//!
//! Invariants of every plan it returns: `ranks.len() == world_size`, ranks sorted, `T | W`,
//! `group = rank / T`, `group_rank = rank % T`, one placement entry per MoE layer.

use fathom_common::ModelConfig;
use fathom_common::ids::{Epoch, Rank};
use fathom_common::plan::elastic::uncovered;
use fathom_common::plan::{ParallelPlan, PlanSpec};
use fathom_proto::v1::{ExpertReplicaSet, ExpertSlot, LayerPlacement, Plan, PlanRank};
use std::collections::BTreeMap;

/// Why a plan could not be formed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("waiting for workers: {live} of {needed} are live")]
    NotEnoughWorkers { live: usize, needed: usize },
    #[error("parallel layout: {0}")]
    Layout(String),
    #[error(
        "waiting for a replacement of {lost:?}: layer {layer} expert {expert} has no replica on \
         the surviving ranks"
    )]
    Uncovered { lost: Vec<String>, layer: usize, expert: usize },
    #[error(
        "waiting for a replacement of {lost:?}: {survivors} surviving ranks are below the minimum \
         world of {min}"
    )]
    BelowMinWorld { lost: Vec<String>, survivors: usize, min: usize },
}

/// World-size limits of elastic epochs (`[parallel]`: world_size, tp, min/max_world_size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elastic {
    pub world_size: usize,
    pub tp: usize,
    pub min_world: usize,
    pub max_world: usize,
}

/// The epoch that served last: its workers by rank and its plan (with the placement in effect).
#[derive(Debug, Clone, Copy)]
pub struct Previous<'a> {
    pub workers: &'a [String],
    pub plan: &'a ParallelPlan,
}

/// How the new epoch's expert placement relates to the previous one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// No previous epoch to continue: the configured initial placement.
    Fresh,
    /// Same world and positions (some possibly taken by spares): the placement in effect.
    Same,
    /// Shrunk and/or grown: new rank `i` continues old rank `origins[i]` (`None`: a new rank).
    Reshaped { origins: Vec<Option<Rank>> },
}

/// A live worker as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub worker_id: String,
    pub address: String,
}

/// What the plan must satisfy.
#[derive(Debug, Clone)]
pub struct PlanInputs<'a> {
    pub epoch: u64,
    pub world_size: usize,
    pub tp: usize,
    pub model: &'a ModelConfig,
    pub model_path: String,
    pub kv_block_size: usize,
    pub kv_blocks: usize,
    pub comm: String,
}

/// Who takes the ranks of the next epoch, and how its placement derives from `prev` (module
/// doc). `members` are the live workers (any order).
pub fn choose_ranks(
    e: &Elastic,
    prev: Option<Previous<'_>>,
    members: &[Member],
) -> Result<(Vec<Member>, Layout), PlanError> {
    let t = e.tp.max(1);
    let Some(prev) = prev.filter(|p| p.workers.len() == p.plan.world_size && p.plan.tp == t) else {
        let w = e.world_size;
        if members.len() < w {
            return Err(PlanError::NotEnoughWorkers { live: members.len(), needed: w });
        }
        let mut chosen = members.to_vec();
        chosen.sort();
        chosen.truncate(w);
        return Ok((chosen, Layout::Fresh));
    };
    let live: BTreeMap<&str, &Member> = members.iter().map(|m| (m.worker_id.as_str(), m)).collect();
    let mut spares: Vec<Member> =
        members.iter().filter(|m| !prev.workers.contains(&m.worker_id)).cloned().collect();
    spares.sort();
    let held: Vec<Option<Member>> =
        prev.workers.iter().map(|id| live.get(id.as_str()).map(|m| (*m).clone())).collect();
    let lost: Vec<String> = prev
        .workers
        .iter()
        .zip(&held)
        .filter(|(_, h)| h.is_none())
        .map(|(id, _)| id.clone())
        .collect();
    // Spares that may join as new ranks after `w` ranks: whole groups up to max_world.
    let joining = |w: usize, spares: usize| (spares.min(e.max_world.saturating_sub(w)) / t) * t;
    let grow = |mut ranks: Vec<Member>, mut origins: Vec<Option<Rank>>, spares: Vec<Member>| {
        let add = joining(ranks.len(), spares.len());
        ranks.extend(spares.into_iter().take(add));
        origins.resize(ranks.len(), None);
        let layout = if origins.iter().enumerate().all(|(i, o)| *o == Some(Rank(i as u32))) {
            Layout::Same
        } else {
            Layout::Reshaped { origins }
        };
        (ranks, layout)
    };
    if lost.is_empty() {
        let ranks: Vec<Member> = held.into_iter().flatten().collect();
        let origins = (0..ranks.len() as u32).map(|r| Some(Rank(r))).collect();
        return Ok(grow(ranks, origins, spares));
    }
    if spares.len() >= lost.len() {
        let mut spares = spares.into_iter();
        let ranks = held
            .into_iter()
            .map(|h| h.or_else(|| spares.next()))
            .collect::<Option<Vec<Member>>>()
            .ok_or_else(|| PlanError::Layout("a replacement went missing".into()))?;
        return Ok((ranks, Layout::Same));
    }
    // Shrink onto the groups that lost no member.
    let mut ranks = Vec::new();
    let mut kept = Vec::new();
    for (g, members) in held.chunks(t).enumerate() {
        if members.iter().all(Option::is_some) {
            ranks.extend(members.iter().flatten().cloned());
            kept.extend((g * t..(g + 1) * t).map(|r| Rank(r as u32)));
        }
    }
    let min = e.min_world.max(1);
    if kept.len() < min {
        return Err(PlanError::BelowMinWorld { lost, survivors: kept.len(), min });
    }
    if let Some((layer, expert)) = uncovered(prev.plan, &kept) {
        return Err(PlanError::Uncovered { lost, layer, expert });
    }
    let origins = kept.into_iter().map(Some).collect();
    Ok(grow(ranks, origins, spares))
}

/// The plan of `inputs.epoch` over `members` (extra members beyond W are left out).
pub fn form_plan(inputs: &PlanInputs<'_>, members: &[Member]) -> Result<Plan, PlanError> {
    let w = inputs.world_size;
    if members.len() < w {
        return Err(PlanError::NotEnoughWorkers { live: members.len(), needed: w });
    }
    let mut chosen = members.to_vec();
    chosen.sort();
    chosen.truncate(w);
    plan_over(inputs, chosen)
}

/// The plan of `inputs.epoch` with `ranks[i]` as rank `i` (`inputs.world_size` is ignored: the
/// world is `ranks.len()`); its placement is the even default until shaped by the caller.
pub fn plan_over(inputs: &PlanInputs<'_>, ranks: Vec<Member>) -> Result<Plan, PlanError> {
    let (w, t) = (ranks.len(), inputs.tp);
    let chosen = ranks;
    let layout = ParallelPlan::build(&PlanSpec::new(Epoch(inputs.epoch), w, t), inputs.model)
        .map_err(|e| PlanError::Layout(e.to_string()))?;
    let ranks = chosen
        .into_iter()
        .enumerate()
        .map(|(r, m)| PlanRank {
            rank: r as u32,
            worker_id: m.worker_id,
            address: m.address,
            group: (r / t) as u32,
            group_rank: (r % t) as u32,
        })
        .collect();
    let placement = layout
        .placement
        .layers
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
        .collect();
    Ok(Plan {
        epoch: inputs.epoch,
        world_size: w as u32,
        tp: t as u32,
        ranks,
        placement,
        model_path: inputs.model_path.clone(),
        kv_block_size: inputs.kv_block_size as u32,
        kv_blocks: inputs.kv_blocks as u32,
        comm: inputs.comm.clone(),
        // Expert redundancy and placement version: set by `crate::experts` (shape_plan).
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<Member> {
        (0..n)
            .rev()
            .map(|i| Member {
                worker_id: format!("w{i}"),
                address: format!("127.0.0.1:{}", 9000 + i),
            })
            .collect()
    }

    #[test]
    fn ranks_sorted_by_id_groups_contiguous() {
        let model = ModelConfig::tiny();
        let inputs = PlanInputs {
            epoch: 3,
            world_size: 4,
            tp: 2,
            model: &model,
            model_path: "/m".into(),
            kv_block_size: 16,
            kv_blocks: 64,
            comm: "tcp".into(),
        };
        let plan = form_plan(&inputs, &members(5)).unwrap();
        assert_eq!(plan.ranks.len(), 4);
        let ids: Vec<_> = plan.ranks.iter().map(|r| r.worker_id.as_str()).collect();
        assert_eq!(ids, ["w0", "w1", "w2", "w3"]);
        assert_eq!(plan.ranks[3].group, 1);
        assert_eq!(plan.ranks[3].group_rank, 1);
        assert_eq!(plan.placement.len(), model.num_moe_layers());
        assert_eq!(plan.placement[0].experts.len(), model.n_routed_experts);
        let e = form_plan(&inputs, &members(3)).unwrap_err();
        assert_eq!(e, PlanError::NotEnoughWorkers { live: 3, needed: 4 });
    }

    fn prev_plan(w: usize, t: usize, redundant: usize) -> ParallelPlan {
        let mut spec = PlanSpec::new(Epoch(1), w, t);
        spec.redundant_slots_per_rank = redundant;
        ParallelPlan::build(&spec, &ModelConfig::tiny()).unwrap()
    }

    fn live(ids: &[&str]) -> Vec<Member> {
        ids.iter()
            .map(|id| Member { worker_id: id.to_string(), address: format!("{id}:1") })
            .collect()
    }

    fn ids(ranks: &[Member]) -> Vec<&str> {
        ranks.iter().map(|m| m.worker_id.as_str()).collect()
    }

    const E: Elastic = Elastic { world_size: 4, tp: 1, min_world: 1, max_world: 4 };

    #[test]
    fn first_epoch_takes_the_first_w_by_id() {
        let (r, l) = choose_ranks(&E, None, &live(&["c", "a", "e", "b", "d"])).unwrap();
        assert_eq!((ids(&r), l), (vec!["a", "b", "c", "d"], Layout::Fresh));
        let err = choose_ranks(&E, None, &live(&["a"])).unwrap_err();
        assert_eq!(err, PlanError::NotEnoughWorkers { live: 1, needed: 4 });
    }

    #[test]
    fn survivors_keep_positions_spares_replace_or_the_world_shrinks() {
        let workers: Vec<String> = ["w0", "w1", "w2", "w3"].map(String::from).into();
        let plan = prev_plan(4, 1, 5);
        let prev = Some(Previous { workers: &workers, plan: &plan });
        // A spare replaces the lost rank in its position.
        let (r, l) = choose_ranks(&E, prev, &live(&["w3", "w0", "a9", "w2"])).unwrap();
        assert_eq!((ids(&r), l), (vec!["w0", "a9", "w2", "w3"], Layout::Same));
        // No spare, every expert still covered: shrink, survivors in order.
        let (r, l) = choose_ranks(&E, prev, &live(&["w3", "w0", "w2"])).unwrap();
        let origins = [0, 2, 3].map(|r| Some(Rank(r))).to_vec();
        assert_eq!((ids(&r), l), (vec!["w0", "w2", "w3"], Layout::Reshaped { origins }));
        // Below the minimum world: wait.
        let strict = Elastic { min_world: 4, ..E };
        let err = choose_ranks(&strict, prev, &live(&["w3", "w0", "w2"])).unwrap_err();
        assert!(matches!(err, PlanError::BelowMinWorld { survivors: 3, min: 4, .. }), "{err}");
        // Without redundancy rank 1's experts are gone with it: wait.
        let plain = prev_plan(4, 1, 0);
        let prev = Some(Previous { workers: &workers, plan: &plain });
        let err = choose_ranks(&E, prev, &live(&["w3", "w0", "w2"])).unwrap_err();
        assert_eq!(err, PlanError::Uncovered { lost: vec!["w1".into()], layer: 1, expert: 4 });
        // Nobody lost, nobody new: the same ranks.
        let (r, l) = choose_ranks(&E, prev, &live(&["w3", "w0", "w2", "w1"])).unwrap();
        assert_eq!((ids(&r), l), (vec!["w0", "w1", "w2", "w3"], Layout::Same));
    }

    #[test]
    fn spares_grow_the_world_up_to_max_in_whole_groups() {
        let workers: Vec<String> = ["w0", "w1"].map(String::from).into();
        let plan = prev_plan(2, 1, 0);
        let prev = Some(Previous { workers: &workers, plan: &plan });
        let e = Elastic { world_size: 2, tp: 1, min_world: 1, max_world: 3 };
        let (r, l) = choose_ranks(&e, prev, &live(&["w1", "x", "w0", "y"])).unwrap();
        let origins = vec![Some(Rank(0)), Some(Rank(1)), None];
        assert_eq!((ids(&r), l), (vec!["w0", "w1", "x"], Layout::Reshaped { origins }));
        // T = 2: a group that lost a member is dropped whole; one spare cannot form a group.
        let workers: Vec<String> = ["w0", "w1", "w2", "w3"].map(String::from).into();
        let plan = prev_plan(4, 2, 8);
        let prev = Some(Previous { workers: &workers, plan: &plan });
        let e = Elastic { world_size: 4, tp: 2, min_world: 2, max_world: 4 };
        let (r, l) = choose_ranks(&e, prev, &live(&["w2", "w3", "w0"])).unwrap();
        let origins = vec![Some(Rank(2)), Some(Rank(3))];
        assert_eq!((ids(&r), l), (vec!["w2", "w3"], Layout::Reshaped { origins }));
        // ...and two workers (the orphan and a newcomer) join as a new group.
        let shrunk: Vec<String> = ["w2", "w3"].map(String::from).into();
        let plan = prev_plan(2, 2, 8);
        let prev = Some(Previous { workers: &shrunk, plan: &plan });
        let (r, l) = choose_ranks(&e, prev, &live(&["w2", "w3", "w0", "n"])).unwrap();
        let origins = vec![Some(Rank(0)), Some(Rank(1)), None, None];
        assert_eq!((ids(&r), l), (vec!["w2", "w3", "n", "w0"], Layout::Reshaped { origins }));
    }
}
