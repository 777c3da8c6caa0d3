//! Redundant replicas at decode batch 1 (issue 9): with every token routed to the same hot
//! experts and those experts replicated on both ranks, the replica choice spreads a one-token
//! batch over the replicas (both ranks' expert slots compute tokens, measured by the ranks' own
//! `StepLoad` counters), and the outputs do not depend on it: greedy tokens equal the one-rank
//! model and the logits are bit-identical to the same layout without replicas.

mod parallel_common;

use fathom_common::ids::{Epoch, ExpertId, Rank};
use fathom_common::plan::{ParallelPlan, PlanSpec};
use fathom_kernels::Tensor;
use fathom_kernels::comm::{Collective, CommOptions, LocalComm};
use fathom_worker::kv::BlockAllocator;
use fathom_worker::model::{ForwardOptions, LogitsMode, SeqInput};
use fathom_worker::parallel::{
    GenerateRequest, RankForwardOptions, RankModel, StepLoad, run_local,
};
use fathom_worker::sampling::SamplingParams;
use fathom_worker::weights::{MemorySource, TensorSource};
use parallel_common::{golden_case, reference_generate};

fn plan(cfg: &fathom_common::ModelConfig, w: usize, t: usize, redundant: usize) -> ParallelPlan {
    let mut spec = PlanSpec::new(Epoch(1), w, t);
    spec.redundant_slots_per_rank = redundant;
    ParallelPlan::build(&spec, cfg).unwrap()
}

/// `src` with a router bias that sends every token to experts 0..top_k.
fn hot_source(src: &MemorySource, cfg: &fathom_common::ModelConfig) -> MemorySource {
    let mut hot = src.clone();
    for l in (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)) {
        let name = format!("model.layers.{l}.mlp.gate.e_score_correction_bias");
        let mut b = src.load(&name).unwrap().into_data();
        for v in b.iter_mut().take(cfg.num_experts_per_tok) {
            *v += 1000.0;
        }
        hot.insert(name, Tensor::new(vec![b.len()], b));
    }
    hot
}

/// Feeds `tokens` one per step (decode batch 1) to group 0 of `p` on W threads; returns each
/// rank's load counters summed over the steps.
fn batch_one_loads(
    cfg: &fathom_common::ModelConfig,
    src: &MemorySource,
    p: &ParallelPlan,
    tokens: &[u32],
) -> Vec<StepLoad> {
    let w = p.world_size;
    let comms = LocalComm::create_with(w, CommOptions::default());
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, mut world)| {
                s.spawn(move || {
                    let mut group = world.split(&p.groups()).unwrap().unwrap();
                    let m = RankModel::load(cfg.clone(), src, p, rank).unwrap();
                    let nb = tokens.len().div_ceil(4);
                    let mut cache = m.new_cache(4, nb).unwrap();
                    let table = BlockAllocator::new(nb).alloc(nb).unwrap();
                    let opts = RankForwardOptions::from(ForwardOptions {
                        logits: LogitsMode::LastPerSeq,
                        ..Default::default()
                    });
                    let mut total = StepLoad::default();
                    for (pos, t) in tokens.iter().enumerate() {
                        let seq = SeqInput {
                            tokens: std::slice::from_ref(t),
                            start_pos: pos,
                            block_table: &table,
                        };
                        let seqs = if m.group() == 0 { vec![seq] } else { Vec::new() };
                        let (_, load) = m
                            .forward_counted(&seqs, &mut cache, &mut world, group.as_mut(), &opts)
                            .unwrap();
                        if total.computed.is_empty() {
                            total = load;
                        } else {
                            total
                                .computed
                                .iter_mut()
                                .zip(&load.computed)
                                .for_each(|(a, b)| *a += b);
                            total.routed.iter_mut().zip(&load.routed).for_each(|(a, b)| *a += b);
                        }
                    }
                    total
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn batch_one_decode_spreads_over_replicas_with_identical_outputs() {
    let case = golden_case("group_routing");
    let cfg = &case.cfg;
    let hot = hot_source(&case.src, cfg);
    let k = cfg.num_experts_per_tok;
    let moe_layers: Vec<usize> =
        (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)).collect();
    // W = 2, T = 1, two redundant slots per rank: the hot experts get a replica on the other
    // rank (an even placement puts experts 0..top_k together on rank 0).
    let p = plan(cfg, 2, 1, 2);
    let l0 = moe_layers[0];
    let reps = p.replicas(l0, ExpertId(0)).unwrap();
    let ranks: std::collections::BTreeSet<Rank> = reps.iter().map(|s| s.rank).collect();
    assert_eq!(ranks.len(), 2, "expert 0 of layer {l0} has replicas on both ranks: {reps:?}");

    let steps = 6;
    let tokens: Vec<u32> = (0..steps as u32).map(|i| (i * 29 + 3) % 256).collect();
    let loads = batch_one_loads(cfg, &hot, &p, &tokens);
    // Rank 0 routes every token (group 0); all go to experts 0..top_k.
    let routed_total: u64 = loads[0].routed.iter().map(|&c| u64::from(c)).sum();
    assert_eq!(routed_total, (steps * k * moe_layers.len()) as u64);
    assert!(loads[1].routed.iter().all(|&c| c == 0), "the idle group routes nothing");
    for (li, &l) in moe_layers.iter().enumerate() {
        let per_rank: Vec<u64> = loads.iter().map(|load| load.computed[li]).collect();
        eprintln!("layer {l}: expert slots computed per rank at batch 1: {per_rank:?}");
        assert_eq!(per_rank.iter().sum::<u64>(), (steps * k) as u64, "layer {l}");
        // Every hot expert is replicated on both ranks here, so both compute.
        let hot_replicated = (0..k as u32)
            .filter(|&e| {
                let r: std::collections::BTreeSet<Rank> =
                    p.replicas(l, ExpertId(e)).unwrap().iter().map(|s| s.rank).collect();
                r.len() == 2
            })
            .count();
        if hot_replicated > 0 {
            assert!(
                per_rank.iter().all(|&c| c > 0),
                "layer {l}: a batch of one token used only one replica: {per_rank:?}"
            );
        }
    }

    // Outputs: greedy tokens equal the one-rank model; logits bit-identical with and without
    // replicas (the replica choice never changes an output bit).
    let prompt = [42u32];
    let n = 6;
    let want = reference_generate(cfg, &hot, &prompt, n);
    let req = |_: usize| GenerateRequest {
        prompts: vec![prompt.to_vec()],
        max_new_tokens: n,
        sampling: SamplingParams::greedy(),
        stop_ids: Vec::new(),
        keep_logits: true,
        record_routing: false,
        block_size: 4,
    };
    let idle = GenerateRequest { prompts: Vec::new(), ..req(0) };
    let with = run_local(cfg, &hot, &p, &[req(0), idle.clone()], CommOptions::default()).unwrap();
    let without =
        run_local(cfg, &hot, &plan(cfg, 2, 1, 0), &[req(0), idle], CommOptions::default()).unwrap();
    assert_eq!(with[0].generated[0], want.generated[0], "greedy tokens vs the one-rank model");
    assert_eq!(with[0].generated, without[0].generated);
    assert_eq!(with[0].logits, without[0].logits, "logits bit-identical with replicas");
}
