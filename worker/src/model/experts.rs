//! Routed-expert compute over an explicit assignment list: for each (token, expert, weight),
//! `out[token] += weight · Expert_e(x[token])`, summed in f32. Holds only the experts of this
//! rank (any subset of ids), so the expert-parallel engine can call it with the assignments
//! dispatched to this rank. Does not route.
//!
//! Also owns [`StepLoad`], the per-step expert-load counters every forward that routes returns
//! (one-rank `Model::forward_counted`, sharded `RankModel::forward_counted`): counted from the
//! assignment lists a MoE layer builds anyway, never from recorded per-token routing.

use super::ModelError;
use super::ffn::SwiGlu;
use crate::weights::TensorSource;
use fathom_common::ModelConfig;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// One (token, expert, weight) routing decision; `token` indexes the rows of the `x` handed to
/// [`Experts::forward`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assignment {
    pub token: u32,
    pub expert: u32,
    pub weight: f32,
}

/// One rank's expert load in one step, counted per MoE layer from the assignment lists the
/// layer builds anyway (no per-token capture).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepLoad {
    /// `[moe_layers][n_routed_experts]` flattened: tokens of this rank's slice routed to each
    /// logical expert (the one-rank model routes every token).
    pub routed: Vec<u32>,
    /// `[moe_layers]`: (token, expert) assignments this rank's expert slots computed.
    pub computed: Vec<u64>,
}

impl StepLoad {
    /// Adds one MoE layer whose tokens were routed as `assignments` and all computed here (the
    /// one-rank case): a row of `n_experts` counters and `assignments.len()` computed. Experts
    /// at or above `n_experts` cannot come from a router of that width and are not counted.
    pub fn push_layer(&mut self, assignments: &[Assignment], n_experts: usize) {
        let base = self.routed.len();
        self.routed.resize(base + n_experts, 0);
        for a in assignments {
            if let Some(c) = self.routed[base..].get_mut(a.expert as usize) {
                *c += 1;
            }
        }
        self.computed.push(assignments.len() as u64);
    }

    /// MoE layers counted.
    pub fn moe_layers(&self) -> usize {
        self.computed.len()
    }
}

/// The routed experts this rank holds, by logical id.
#[derive(Debug, Clone)]
pub struct Experts {
    local: BTreeMap<u32, SwiGlu>,
    hidden: usize,
}

impl Experts {
    /// Loads `{prefix}.{e}.{gate,up,down}_proj.weight` for every `e` in `ids`.
    pub fn load(
        src: &dyn TensorSource,
        prefix: &str,
        ids: &[u32],
        cfg: &ModelConfig,
    ) -> Result<Self, ModelError> {
        let mut local = BTreeMap::new();
        for &e in ids {
            if e as usize >= cfg.n_routed_experts {
                return Err(ModelError::Shard(format!(
                    "expert {e} is not below n_routed_experts {}",
                    cfg.n_routed_experts
                )));
            }
            local.insert(
                e,
                SwiGlu::load(
                    src,
                    &format!("{prefix}.{e}"),
                    cfg.hidden_size,
                    cfg.moe_intermediate_size,
                )?,
            );
        }
        Ok(Self { local, hidden: cfg.hidden_size })
    }

    /// Logical ids held here, ascending.
    pub fn ids(&self) -> Vec<u32> {
        self.local.keys().copied().collect()
    }

    /// Expert-parallel form: `Expert_{a.expert}(x[a.token])` for every assignment, unweighted,
    /// as `[assignments.len(), hidden]` in assignment order (the caller weights and sums, so the
    /// order of the fp32 sum stays the caller's). Tokens of one expert run as one GEMM.
    pub fn compute_each(
        &self,
        x: &[f32],
        assignments: &[Assignment],
        layer: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let h = self.hidden;
        let mut by_expert: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, a) in assignments.iter().enumerate() {
            if !self.local.contains_key(&a.expert) {
                return Err(ModelError::ExpertNotLoaded { layer, expert: a.expert });
            }
            by_expert.entry(a.expert).or_default().push(i);
        }
        let results: Vec<(Vec<usize>, Vec<f32>)> = by_expert
            .into_par_iter()
            .map(|(e, list)| {
                let mut rows = Vec::with_capacity(list.len() * h); // [m, hidden]
                for &i in &list {
                    let t = assignments[i].token as usize;
                    rows.extend_from_slice(&x[t * h..(t + 1) * h]);
                }
                let y = self.local[&e].forward(&rows); // [m, hidden]
                (list, y)
            })
            .collect();
        let mut out = vec![0.0; assignments.len() * h];
        for (list, y) in results {
            for (k, &i) in list.iter().enumerate() {
                out[i * h..(i + 1) * h].copy_from_slice(&y[k * h..(k + 1) * h]);
            }
        }
        Ok(out)
    }

    /// `out[a.token] += a.weight · Expert_{a.expert}(x[a.token])` for every assignment.
    /// `x` `[n, hidden]`, `out` `[n, hidden]`. An expert not held here is an error (`layer` names
    /// it).
    pub fn forward(
        &self,
        x: &[f32],
        assignments: &[Assignment],
        layer: usize,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let h = self.hidden;
        let mut by_expert: BTreeMap<u32, Vec<Assignment>> = BTreeMap::new();
        for a in assignments {
            if !self.local.contains_key(&a.expert) {
                return Err(ModelError::ExpertNotLoaded { layer, expert: a.expert });
            }
            by_expert.entry(a.expert).or_default().push(*a);
        }
        let results: Vec<(Vec<Assignment>, Vec<f32>)> = by_expert
            .into_par_iter()
            .map(|(e, list)| {
                let mut rows = Vec::with_capacity(list.len() * h); // [m, hidden]
                for a in &list {
                    rows.extend_from_slice(&x[a.token as usize * h..(a.token as usize + 1) * h]);
                }
                let y = self.local[&e].forward(&rows);
                (list, y)
            })
            .collect();
        for (list, y) in results {
            for (i, a) in list.iter().enumerate() {
                let o = &mut out[a.token as usize * h..(a.token as usize + 1) * h];
                for (o, v) in o.iter_mut().zip(&y[i * h..(i + 1) * h]) {
                    *o += a.weight * v;
                }
            }
        }
        Ok(())
    }
}
