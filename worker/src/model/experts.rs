//! Routed-expert compute over an explicit assignment list: for each (token, expert, weight),
//! `out[token] += weight · Expert_e(x[token])`, summed in f32. Holds only the experts of this
//! rank (any subset of ids), so the expert-parallel engine can call it with the assignments
//! dispatched to this rank. Does not route.

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
