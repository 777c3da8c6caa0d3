//! Tests of the continuous-batching policy: unit cases for each rule, and a property test that
//! drives random traffic (submits, cancels, random sampled tokens, epoch resets) and checks the
//! invariants after every step.

use super::*;
use proptest::prelude::*;

fn cfg(
    groups: usize,
    kv_blocks: usize,
    block: usize,
    step: usize,
    batch: usize,
) -> SchedulerConfig {
    SchedulerConfig {
        groups,
        kv_blocks,
        kv_block_size: block,
        max_queue: 8,
        max_step_tokens: step,
        max_batch: batch,
    }
}

fn req(prompt_len: usize, max_tokens: usize) -> SeqRequest {
    SeqRequest { prompt: (1..=prompt_len as u32).collect(), max_tokens, stop_token_ids: vec![0] }
}

/// Completes the in-flight step sampling `token` for every sampling sequence.
fn finish_step(s: &mut Scheduler, plan: &StepPlan, token: u32) -> Vec<SeqUpdate> {
    let sampled: Vec<(SeqId, u32)> = plan
        .groups
        .iter()
        .flat_map(|g| g.seqs.iter())
        .filter(|q| q.sample)
        .map(|q| (q.seq_id, token))
        .collect();
    s.complete(plan.step_id, &sampled).unwrap()
}

#[test]
fn config_comes_from_the_coordinator_section() {
    let section = fathom_common::cluster::CoordinatorSection::default();
    let c = SchedulerConfig::from_section(&section, 2);
    assert_eq!((c.groups, c.kv_blocks, c.kv_block_size), (2, 4096, 64));
    assert_eq!((c.max_step_tokens, c.max_batch, c.max_queue), (2048, 256, 1024));
    assert!(Scheduler::new(c).is_ok());
    let e = Scheduler::new(cfg(0, 4, 4, 8, 8)).unwrap_err();
    assert!(matches!(e, SchedulerError::InvalidConfig { what: "groups", .. }), "{e}");
}

#[test]
fn queue_bound_and_request_validation() {
    let mut s = Scheduler::new(SchedulerConfig { max_queue: 2, ..cfg(1, 4, 4, 64, 4) }).unwrap();
    s.submit(req(3, 2)).unwrap();
    s.submit(req(3, 2)).unwrap();
    let e = s.submit(req(3, 2)).unwrap_err();
    assert_eq!(e, SchedulerError::QueueFull { capacity: 2 });
    assert!(e.retryable());
    assert_eq!(s.submit(req(15, 2)), Err(SchedulerError::TooLong { tokens: 17, capacity: 16 }));
    assert!(matches!(
        s.submit(req(0, 2)),
        Err(SchedulerError::InvalidRequest { what: "prompt", .. })
    ));
    assert!(matches!(s.submit(req(2, 0)), Err(SchedulerError::InvalidRequest { .. })));
}

#[test]
fn long_prompt_is_prefilled_in_chunks_and_samples_once() {
    let mut s = Scheduler::new(cfg(1, 16, 4, 8, 4)).unwrap();
    let id = s.submit(req(20, 3)).unwrap();
    let mut starts = Vec::new();
    loop {
        let plan = s.schedule().unwrap().unwrap();
        let q = &plan.groups[0].seqs[0];
        assert_eq!(q.seq_id, id);
        starts.push((q.start_position, q.token_ids.len(), q.sample));
        assert!(q.block_table.len() * 4 >= q.start_position + q.token_ids.len());
        let ups = finish_step(&mut s, &plan, 7);
        if q.sample {
            assert_eq!(ups, [SeqUpdate { seq_id: id, token: 7, finished: None }]);
            break;
        }
        assert!(ups.is_empty());
    }
    assert_eq!(starts, [(0, 8, false), (8, 8, false), (16, 4, true)]);
    // Then one-token decodes at the following positions, until max_tokens.
    let plan = s.schedule().unwrap().unwrap();
    assert_eq!(plan.groups[0].seqs[0].token_ids, [7]);
    assert_eq!(plan.groups[0].seqs[0].start_position, 20);
    assert_eq!(plan.groups[0].seqs[0].generated, 1);
    finish_step(&mut s, &plan, 9);
    let plan = s.schedule().unwrap().unwrap();
    let ups = finish_step(&mut s, &plan, 9);
    assert_eq!(ups[0].finished, Some(FinishReason::Length));
    assert_eq!(s.kv_usage(0), Some((0, 16)), "finished sequence freed its blocks");
    assert!(s.schedule().unwrap().is_none());
}

#[test]
fn decodes_go_first_and_prefills_fill_the_token_budget() {
    let mut s = Scheduler::new(cfg(1, 32, 4, 10, 8)).unwrap();
    let a = s.submit(req(4, 5)).unwrap();
    let plan = s.schedule().unwrap().unwrap();
    finish_step(&mut s, &plan, 5);
    // a now decodes; b (12 tokens) arrives: 1 decode + a 9-token chunk of b.
    let b = s.submit(req(12, 5)).unwrap();
    let plan = s.schedule().unwrap().unwrap();
    let seqs = &plan.groups[0].seqs;
    assert_eq!(seqs[0].seq_id, a);
    assert_eq!(seqs[0].token_ids.len(), 1);
    assert_eq!(seqs[1].seq_id, b);
    assert_eq!(seqs[1].token_ids.len(), 9);
    assert!(!seqs[1].sample);
}

#[test]
fn max_batch_limits_sequences_per_group_and_groups_share_load() {
    let mut s = Scheduler::new(cfg(2, 16, 4, 64, 2)).unwrap();
    for _ in 0..5 {
        s.submit(req(3, 4)).unwrap();
    }
    let plan = s.schedule().unwrap().unwrap();
    assert_eq!(plan.groups.len(), 2);
    assert_eq!(plan.groups[0].seqs.len(), 2);
    assert_eq!(plan.groups[1].seqs.len(), 2);
    assert_eq!(s.waiting_len(), 1);
    assert_eq!(s.running_len(), 4);
}

#[test]
fn admission_waits_for_blocks_then_proceeds() {
    // 4 blocks of 4 tokens: a (10-token prompt) takes 3 blocks (+1 reserved for its next token).
    let mut s = Scheduler::new(cfg(1, 4, 4, 64, 8)).unwrap();
    let a = s.submit(req(10, 2)).unwrap();
    let b = s.submit(req(6, 2)).unwrap();
    let plan = s.schedule().unwrap().unwrap();
    assert_eq!(plan.groups[0].seqs.len(), 1, "b must wait: not enough free blocks");
    assert_eq!(s.waiting_len(), 1);
    finish_step(&mut s, &plan, 3);
    let plan = s.schedule().unwrap().unwrap();
    let ups = finish_step(&mut s, &plan, 3);
    assert_eq!(ups[0], SeqUpdate { seq_id: a, token: 3, finished: Some(FinishReason::Length) });
    let plan = s.schedule().unwrap().unwrap();
    assert_eq!(plan.groups[0].seqs[0].seq_id, b);
    assert_eq!(plan.groups[0].released, [a]);
}

#[test]
fn stop_token_ends_the_sequence() {
    let mut s = Scheduler::new(cfg(1, 8, 4, 64, 8)).unwrap();
    let id = s.submit(req(3, 10)).unwrap();
    let plan = s.schedule().unwrap().unwrap();
    let ups = finish_step(&mut s, &plan, 0);
    assert_eq!(ups, [SeqUpdate { seq_id: id, token: 0, finished: Some(FinishReason::Stop(0)) }]);
    assert!(!s.has_work());
}

#[test]
fn cancel_frees_blocks_now_or_after_the_step_in_flight() {
    let mut s = Scheduler::new(cfg(1, 8, 4, 64, 2)).unwrap();
    let a = s.submit(req(6, 4)).unwrap();
    let b = s.submit(req(6, 4)).unwrap();
    let waiting = s.submit(req(6, 4)).unwrap();
    let plan = s.schedule().unwrap().unwrap();
    assert!(s.cancel(a).unwrap());
    assert_eq!(s.kv_usage(0).unwrap().0, 4, "a's blocks stay until its step completes");
    let ups = finish_step(&mut s, &plan, 2);
    assert!(ups.iter().all(|u| u.seq_id != a), "no token is reported for a cancelled sequence");
    assert_eq!(s.kv_usage(0).unwrap().0, 2);
    assert!(s.cancel(b).unwrap());
    assert!(s.cancel(waiting).unwrap());
    assert_eq!(s.kv_usage(0).unwrap().0, 0);
    assert!(!s.cancel(b).unwrap(), "already gone");
    assert!(!s.has_work());
}

#[test]
fn complete_validates_before_changing_anything() {
    let mut s = Scheduler::new(cfg(1, 8, 4, 64, 8)).unwrap();
    let a = s.submit(req(3, 4)).unwrap();
    let plan = s.schedule().unwrap().unwrap();
    assert!(matches!(s.schedule(), Err(SchedulerError::StepInFlight { .. })));
    let e = s.complete(plan.step_id + 1, &[(a, 1)]).unwrap_err();
    assert!(matches!(e, SchedulerError::StepMismatch { .. }));
    let e = s.complete(plan.step_id, &[]).unwrap_err();
    assert_eq!(e, SchedulerError::BadResult { seq: a, reason: "no token" });
    let e = s.complete(plan.step_id, &[(a, 1), (SeqId(99), 1)]).unwrap_err();
    assert_eq!(e, SchedulerError::BadResult { seq: SeqId(99), reason: "did not sample" });
    assert_eq!(s.complete(plan.step_id, &[(a, 1)]).unwrap().len(), 1);
}

#[test]
fn decode_under_block_pressure_preempts_the_newest_sequence() {
    // 2 blocks of 2 tokens. a and b each hold one block after their prefill; when a's decode
    // needs a second block, b (newest, not yet scheduled this step) is preempted: its block is
    // freed and it goes back to the queue with its generated token, to be re-prefilled.
    let mut s = Scheduler::new(cfg(1, 2, 2, 64, 8)).unwrap();
    let a = s.submit(req(1, 3)).unwrap();
    let plan = s.schedule().unwrap().unwrap();
    finish_step(&mut s, &plan, 4); // a: tokens [1, 4], computed 1
    let b = s.submit(req(1, 3)).unwrap();
    let plan = s.schedule().unwrap().unwrap(); // a decodes at position 1, b prefills
    assert_eq!(plan.groups[0].seqs.len(), 2);
    finish_step(&mut s, &plan, 5); // a: [1, 4, 5]; b: [1, 5]
    assert_eq!(s.kv_usage(0), Some((2, 2)));
    let plan = s.schedule().unwrap().unwrap();
    let seqs = &plan.groups[0].seqs;
    assert_eq!(seqs.len(), 1);
    assert_eq!((seqs[0].seq_id, seqs[0].start_position), (a, 2));
    assert_eq!(seqs[0].block_table.len(), 2, "a took b's block");
    assert_eq!(plan.groups[0].released, [b]);
    assert_eq!(s.waiting_len(), 1);
    let ups = finish_step(&mut s, &plan, 6);
    assert_eq!(ups[0].finished, Some(FinishReason::Length));
    // b is re-prefilled from position 0 with its generated token, then continues.
    let plan = s.schedule().unwrap().unwrap();
    let q = &plan.groups[0].seqs[0];
    assert_eq!((q.seq_id, q.start_position, q.generated, q.sample), (b, 0, 1, true));
    assert_eq!(q.token_ids, [1, 5]);
}

#[test]
fn reset_epoch_requeues_running_sequences_with_their_tokens() {
    let mut s = Scheduler::new(cfg(2, 8, 4, 64, 8)).unwrap();
    let a = s.submit(req(5, 4)).unwrap();
    let plan = s.schedule().unwrap().unwrap();
    finish_step(&mut s, &plan, 9);
    let plan = s.schedule().unwrap().unwrap();
    assert_eq!(plan.groups.iter().map(|g| g.seqs.len()).sum::<usize>(), 1);
    // The epoch changes while this step is in flight: it is fenced and a is re-prefilled.
    s.reset_epoch(1).unwrap();
    assert_eq!(s.running_len(), 0);
    assert_eq!(s.waiting_len(), 1);
    let plan = s.schedule().unwrap().unwrap();
    assert_eq!(plan.groups.len(), 1);
    let q = &plan.groups[0].seqs[0];
    assert_eq!(q.seq_id, a);
    assert_eq!(q.start_position, 0);
    assert_eq!(q.token_ids, [1, 2, 3, 4, 5, 9], "prompt + the generated token");
    assert_eq!(q.generated, 1);
    assert!(q.sample);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random traffic: every step respects the budget, batch and block invariants; blocks are
    /// never shared; and once traffic stops every request finishes and every block is free.
    #[test]
    fn random_traffic_keeps_invariants_and_drains(
        ops in proptest::collection::vec((0u8..10, 1usize..14, 1usize..8, 0u32..6), 1..120),
    ) {
        let c = SchedulerConfig { max_queue: 6, ..cfg(2, 6, 3, 7, 3) };
        let mut s = Scheduler::new(c.clone()).unwrap();
        let mut live: Vec<SeqId> = Vec::new();
        let mut generated: HashMap<SeqId, (usize, usize)> = HashMap::new(); // (count, max)
        let step = |s: &mut Scheduler, token: u32, live: &mut Vec<SeqId>,
                        generated: &mut HashMap<SeqId, (usize, usize)>| -> Result<bool, TestCaseError> {
            let Some(plan) = s.schedule().unwrap() else { return Ok(false) };
            for (g, batch) in plan.groups.iter().enumerate() {
                let tokens: usize = batch.seqs.iter().map(|q| q.token_ids.len()).sum();
                prop_assert!(tokens <= c.max_step_tokens);
                prop_assert!(batch.seqs.len() <= c.max_batch);
                let mut blocks = HashSet::new();
                for q in &batch.seqs {
                    prop_assert!(!q.token_ids.is_empty());
                    prop_assert!(q.block_table.len() * c.kv_block_size >= q.start_position + q.token_ids.len());
                    for b in &q.block_table {
                        prop_assert!(blocks.insert(*b), "block {:?} shared", b);
                    }
                }
                prop_assert!(blocks.len() <= s.kv_usage(g).unwrap().0);
            }
            for u in finish_step(s, &plan, token) {
                let e = generated.get_mut(&u.seq_id).unwrap();
                e.0 += 1;
                prop_assert!(e.0 <= e.1, "generated past max_tokens");
                match u.finished {
                    Some(FinishReason::Length) => prop_assert_eq!(e.0, e.1),
                    Some(FinishReason::Stop(t)) => prop_assert_eq!(t, 0),
                    None => prop_assert!(u.token != 0 && e.0 < e.1),
                }
                if u.finished.is_some() {
                    live.retain(|x| *x != u.seq_id);
                }
            }
            Ok(true)
        };
        for (op, len, max, token) in ops {
            match op {
                0..=3 => match s.submit(req(len, max)) {
                    Ok(id) => {
                        live.push(id);
                        generated.insert(id, (0, max));
                    }
                    Err(e) => {
                        let full = matches!(
                            e,
                            SchedulerError::QueueFull { .. } | SchedulerError::TooLong { .. }
                        );
                        prop_assert!(full, "unexpected submit error: {}", e);
                    }
                },
                4 if !live.is_empty() => {
                    let id = live.remove(len % live.len());
                    prop_assert!(s.cancel(id).unwrap());
                }
                5 => s.reset_epoch(1 + len % 2).unwrap(),
                _ => {
                    step(&mut s, token, &mut live, &mut generated)?;
                }
            }
        }
        // Drain: with token 1 (never a stop token) everything ends by length.
        for _ in 0..500 {
            if !step(&mut s, 1, &mut live, &mut generated)? {
                break;
            }
        }
        prop_assert!(live.is_empty(), "unfinished: {:?}", live);
        prop_assert!(!s.has_work());
        for g in 0.. {
            match s.kv_usage(g) {
                Some((used, _)) => prop_assert_eq!(used, 0),
                None => break,
            }
        }
    }
}
