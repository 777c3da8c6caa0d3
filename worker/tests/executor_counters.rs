//! Expert-load counters at the step executor (issue 9), on the golden checkpoint `sparse_long`:
//! the single-rank executor (W = 1) counts inside its MoE layers — with and without routed
//! experts asked for, the same counts — its metrics tally and its `StepResult` counters (the
//! compact wire form, decoded) both equal tokens fed × top_k per MoE layer, and the
//! per-(layer, expert) counts equal the sum over the ranks of the sharded executor (W = 2).

use fathom_common::ModelConfig;
use fathom_kernels::comm::{Collective, LocalComm};
use fathom_proto::v1::{GroupStep, Plan, SeqOutputs, SeqStep, StepRequest, StepResult};
use fathom_worker::executor::sharded::ShardedFactory;
use fathom_worker::executor::single::SingleRankFactory;
use fathom_worker::executor::{EpochContext, Executor, ExecutorFactory, expert_wire};
use std::path::PathBuf;

const BLOCK: u32 = 4;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden/sparse_long")
}

fn plan(w: u32) -> Plan {
    Plan {
        epoch: 1,
        world_size: w,
        tp: 1,
        model_path: golden_dir().display().to_string(),
        kv_block_size: BLOCK,
        kv_blocks: 64,
        comm: "local".into(),
        ..Default::default()
    }
}

/// A 9-token prefill of two sequences (5 + 4 tokens), then two decode steps of both.
fn steps(outputs: Option<SeqOutputs>, groups: u32) -> (Vec<StepRequest>, Vec<usize>) {
    let seq = |id: u64, tokens: Vec<u32>, start: u32, table0: u32| SeqStep {
        seq_id: id,
        block_table: (table0..table0 + (start + tokens.len() as u32).div_ceil(BLOCK)).collect(),
        token_ids: tokens,
        start_position: start,
        sample: true,
        sampling: Some(Default::default()),
        outputs,
        ..Default::default()
    };
    let batches = [
        vec![seq(1, vec![3, 17, 40, 2, 99], 0, 0), seq(2, vec![8, 8, 61, 5], 0, 10)],
        vec![seq(1, vec![11], 5, 0), seq(2, vec![120], 4, 10)],
        vec![seq(1, vec![7], 6, 0), seq(2, vec![31], 5, 10)],
    ];
    let fed = batches.iter().map(|b| b.iter().map(|s| s.token_ids.len()).sum()).collect();
    let reqs = batches
        .into_iter()
        .enumerate()
        .map(|(i, seqs)| StepRequest {
            epoch: 1,
            step_id: i as u64 + 1,
            groups: (0..groups)
                .map(|g| GroupStep {
                    group: g,
                    seqs: if g == 0 { seqs.clone() } else { Vec::new() },
                    released_seq_ids: Vec::new(),
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    (reqs, fed)
}

/// Per step: the metrics tally's cells and the `StepResult` counters decoded.
type Counts = Vec<(Vec<u64>, Vec<u32>)>;

fn run(ex: &mut dyn Executor, steps: &[StepRequest]) -> Counts {
    steps
        .iter()
        .map(|s| {
            ex.execute(s).unwrap_or_else(|e| panic!("{e}"));
            let tally = ex.take_report().experts.expect("the executor reports expert counts");
            let mut r = StepResult::default();
            ex.step_report().fill(&mut r);
            assert!(r.expert_tokens.is_empty() || r.expert_token_runs.is_empty(), "never both");
            let wire = expert_wire::decode(&r).unwrap().unwrap_or_default();
            (tally.counts, wire)
        })
        .collect()
}

fn single(outputs: Option<SeqOutputs>) -> Counts {
    let ctx = EpochContext { plan: plan(1), rank: 0, world: None, group: None };
    let mut ex = SingleRankFactory.prepare(ctx).unwrap();
    run(ex.as_mut(), &steps(outputs, 1).0)
}

fn sharded(w: u32) -> Vec<Counts> {
    let comms = LocalComm::create(w as usize);
    let groups: Vec<Vec<usize>> = (0..w as usize).map(|r| vec![r]).collect();
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
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
                    run(ex.as_mut(), &steps(None, w).0)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn one_rank_executor_counts_in_layer_without_recording_routing() {
    let cfg = ModelConfig::from_file(&golden_dir().join("config.json")).unwrap();
    let per_token = (cfg.num_experts_per_tok * cfg.num_moe_layers()) as u64;
    assert!(per_token > 0, "the fixture has MoE layers");
    let (_, fed) = steps(None, 1);
    let plain = single(None);
    let asked = SeqOutputs { routed_experts: true, ..Default::default() };
    let with_routing = single(Some(asked));
    assert_eq!(plain, with_routing, "counts do not depend on routed experts being asked");
    for (i, ((tally, wire), fed)) in plain.iter().zip(&fed).enumerate() {
        assert_eq!(tally.iter().sum::<u64>(), *fed as u64 * per_token, "step {i}: tally");
        let wire64: Vec<u64> = wire.iter().map(|&c| u64::from(c)).collect();
        assert_eq!(&wire64, tally, "step {i}: StepResult counters equal the metrics tally");
    }
    // The same per-(layer, expert) counts as the sharded executor's ranks together.
    let ranks = sharded(2);
    for (i, (tally, _)) in plain.iter().enumerate() {
        let mut sum = vec![0u64; tally.len()];
        for r in &ranks {
            sum.iter_mut().zip(&r[i].0).for_each(|(s, c)| *s += c);
        }
        assert_eq!(&sum, tally, "step {i}: W=1 vs the sum over W=2 ranks");
    }
}
