//! The worker's side of live expert-placement changes and expert-load reporting (issue 9,
//! docs/experts.md).
//!
//! Owns: [`PlacementStager`] — turns a `StepRequest.stage_placement` into a validated
//! [`ParallelPlan`], loads the experts this rank gains on a background thread (opening the
//! epoch's checkpoint again; the mmap reader makes that cheap) while steps keep running, and
//! switches the [`RankModel`] before the first step that names the new version — and
//! [`StepReport`], the per-step extras a `StepResult` carries (load counters, placement versions,
//! staging errors).
//!
//! Does not own: choosing placements (coordinator), the switch itself (`RankModel::
//! apply_placement`), the step stream (`service.rs`).
//!
//! Invariants: at most one staging is in flight; a newer `stage_placement` supersedes an older
//! one (its result is dropped); a step naming a version this rank neither uses nor staged fails
//! with an error naming both versions; the model's placement only changes between steps.

use crate::executor::ExecError;
use crate::parallel::{RankModel, StagedExperts, StepLoad, stage};
use crate::weights::CheckpointReader;
use fathom_common::ModelConfig;
use fathom_common::ids::Rank;
use fathom_common::plan::{ParallelPlan, Slot};
use fathom_proto::v1::{LayerPlacement, PlacementUpdate, StepRequest, StepResult};
use std::path::PathBuf;
use std::thread::JoinHandle;

/// What a step adds to its `StepResult` besides sampled tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepReport {
    /// `[moe_layers][experts]` flattened: tokens of this rank's slice routed to each expert.
    pub expert_tokens: Vec<u32>,
    /// `[moe_layers]`: tokens this rank's expert slots computed.
    pub rank_expert_tokens: Vec<u64>,
    /// The placement version the step ran with.
    pub placement_version: u64,
    /// Newest staged placement that is loaded and ready (0: none).
    pub staged_placement_version: u64,
    /// Why the last staging failed (empty: it did not).
    pub staging_error: String,
}

impl StepReport {
    /// Copies the report into `result`.
    pub fn fill(self, result: &mut StepResult) {
        // Dense or sparse, whichever is smaller (never both).
        crate::executor::expert_wire::encode(self.expert_tokens).fill(result);
        result.rank_expert_tokens = self.rank_expert_tokens;
        result.placement_version = self.placement_version;
        result.staged_placement_version = self.staged_placement_version;
        result.staging_error = self.staging_error;
    }

    /// The counters of one step.
    pub fn with_load(load: StepLoad, placement_version: u64) -> Self {
        Self {
            expert_tokens: load.routed,
            rank_expert_tokens: load.computed,
            placement_version,
            ..Self::default()
        }
    }
}

/// The wire placement `layers` (version `version`) applied to `base`'s layout, validated for
/// `cfg`. Shared by epoch preparation and live changes.
pub fn placement_from_wire(
    base: &ParallelPlan,
    layers: &[LayerPlacement],
    version: u64,
    cfg: &ModelConfig,
) -> Result<ParallelPlan, String> {
    let mut plan = base.clone();
    if layers.len() != plan.placement.layers.len() {
        return Err(format!(
            "placement has {} MoE layers, the model has {}",
            layers.len(),
            plan.placement.layers.len()
        ));
    }
    for (wire, mine) in layers.iter().zip(plan.placement.layers.iter_mut()) {
        if wire.layer as usize != mine.layer {
            return Err(format!("placement layer {} where {} expected", wire.layer, mine.layer));
        }
        mine.replicas = wire
            .experts
            .iter()
            .map(|set| {
                set.slots.iter().map(|s| Slot { rank: Rank(s.rank), slot: s.local_slot }).collect()
            })
            .collect();
    }
    plan.placement.version = version;
    plan.validate_for(cfg).map_err(|e| format!("placement version {version}: {e}"))?;
    Ok(plan)
}

/// A staging in flight or finished.
#[derive(Debug)]
enum Staging {
    Loading { version: u64, handle: JoinHandle<Result<StagedExperts, String>> },
    Ready(StagedExperts),
}

/// Loads staged placements in the background and switches the model at step boundaries.
#[derive(Debug)]
pub struct PlacementStager {
    model_path: PathBuf,
    staging: Option<Staging>,
    error: String,
}

impl PlacementStager {
    /// Stages from the checkpoint at `model_path` (the epoch plan's `model_path`).
    pub fn new(model_path: PathBuf) -> Self {
        Self { model_path, staging: None, error: String::new() }
    }

    /// Call before executing `step`: starts staging its `stage_placement`, and switches `model`
    /// when the step names a placement version other than the current one (waiting for the
    /// staged load to finish if it has not yet).
    pub fn before_step(
        &mut self,
        model: &mut RankModel,
        step: &StepRequest,
    ) -> Result<(), ExecError> {
        let fail = |reason: String| ExecError::Step { step_id: step.step_id, reason };
        if let Some(update) = &step.stage_placement {
            self.start(model, update);
        }
        let want = step.placement_version;
        if want == 0 || want == model.placement_version() {
            return Ok(());
        }
        let staged = match self.staging.take() {
            Some(Staging::Ready(s)) if s.plan.placement.version == want => s,
            Some(Staging::Loading { version, handle }) if version == want => handle
                .join()
                .map_err(|_| fail(format!("loading placement {want} panicked")))?
                .map_err(|e| fail(format!("loading placement {want}: {e}")))?,
            other => {
                self.staging = other;
                return Err(fail(format!(
                    "placement version {want} requested; this rank uses {} and has not staged it",
                    model.placement_version()
                )));
            }
        };
        model
            .apply_placement(staged)
            .map_err(|e| fail(format!("switching to placement {want}: {e}")))?;
        tracing::info!(version = want, rank = model.rank(), "expert placement switched");
        Ok(())
    }

    fn start(&mut self, model: &RankModel, update: &PlacementUpdate) {
        let version = update.version;
        if version <= model.placement_version() {
            self.error = format!(
                "placement {version} is not newer than the current {}",
                model.placement_version()
            );
            return;
        }
        let plan =
            match placement_from_wire(model.plan(), &update.placement, version, model.config()) {
                Ok(p) => p,
                Err(e) => {
                    self.error = e;
                    return;
                }
            };
        if let Err(e) = model.check_placement(&plan) {
            self.error = format!("placement {version}: {e}");
            return;
        }
        self.error.clear();
        let gain = model.experts_to_gain(&plan);
        let cfg = model.config().clone();
        let path = self.model_path.clone();
        // A superseded staging finishes on its own; its result is dropped with the handle.
        let handle = std::thread::spawn(move || {
            let reader = CheckpointReader::open(&path).map_err(|e| e.to_string())?;
            stage(&cfg, &reader, plan, &gain).map_err(|e| e.to_string())
        });
        self.staging = Some(Staging::Loading { version, handle });
    }

    /// The staged version that is ready (0: none) and the last staging error; collects a
    /// finished background load without blocking.
    pub fn poll(&mut self) -> (u64, String) {
        let finished =
            matches!(&self.staging, Some(Staging::Loading { handle, .. }) if handle.is_finished());
        if finished && let Some(Staging::Loading { version, handle }) = self.staging.take() {
            match handle.join() {
                Ok(Ok(s)) => self.staging = Some(Staging::Ready(s)),
                Ok(Err(e)) => self.error = format!("loading placement {version}: {e}"),
                Err(_) => self.error = format!("loading placement {version} panicked"),
            }
        }
        let ready = match &self.staging {
            Some(Staging::Ready(s)) => s.plan.placement.version,
            _ => 0,
        };
        (ready, self.error.clone())
    }
}
