//! Sharded execution against the one-rank model on the golden configs
//! (`tests/fixtures/golden/*`: 16 experts, 4 heads): every layout in {W=1; W=2, T∈{1,2};
//! W=4, T∈{1,2,4}; W=8, T∈{2,4}}, with and without redundant replicas, must give the same greedy
//! tokens as W=1 and logits within 1e-5 relative (per row, `max|a−b| / max|b|`).
//!
//! Ranks are threads over `LocalComm`. Three sequences of different lengths are spread over the
//! D groups round-robin (so with D = 4 one group has none and only serves MoE traffic).

mod parallel_common;

use fathom_common::ids::Epoch;
use fathom_common::plan::{ParallelPlan, PlanSpec};
use fathom_kernels::comm::CommOptions;
use fathom_worker::parallel::{GenerateOutput, GenerateRequest, run_local};
use fathom_worker::sampling::SamplingParams;
use parallel_common::{golden_cases, reference_generate, rel_row_err};

const LAYOUTS: [(usize, usize); 8] =
    [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 2), (8, 4)];
const TOL: f32 = 1e-5;
const NEW_TOKENS: usize = 5;

fn prompts(vocab: usize) -> Vec<Vec<u32>> {
    [7usize, 3, 11]
        .iter()
        .enumerate()
        .map(|(s, &len)| (0..len).map(|i| ((i * 37 + s * 101 + 11) % vocab) as u32).collect())
        .collect()
}

/// Splits `prompts` round-robin over `d` groups; returns the requests and, per group, the
/// original sequence indices.
fn requests(prompts: &[Vec<u32>], d: usize) -> (Vec<GenerateRequest>, Vec<Vec<usize>>) {
    let mut reqs = Vec::new();
    let mut which = Vec::new();
    for g in 0..d {
        let idx: Vec<usize> = (0..prompts.len()).filter(|s| s % d == g).collect();
        reqs.push(GenerateRequest {
            prompts: idx.iter().map(|&s| prompts[s].clone()).collect(),
            max_new_tokens: NEW_TOKENS,
            sampling: SamplingParams::greedy(),
            stop_ids: Vec::new(),
            keep_logits: true,
            record_routing: false,
            block_size: 4,
        });
        which.push(idx);
    }
    (reqs, which)
}

fn check_layouts(redundant: usize) {
    for case in golden_cases() {
        let ps = prompts(case.cfg.vocab_size);
        let reference: Vec<GenerateOutput> =
            ps.iter().map(|p| reference_generate(&case.cfg, &case.src, p, NEW_TOKENS)).collect();
        for (w, t) in LAYOUTS {
            let mut spec = PlanSpec::new(Epoch(1), w, t);
            spec.redundant_slots_per_rank = redundant;
            let plan = ParallelPlan::build(&spec, &case.cfg).unwrap();
            if redundant > 0 && w > 1 {
                let extra: usize =
                    plan.placement.layers[0].replicas.iter().map(|r| r.len() - 1).sum();
                assert!(extra > 0, "{}: W={w} T={t}: no redundant replica placed", case.name);
            }
            let (reqs, which) = requests(&ps, plan.num_groups());
            let outs = run_local(&case.cfg, &case.src, &plan, &reqs, CommOptions::default())
                .unwrap_or_else(|e| panic!("{}: W={w} T={t}: {e}", case.name));
            for (g, out) in outs.iter().enumerate() {
                for (i, &s) in which[g].iter().enumerate() {
                    let want = &reference[s];
                    assert_eq!(
                        out.generated[i], want.generated[0],
                        "{}: W={w} T={t} redundant={redundant}: greedy tokens of sequence {s}",
                        case.name
                    );
                    for (step, (a, b)) in out.logits[i].iter().zip(&want.logits[0]).enumerate() {
                        let err = rel_row_err(a, b, a.len());
                        assert!(
                            err <= TOL,
                            "{}: W={w} T={t} redundant={redundant}: sequence {s} step {step}: \
                             logits rel err {err:e} > {TOL:e}",
                            case.name
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn every_layout_matches_one_rank() {
    check_layouts(0);
}

#[test]
fn every_layout_matches_one_rank_with_redundant_replicas() {
    check_layouts(2);
}
