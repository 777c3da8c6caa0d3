//! Sharded execution under skew and faults, on the golden configs (ranks as threads over
//! `LocalComm`):
//! - each rank reads only its own tensors (bytes counted through `CountingSource`);
//! - all tokens routed to the same experts on one rank (huge router bias), with and without
//!   redundant replicas of them; a batch of one token (T−1 ranks of the group route nothing);
//!   groups with no sequence at all — all equal to the one-rank model;
//! - the replicated indexer selects the same top-k on every rank of a group (debug check);
//! - routing recorded by the sharded model equals the one-rank model's;
//! - a rank that dies mid-generation or stalls: the others fail naming it within the deadline.

mod parallel_common;

use fathom_common::ids::{Epoch, ExpertId, Rank};
use fathom_common::plan::{ParallelPlan, PlanSpec};
use fathom_kernels::Tensor;
use fathom_kernels::comm::{Collective, CommOptions, LocalComm};
use fathom_worker::kv::{BlockAllocator, blocks_for};
use fathom_worker::model::{ForwardOptions, LogitsMode, Model, SeqInput, ShardSpec};
use fathom_worker::parallel::{
    CountingSource, GenerateRequest, ParallelError, RankForwardOptions, RankModel,
    generate_on_rank, run_local,
};
use fathom_worker::sampling::SamplingParams;
use fathom_worker::weights::{MemorySource, TensorSource};
use parallel_common::{golden_case, reference_generate, rel_row_err};
use std::time::{Duration, Instant};

const TOL: f32 = 1e-5;

fn plan(cfg: &fathom_common::ModelConfig, w: usize, t: usize, redundant: usize) -> ParallelPlan {
    let mut spec = PlanSpec::new(Epoch(1), w, t);
    spec.redundant_slots_per_rank = redundant;
    ParallelPlan::build(&spec, cfg).unwrap()
}

fn request(prompts: Vec<Vec<u32>>, n: usize) -> GenerateRequest {
    GenerateRequest {
        prompts,
        max_new_tokens: n,
        sampling: SamplingParams::greedy(),
        stop_ids: Vec::new(),
        keep_logits: true,
        record_routing: false,
        block_size: 4,
    }
}

/// Runs `prompt` on group 0 only (other groups idle) and checks it against the one-rank model.
fn check_single(
    label: &str,
    src: &MemorySource,
    cfg: &fathom_common::ModelConfig,
    p: &ParallelPlan,
    prompt: &[u32],
    n: usize,
) {
    let want = reference_generate(cfg, src, prompt, n);
    let mut reqs = vec![request(vec![prompt.to_vec()], n)];
    reqs.extend((1..p.num_groups()).map(|_| request(Vec::new(), n)));
    let out = run_local(cfg, src, p, &reqs, CommOptions::default())
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(out[0].generated[0], want.generated[0], "{label}: greedy tokens");
    for (step, (a, b)) in out[0].logits[0].iter().zip(&want.logits[0]).enumerate() {
        let err = rel_row_err(a, b, a.len());
        assert!(err <= TOL, "{label}: step {step}: logits rel err {err:e}");
    }
    for g in 1..out.len() {
        assert!(out[g].generated.is_empty(), "{label}: idle group {g} generated something");
    }
}

#[test]
fn each_rank_reads_only_its_tensors() {
    let case = golden_case("dense2");
    let cfg = &case.cfg;
    let all = CountingSource::new(&case.src);
    Model::load(&all, cfg.clone(), ShardSpec { load_mtp: false, ..ShardSpec::full(cfg) }).unwrap();
    let full = all.bytes_by_tensor();
    for (w, t) in [(4, 2), (8, 4), (2, 1)] {
        let p = plan(cfg, w, t, 0);
        let mut expert_bytes = 0;
        for rank in 0..w {
            let counting = CountingSource::new(&case.src);
            RankModel::load(cfg.clone(), &counting, &p, rank).unwrap();
            let got = counting.bytes_by_tensor();
            for (name, &bytes) in &got {
                let whole = full[name];
                if let Some(rest) = name.split(".mlp.experts.").nth(1) {
                    let layer: usize = name.split('.').nth(2).unwrap().parse().unwrap();
                    let e: u32 = rest.split('.').next().unwrap().parse().unwrap();
                    let mine = p
                        .experts_on(layer, Rank(rank as u32))
                        .iter()
                        .any(|(_, x)| *x == ExpertId(e));
                    assert!(mine, "W={w} T={t} rank {rank} read {name}, not one of its experts");
                    assert_eq!(bytes, whole, "{name}");
                    expert_bytes += bytes;
                } else if name.contains("q_b_proj")
                    || name.contains("kv_b_proj")
                    || name.contains("o_proj")
                    || (name.contains(".mlp.")
                        && !name.contains("shared_experts")
                        && !name.contains(".gate."))
                    || name.contains("embed_tokens")
                    || name.starts_with("lm_head")
                {
                    assert_eq!(
                        bytes * t as u64,
                        whole,
                        "W={w} T={t} rank {rank}: {name} is not a 1/T slice"
                    );
                } else {
                    assert_eq!(bytes, whole, "W={w} T={t} rank {rank}: replicated {name}");
                }
            }
            assert!(!got.keys().any(|k| k.contains("mlp.experts") && !full.contains_key(k)));
        }
        let all_experts: u64 =
            full.iter().filter(|(k, _)| k.contains(".mlp.experts.")).map(|(_, v)| v).sum();
        assert_eq!(expert_bytes, all_experts, "W={w}: experts read once over the world");
    }
}

/// `src` with a router bias that sends every token to experts 0..4 (one group, one rank at W=4).
fn hot_source(src: &MemorySource, cfg: &fathom_common::ModelConfig) -> MemorySource {
    let mut hot = src.clone();
    for l in (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)) {
        let name = format!("model.layers.{l}.mlp.gate.e_score_correction_bias");
        let mut b = src.load(&name).unwrap().into_data();
        for (e, v) in b.iter_mut().enumerate() {
            if e < cfg.num_experts_per_tok {
                *v += 1000.0;
            }
        }
        hot.insert(name, Tensor::new(vec![b.len()], b));
    }
    hot
}

#[test]
fn all_tokens_to_one_rank_with_and_without_replicas() {
    let case = golden_case("group_routing");
    let hot = hot_source(&case.src, &case.cfg);
    // The bias really routes every token to experts 0..top_k.
    let model = Model::load(&hot, case.cfg.clone(), ShardSpec::full(&case.cfg)).unwrap();
    let prompt: Vec<u32> = (0..9).map(|i| (i * 29 + 3) % 256).collect();
    let mut cache = model.new_cache(4, 3).unwrap();
    let f = model
        .forward(
            &[SeqInput { tokens: &prompt, start_pos: 0, block_table: &[0, 1, 2] }],
            &mut cache,
            &ForwardOptions {
                logits: LogitsMode::None,
                record_hidden: false,
                record_routing: true,
            },
        )
        .unwrap();
    let want: Vec<u32> = (0..case.cfg.num_experts_per_tok as u32).collect();
    assert!(f.routed_experts.iter().flatten().all(|ids| *ids == want));
    for (w, t, r) in [(4, 2, 0), (4, 1, 2), (8, 2, 1), (2, 2, 2)] {
        let p = plan(&case.cfg, w, t, r);
        if r > 0 {
            assert!(
                p.replicas(1, ExpertId(0)).unwrap().len() > 1,
                "W={w}: expert 0 not replicated"
            );
        }
        check_single(&format!("hot W={w} T={t} redundant={r}"), &hot, &case.cfg, &p, &prompt, 4);
    }
}

#[test]
fn one_token_batch_and_idle_groups() {
    let case = golden_case("short_prompt");
    for (w, t) in [(4, 4), (4, 1), (8, 2), (2, 2)] {
        let p = plan(&case.cfg, w, t, 0);
        check_single(&format!("one token W={w} T={t}"), &case.src, &case.cfg, &p, &[42], 4);
    }
}

/// Runs `body(rank, world, group)` on W threads over LocalComm.
fn run_world<R: Send>(
    w: usize,
    p: &ParallelPlan,
    opts: CommOptions,
    body: impl Fn(usize, &mut LocalComm, &mut dyn Collective) -> R + Sync,
) -> Vec<R> {
    let comms = LocalComm::create_with(w, opts);
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, mut world)| {
                let body = &body;
                s.spawn(move || {
                    let mut group = world.split(&p.groups()).unwrap().unwrap();
                    body(rank, &mut world, group.as_mut())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn indexer_topk_identical_in_group_and_routing_matches() {
    let case = golden_case("sparse_long"); // index_topk 8 < prompt: real sparse selection
    let cfg = &case.cfg;
    let prompt: Vec<u32> = (0..20).map(|i| (i * 13 + 5) % 256).collect();
    let reference = Model::load(&case.src, cfg.clone(), ShardSpec::full(cfg)).unwrap();
    let nb = blocks_for(prompt.len(), 4);
    let table = BlockAllocator::new(nb).alloc(nb).unwrap();
    let seq = [SeqInput { tokens: &prompt, start_pos: 0, block_table: &table }];
    let base =
        ForwardOptions { logits: LogitsMode::All, record_hidden: false, record_routing: true };
    let mut cache = reference.new_cache(4, nb).unwrap();
    let want = reference.forward(&seq, &mut cache, &base).unwrap();
    let p = plan(cfg, 4, 4, 0);
    let outs = run_world(4, &p, CommOptions::default(), |rank, world, group| {
        let m = RankModel::load(cfg.clone(), &case.src, &p, rank).unwrap();
        let mut cache = m.new_cache(4, nb).unwrap();
        let opts = RankForwardOptions { base, check_topk: true };
        m.forward(&seq, &mut cache, world, group, &opts).unwrap()
    });
    for (rank, o) in outs.iter().enumerate() {
        assert_eq!(o.routed_experts, want.routed_experts, "rank {rank}: routing");
        let err = rel_row_err(&o.logits, &want.logits, cfg.vocab_size);
        assert!(err <= TOL, "rank {rank}: logits rel err {err:e}");
    }
}

#[test]
fn dead_rank_is_named() {
    let case = golden_case("dense2");
    let cfg = &case.cfg;
    let p = plan(cfg, 4, 2, 0);
    let opts = CommOptions { timeout: Duration::from_secs(5), ..CommOptions::default() };
    let started = Instant::now();
    // Survivors keep their communicators until all of them failed (so none blames another).
    let survivors = std::sync::Barrier::new(3);
    let results = run_world(4, &p, opts, |rank, world, group| {
        let m = RankModel::load(cfg.clone(), &case.src, &p, rank).unwrap();
        let prompts = if m.group() == 0 { vec![vec![5, 6, 7]] } else { vec![vec![9]] };
        let req = request(prompts.clone(), 6);
        if rank == 2 {
            // One full step (the loop's all-reduce + a forward), then the rank dies.
            let mut n = [1.0f32];
            world.all_reduce_sum_f32(&mut n).unwrap();
            let mut cache = m.new_cache(4, 4).unwrap();
            let seq = [SeqInput { tokens: &prompts[0], start_pos: 0, block_table: &[0, 1] }];
            m.forward(&seq, &mut cache, world, group, &ForwardOptions::default().into()).unwrap();
            return Ok(Default::default());
        }
        let r = generate_on_rank(&m, world, group, &req);
        survivors.wait();
        r
    });
    for (rank, r) in results.iter().enumerate().filter(|(r, _)| *r != 2) {
        let e = r.as_ref().expect_err("a survivor finished without its peer");
        let ParallelError::Comm(c) = e else { panic!("rank {rank}: not a comm error: {e}") };
        assert!(c.ranks().contains(&2) || e.to_string().contains("rank 2"), "rank {rank}: {e}");
    }
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
}

#[test]
fn stalled_rank_is_named_within_the_deadline() {
    let case = golden_case("dense2");
    let cfg = &case.cfg;
    let p = plan(cfg, 4, 1, 0);
    let deadline = Duration::from_millis(1500);
    let opts = CommOptions { timeout: deadline, ..CommOptions::default() };
    let survivors = std::sync::Barrier::new(3);
    let results = run_world(4, &p, opts, |rank, world, group| {
        let m = RankModel::load(cfg.clone(), &case.src, &p, rank).unwrap();
        let req = request(vec![vec![3, 4, rank as u32]], 3);
        if rank == 1 {
            std::thread::sleep(deadline * 3);
            return (Ok(Default::default()), Duration::ZERO);
        }
        let t0 = Instant::now();
        let r = generate_on_rank(&m, world, group, &req);
        let took = t0.elapsed();
        survivors.wait();
        (r, took)
    });
    for (rank, (r, took)) in results.iter().enumerate().filter(|(r, _)| *r != 1) {
        let e = r.as_ref().expect_err("a survivor finished without the stalled peer");
        let ParallelError::Comm(c) = e else { panic!("rank {rank}: not a comm error: {e}") };
        assert_eq!(c.ranks(), vec![1], "rank {rank}: {e}");
        assert!(*took < deadline + Duration::from_secs(2), "rank {rank}: failed after {took:?}");
    }
}
