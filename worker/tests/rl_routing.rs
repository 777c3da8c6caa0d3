//! RL rollouts, "keep routing" (issue 12): the routed experts Fathom reports for every position
//! fed through the model equal HF transformers' router decisions (teacher-forced, from the golden
//! fixtures `tests/fixtures/golden/*/golden.json` → `routing[*].topk`), for W=1, for W=4 with
//! T=2, and for W=4 T=2 with redundant and pinned expert replicas (the ids are logical: replica
//! placement never shows), and chunked prefill does not change them.
//!
//! The fed sequence of a greedy rollout is `prompt + greedy[..N-1]`, exactly HF's teacher-forced
//! sequence, because the greedy ids equal HF's (asserted here too: every fixture step has a
//! top-1/top-2 logit margin ≥ 1e-3). Positions whose router margin (k-th minus (k+1)-th
//! selection score) or group margin is below [`MARGIN`] may legitimately differ under fp32
//! reordering; they are excluded, counted, printed, and the count is asserted (the fixtures were
//! drawn with every margin ≥ 1e-4, so the count is 0 — a regenerated fixture with near-ties
//! would show up here).

mod parallel_common;

use fathom_common::ModelConfig;
use fathom_common::ids::Epoch;
use fathom_common::plan::{ParallelPlan, PlanSpec};
use fathom_kernels::comm::{Collective, CommOptions, LocalComm};
use fathom_worker::kv::{BlockAllocator, blocks_for};
use fathom_worker::model::{ForwardOptions, LogitsMode, Model, SeqInput, ShardSpec};
use fathom_worker::parallel::{GenerateRequest, RankForwardOptions, RankModel, run_local};
use fathom_worker::sampling::SamplingParams;
use parallel_common::{GoldenCase, fixtures, golden_cases};

/// Router decisions closer than this may flip under fp32 summation order.
const MARGIN: f64 = 1e-4;

/// HF's routing of one case: per position, per MoE layer, the sorted logical ids, and whether
/// the position is decided by a margin below [`MARGIN`] in any layer.
struct HfRouting {
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    /// [position][moe_layer][top_k]
    topk: Vec<Vec<Vec<u32>>>,
    /// [position]: true when some layer's router or group margin is below [`MARGIN`].
    near_tie: Vec<bool>,
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn hf_routing(case: &GoldenCase) -> HfRouting {
    let path = fixtures().join(&case.name).join("golden.json");
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let t_len = g["teacher_forced_len"].as_u64().unwrap() as usize;
    let layers = g["routing"].as_array().unwrap();
    assert_eq!(layers.len(), case.cfg.num_moe_layers(), "{}: MoE layers in golden.json", case.name);
    let mut topk = vec![Vec::new(); t_len];
    let mut near_tie = vec![false; t_len];
    for (m, layer) in layers.iter().enumerate() {
        let li = layer["layer"].as_u64().unwrap() as usize;
        assert_eq!(li, case.cfg.first_k_dense_replace + m, "{}: routing layer order", case.name);
        let rows = layer["topk"].as_array().unwrap();
        assert_eq!(rows.len(), t_len, "{}: layer {li} positions", case.name);
        for (t, row) in rows.iter().enumerate() {
            topk[t].push(u32s(row));
            let margin = layer["margin"][t].as_f64().unwrap();
            let group_margin = layer["group_margin"][t].as_f64().unwrap_or(f64::INFINITY);
            near_tie[t] |= margin < MARGIN || group_margin < MARGIN;
        }
    }
    HfRouting { prompt: u32s(&g["prompt_ids"]), greedy: u32s(&g["greedy_ids"]), topk, near_tie }
}

/// Compares `ours` ([position][moe_layer][top_k]) with HF's; returns the number of excluded
/// (near-tie) positions after asserting every other position equal.
fn check_against_hf(
    what: &str,
    ours: &[Vec<Vec<u32>>],
    hf: &HfRouting,
    cfg: &ModelConfig,
) -> usize {
    assert_eq!(ours.len(), hf.topk.len(), "{what}: positions with routing");
    let mut excluded = 0;
    for (t, (mine, theirs)) in ours.iter().zip(&hf.topk).enumerate() {
        assert_eq!(mine.len(), cfg.num_moe_layers(), "{what}: position {t}: MoE layers");
        for ids in mine {
            assert_eq!(ids.len(), cfg.num_experts_per_tok, "{what}: position {t}: top-k");
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "{what}: position {t}: not ascending");
            assert!(
                ids.iter().all(|&e| (e as usize) < cfg.n_routed_experts),
                "{what}: logical ids"
            );
        }
        if hf.near_tie[t] {
            excluded += 1;
            continue;
        }
        assert_eq!(mine, theirs, "{what}: position {t}: routed experts [moe_layer][k]");
    }
    excluded
}

/// The plans under test: W=1; W=4 T=2; W=4 T=2 with 2 redundant slots per rank and expert 5
/// pinned to 3 replicas in every MoE layer.
fn plans(cfg: &ModelConfig) -> Vec<(&'static str, ParallelPlan)> {
    let w1 = PlanSpec::new(Epoch(1), 1, 1);
    let w4 = PlanSpec::new(Epoch(1), 4, 2);
    let mut replicas = PlanSpec::new(Epoch(1), 4, 2);
    replicas.redundant_slots_per_rank = 2;
    replicas.pinned.every_layer.insert(5, 3);
    let build = |s: &PlanSpec| ParallelPlan::build(s, cfg).unwrap();
    let with_replicas = build(&replicas);
    for l in &with_replicas.placement.layers {
        assert_eq!(l.replicas[5].len(), 3, "layer {}: expert 5 pinned to 3 replicas", l.layer);
        let extra: usize = l.replicas.iter().map(|r| r.len() - 1).sum();
        assert!(extra >= 4, "layer {}: only {extra} redundant replicas placed", l.layer);
    }
    vec![("W=1", build(&w1)), ("W=4 T=2", build(&w4)), ("W=4 T=2 replicas", with_replicas)]
}

#[test]
fn routed_experts_equal_hf_router_on_every_layout() {
    let mut total_excluded = 0;
    let mut total_positions = 0;
    for case in golden_cases() {
        let hf = hf_routing(&case);
        let expected_excluded = hf.near_tie.iter().filter(|&&x| x).count();
        let n = hf.greedy.len();
        for (layout, plan) in plans(&case.cfg) {
            // Group 0 runs the golden prompt next to an unrelated sequence (so its tokens share
            // steps and MoE messages with another request); every other group runs the golden
            // prompt alone. Every group's copy must route exactly as HF.
            let other: Vec<u32> =
                (0..9).map(|i| (i * 53 + 17) % case.cfg.vocab_size as u32).collect();
            let reqs: Vec<GenerateRequest> = (0..plan.num_groups())
                .map(|g| GenerateRequest {
                    prompts: if g == 0 {
                        vec![hf.prompt.clone(), other.clone()]
                    } else {
                        vec![hf.prompt.clone()]
                    },
                    max_new_tokens: n,
                    sampling: SamplingParams::greedy(),
                    stop_ids: Vec::new(),
                    keep_logits: false,
                    record_routing: true,
                    block_size: 4,
                })
                .collect();
            let outs = run_local(&case.cfg, &case.src, &plan, &reqs, CommOptions::default())
                .unwrap_or_else(|e| panic!("{} {layout}: {e}", case.name));
            for (g, out) in outs.iter().enumerate() {
                let what = format!("{} {layout} group {g}", case.name);
                assert_eq!(out.generated[0], hf.greedy, "{what}: greedy ids differ from HF");
                let excluded = check_against_hf(&what, &out.routed_experts[0], &hf, &case.cfg);
                assert_eq!(excluded, expected_excluded, "{what}: excluded positions");
                // The neighbour's routing covers its own fed positions (prompt + n - 1).
                if g == 0 {
                    assert_eq!(out.routed_experts[1].len(), other.len() + n - 1, "{what}: seq 1");
                }
                total_excluded += excluded;
                total_positions += hf.topk.len();
            }
        }
    }
    eprintln!(
        "routed experts vs HF: {total_positions} (layout, position) pairs compared, \
         {total_excluded} excluded (router or group margin < {MARGIN:e})"
    );
    assert!(total_positions > 0, "no golden case ran");
    // The fixtures were drawn with every margin >= 1e-4: nothing may be excluded.
    assert_eq!(total_excluded, 0, "positions excluded for near-tie router margins");
}

#[test]
fn chunked_prefill_does_not_change_routed_experts() {
    for case in golden_cases() {
        let hf = hf_routing(&case);
        let model = Model::load(&case.src, case.cfg.clone(), ShardSpec::full(&case.cfg)).unwrap();
        let mut tf = hf.prompt.clone();
        tf.extend_from_slice(&hf.greedy[..hf.greedy.len() - 1]);
        for chunk in [1usize, 3, 5, tf.len()] {
            let bs = 4;
            let nb = blocks_for(tf.len(), bs);
            let mut cache = model.new_cache(bs, nb).unwrap();
            let table = BlockAllocator::new(nb).alloc(nb).unwrap();
            let opts = ForwardOptions {
                logits: LogitsMode::None,
                record_hidden: false,
                record_routing: true,
            };
            let mut routed = Vec::new();
            for start in (0..tf.len()).step_by(chunk) {
                let end = (start + chunk).min(tf.len());
                let seq =
                    SeqInput { tokens: &tf[start..end], start_pos: start, block_table: &table };
                let out = model.forward(&[seq], &mut cache, &opts).unwrap();
                assert_eq!(out.routed_experts.len(), end - start, "one routing row per token");
                routed.extend(out.routed_experts);
            }
            let what = format!("{} chunks of {chunk}", case.name);
            let excluded = check_against_hf(&what, &routed, &hf, &case.cfg);
            assert_eq!(excluded, hf.near_tie.iter().filter(|&&x| x).count(), "{what}");
        }
    }
}

#[test]
fn no_routing_is_captured_unless_asked() {
    for case in golden_cases().into_iter().take(1) {
        let model = Model::load(&case.src, case.cfg.clone(), ShardSpec::full(&case.cfg)).unwrap();
        let tokens: Vec<u32> = (2..14).collect();
        let mut cache = model.new_cache(4, 4).unwrap();
        let table: Vec<u32> = (0..4).collect();
        let seq = SeqInput { tokens: &tokens, start_pos: 0, block_table: &table };
        let out = model.forward(&[seq], &mut cache, &ForwardOptions::default()).unwrap();
        assert!(out.routed_experts.is_empty(), "routing captured without record_routing");
        assert!(out.layer_hidden.is_empty(), "hidden states captured without record_hidden");

        // The sharded forward of one rank: nothing recorded unless asked, and one row per
        // token when asked (so the first assertion could fail).
        let plan = ParallelPlan::build(&PlanSpec::new(Epoch(1), 1, 1), &case.cfg).unwrap();
        let rank = RankModel::load(case.cfg.clone(), &case.src, &plan, 0).unwrap();
        let mut world = LocalComm::create(1).pop().unwrap();
        let mut group = world.split(&plan.groups()).unwrap().unwrap();
        for record_routing in [false, true] {
            let mut cache = rank.new_cache(4, 4).unwrap();
            let opts = RankForwardOptions::from(ForwardOptions {
                record_routing,
                ..ForwardOptions::default()
            });
            let out = rank.forward(&[seq], &mut cache, &mut world, group.as_mut(), &opts).unwrap();
            let want = if record_routing { tokens.len() } else { 0 };
            assert_eq!(
                out.routed_experts.len(),
                want,
                "RankModel, record_routing {record_routing}"
            );
        }

        for (layout, plan) in plans(&case.cfg) {
            let reqs: Vec<GenerateRequest> = (0..plan.num_groups())
                .map(|_| GenerateRequest {
                    prompts: vec![tokens.clone()],
                    max_new_tokens: 4,
                    sampling: SamplingParams { seed: 3, top_k: 5, ..SamplingParams::default() },
                    stop_ids: Vec::new(),
                    keep_logits: false,
                    record_routing: false,
                    block_size: 4,
                })
                .collect();
            let outs = run_local(&case.cfg, &case.src, &plan, &reqs, CommOptions::default())
                .unwrap_or_else(|e| panic!("{layout}: {e}"));
            for out in outs {
                assert_eq!(out.generated[0].len(), 4, "{layout}");
                assert!(
                    out.routed_experts.iter().all(Vec::is_empty),
                    "{layout}: routing captured without record_routing"
                );
                assert!(out.sampled.iter().all(Vec::is_empty), "{layout}: masks kept unasked");
                assert!(out.logits.iter().all(Vec::is_empty), "{layout}: logits kept unasked");
            }
        }
    }
}
