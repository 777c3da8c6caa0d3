//! Tests of `plan::load`: the sliding window against a brute-force sum, the per-replica split
//! against the plan's own per-token replica choice, balancedness, and the errors.

use fathom_common::ModelConfig;
use fathom_common::ids::{Epoch, ExpertId};
use fathom_common::plan::load::{balance, balancedness, rank_loads, replica_share};
use fathom_common::plan::{ExpertError, LoadWindow, ParallelPlan, PlanSpec};
use proptest::prelude::*;
use std::collections::BTreeMap;

/// A model with 8 heads, `experts` routed experts and MoE layers 1..=moe_layers.
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

#[test]
fn window_keeps_the_last_steps_only() {
    let mut w = LoadWindow::new(vec![1, 2], 3, 2).unwrap();
    assert_eq!((w.window(), w.steps()), (2, 1));
    w.record_step(1, &[1, 2, 3]).unwrap();
    w.record_step(2, &[10, 0, 0]).unwrap();
    w.end_step();
    w.record_step(1, &[100, 0, 0]).unwrap();
    assert_eq!(w.totals()[&1], vec![101, 2, 3]);
    assert_eq!(w.totals()[&2], vec![10, 0, 0]);
    assert_eq!(w.steps(), 2);
    w.end_step(); // the first step falls out
    w.record_step(1, &[0, 0, 7]).unwrap();
    assert_eq!(w.totals()[&1], vec![100, 0, 7]);
    assert_eq!(w.totals()[&2], vec![0, 0, 0]);
    w.reset();
    assert_eq!(w.totals()[&1], vec![0, 0, 0]);
}

#[test]
fn window_errors_name_what_was_wrong() {
    assert_eq!(LoadWindow::new(vec![1], 4, 0), Err(ExpertError::ZeroWindow));
    let mut w = LoadWindow::new(vec![1, 2], 4, 3).unwrap();
    let err = w.record_step(0, &[0; 4]).unwrap_err();
    assert_eq!(err, ExpertError::UnknownLayer { layer: 0, moe_layers: vec![1, 2] });
    assert!(err.to_string().contains("layer 0"), "{err}");
    let err = w.record_step(2, &[0; 5]).unwrap_err();
    assert_eq!(err, ExpertError::CountsLength { layer: 2, got: 5, want: 4 });
    assert!(err.to_string().contains("5 expert counts"), "{err}");
}

#[test]
fn balancedness_is_mean_over_max() {
    assert_eq!(balancedness(&[3, 3, 3, 3]), 1.0);
    assert_eq!(balancedness(&[4, 0, 0, 0]), 0.25);
    assert_eq!(balancedness(&[0, 0]), 1.0);
    assert!((balancedness(&[1, 2, 3]) - 2.0 / 3.0).abs() < 1e-12);
}

#[test]
fn balance_of_a_plan_per_layer_and_overall() {
    let m = model(8, 2);
    let plan = ParallelPlan::build(&PlanSpec::new(Epoch(0), 4, 1), &m).unwrap();
    // Layer 1: experts 0,1 (rank 0) carry everything. Layer 2: uniform.
    let counts = BTreeMap::from([(1, vec![5, 3, 0, 0, 0, 0, 0, 0]), (2, vec![1; 8])]);
    let b = balance(&plan.placement, 4, &counts).unwrap();
    assert_eq!(b.per_layer[&1], 0.25);
    assert_eq!(b.per_layer[&2], 1.0);
    assert_eq!(b.overall, 0.625);
    let bad = BTreeMap::from([(0, vec![1; 8])]);
    assert!(matches!(balance(&plan.placement, 4, &bad), Err(ExpertError::UnknownLayer { .. })));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The ring's totals equal the sum of the last `window` steps, however many steps went by.
    #[test]
    fn window_totals_match_brute_force(
        window in 1usize..5,
        steps in prop::collection::vec(prop::collection::vec(0u64..50, 3), 1..12),
    ) {
        let mut w = LoadWindow::new(vec![4], 3, window).unwrap();
        for (i, s) in steps.iter().enumerate() {
            if i > 0 {
                w.end_step();
            }
            w.record_step(4, s).unwrap();
        }
        let first = steps.len().saturating_sub(window);
        let want: Vec<u64> = (0..3).map(|e| steps[first..].iter().map(|s| s[e]).sum()).collect();
        prop_assert_eq!(&w.totals()[&4], &want);
        prop_assert_eq!(w.steps(), steps.len().min(window));
    }

    /// Per-rank load equals routing every token through `ParallelPlan::replica_for`.
    #[test]
    fn rank_loads_match_the_replica_choice(
        world in 1usize..6,
        experts in 1usize..12,
        redundant in 0usize..3,
        counts in prop::collection::vec(0u64..40, 12),
    ) {
        let m = model(experts, 1);
        let mut spec = PlanSpec::new(Epoch(0), world, 1);
        spec.redundant_slots_per_rank = redundant;
        let plan = ParallelPlan::build(&spec, &m).unwrap();
        let counts = &counts[..experts];
        let mut want = vec![0u64; world];
        for (e, &c) in counts.iter().enumerate() {
            for i in 0..c as usize {
                want[plan.replica_for(1, ExpertId(e as u32), i).unwrap().rank.0 as usize] += 1;
            }
            let n = plan.replicas(1, ExpertId(e as u32)).unwrap().len();
            let shares: Vec<u64> = (0..n).map(|j| replica_share(c, n, j)).collect();
            prop_assert_eq!(shares.iter().sum::<u64>(), c);
            prop_assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1);
        }
        prop_assert_eq!(rank_loads(plan.layer(1).unwrap(), world, counts).unwrap(), want);
    }
}
