//! [`ParallelPlan`]: the parallel layout of one plan epoch (ARCHITECTURE §2) — W ranks in
//! D = W/T attention groups of T ranks, and where every routed expert of every MoE layer lives.
//!
//! Owns: the rank/group arithmetic, the expert placement ([`ExpertPlacement`]: logical expert →
//! replicas `(rank, slot)`), the policy that builds it ([`placement`]), the per-token replica
//! choice, and validation. Pure data (serde): it travels in the plan epoch through etcd and
//! gRPC, and every receiver re-validates it ([`ParallelPlan::validate`]). Changing a placement
//! while serving: measured load and balancedness ([`load`]), `experts set` / `rebalance`
//! ([`rebalance`]). Does not own: who the
//! ranks are (membership), communicators (kernels `comm`), loading the experts (worker).
//!
//! Layout rules:
//! - Groups are contiguous: group `g` = ranks `g·T .. (g+1)·T`; a rank's position in its group
//!   picks its heads (`heads/T` each, in order).
//! - Slots: every rank reserves `slots_per_rank = ceil(E/W) + redundant_slots_per_rank` expert
//!   slots per MoE layer. The even default puts expert `e` on rank `r` with
//!   `floor(r·E/W) <= e < floor((r+1)·E/W)` (contiguous, as DeepSeek's reference), in slot
//!   `e - floor(r·E/W)`; that first (primary) replica is listed first. Redundant replicas go in
//!   the rank's remaining slots, at most `redundant_slots_per_rank` of them per rank.
//! - **Replica choice** ([`ParallelPlan::replica_for`]): a token with key `i` (chosen by the
//!   routing rank, worker `parallel::moe::replica_key`) sent to expert `e` goes to
//!   `replicas(e)[i mod replicas(e).len()]` — deterministic, no communication, spreads a hot
//!   expert's tokens evenly over its replicas.
//!
//! Invariants ([`ParallelPlan::validate`]): T ≥ 1 divides W and the head count; every expert of
//! every layer has ≥ 1 replica; no rank holds two replicas of one expert; slot indices are below
//! `slots_per_rank` and no two replicas share a (rank, slot); each rank holds at most its even
//! share plus `redundant_slots_per_rank` experts per layer.

pub mod elastic;
pub mod load;
pub mod placement;
pub mod rebalance;
#[cfg(test)]
mod tests;

use crate::config::ModelConfig;
use crate::ids::{Epoch, ExpertId, Rank};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use load::{Balance, ExpertError, LayerCounts, LoadWindow};
pub use placement::{PinnedReplicas, PlanSpec};
pub use rebalance::{PlacementChange, RebalanceReport, ReplicaRequest};

/// Why a plan could not be built or is not valid. Each variant names the layer/expert/rank.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("world_size must be >= 1")]
    EmptyWorld,
    #[error("tp {tp} must be >= 1 and divide {what} {value}")]
    TpDoesNotDivide { tp: usize, what: &'static str, value: usize },
    #[error("the plan's {what} ({plan}) does not match the model ({model})")]
    ModelMismatch { what: &'static str, plan: String, model: String },
    #[error("layer {layer}: expert {expert} has no replica")]
    NoReplica { layer: usize, expert: usize },
    #[error(
        "layer {layer}: expert {expert} has a replica on rank {rank}, outside the world of {world}"
    )]
    RankOutOfRange { layer: usize, expert: usize, rank: u32, world: usize },
    #[error("layer {layer}: rank {rank} holds expert {expert} twice")]
    DuplicateReplica { layer: usize, expert: usize, rank: u32 },
    #[error("layer {layer}: rank {rank} slot {slot} is beyond its {capacity} slots")]
    SlotOutOfRange { layer: usize, rank: u32, slot: u32, capacity: usize },
    #[error("layer {layer}: rank {rank} slot {slot} holds two experts ({first} and {second})")]
    SlotTaken { layer: usize, rank: u32, slot: u32, first: usize, second: usize },
    #[error(
        "layer {layer}: rank {rank} holds {held} experts, more than its {allowed} (even share + redundant slots)"
    )]
    OverCapacity { layer: usize, rank: u32, held: usize, allowed: usize },
    #[error("pinned replicas {key:?}: {reason}")]
    Pinned { key: String, reason: String },
    #[error("expected load of layer {layer}: {reason}")]
    ExpectedLoad { layer: usize, reason: String },
    #[error("unknown layer {layer} or expert {expert} in a lookup")]
    Lookup { layer: usize, expert: usize },
}

/// Where one replica of an expert lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Slot {
    pub rank: Rank,
    /// Index among the rank's `slots_per_rank` expert slots of this layer.
    pub slot: u32,
}

/// Replicas of every expert of one MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerPlacement {
    /// Absolute layer index (`first_k_dense_replace..num_hidden_layers`).
    pub layer: usize,
    /// `replicas[e]`: the replicas of logical expert `e`, primary first.
    pub replicas: Vec<Vec<Slot>>,
}

/// Expert placement for all MoE layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpertPlacement {
    /// Bumped on every placement change (rebalance, replica counts), independent of the epoch.
    pub version: u64,
    /// Logical routed experts per layer (E).
    pub n_experts: usize,
    /// Redundant slots per rank beyond the even share.
    pub redundant_slots_per_rank: usize,
    /// Slots every rank reserves per layer: `ceil(E/W) + redundant_slots_per_rank`.
    pub slots_per_rank: usize,
    /// One entry per MoE layer, in layer order.
    pub layers: Vec<LayerPlacement>,
}

/// The parallel layout of one plan epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParallelPlan {
    pub epoch: Epoch,
    /// W: ranks in the world.
    pub world_size: usize,
    /// T: ranks per attention (tensor-parallel) group.
    pub tp: usize,
    /// Attention heads of the model (split T ways).
    pub num_heads: usize,
    pub placement: ExpertPlacement,
}

impl ParallelPlan {
    /// Builds the plan for `model` from `spec` (even default + redundant replicas placed by the
    /// policy of [`placement`]), validated.
    pub fn build(spec: &PlanSpec, model: &ModelConfig) -> Result<Self, PlanError> {
        placement::build(spec, model)
    }

    /// D: number of attention groups.
    pub fn num_groups(&self) -> usize {
        self.world_size / self.tp
    }

    /// The group of `rank`.
    pub fn group_of(&self, rank: Rank) -> usize {
        rank.0 as usize / self.tp
    }

    /// `rank`'s position inside its group (0..T).
    pub fn rank_in_group(&self, rank: Rank) -> usize {
        rank.0 as usize % self.tp
    }

    /// The ranks of group `g`, in order.
    pub fn group_ranks(&self, g: usize) -> Vec<Rank> {
        (g * self.tp..(g + 1) * self.tp).map(|r| Rank(r as u32)).collect()
    }

    /// Every group as world ranks: the argument `Collective::split` takes to build the
    /// attention-group communicators.
    pub fn groups(&self) -> Vec<Vec<usize>> {
        (0..self.num_groups()).map(|g| (g * self.tp..(g + 1) * self.tp).collect()).collect()
    }

    /// Heads `rank` computes: a contiguous range of `num_heads / T`.
    pub fn head_range(&self, rank: Rank) -> std::ops::Range<usize> {
        let per = self.num_heads / self.tp;
        let k = self.rank_in_group(rank);
        k * per..(k + 1) * per
    }

    /// Placement of absolute layer `layer`, if it is a MoE layer.
    pub fn layer(&self, layer: usize) -> Option<&LayerPlacement> {
        self.placement.layers.iter().find(|l| l.layer == layer)
    }

    /// Replicas of `expert` in `layer`, primary first.
    pub fn replicas(&self, layer: usize, expert: ExpertId) -> Result<&[Slot], PlanError> {
        self.layer(layer)
            .and_then(|l| l.replicas.get(expert.0 as usize))
            .map(Vec::as_slice)
            .ok_or(PlanError::Lookup { layer, expert: expert.0 as usize })
    }

    /// The replica that token `token_index` routed to `expert` goes to:
    /// `replicas[token_index mod replicas.len()]`.
    pub fn replica_for(
        &self,
        layer: usize,
        expert: ExpertId,
        token_index: usize,
    ) -> Result<Slot, PlanError> {
        let reps = self.replicas(layer, expert)?;
        reps.get(token_index % reps.len().max(1))
            .copied()
            .ok_or(PlanError::NoReplica { layer, expert: expert.0 as usize })
    }

    /// What `rank` holds in `layer`: `(slot, expert)` sorted by slot (the experts it loads).
    pub fn experts_on(&self, layer: usize, rank: Rank) -> Vec<(u32, ExpertId)> {
        let mut out: Vec<(u32, ExpertId)> = self
            .layer(layer)
            .into_iter()
            .flat_map(|l| l.replicas.iter().enumerate())
            .flat_map(|(e, reps)| {
                reps.iter().filter(|s| s.rank == rank).map(move |s| (s.slot, ExpertId(e as u32)))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// The even share of rank `r`: experts `floor(r·E/W) .. floor((r+1)·E/W)`.
    pub fn even_share(n_experts: usize, world: usize, r: usize) -> std::ops::Range<usize> {
        r * n_experts / world..(r + 1) * n_experts / world
    }

    /// Checks every invariant of the module doc that needs no model.
    pub fn validate(&self) -> Result<(), PlanError> {
        let (w, t) = (self.world_size, self.tp);
        if w == 0 {
            return Err(PlanError::EmptyWorld);
        }
        if t == 0 || w % t != 0 {
            return Err(PlanError::TpDoesNotDivide { tp: t, what: "world_size", value: w });
        }
        if self.num_heads % t != 0 {
            return Err(PlanError::TpDoesNotDivide { tp: t, what: "heads", value: self.num_heads });
        }
        let p = &self.placement;
        let base = p.n_experts.div_ceil(w);
        if p.slots_per_rank != base + p.redundant_slots_per_rank {
            return Err(PlanError::ModelMismatch {
                what: "slots_per_rank",
                plan: p.slots_per_rank.to_string(),
                model: format!("ceil({}/{w}) + {}", p.n_experts, p.redundant_slots_per_rank),
            });
        }
        for l in &p.layers {
            validate_layer(l, p, w)?;
        }
        Ok(())
    }

    /// [`Self::validate`] plus agreement with `model`: heads, experts, the set of MoE layers.
    pub fn validate_for(&self, model: &ModelConfig) -> Result<(), PlanError> {
        self.validate()?;
        let mismatch =
            |what, plan: String, model: String| Err(PlanError::ModelMismatch { what, plan, model });
        if self.num_heads != model.num_attention_heads {
            return mismatch(
                "heads",
                self.num_heads.to_string(),
                model.num_attention_heads.to_string(),
            );
        }
        if self.placement.n_experts != model.n_routed_experts {
            return mismatch(
                "n_experts",
                self.placement.n_experts.to_string(),
                model.n_routed_experts.to_string(),
            );
        }
        let want = moe_layers(model);
        let have: Vec<usize> = self.placement.layers.iter().map(|l| l.layer).collect();
        if have != want {
            return mismatch("MoE layers", format!("{have:?}"), format!("{want:?}"));
        }
        Ok(())
    }
}

/// The MoE layers of the main model, in order.
pub fn moe_layers(model: &ModelConfig) -> Vec<usize> {
    (0..model.num_hidden_layers).filter(|&l| model.is_moe_layer(l)).collect()
}

fn validate_layer(l: &LayerPlacement, p: &ExpertPlacement, w: usize) -> Result<(), PlanError> {
    let layer = l.layer;
    if l.replicas.len() != p.n_experts {
        return Err(PlanError::ModelMismatch {
            what: "experts in a layer",
            plan: format!("layer {layer}: {}", l.replicas.len()),
            model: p.n_experts.to_string(),
        });
    }
    // (rank, slot) -> expert
    let mut taken: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    let mut held = vec![0usize; w];
    for (expert, reps) in l.replicas.iter().enumerate() {
        if reps.is_empty() {
            return Err(PlanError::NoReplica { layer, expert });
        }
        for (i, s) in reps.iter().enumerate() {
            let rank = s.rank.0;
            if rank as usize >= w {
                return Err(PlanError::RankOutOfRange { layer, expert, rank, world: w });
            }
            if reps[..i].iter().any(|o| o.rank == s.rank) {
                return Err(PlanError::DuplicateReplica { layer, expert, rank });
            }
            if s.slot as usize >= p.slots_per_rank {
                return Err(PlanError::SlotOutOfRange {
                    layer,
                    rank,
                    slot: s.slot,
                    capacity: p.slots_per_rank,
                });
            }
            if let Some(&first) = taken.get(&(rank, s.slot)) {
                return Err(PlanError::SlotTaken {
                    layer,
                    rank,
                    slot: s.slot,
                    first,
                    second: expert,
                });
            }
            taken.insert((rank, s.slot), expert);
            held[rank as usize] += 1;
        }
    }
    for (r, &n) in held.iter().enumerate() {
        let allowed =
            ParallelPlan::even_share(p.n_experts, w, r).len() + p.redundant_slots_per_rank;
        if n > allowed {
            return Err(PlanError::OverCapacity { layer, rank: r as u32, held: n, allowed });
        }
    }
    Ok(())
}
