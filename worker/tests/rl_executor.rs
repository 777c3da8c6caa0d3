//! RL outputs at the step executor (what a worker puts in `StepEvent.result`, issue 12), on the
//! golden checkpoint `sparse_long` through the real mmap reader, for the single-rank executor
//! (W=1) and the sharded one (W=2, T=1, ranks as threads over `LocalComm`):
//!
//! - teacher-forced steps with the prompt prefilled in chunks (only the last one samples): the
//!   routed experts of *every* chunk come back, with the first sample, as one run from position
//!   0, and then one position per decode step; together they equal HF's router
//!   (`golden.json`), so the chunking does not change the answer;
//! - the same steps without options: each `SeqResult` encodes to exactly the bytes of
//!   `{seq_id, token_id}` (no logprob, mask, top logits or routing is built or sent), and the
//!   sampled tokens are the same.

use fathom_kernels::comm::{Collective, LocalComm};
use fathom_proto::v1::{
    GroupStep, Plan, SamplingParams, SeqOutputs, SeqResult, SeqStep, StepRequest,
};
use fathom_worker::executor::sharded::ShardedFactory;
use fathom_worker::executor::single::SingleRankFactory;
use fathom_worker::executor::{EpochContext, Executor, ExecutorFactory};
use prost::Message;
use std::path::PathBuf;

const BLOCK: usize = 4;
const CHUNK: usize = 6;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden/sparse_long")
}

struct Golden {
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    /// [position][moe_layer][top_k]
    topk: Vec<Vec<Vec<u32>>>,
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn golden() -> Golden {
    let dir = golden_dir();
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let t_len = g["teacher_forced_len"].as_u64().unwrap() as usize;
    let mut topk = vec![Vec::new(); t_len];
    for layer in g["routing"].as_array().unwrap() {
        for (t, row) in topk.iter_mut().enumerate() {
            // The fixture's margins are all >= 1e-4 (README): no position is excluded here.
            assert!(layer["margin"][t].as_f64().unwrap() >= 1e-4);
            row.push(u32s(&layer["topk"][t]));
        }
    }
    Golden { prompt: u32s(&g["prompt_ids"]), greedy: u32s(&g["greedy_ids"]), topk }
}

/// Teacher-forced steps of one sequence in group 0: the prompt in chunks of [`CHUNK`] (the last
/// samples), then every greedy token but the last, one per step.
fn steps(g: &Golden, outputs: SeqOutputs, groups: u32) -> Vec<StepRequest> {
    let mut tf = g.prompt.clone();
    tf.extend_from_slice(&g.greedy[..g.greedy.len() - 1]);
    let p = g.prompt.len();
    let mut bounds: Vec<(usize, usize)> =
        (0..p).step_by(CHUNK).map(|s| (s, (s + CHUNK).min(p))).collect();
    bounds.extend((p..tf.len()).map(|s| (s, s + 1)));
    bounds
        .iter()
        .enumerate()
        .map(|(i, &(start, end))| {
            let seq = SeqStep {
                seq_id: 42,
                token_ids: tf[start..end].to_vec(),
                start_position: start as u32,
                block_table: (0..end.div_ceil(BLOCK) as u32).collect(),
                sample: end >= p,
                sampling: Some(SamplingParams::default()),
                seed: 0,
                generated: end.saturating_sub(p) as u32,
                outputs: Some(outputs),
            };
            StepRequest {
                epoch: 1,
                step_id: i as u64 + 1,
                groups: (0..groups)
                    .map(|gi| GroupStep {
                        group: gi,
                        seqs: if gi == 0 { vec![seq.clone()] } else { Vec::new() },
                        released_seq_ids: Vec::new(),
                    })
                    .collect(),
                flags: None,
                ..Default::default()
            }
        })
        .collect()
}

fn plan(w: u32) -> Plan {
    Plan {
        epoch: 1,
        world_size: w,
        tp: 1,
        model_path: golden_dir().display().to_string(),
        kv_block_size: BLOCK as u32,
        kv_blocks: 64,
        comm: "local".into(),
        ..Default::default()
    }
}

fn run(ex: &mut dyn Executor, steps: &[StepRequest]) -> Vec<Vec<SeqResult>> {
    steps.iter().map(|s| ex.execute(s).unwrap_or_else(|e| panic!("{e}"))).collect()
}

/// Group 0's results per step, for world size `w` (1: single-rank executor; > 1: sharded,
/// T = 1, ranks as threads).
fn execute(w: u32, steps: &[StepRequest]) -> Vec<Vec<SeqResult>> {
    if w == 1 {
        let ctx = EpochContext { plan: plan(1), rank: 0, world: None, group: None };
        let mut ex = SingleRankFactory.prepare(ctx).unwrap();
        return run(ex.as_mut(), steps);
    }
    let comms = LocalComm::create(w as usize);
    let groups: Vec<Vec<usize>> = (0..w as usize).map(|r| vec![r]).collect();
    let mut per_rank: Vec<Vec<Vec<SeqResult>>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, mut world)| {
                let groups = groups.clone();
                s.spawn(move || {
                    let group = world.split(&groups).unwrap().unwrap();
                    let ctx = EpochContext {
                        plan: plan(w),
                        rank: rank as u32,
                        world: Some(Box::new(world)),
                        group: Some(group),
                    };
                    let mut ex = ShardedFactory.prepare(ctx).unwrap();
                    run(ex.as_mut(), steps)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, r) in per_rank.iter().enumerate().skip(1) {
        assert!(r.iter().all(Vec::is_empty), "rank {rank} (empty group) returned results");
    }
    per_rank.swap_remove(0)
}

#[test]
fn chunked_prefill_routing_reaches_the_first_sample_and_equals_hf() {
    let g = golden();
    let all = SeqOutputs {
        routed_experts: true,
        logprobs: true,
        top_logprobs: 2,
        sampling_mask: true,
        logits_top_k: 0,
    };
    let chunks = g.prompt.len().div_ceil(CHUNK);
    assert!(chunks >= 3, "the prompt must span several chunks");
    for w in [1, 2] {
        let results = execute(w, &steps(&g, all, w));
        // Non-final chunks answer nothing; then one result per step.
        assert!(results[..chunks - 1].iter().all(Vec::is_empty), "W={w}: non-final chunks");
        let mut tokens = Vec::new();
        let mut routed: Vec<Vec<Vec<u32>>> = Vec::new();
        for (i, r) in results[chunks - 1..].iter().enumerate() {
            assert_eq!(r.len(), 1, "W={w}: step {i}");
            let r = &r[0];
            tokens.push(r.token_id);
            assert!(r.logprob.is_some() && r.sampling_mask.is_some(), "W={w}: extras asked");
            let re = r.routed_experts.as_ref().expect("routed experts asked");
            let want = if i == 0 { g.prompt.len() } else { 1 };
            assert_eq!(re.start_position as usize, routed.len(), "W={w}: contiguous from 0");
            assert_eq!(re.positions as usize, want, "W={w}: step {i}: positions");
            assert_eq!(re.bytes_per_id, 1);
            let per_pos = (re.moe_layers * re.top_k) as usize;
            assert_eq!(re.ids.len(), want * per_pos, "W={w}: step {i}: packed length");
            for pos in re.ids.chunks(per_pos) {
                routed.push(
                    pos.chunks(re.top_k as usize)
                        .map(|l| l.iter().map(|&b| u32::from(b)).collect())
                        .collect(),
                );
            }
        }
        assert_eq!(tokens, g.greedy[..tokens.len()], "W={w}: greedy tokens");
        assert_eq!(routed.len(), g.topk.len(), "W={w}: every fed position");
        for (t, (ours, hf)) in routed.iter().zip(&g.topk).enumerate() {
            assert_eq!(ours, hf, "W={w}: position {t}");
        }
    }
}

#[test]
fn results_without_options_carry_only_the_token() {
    let g = golden();
    for w in [1, 2] {
        let bare = execute(w, &steps(&g, SeqOutputs::default(), w));
        let full = execute(
            w,
            &steps(
                &g,
                SeqOutputs {
                    routed_experts: true,
                    logprobs: true,
                    sampling_mask: true,
                    ..Default::default()
                },
                w,
            ),
        );
        let mut n = 0;
        for (i, (b, f)) in bare.iter().zip(&full).enumerate() {
            assert_eq!(b.len(), f.len(), "W={w}: step {i}");
            for (b, f) in b.iter().zip(f) {
                n += 1;
                let token_only =
                    SeqResult { seq_id: b.seq_id, token_id: b.token_id, ..Default::default() };
                assert_eq!(b, &token_only, "W={w}: step {i}: extras sent unasked");
                assert_eq!(b.encoded_len(), token_only.encoded_len());
                assert_eq!(b.token_id, f.token_id, "W={w}: step {i}: options changed the token");
                assert!(f.encoded_len() > b.encoded_len(), "W={w}: step {i}: options sent nothing");
            }
        }
        assert_eq!(n, g.greedy.len(), "W={w}: one result per sampled token");
    }
}
