//! Unit and property tests of [`ParallelPlan`]: the even default, the redundancy policy,
//! validation errors and the invariants of the module doc on random layouts.

use super::*;
use crate::cluster::ParallelSection;
use proptest::prelude::*;

/// A model with `heads` heads, `experts` routed experts and MoE layers 1..=moe_layers.
fn model(heads: usize, experts: usize, moe_layers: usize) -> ModelConfig {
    let mut m = ModelConfig::tiny();
    m.num_attention_heads = heads;
    m.n_routed_experts = experts;
    m.n_group = 1;
    m.topk_group = 1;
    m.num_experts_per_tok = 1;
    m.first_k_dense_replace = 1;
    m.num_hidden_layers = 1 + moe_layers;
    m
}

#[test]
fn even_default_is_contiguous_like_the_reference() {
    let m = model(8, 16, 2);
    let plan = ParallelPlan::build(&PlanSpec::new(Epoch(3), 4, 2), &m).unwrap();
    assert_eq!((plan.num_groups(), plan.placement.slots_per_rank), (2, 4));
    assert_eq!(plan.groups(), vec![vec![0, 1], vec![2, 3]]);
    assert_eq!(plan.group_of(Rank(3)), 1);
    assert_eq!(plan.group_ranks(1), vec![Rank(2), Rank(3)]);
    assert_eq!(plan.head_range(Rank(3)), 4..8);
    for l in [1, 2] {
        for e in 0..16u32 {
            let reps = plan.replicas(l, ExpertId(e)).unwrap();
            assert_eq!(reps, &[Slot { rank: Rank(e / 4), slot: e % 4 }]);
        }
        let on2: Vec<u32> = plan.experts_on(l, Rank(2)).iter().map(|x| x.1.0).collect();
        assert_eq!(on2, vec![8, 9, 10, 11]);
    }
    assert!(plan.layer(0).is_none(), "dense layer has no placement");
    assert!(plan.replicas(0, ExpertId(0)).is_err());
}

#[test]
fn uneven_share_when_w_does_not_divide_experts() {
    let plan = ParallelPlan::build(&PlanSpec::new(Epoch(0), 3, 1), &model(4, 8, 1)).unwrap();
    let sizes: Vec<usize> = (0..3).map(|r| plan.experts_on(1, Rank(r)).len()).collect();
    assert_eq!(sizes, vec![2, 3, 3]); // floor(r*8/3): 0, 2, 5, 8
    assert_eq!(plan.placement.slots_per_rank, 3);
}

#[test]
fn greedy_gives_hot_experts_replicas_on_least_loaded_ranks() {
    let m = model(4, 8, 1);
    let mut spec = PlanSpec::new(Epoch(1), 4, 1);
    spec.redundant_slots_per_rank = 1;
    // Expert 5 (on rank 2) is very hot, expert 0 (on rank 0) warm.
    let mut load = vec![1.0; 8];
    load[5] = 40.0;
    load[0] = 10.0;
    spec.expected_load.insert(1, load);
    let plan = ParallelPlan::build(&spec, &m).unwrap();
    let n = |e: u32| plan.replicas(1, ExpertId(e)).unwrap().len();
    // 40/1, 40/2, 40/3 all beat 10/1: expert 5 takes three extra slots (then it is on every
    // rank, 40/4 = 10), and the last free slot (rank 2, its home) goes to expert 0.
    assert_eq!(n(5), 4);
    assert_eq!(n(0), 2);
    let r5: Vec<u32> = plan.replicas(1, ExpertId(5)).unwrap().iter().map(|s| s.rank.0).collect();
    assert_eq!(r5[0], 2, "primary first");
    let r0: Vec<u32> = plan.replicas(1, ExpertId(0)).unwrap().iter().map(|s| s.rank.0).collect();
    assert_eq!(r0, vec![0, 2]);
    // Replica choice rotates over the replicas by token index.
    let picks: Vec<Slot> = (0..8).map(|i| plan.replica_for(1, ExpertId(5), i).unwrap()).collect();
    let reps = plan.replicas(1, ExpertId(5)).unwrap();
    assert_eq!(picks, [reps, reps].concat());
}

#[test]
fn pinned_counts_are_exact_and_parsed_from_the_cluster_config() {
    let m = model(4, 8, 2);
    let mut section =
        ParallelSection { world_size: 4, tp: 2, redundant_slots_per_rank: 2, ..Default::default() };
    section.pinned_replicas.insert("*:3".into(), 4);
    section.pinned_replicas.insert("2:3".into(), 1);
    section.pinned_replicas.insert("1:6".into(), 2);
    let plan =
        ParallelPlan::build(&PlanSpec::from_cluster(&section, Epoch(9)).unwrap(), &m).unwrap();
    let n = |l, e| plan.replicas(l, ExpertId(e)).unwrap().len();
    assert_eq!((n(1, 3), n(2, 3), n(1, 6)), (4, 1, 2));
    assert_eq!(plan.epoch, Epoch(9));
}

#[test]
fn bad_inputs_are_named() {
    let m = model(4, 8, 1);
    let err = |spec: PlanSpec| ParallelPlan::build(&spec, &m).unwrap_err();
    assert!(matches!(err(PlanSpec::new(Epoch(0), 0, 1)), PlanError::EmptyWorld));
    assert!(matches!(
        err(PlanSpec::new(Epoch(0), 6, 4)),
        PlanError::TpDoesNotDivide { what: "world_size", .. }
    ));
    assert!(matches!(
        err(PlanSpec::new(Epoch(0), 8, 8)),
        PlanError::TpDoesNotDivide { what: "heads", value: 4, .. }
    ));
    let pin = |key: &str, count: usize, redundant: usize| {
        let mut s = PlanSpec::new(Epoch(0), 4, 1);
        s.redundant_slots_per_rank = redundant;
        s.pinned = PinnedReplicas::from_config(&[(key.to_string(), count)].into()).unwrap();
        err(s).to_string()
    };
    assert!(pin("*:8", 2, 1).contains("expert 8 does not exist"));
    assert!(pin("0:1", 2, 1).contains("not a MoE layer"));
    assert!(pin("*:1", 5, 1).contains("1..=4"));
    assert!(pin("*:1", 0, 1).contains("1..=4"));
    assert!(pin("*:1", 2, 0).contains("raise redundant_slots_per_rank"));
    let e = PinnedReplicas::from_config(&[("x:1".to_string(), 2)].into()).unwrap_err();
    assert!(e.to_string().contains("\"x:1\""), "{e}");
    let mut s = PlanSpec::new(Epoch(0), 4, 1);
    s.expected_load.insert(1, vec![1.0; 7]);
    assert!(matches!(err(s.clone()), PlanError::ExpectedLoad { layer: 1, .. }));
    s.expected_load.insert(1, vec![f64::NAN; 8]);
    assert!(matches!(err(s), PlanError::ExpectedLoad { layer: 1, .. }));
}

#[test]
fn validate_catches_corrupt_plans() {
    let m = model(4, 8, 1);
    let mut spec = PlanSpec::new(Epoch(0), 4, 2);
    spec.redundant_slots_per_rank = 1;
    let good = ParallelPlan::build(&spec, &m).unwrap();
    let corrupt = |f: &dyn Fn(&mut ParallelPlan)| {
        let mut p = good.clone();
        f(&mut p);
        p.validate_for(&m).unwrap_err()
    };
    let e = corrupt(&|p| p.placement.layers[0].replicas[4].clear());
    assert_eq!(e, PlanError::NoReplica { layer: 1, expert: 4 });
    let e = corrupt(&|p| {
        let first = p.placement.layers[0].replicas[4][0];
        p.placement.layers[0].replicas[4].push(Slot { slot: 2, ..first });
    });
    assert!(matches!(e, PlanError::DuplicateReplica { expert: 4, .. }), "{e}");
    let e = corrupt(&|p| p.placement.layers[0].replicas[4][0].slot = 3);
    assert!(matches!(e, PlanError::SlotOutOfRange { capacity: 3, .. }), "{e}");
    let e = corrupt(&|p| p.placement.layers[0].replicas[4][0].rank = Rank(4));
    assert!(matches!(e, PlanError::RankOutOfRange { rank: 4, .. }), "{e}");
    let e = corrupt(&|p| p.placement.layers[0].replicas[5][0].slot = 0); // expert 4's slot
    assert!(matches!(e, PlanError::SlotTaken { first: 4, second: 5, .. }), "{e}");
    let e = corrupt(&|p| p.tp = 3);
    assert!(matches!(e, PlanError::TpDoesNotDivide { .. }), "{e}");
    let e = corrupt(&|p| p.placement.layers[0].layer = 2);
    assert!(matches!(e, PlanError::ModelMismatch { what: "MoE layers", .. }), "{e}");
}

#[test]
fn serde_round_trip_and_rejects_corruption_on_validate() {
    let m = model(8, 16, 2);
    let mut spec = PlanSpec::new(Epoch(5), 4, 2);
    spec.redundant_slots_per_rank = 2;
    spec.placement_version = 7;
    let plan = ParallelPlan::build(&spec, &m).unwrap();
    let json = serde_json::to_string(&plan).unwrap();
    let back: ParallelPlan = serde_json::from_str(&json).unwrap();
    assert_eq!(back, plan);
    assert_eq!(back.placement.version, 7);
    back.validate_for(&m).unwrap();
}

fn layout() -> impl Strategy<Value = (usize, usize, usize, usize, usize)> {
    // (W, T, E, redundant, moe layers)
    (1usize..=12, 1usize..=40, 0usize..=3, 1usize..=3).prop_flat_map(|(w, e, red, layers)| {
        let divisors: Vec<usize> = (1..=w).filter(|t| w % t == 0).collect();
        (Just(w), proptest::sample::select(divisors), Just(e), Just(red), Just(layers))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn plans_keep_their_invariants(
        (w, t, e, red, nl) in layout(),
        loads in proptest::collection::vec(0.0f64..100.0, 40),
        pins in proptest::collection::vec((0usize..40, 1usize..=3), 0..3),
        heads_per in 1usize..4,
    ) {
        let m = model(t * heads_per, e, nl);
        let mut spec = PlanSpec::new(Epoch(1), w, t);
        spec.redundant_slots_per_rank = red;
        spec.expected_load.insert(1, loads[..e].to_vec());
        for &(x, c) in &pins {
            spec.pinned.every_layer.insert(x % e, c.min(w));
        }
        let plan = match ParallelPlan::build(&spec, &m) {
            Ok(p) => p,
            // The only acceptable failure: pins that do not fit in the redundant slots.
            Err(PlanError::Pinned { reason, .. }) => {
                prop_assert!(reason.contains("raise redundant_slots_per_rank"), "{}", reason);
                return Ok(());
            }
            Err(other) => return Err(TestCaseError::fail(other.to_string())),
        };
        plan.validate_for(&m).map_err(|x| TestCaseError::fail(x.to_string()))?;
        // Groups partition the ranks.
        let flat: Vec<usize> = plan.groups().concat();
        prop_assert_eq!(flat, (0..w).collect::<Vec<_>>());
        for r in 0..w {
            let rank = Rank(r as u32);
            prop_assert!(plan.group_ranks(plan.group_of(rank)).contains(&rank));
            prop_assert_eq!(plan.head_range(rank).len() * t, plan.num_heads);
        }
        let extra_total = w * red;
        for l in &plan.placement.layers {
            let mut placed = 0;
            for (x, reps) in l.replicas.iter().enumerate() {
                prop_assert!(!reps.is_empty());
                // Primary replica is the even default.
                let home = (0..w).find(|&r| ParallelPlan::even_share(e, w, r).contains(&x)).unwrap();
                prop_assert_eq!(reps[0].rank, Rank(home as u32));
                if let Some(c) = spec.pinned.count(l.layer, x) {
                    prop_assert_eq!(reps.len(), c);
                }
                let mut ranks: Vec<u32> = reps.iter().map(|s| s.rank.0).collect();
                ranks.sort_unstable();
                ranks.dedup();
                prop_assert_eq!(ranks.len(), reps.len(), "a rank holds an expert twice");
                for i in 0..2 * reps.len() {
                    let s = plan.replica_for(l.layer, ExpertId(x as u32), i).unwrap();
                    prop_assert_eq!(s, reps[i % reps.len()]);
                }
                placed += reps.len() - 1;
            }
            prop_assert!(placed <= extra_total);
            // With no pins, every free slot is used unless every expert is on every rank.
            if spec.pinned.every_layer.is_empty() && placed < extra_total {
                prop_assert!(l.replicas.iter().all(|r| r.len() == w) || e * w - e == placed);
            }
            for r in 0..w {
                let held = plan.experts_on(l.layer, Rank(r as u32));
                prop_assert!(held.len() <= plan.placement.slots_per_rank);
                let mut slots: Vec<u32> = held.iter().map(|h| h.0).collect();
                slots.dedup();
                prop_assert_eq!(slots.len(), held.len(), "two replicas in one slot");
            }
        }
        let back: ParallelPlan = serde_json::from_str(&serde_json::to_string(&plan).unwrap()).unwrap();
        prop_assert_eq!(&back, &plan);
        // Deterministic: building again gives the same plan.
        prop_assert_eq!(ParallelPlan::build(&spec, &m).unwrap(), plan);
    }
}
