//! Tests of `plan::rebalance`: skewed and Zipf-like loads get much better balanced, measured
//! with `plan::load`'s own per-rank split; rebalancing is sticky; `set_replicas` does what is
//! asked and refuses bad requests with named errors.

use fathom_common::ModelConfig;
use fathom_common::ids::{Epoch, ExpertId};
use fathom_common::plan::load::{balance, rank_loads};
use fathom_common::plan::rebalance::{rebalance, set_replicas};
use fathom_common::plan::{ExpertError, LayerCounts, ParallelPlan, PlanSpec, ReplicaRequest};
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

fn plan(world: usize, experts: usize, moe_layers: usize, redundant: usize) -> ParallelPlan {
    let mut spec = PlanSpec::new(Epoch(1), world, 1);
    spec.redundant_slots_per_rank = redundant;
    ParallelPlan::build(&spec, &model(experts, moe_layers)).unwrap()
}

/// max/mean per-rank load of `layer` (the inverse of balancedness).
fn imbalance(p: &ParallelPlan, layer: usize, counts: &[u64]) -> f64 {
    let loads = rank_loads(p.layer(layer).unwrap(), p.world_size, counts).unwrap();
    let mean = loads.iter().sum::<u64>() as f64 / loads.len() as f64;
    *loads.iter().max().unwrap() as f64 / mean
}

fn with(p: &ParallelPlan, placement: fathom_common::plan::ExpertPlacement) -> ParallelPlan {
    let out = ParallelPlan { placement, ..p.clone() };
    out.validate().unwrap();
    out
}

/// Checks the rebalance of `counts` on W = 8, E = 64, 2 redundant slots per rank: the max/mean
/// rank load drops by at least 30% against the even default (no redundancy) and against the
/// plan it starts from (default redundancy policy). Returns (before, after).
fn assert_rebalance_helps(counts: Vec<u64>) -> (f64, f64) {
    let even = plan(8, 64, 1, 0);
    let start = plan(8, 64, 1, 2);
    let load: LayerCounts = BTreeMap::from([(1, counts.clone())]);
    let report = rebalance(&start, &load).unwrap();
    let after_plan = with(&start, report.change.placement.clone());
    let (even_i, start_i) = (imbalance(&even, 1, &counts), imbalance(&start, 1, &counts));
    let after = imbalance(&after_plan, 1, &counts);
    eprintln!(
        "max/mean: even {even_i:.3}, start {start_i:.3}, after {after:.3}; moved {}",
        report.change.moved
    );
    assert!(even_i > 1.5 && start_i > 1.5, "the load must be skewed: {even_i} {start_i}");
    for before in [even_i, start_i] {
        assert!(after <= 0.7 * before, "max/mean {before} -> {after}: less than 30% better");
    }
    // The report agrees with the load module, and the version moved on.
    let b = balance(&after_plan.placement, 8, &load).unwrap();
    assert_eq!(report.balancedness_after, b.overall);
    assert!((report.balancedness_after - 1.0 / after).abs() < 1e-12);
    assert!((report.balancedness_before - 1.0 / start_i).abs() < 1e-12);
    assert_eq!(after_plan.placement.version, start.placement.version + 1);
    assert!(report.change.moved > 0 && report.change.moved == report.change.moved_per_layer[&1]);
    // Deterministic, and a second rebalance on the same load moves nothing.
    assert_eq!(rebalance(&start, &load).unwrap(), report);
    let again = rebalance(&after_plan, &load).unwrap();
    assert_eq!((again.change.moved, again.change.dropped), (0, 0));
    assert_eq!(again.change.placement.layers, after_plan.placement.layers);
    (start_i, after)
}

#[test]
fn skewed_load_8_of_64_experts_with_70_percent() {
    // Hot experts clustered on a few ranks, as a real hot spot would be.
    let hot = [2, 5, 6, 9, 13, 30, 33, 60];
    let counts: Vec<u64> =
        (0..64).map(|e| if hot.contains(&e) { 87_500 } else { 300_000 / 56 }).collect();
    let (before, after) = assert_rebalance_helps(counts);
    assert!(after < 1.15, "near-perfect balance expected: {before} -> {after}");
}

#[test]
fn zipf_like_load() {
    // load ∝ 1/(popularity + 1), popularity a fixed permutation of the experts.
    let counts: Vec<u64> =
        (0..64u64).map(|e| (1_000_000.0 / (((e * 23 + 7) % 64) + 1) as f64) as u64).collect();
    assert_rebalance_helps(counts);
}

#[test]
fn no_load_changes_nothing_but_measured_layers() {
    let p = plan(4, 16, 2, 1);
    let report = rebalance(&p, &BTreeMap::new()).unwrap();
    assert_eq!(report.change.placement.layers, p.placement.layers);
    assert_eq!((report.change.moved, report.balancedness_before), (0, 1.0));
    // All-zero load: nothing is better, nothing moves.
    let zero = BTreeMap::from([(1, vec![0; 16])]);
    assert_eq!(rebalance(&p, &zero).unwrap().change.moved, 0);
    // Load on layer 2 only: layer 1 is untouched.
    let mut c = vec![1u64; 16];
    c[0] = 1000;
    let r = rebalance(&p, &BTreeMap::from([(2, c)])).unwrap();
    assert_eq!(r.change.placement.layers[0], p.placement.layers[0]);
    assert_eq!(r.change.moved_per_layer[&1], 0);
    assert!(r.balancedness_after > r.balancedness_before);
}

#[test]
fn rebalance_refuses_bad_load() {
    let p = plan(4, 16, 1, 1);
    let err = rebalance(&p, &BTreeMap::from([(0, vec![1; 16])])).unwrap_err();
    assert_eq!(err, ExpertError::UnknownLayer { layer: 0, moe_layers: vec![1] });
    let err = rebalance(&p, &BTreeMap::from([(1, vec![1; 15])])).unwrap_err();
    assert_eq!(err, ExpertError::CountsLength { layer: 1, got: 15, want: 16 });
}

#[test]
fn set_explicit_changes_only_what_is_asked() {
    let p = plan(4, 16, 2, 1); // every slot is taken: experts 0..3 have 2 replicas
    let zero = p.replicas(1, ExpertId(0)).unwrap().to_vec();
    assert_eq!(zero.len(), 2);
    // Drop expert 0's second replica; give one more to an expert that rank does not hold.
    let freed = zero[1].rank;
    let e = (4..16u32)
        .find(|&e| p.replicas(1, ExpertId(e)).unwrap().iter().all(|s| s.rank != freed))
        .unwrap();
    let req = ReplicaRequest::Explicit(BTreeMap::from([((1, e as usize), 2), ((1, 0), 1)]));
    let c = set_replicas(&p, &req, &BTreeMap::new()).unwrap();
    let np = with(&p, c.placement.clone());
    assert_eq!(np.placement.version, 1);
    assert_eq!(np.replicas(1, ExpertId(0)).unwrap(), &zero[..1]);
    let new_e = np.replicas(1, ExpertId(e)).unwrap();
    assert_eq!(new_e[0], p.replicas(1, ExpertId(e)).unwrap()[0]);
    assert_eq!(new_e[1], zero[1], "the freed slot is reused");
    for x in (1..16).filter(|&x| x != e) {
        assert_eq!(np.replicas(1, ExpertId(x)).unwrap(), p.replicas(1, ExpertId(x)).unwrap());
    }
    assert_eq!((c.moved, c.dropped), (1, 1));
    assert_eq!(np.placement.layers[1], p.placement.layers[1], "layer 2 was not asked about");
    // The Admin form (full count vectors) means the same.
    let mut counts: Vec<usize> =
        (0..16).map(|x| p.replicas(1, ExpertId(x)).unwrap().len()).collect();
    counts[e as usize] = 2;
    counts[0] = 1;
    let full = ReplicaRequest::from_layer_counts(&BTreeMap::from([(1, counts)]));
    assert_eq!(set_replicas(&p, &full, &BTreeMap::new()).unwrap().placement, c.placement);
    // Growing a full layer with no drop is refused, not squeezed.
    let more = ReplicaRequest::Explicit(BTreeMap::from([((1, e as usize), 2)]));
    let err = set_replicas(&p, &more, &BTreeMap::new()).unwrap_err();
    assert_eq!(err, ExpertError::NotEnoughSlots { layer: 1, needed: 21, available: 20 });
}

#[test]
fn set_redundant_follows_measured_load() {
    let p = plan(4, 16, 1, 1);
    let mut counts = vec![10u64; 16];
    for e in [9, 10, 11] {
        counts[e] = 1000;
    }
    let load = BTreeMap::from([(1, counts)]);
    let c = set_replicas(&p, &ReplicaRequest::Redundant(4), &load).unwrap();
    let np = with(&p, c.placement);
    let got: Vec<usize> = (0..16).map(|e| np.replicas(1, ExpertId(e)).unwrap().len()).collect();
    // Three hot experts get one extra each, then the hottest per replica (9, lowest id) another.
    let mut want = vec![1; 16];
    want[9] = 3;
    want[10] = 2;
    want[11] = 2;
    assert_eq!(got, want);
    // Without load: uniform, extras to experts 0.. in turn.
    let c = set_replicas(&p, &ReplicaRequest::Redundant(2), &BTreeMap::new()).unwrap();
    let np = with(&p, c.placement);
    assert_eq!(np.replicas(1, ExpertId(1)).unwrap().len(), 2);
    assert_eq!(np.replicas(1, ExpertId(2)).unwrap().len(), 1);
}

#[test]
fn set_errors_name_what_was_wrong() {
    let p = plan(4, 16, 2, 1); // 16 + 4 slots per layer
    let set = |pairs: &[((usize, usize), usize)]| {
        let req = ReplicaRequest::Explicit(pairs.iter().copied().collect());
        set_replicas(&p, &req, &BTreeMap::new()).unwrap_err()
    };
    let err = set(&[((0, 1), 2)]);
    assert_eq!(err, ExpertError::UnknownLayer { layer: 0, moe_layers: vec![1, 2] });
    assert!(err.to_string().contains("layer 0 is not a MoE layer"), "{err}");
    let err = set(&[((1, 16), 2)]);
    assert_eq!(err, ExpertError::UnknownExpert { layer: 1, expert: 16, n_experts: 16 });
    assert!(err.to_string().contains("expert 16 does not exist"), "{err}");
    let err = set(&[((2, 3), 0)]);
    assert_eq!(err, ExpertError::ZeroReplicas { layer: 2, expert: 3 });
    assert!(err.to_string().contains("expert 3 would have zero replicas"), "{err}");
    let err = set(&[((1, 3), 5)]);
    assert_eq!(err, ExpertError::MoreReplicasThanRanks { layer: 1, expert: 3, count: 5, world: 4 });
    assert!(err.to_string().contains("5 replicas, more than the 4 ranks"), "{err}");
    // Experts 12..15 at 1 replica each go to 3: the layer's 20 replicas grow by 8.
    let err = set(&[((2, 12), 3), ((2, 13), 3), ((2, 14), 3), ((2, 15), 3)]);
    assert_eq!(err, ExpertError::NotEnoughSlots { layer: 2, needed: 28, available: 20 });
    assert!(err.to_string().contains("28 replicas do not fit in the 20"), "{err}");
    let err = set_replicas(&p, &ReplicaRequest::Redundant(5), &BTreeMap::new()).unwrap_err();
    assert_eq!(err, ExpertError::NotEnoughSlots { layer: 1, needed: 21, available: 20 });
    let bad_load = BTreeMap::from([(1, vec![0u64; 3])]);
    let err = set_replicas(&p, &ReplicaRequest::Redundant(1), &bad_load).unwrap_err();
    assert_eq!(err, ExpertError::CountsLength { layer: 1, got: 3, want: 16 });
}

#[test]
fn full_width_scale_58_layers() {
    // DeepSeek-V3.2 width: 256 experts, 58 MoE layers, W = 64 with 2 redundant slots per rank.
    let start = plan(64, 256, 58, 2);
    let load: LayerCounts = (1..=58u64)
        .map(|l| {
            let c = (0..256u64)
                .map(|e| (1_000_000.0 / (((e * 97 + l * 31) % 256) + 1) as f64) as u64)
                .collect();
            (l as usize, c)
        })
        .collect();
    let t = std::time::Instant::now();
    let report = rebalance(&start, &load).unwrap();
    let took = t.elapsed();
    let after_plan = with(&start, report.change.placement.clone());
    eprintln!(
        "58 layers x 256 experts on 64 ranks: {took:?}, balancedness {:.3} -> {:.3}, moved {}",
        report.balancedness_before, report.balancedness_after, report.change.moved
    );
    assert!(report.balancedness_after > 0.95 && report.balancedness_before < 0.6);
    assert_eq!(after_plan.placement.layers.len(), 58);
}

#[test]
fn rebalance_falls_back_to_a_feasible_fill_when_lpt_is_stuck() {
    // W = 3, E = 2, R = 1: capacities (1, 2, 2). Load (30, 25) gives counts (3, 2), expert 1
    // first by load per replica (12.5 > 10); LPT puts it on ranks 0 and 1, filling rank 0, and
    // expert 0 then cannot get 3 distinct ranks. The fill places expert 0 first.
    let full = plan(3, 2, 1, 1);
    let one_each = ReplicaRequest::Explicit(BTreeMap::from([((1, 0), 1), ((1, 1), 1)]));
    let start = with(&full, set_replicas(&full, &one_each, &BTreeMap::new()).unwrap().placement);
    let load = BTreeMap::from([(1, vec![30u64, 25])]);
    let report = rebalance(&start, &load).unwrap();
    let p = with(&start, report.change.placement);
    assert_eq!(p.replicas(1, ExpertId(0)).unwrap().len(), 3);
    assert_eq!(p.replicas(1, ExpertId(1)).unwrap().len(), 2);
    // Ranks: (0, 30, 25) before; (10, 22, 23) or so after (integer split of 25 over 2).
    assert!((report.balancedness_before - 55.0 / 3.0 / 30.0).abs() < 1e-12);
    assert!((report.balancedness_after - 55.0 / 3.0 / 23.0).abs() < 1e-12);
}
