//! Property tests of `plan::rebalance` on random layouts and loads: every result is a valid
//! plan (every expert ≥ 1 replica, capacity, no duplicate expert on a rank, unique slots), is
//! deterministic, never raises a layer's most loaded rank, counts its moves honestly; and
//! `set_replicas` gives exactly the asked counts or refuses with the right error.

use fathom_common::ModelConfig;
use fathom_common::ids::{Epoch, ExpertId};
use fathom_common::plan::load::rank_loads;
use fathom_common::plan::rebalance::{rebalance, set_replicas};
use fathom_common::plan::{
    ExpertError, ExpertPlacement, LayerCounts, ParallelPlan, PlanSpec, ReplicaRequest,
};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn model(experts: usize, moe_layers: usize) -> ModelConfig {
    let mut m = ModelConfig::tiny();
    m.num_attention_heads = 8;
    m.n_routed_experts = experts;
    m.n_group = 1;
    m.topk_group = 1;
    m.num_experts_per_tok = 1;
    m.first_k_dense_replace = 1;
    m.num_hidden_layers = 1 + moe_layers;
    m
}

/// A random starting plan: W, E, redundancy, 1–2 MoE layers, and a random expected load so
/// the default policy puts redundant replicas in varied places.
fn arb_case() -> impl Strategy<Value = (ParallelPlan, LayerCounts)> {
    (1usize..=8, 1usize..=40, 0usize..=3, 1usize..=2)
        .prop_flat_map(|(w, e, r, layers)| {
            let counts = prop::collection::vec(prop_oneof![Just(0u64), 0u64..2000, 0u64..50], e);
            let expected = prop::collection::vec(0u32..100, e);
            (Just((w, e, r, layers)), counts.clone(), counts, expected)
        })
        .prop_map(|((w, e, r, layers), c1, c2, expected)| {
            let mut spec = PlanSpec::new(Epoch(2), w, 1);
            spec.redundant_slots_per_rank = r;
            spec.expected_load.insert(1, expected.iter().map(|&x| x as f64).collect());
            spec.placement_version = 7;
            let plan = ParallelPlan::build(&spec, &model(e, layers)).unwrap();
            let mut load = BTreeMap::from([(1, c1)]);
            if layers == 2 {
                load.insert(2, c2);
            }
            (plan, load)
        })
}

fn checked(p: &ParallelPlan, placement: &ExpertPlacement) -> ParallelPlan {
    let out = ParallelPlan { placement: placement.clone(), ..p.clone() };
    out.validate().unwrap_or_else(|e| panic!("invalid result: {e}"));
    assert_eq!(out.placement.version, p.placement.version + 1);
    out
}

/// (moved, dropped) recounted from the two placements by (expert, rank) pairs.
fn diff(old: &ParallelPlan, new: &ParallelPlan) -> (usize, usize) {
    let (mut moved, mut dropped) = (0, 0);
    for (o, n) in old.placement.layers.iter().zip(&new.placement.layers) {
        for (or, nr) in o.replicas.iter().zip(&n.replicas) {
            let ranks =
                |v: &Vec<fathom_common::plan::Slot>| v.iter().map(|s| s.rank).collect::<Vec<_>>();
            let (or, nr) = (ranks(or), ranks(nr));
            moved += nr.iter().filter(|r| !or.contains(r)).count();
            dropped += or.iter().filter(|r| !nr.contains(r)).count();
        }
    }
    (moved, dropped)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn rebalance_keeps_every_invariant((plan, load) in arb_case()) {
        let report = rebalance(&plan, &load).unwrap();
        let new = checked(&plan, &report.change.placement);
        prop_assert_eq!(&rebalance(&plan, &load).unwrap(), &report, "deterministic");
        prop_assert_eq!(diff(&plan, &new), (report.change.moved, report.change.dropped));
        for (layer, counts) in &load {
            let max = |p: &ParallelPlan| {
                rank_loads(p.layer(*layer).unwrap(), p.world_size, counts).unwrap().into_iter().max()
            };
            prop_assert!(max(&new) <= max(&plan), "layer {} got worse", layer);
            if report.change.moved_per_layer[layer] == 0 && report.change.dropped == 0 {
                prop_assert_eq!(new.layer(*layer), plan.layer(*layer));
            }
        }
        prop_assert!(report.balancedness_after >= report.balancedness_before - 1e-12);
        // Rebalancing the result again never makes it worse.
        let again = rebalance(&new, &load).unwrap();
        prop_assert!(again.balancedness_after >= report.balancedness_after - 1e-12);
    }

    #[test]
    fn set_gives_exactly_the_asked_counts(
        (plan, load) in arb_case(),
        asks in prop::collection::vec((1usize..=2, 0usize..40, 1usize..=8), 0..6),
    ) {
        let p = &plan.placement;
        let (e_count, w) = (p.n_experts, plan.world_size);
        let asks: BTreeMap<(usize, usize), usize> = asks
            .into_iter()
            .filter(|&(l, e, c)| plan.layer(l).is_some() && e < e_count && c <= w)
            .map(|(l, e, c)| ((l, e), c))
            .collect();
        let req = ReplicaRequest::Explicit(asks.clone());
        let available = e_count + w * p.redundant_slots_per_rank;
        match set_replicas(&plan, &req, &load) {
            Ok(change) => {
                let new = checked(&plan, &change.placement);
                prop_assert_eq!(&set_replicas(&plan, &req, &load).unwrap(), &change);
                prop_assert_eq!(diff(&plan, &new), (change.moved, change.dropped));
                for l in p.layers.iter().map(|l| l.layer) {
                    for e in 0..e_count {
                        let want = asks.get(&(l, e)).copied()
                            .unwrap_or(plan.replicas(l, ExpertId(e as u32)).unwrap().len());
                        prop_assert_eq!(new.replicas(l, ExpertId(e as u32)).unwrap().len(), want);
                    }
                    if !asks.keys().any(|&(al, _)| al == l) {
                        prop_assert_eq!(new.layer(l), plan.layer(l));
                    }
                }
            }
            Err(ExpertError::NotEnoughSlots { layer, needed, available: a }) => {
                prop_assert_eq!(a, available);
                prop_assert!(needed > available);
                let want: usize = (0..e_count)
                    .map(|e| asks.get(&(layer, e)).copied()
                        .unwrap_or(plan.replicas(layer, ExpertId(e as u32)).unwrap().len()))
                    .sum();
                prop_assert_eq!(needed, want);
            }
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
    }

    #[test]
    fn set_redundant_is_valid_or_names_the_shortfall((plan, load) in arb_case(), n in 0usize..40) {
        let p = &plan.placement;
        // Extra replicas that fit: free slots, and no expert beyond one replica per rank.
        let w = plan.world_size;
        let extra = (w * p.redundant_slots_per_rank).min(p.n_experts * (w - 1));
        match set_replicas(&plan, &ReplicaRequest::Redundant(n), &load) {
            Ok(change) => {
                prop_assert!(n <= extra);
                let new = checked(&plan, &change.placement);
                for l in &new.placement.layers {
                    prop_assert_eq!(l.replicas.iter().map(Vec::len).sum::<usize>(), p.n_experts + n);
                }
            }
            Err(ExpertError::NotEnoughSlots { needed, .. }) => {
                prop_assert!(n > extra);
                prop_assert_eq!(needed, p.n_experts + n);
            }
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
    }
}
