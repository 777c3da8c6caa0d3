//! Live expert-placement changes of a [`RankModel`] (issue 9) and its per-step load counters.
//!
//! A change has two halves so serving never waits for weights: [`RankModel::experts_to_gain`]
//! and [`stage`] (no access to the model: runs on a background thread) load only the experts
//! this rank gains; [`RankModel::apply_placement`] then switches between two steps — it adds
//! the loaded experts, frees the ones the rank no longer holds, and replaces the plan the
//! dispatch reads. KV caches, attention and dense weights are untouched.
//!
//! Invariants: a switch either applies completely or not at all (everything is checked before
//! the first mutation); the new plan has the same world, groups and MoE layers as the old one;
//! after it, each MoE layer holds exactly `plan.experts_on(layer, rank)`.

use super::moe::MoeCounts;
use super::table::load_expert;
use super::{ParallelError, RankModel};
use crate::model::ModelError;
use crate::model::ffn::SwiGlu;
use crate::weights::TensorSource;
use fathom_common::ModelConfig;
use fathom_common::ids::Rank;
use fathom_common::plan::ParallelPlan;
use std::collections::{BTreeMap, BTreeSet};

/// One rank's expert load in one step (the type is shared with the one-rank model).
pub use crate::model::experts::StepLoad;

impl StepLoad {
    pub(super) fn push(&mut self, counts: Option<MoeCounts>) {
        if let Some(c) = counts {
            self.routed.extend_from_slice(&c.routed);
            self.computed.push(c.computed);
        }
    }
}

/// The experts loaded for a staged placement: the new plan and, per MoE layer, the experts this
/// rank gains under it.
#[derive(Debug)]
pub struct StagedExperts {
    pub plan: ParallelPlan,
    pub gained: BTreeMap<usize, Vec<(u32, SwiGlu)>>,
}

/// Loads the experts `gain` (absolute MoE layer → logical ids) for `plan`. Pure loading: call it
/// from a background thread while the model keeps serving.
pub fn stage(
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    plan: ParallelPlan,
    gain: &BTreeMap<usize, Vec<u32>>,
) -> Result<StagedExperts, ParallelError> {
    let mut gained = BTreeMap::new();
    for (&layer, ids) in gain {
        let loaded: Vec<(u32, SwiGlu)> = ids
            .iter()
            .map(|&e| load_expert(src, cfg, layer, e).map(|w| (e, w)))
            .collect::<Result<_, ModelError>>()?;
        gained.insert(layer, loaded);
    }
    Ok(StagedExperts { plan, gained })
}

impl RankModel {
    /// Version of the expert placement in use.
    pub fn placement_version(&self) -> u64 {
        self.plan.placement.version
    }

    /// Checks that `new` is a placement change of this model's plan (same world, groups, heads
    /// and MoE layers) and valid for the model.
    pub fn check_placement(&self, new: &ParallelPlan) -> Result<(), ParallelError> {
        new.validate_for(&self.cfg)?;
        let old = &self.plan;
        let same = [
            ("world size of the new placement", old.world_size, new.world_size),
            ("tp of the new placement", old.tp, new.tp),
            ("experts of the new placement", old.placement.n_experts, new.placement.n_experts),
            (
                "MoE layers of the new placement",
                old.placement.layers.len(),
                new.placement.layers.len(),
            ),
        ];
        for (what, expected, got) in same {
            if expected != got {
                return Err(ParallelError::Layout { what, expected, got });
            }
        }
        Ok(())
    }

    /// The experts this rank must load to serve `new`: per MoE layer, those `new` places here
    /// that the rank does not hold yet (ascending; layers without any are left out).
    pub fn experts_to_gain(&self, new: &ParallelPlan) -> BTreeMap<usize, Vec<u32>> {
        let me = Rank(self.rank as u32);
        let mut out = BTreeMap::new();
        for layer in &self.layers {
            let Some(table) = layer.experts() else { continue };
            let have = table.ids();
            let want: Vec<u32> = new
                .experts_on(layer.index(), me)
                .into_iter()
                .map(|(_, e)| e.0)
                .filter(|e| !have.contains(e))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if !want.is_empty() {
                out.insert(layer.index(), want);
            }
        }
        out
    }

    /// Switches to `staged.plan`: adds the loaded experts, frees those no longer placed here.
    /// Fails without changing anything when an expert the new plan places here is neither held
    /// nor loaded, or the plan does not fit the model.
    pub fn apply_placement(&mut self, staged: StagedExperts) -> Result<(), ParallelError> {
        self.check_placement(&staged.plan)?;
        let me = Rank(self.rank as u32);
        let mut wanted: BTreeMap<usize, BTreeSet<u32>> = BTreeMap::new();
        for layer in &self.layers {
            let Some(table) = layer.experts() else { continue };
            let want: BTreeSet<u32> =
                staged.plan.experts_on(layer.index(), me).into_iter().map(|(_, e)| e.0).collect();
            let mut have = table.ids();
            have.extend(staged.gained.get(&layer.index()).into_iter().flatten().map(|(e, _)| *e));
            if let Some(&missing) = want.difference(&have).next() {
                return Err(
                    ModelError::ExpertNotLoaded { layer: layer.index(), expert: missing }.into()
                );
            }
            wanted.insert(layer.index(), want);
        }
        let mut gained = staged.gained;
        for layer in &mut self.layers {
            let index = layer.index();
            let Some(table) = layer.experts_mut() else { continue };
            for (e, w) in gained.remove(&index).unwrap_or_default() {
                table.insert(e, w);
            }
            table.retain(&wanted[&index]);
        }
        self.plan = staged.plan;
        Ok(())
    }

    /// The logical experts this rank holds in MoE layer `layer`, ascending (`None`: not a MoE
    /// layer).
    pub fn experts_held(&self, layer: usize) -> Option<Vec<u32>> {
        self.layers
            .iter()
            .find(|l| l.index() == layer)
            .and_then(|l| l.experts())
            .map(|t| t.ids().into_iter().collect())
    }
}
