//! The coordinator's expert runtime driven as the engine drives it, with the ranks' step results
//! written by hand: counters, the stage → acknowledge → switch protocol, refusals.

use super::*;
use crate::planner::Layout;
use fathom_common::plan::load::rank_loads;

const W: usize = 4;

fn handle(redundant_slots: usize, redundant_experts: Option<usize>) -> (ExpertsHandle, Plan) {
    let model = ModelConfig::tiny();
    let cfg = ExpertsConfig {
        redundant_slots_per_rank: redundant_slots,
        redundant_experts,
        window_steps: 8,
        ..ExpertsConfig::default()
    };
    let h = ExpertsHandle::new(cfg, model);
    let mut plan = Plan { epoch: 1, world_size: W as u32, tp: 1, ..Default::default() };
    h.shape_plan(&mut plan, &Layout::Fresh).unwrap();
    h.epoch_started();
    (h, plan)
}

/// What the ranks would report for a step where every token goes to experts 0..4 of every
/// layer (`tokens` per rank's slice), under the placement in effect.
fn skewed_results(h: &ExpertsHandle, tokens: u32, staged: u64) -> Vec<StepResult> {
    let st = h.lock();
    let a = st.active.as_ref().unwrap();
    let e = a.placement.n_experts;
    let version = a.placement.version;
    let mut computed = vec![vec![0u64; a.placement.layers.len()]; W];
    let mut counts = vec![0u64; e];
    counts[..4].iter_mut().for_each(|c| *c = u64::from(tokens) * W as u64);
    for (li, lp) in a.placement.layers.iter().enumerate() {
        for (r, load) in rank_loads(lp, W, &counts).unwrap().into_iter().enumerate() {
            computed[r][li] = load;
        }
    }
    (0..W)
        .map(|r| {
            let mut expert_tokens = Vec::new();
            for _ in &a.placement.layers {
                let mut row = vec![0u32; e];
                row[..4].iter_mut().for_each(|c| *c = tokens);
                expert_tokens.extend(row);
            }
            StepResult {
                rank: r as u32,
                expert_tokens,
                rank_expert_tokens: computed[r].clone(),
                placement_version: version,
                staged_placement_version: staged,
                ..Default::default()
            }
        })
        .collect()
}

#[test]
fn initial_policy_and_counters() {
    let (h, plan) = handle(2, Some(0));
    assert_eq!(plan.redundant_slots_per_rank, 2);
    assert!(plan.placement.iter().all(|l| l.experts.iter().all(|e| e.slots.len() == 1)));
    let s = h.snapshot();
    assert_eq!((s.placement_version, s.world_size, s.balancedness), (0, W, 1.0));
    h.record_results(&skewed_results(&h, 5, 0));
    let s = h.snapshot();
    assert_eq!(s.window_steps, 1);
    let l = &s.layers[0];
    assert_eq!(&l.tokens[..5], &[20, 20, 20, 20, 0]);
    // Experts 0..4 all live on rank 0 under the even placement.
    assert_eq!(l.rank_tokens, vec![80, 0, 0, 0]);
    assert!((s.balancedness - 0.25).abs() < 1e-9, "{}", s.balancedness);
    assert!((s.max_over_mean - 4.0).abs() < 1e-9);
    // Steps without tokens do not move the window.
    h.record_results(&skewed_results(&h, 0, 0));
    assert_eq!(h.snapshot().window_steps, 1);
    // Filling every slot by default: 8 extra replicas per layer.
    let (_, full) = handle(2, None);
    let reps: usize = full.placement[0].experts.iter().map(|e| e.slots.len()).sum();
    assert_eq!(reps, 16 + 2 * W);
}

#[test]
fn rebalance_stages_then_switches_at_a_step_boundary() {
    let (h, _) = handle(2, Some(0));
    h.record_results(&skewed_results(&h, 6, 0));
    let dry = h.rebalance(true).unwrap();
    assert!(!dry.applied && dry.moved > 0 && dry.placement_version == 0);
    assert!(dry.balancedness_after > dry.balancedness_before);
    assert!(!h.wants_step());
    let s = h.rebalance(false).unwrap();
    assert!(s.applied && s.placement_version == 1, "{s:?}");
    assert_eq!(h.snapshot().pending_version, Some(1));
    // A second change waits for the first.
    assert!(matches!(h.rebalance(false), Err(ExpertsError::Busy { version: 1 })));
    assert!(h.wants_step());
    // First step: carries the placement to load, still runs version 0.
    let mut step = StepRequest::default();
    h.prepare_step(&mut step);
    let update = step.stage_placement.clone().expect("staged");
    assert_eq!((update.version, step.placement_version), (1, 0));
    // Three ranks ready: no switch yet.
    let mut results = skewed_results(&h, 6, 1);
    results[3].staged_placement_version = 0;
    h.record_results(&results);
    let mut step = StepRequest::default();
    h.prepare_step(&mut step);
    assert!(step.stage_placement.is_none());
    assert_eq!(step.placement_version, 0);
    // All ready: the next step switches.
    h.record_results(&skewed_results(&h, 6, 1));
    let mut step = StepRequest::default();
    h.prepare_step(&mut step);
    assert_eq!(step.placement_version, 1);
    let s = h.snapshot();
    assert_eq!((s.placement_version, s.pending_version, s.placement_steps), (1, None, 0));
    assert!(s.layers[0].replicas[..4].iter().all(|&r| r > 1), "{:?}", s.layers[0].replicas);
    // Measured under the new placement: balanced.
    h.record_results(&skewed_results(&h, 6, 1));
    let after = h.snapshot();
    assert!(after.max_over_mean < 1.5, "{after:?}");
    assert_eq!(after.window_steps, 4, "expert counts survive the switch");
    // Rebalancing the same load again changes nothing.
    let again = h.rebalance(false).unwrap();
    assert!(!again.applied && again.placement_version == 1 && again.moved == 0);
}

#[test]
fn staging_error_abandons_the_change() {
    let (h, _) = handle(1, Some(0));
    h.set_replicas(&ReplicaRequest::Redundant(2)).unwrap();
    let mut step = StepRequest::default();
    h.prepare_step(&mut step);
    let mut results = skewed_results(&h, 1, 0);
    results[2].staging_error = "disk gone".into();
    h.record_results(&results);
    let s = h.snapshot();
    assert_eq!(s.pending_version, None);
    assert!(s.last_error.unwrap().contains("rank 2: disk gone"));
    assert_eq!(s.placement_version, 0);
}

#[test]
fn invalid_requests_name_what_is_wrong() {
    let (h, _) = handle(1, Some(0));
    let layer = ModelConfig::tiny().first_k_dense_replace;
    let explicit =
        |l: usize, e: usize, c: usize| h.explicit_request(&BTreeMap::new(), &[(l, e, c)]);
    let cases: Vec<(Result<ChangeSummary, ExpertsError>, &str)> = vec![
        (explicit(0, 1, 2).and_then(|r| h.set_replicas(&r)), "layer 0"),
        (explicit(layer, 99, 2).and_then(|r| h.set_replicas(&r)), "expert 99"),
        (explicit(layer, 3, 0).and_then(|r| h.set_replicas(&r)), "zero replicas"),
        (explicit(layer, 3, 9).and_then(|r| h.set_replicas(&r)), "9 replicas"),
        (h.set_replicas(&ReplicaRequest::Redundant(50)), "slots"),
        (
            h.explicit_request(&[(layer, vec![1, 2])].into_iter().collect(), &[])
                .and_then(|r| h.set_replicas(&r)),
            "2 expert counts",
        ),
    ];
    for (r, text) in cases {
        let e = r.expect_err(text);
        let engine = EngineError::from(e.clone());
        assert!(matches!(engine, EngineError::InvalidArgument { .. }), "{text}: {engine:?}");
        assert!(e.to_string().contains(text), "{text}: {e}");
    }
    // Nothing was queued by the refusals.
    assert_eq!(h.snapshot().pending_version, None);
    // Before any epoch: UNAVAILABLE.
    let fresh = ExpertsHandle::new(ExpertsConfig::default(), ModelConfig::tiny());
    let e = EngineError::from(fresh.rebalance(false).unwrap_err());
    assert!(matches!(e, EngineError::Unavailable(_)), "{e:?}");
}

#[test]
fn a_new_epoch_keeps_the_placement_in_effect() {
    let (h, _) = handle(2, Some(0));
    h.set_replicas(&ReplicaRequest::Redundant(3)).unwrap();
    let mut step = StepRequest::default();
    h.prepare_step(&mut step);
    h.record_results(&skewed_results(&h, 1, 1));
    h.prepare_step(&mut StepRequest::default());
    assert_eq!(h.snapshot().placement_version, 1);
    let mut plan = Plan { epoch: 2, world_size: W as u32, tp: 1, ..Default::default() };
    h.shape_plan(&mut plan, &Layout::Same).unwrap();
    h.epoch_started();
    assert_eq!(plan.placement_version, 1);
    let reps: usize = plan.placement[0].experts.iter().map(|e| e.slots.len()).sum();
    assert_eq!(reps, 16 + 3);
    // A different world starts from the configured policy.
    let mut plan = Plan { epoch: 3, world_size: 2, tp: 1, ..Default::default() };
    h.shape_plan(&mut plan, &Layout::Fresh).unwrap();
    assert_eq!(plan.placement_version, 0);
}

#[test]
fn a_shrunk_epoch_carries_the_placement_onto_the_survivors() {
    let (h, first) = handle(5, None);
    let before = h.active_plan().unwrap();
    use fathom_common::ids::Rank;
    let origins = vec![Some(Rank(0)), Some(Rank(2)), Some(Rank(3))];
    let mut plan = Plan { epoch: 2, world_size: 3, tp: 1, ..Default::default() };
    h.shape_plan(&mut plan, &Layout::Reshaped { origins }).unwrap();
    h.epoch_started();
    let after = h.active_plan().unwrap();
    assert_eq!(after.world_size, 3);
    assert_eq!(plan.placement_version, first.placement_version + 1);
    for (new, old) in [(0u32, 0u32), (1, 2), (2, 3)] {
        for l in &after.placement.layers {
            assert_eq!(after.experts_on(l.layer, Rank(new)), before.experts_on(l.layer, Rank(old)));
        }
    }
    assert_eq!(h.snapshot().world_size, 3);
}

/// `skewed_results` with the counters sent sparse: (gap, count) pairs of the non-zero cells.
fn sparse(mut results: Vec<StepResult>) -> Vec<StepResult> {
    for r in &mut results {
        let mut runs = Vec::new();
        let mut next = 0;
        for (i, &c) in r.expert_tokens.iter().enumerate() {
            if c > 0 {
                runs.extend([(i - next) as u32, c]);
                next = i + 1;
            }
        }
        r.expert_token_cells = r.expert_tokens.len() as u32;
        r.expert_token_runs = runs;
        r.expert_tokens.clear();
    }
    results
}

#[test]
fn sparse_counters_read_as_dense_and_malformed_ones_add_nothing() {
    let (dense, _) = handle(2, Some(0));
    let (sp, _) = handle(2, Some(0));
    dense.record_results(&skewed_results(&dense, 5, 0));
    let sparse_results = sparse(skewed_results(&sp, 5, 0));
    assert!(sparse_results[0].expert_token_runs.len() < 2 * 64, "sparse on the wire");
    sp.record_results(&sparse_results);
    let (a, b) = (dense.snapshot(), sp.snapshot());
    assert_eq!(b.window_steps, 1);
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        assert_eq!(la.tokens, lb.tokens);
        assert_eq!(la.rank_tokens, lb.rank_tokens);
    }
    // Malformed: refused whole, named.
    let cells = sparse_results[0].expert_token_cells as usize;
    let mut routed = vec![0u64; cells];
    let bad = |f: &dyn Fn(&mut StepResult)| {
        let mut r = sparse_results[0].clone();
        f(&mut r);
        add_step_expert_tokens(&r, &mut vec![0u64; cells]).unwrap_err()
    };
    assert!(bad(&|r| r.expert_token_runs.push(1)).contains("odd"));
    assert!(bad(&|r| r.expert_token_cells += 1).contains("cells"));
    assert!(bad(&|r| r.expert_tokens = vec![1]).contains("both"));
    assert!(bad(&|r| r.expert_token_runs[1] = 0).contains("pair 0"));
    assert!(bad(&|r| *r.expert_token_runs.last_mut().unwrap() = 0).contains("pair"));
    let mut far = sparse_results[0].clone();
    far.expert_token_runs.extend([cells as u32, 1]);
    assert!(add_step_expert_tokens(&far, &mut routed).is_err());
    assert!(routed.iter().all(|&c| c == 0), "nothing added from a refused result");
    assert_eq!(add_step_expert_tokens(&StepResult::default(), &mut routed), Ok(false));
}
