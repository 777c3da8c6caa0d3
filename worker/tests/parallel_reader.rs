//! Each rank reads only its own bytes from a real checkpoint: the golden `dense2` directory
//! opened with the mmap `CheckpointReader` (one reader per rank, as separate processes would),
//! its per-tensor read counters checked against the plan after `RankModel::load`, and the
//! shard it loaded producing the same logits as the one-rank model (through `run_local`, which
//! loads from the reader too).

mod parallel_common;

use fathom_common::ids::{Epoch, ExpertId, Rank};
use fathom_common::plan::{ParallelPlan, PlanSpec};
use fathom_kernels::comm::CommOptions;
use fathom_worker::model::{Model, ShardSpec};
use fathom_worker::parallel::{GenerateRequest, RankModel, run_local};
use fathom_worker::sampling::SamplingParams;
use fathom_worker::weights::reader::CheckpointReader;
use parallel_common::{fixtures, reference_generate, rel_row_err};

#[test]
fn each_rank_reads_only_its_bytes_from_the_checkpoint() {
    let dir = fixtures().join("dense2");
    let whole = CheckpointReader::open(&dir).unwrap();
    let cfg = whole.config().clone();
    Model::load(&whole, cfg.clone(), ShardSpec { load_mtp: false, ..ShardSpec::full(&cfg) })
        .unwrap();
    let full = whole.bytes_read_by_tensor();
    let full_total = whole.bytes_read();
    for (w, t) in [(4, 2), (8, 4)] {
        let plan = ParallelPlan::build(&PlanSpec::new(Epoch(1), w, t), &cfg).unwrap();
        let mut world_total = 0;
        for rank in 0..w {
            let reader = CheckpointReader::open(&dir).unwrap();
            RankModel::load(cfg.clone(), &reader, &plan, rank).unwrap();
            for (name, &bytes) in &reader.bytes_read_by_tensor() {
                if let Some(rest) = name.split(".mlp.experts.").nth(1) {
                    let layer: usize = name.split('.').nth(2).unwrap().parse().unwrap();
                    let e: u32 = rest.split('.').next().unwrap().parse().unwrap();
                    assert!(
                        plan.experts_on(layer, Rank(rank as u32))
                            .iter()
                            .any(|(_, x)| *x == ExpertId(e)),
                        "W={w} T={t} rank {rank} read {name}"
                    );
                } else if name.contains("q_b_proj") || name.contains("o_proj") {
                    assert_eq!(bytes * t as u64, full[name], "W={w} T={t} rank {rank}: {name}");
                }
            }
            let mine = reader.bytes_read();
            assert!(mine < full_total, "W={w} rank {rank} read {mine} of {full_total} bytes");
            world_total += mine;
        }
        // Sliced and expert bytes are read once over the world; replicated ones W times.
        assert!(world_total < w as u64 * full_total, "W={w}: {world_total} bytes over the world");
    }
    // And a sharded run from the reader equals the one-rank model.
    let plan = ParallelPlan::build(&PlanSpec::new(Epoch(1), 4, 2), &cfg).unwrap();
    let reader = CheckpointReader::open(&dir).unwrap();
    let prompt = vec![3, 17, 90, 4];
    let reqs: Vec<GenerateRequest> = (0..2)
        .map(|g| GenerateRequest {
            prompts: if g == 0 { vec![prompt.clone()] } else { Vec::new() },
            max_new_tokens: 4,
            sampling: SamplingParams::greedy(),
            stop_ids: Vec::new(),
            keep_logits: true,
            record_routing: false,
            block_size: 4,
        })
        .collect();
    let out = run_local(&cfg, &reader, &plan, &reqs, CommOptions::default()).unwrap();
    let mem = parallel_common::read_source(&dir.join("model.safetensors"));
    let want = reference_generate(&cfg, &mem, &prompt, 4);
    assert_eq!(out[0].generated[0], want.generated[0]);
    for (a, b) in out[0].logits[0].iter().zip(&want.logits[0]) {
        assert!(rel_row_err(a, b, a.len()) <= 1e-5);
    }
}
