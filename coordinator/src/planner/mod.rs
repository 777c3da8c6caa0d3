//! The planner: turns the live workers and the cluster spec into the `fathom.v1.Plan` of a new
//! epoch.
//!
//! Owns rank assignment (the first W live workers sorted by id take ranks 0..W, so a restart with
//! the same workers gives the same layout) and the conversion of
//! [`fathom_common::plan::ParallelPlan`] (groups, expert placement) into the wire `Plan`.
//! Does not own: who is live (the worker directory / membership), preparing the ranks (engine).
//!
//! Invariants of every plan it returns: `ranks.len() == world_size`, ranks sorted, `T | W`,
//! `group = rank / T`, `group_rank = rank % T`, one placement entry per MoE layer.

use fathom_common::ModelConfig;
use fathom_common::ids::Epoch;
use fathom_common::plan::{ParallelPlan, PlanSpec};
use fathom_proto::v1::{ExpertReplicaSet, ExpertSlot, LayerPlacement, Plan, PlanRank};

/// Why a plan could not be formed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("waiting for workers: {live} of {needed} are live")]
    NotEnoughWorkers { live: usize, needed: usize },
    #[error("parallel layout: {0}")]
    Layout(String),
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

/// The plan of `inputs.epoch` over `members` (extra members beyond W are left out).
pub fn form_plan(inputs: &PlanInputs<'_>, members: &[Member]) -> Result<Plan, PlanError> {
    let (w, t) = (inputs.world_size, inputs.tp);
    if members.len() < w {
        return Err(PlanError::NotEnoughWorkers { live: members.len(), needed: w });
    }
    let mut chosen = members.to_vec();
    chosen.sort();
    chosen.truncate(w);
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
}
