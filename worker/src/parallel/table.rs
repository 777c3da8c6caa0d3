//! [`ExpertTable`]: the routed experts one rank holds in one MoE layer, keyed by logical id, and
//! their expert-parallel compute. Unlike `model::experts::Experts` the set can change while
//! serving (issue 9): experts are added ([`ExpertTable::insert`], weights loaded in the
//! background by `crate::experts`) and dropped ([`ExpertTable::retain`]) one by one, so a
//! placement change loads only the experts a rank gains.
//!
//! Numerics are exactly those of `Experts::compute_each`: the tokens of one expert run as one
//! GEMM in assignment order, so where a replica lives never changes an output bit.

use crate::model::ModelError;
use crate::model::experts::Assignment;
use crate::model::ffn::SwiGlu;
use crate::weights::TensorSource;
use fathom_common::ModelConfig;
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

/// The experts of one layer held here, by logical id.
#[derive(Debug, Clone, Default)]
pub struct ExpertTable {
    local: BTreeMap<u32, SwiGlu>,
    hidden: usize,
}

/// Loads routed expert `expert` of `layer` (`model.layers.{layer}.mlp.experts.{expert}.*`).
pub fn load_expert(
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    layer: usize,
    expert: u32,
) -> Result<SwiGlu, ModelError> {
    if expert as usize >= cfg.n_routed_experts {
        return Err(ModelError::Shard(format!(
            "expert {expert} is not below n_routed_experts {}",
            cfg.n_routed_experts
        )));
    }
    SwiGlu::load(
        src,
        &format!("model.layers.{layer}.mlp.experts.{expert}"),
        cfg.hidden_size,
        cfg.moe_intermediate_size,
    )
}

impl ExpertTable {
    /// Loads the experts `ids` of `layer`.
    pub fn load(
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        layer: usize,
        ids: &[u32],
    ) -> Result<Self, ModelError> {
        let mut local = BTreeMap::new();
        for &e in ids {
            local.insert(e, load_expert(src, cfg, layer, e)?);
        }
        Ok(Self { local, hidden: cfg.hidden_size })
    }

    /// Logical ids held, ascending.
    pub fn ids(&self) -> BTreeSet<u32> {
        self.local.keys().copied().collect()
    }

    /// Adds (or replaces) expert `id`.
    pub fn insert(&mut self, id: u32, expert: SwiGlu) {
        self.local.insert(id, expert);
    }

    /// Keeps only the experts in `keep` (the others' weights are freed).
    pub fn retain(&mut self, keep: &BTreeSet<u32>) {
        self.local.retain(|id, _| keep.contains(id));
    }

    /// `Expert_{a.expert}(x[a.token])` for every assignment, unweighted, `[assignments, hidden]`
    /// in assignment order. An expert not held here is an error naming `layer`.
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
        let mut out = vec![0.0; assignments.len() * h]; // [assignments, hidden]
        for (list, y) in results {
            for (k, &i) in list.iter().enumerate() {
                out[i * h..(i + 1) * h].copy_from_slice(&y[k * h..(k + 1) * h]);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::experts::Experts;
    use crate::model::random::random_source;

    #[test]
    fn same_bits_as_experts_and_tracks_changes() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let src = random_source(&cfg, 5);
        let layer = (0..cfg.num_hidden_layers).find(|&l| cfg.is_moe_layer(l)).unwrap();
        let ids = [1u32, 4, 9];
        let reference =
            Experts::load(&src, &format!("model.layers.{layer}.mlp.experts"), &ids, &cfg).unwrap();
        let mut table = ExpertTable::load(&src, &cfg, layer, &[1, 4]).unwrap();
        table.insert(9, load_expert(&src, &cfg, layer, 9).unwrap());
        let h = cfg.hidden_size;
        let x: Vec<f32> = (0..3 * h).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let assign: Vec<Assignment> = [(0, 9), (1, 1), (2, 4), (0, 4), (2, 9)]
            .iter()
            .map(|&(t, e)| Assignment { token: t, expert: e, weight: 1.0 })
            .collect();
        let want = reference.compute_each(&x, &assign, layer).unwrap();
        assert_eq!(table.compute_each(&x, &assign, layer).unwrap(), want);
        table.retain(&[1, 4].into_iter().collect());
        assert_eq!(table.ids(), [1, 4].into_iter().collect());
        let err = table.compute_each(&x, &assign, layer).unwrap_err();
        assert!(matches!(err, ModelError::ExpertNotLoaded { expert: 9, .. }), "{err}");
        assert!(load_expert(&src, &cfg, layer, 16).is_err());
    }
}
