//! The scheduler's bookkeeping: sequences, the KV block pool of one attention group, the
//! admission queue and the continuous-batching policy that turns them into one `GroupStep`.
//!
//! Pure data, no I/O: `engine/run.rs` drives it (submissions in, steps out, results back).
//!
//! Policy (per step, one group):
//! - admission happens only at step boundaries, FIFO; a request is admitted when the pool has
//!   blocks for its whole budget (`prompt + max_tokens`, capped by the context), so a running
//!   sequence never runs out of KV and is never preempted;
//! - decodes first (one token each, every running decode every step), then prefill chunks in
//!   admission order while the step's token budget lasts (chunked prefill: a long prompt is fed
//!   over several steps; only its last chunk samples);
//! - at most `max_batch` sequences per step.
//!
//! Invariants: a block is owned by at most one sequence; `used() + free() == total()`; a
//! sequence's table covers every position it has been fed.

use fathom_proto::v1::{SamplingParams, SeqOutputs, SeqStep};
use std::collections::VecDeque;

/// Blocks of `block_size` tokens needed for `tokens` tokens.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// The KV block pool of one attention group (pure bookkeeping; the blocks live on the ranks).
#[derive(Debug, Clone)]
pub struct BlockPool {
    free: Vec<u32>,
    total: usize,
}

impl BlockPool {
    pub fn new(total: usize) -> Self {
        // Lowest ids handed out first.
        Self { free: (0..total as u32).rev().collect(), total }
    }
    pub fn total(&self) -> usize {
        self.total
    }
    pub fn free(&self) -> usize {
        self.free.len()
    }
    pub fn used(&self) -> usize {
        self.total - self.free.len()
    }
    /// `n` blocks, or `None` (nothing taken) when fewer are free.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let at = self.free.len() - n;
        let mut got = self.free.split_off(at);
        got.reverse();
        Some(got)
    }
    pub fn release(&mut self, blocks: Vec<u32>) {
        self.free.extend(blocks.into_iter().rev());
        debug_assert!(self.free.len() <= self.total);
    }
}

/// One request inside the scheduler.
#[derive(Debug)]
pub struct Seq<T> {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub generated: Vec<u32>,
    /// Context tokens (prompt, then the first `resumed` generated tokens) already fed through the
    /// model.
    pub prefilled: usize,
    /// Generated tokens to feed again with the prompt (re-prefill) after the sequence migrated
    /// to a new epoch (0 for a sequence that never migrated). They are never sampled or streamed
    /// again: the prefill's last chunk samples token `generated.len()`.
    pub resumed: usize,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: u64,
    pub outputs: SeqOutputs,
    /// KV blocks reserved for the whole budget.
    pub blocks: Vec<u32>,
    /// Whatever the engine attaches (the client channel, timings).
    pub tag: T,
}

impl<T> Seq<T> {
    /// Positions the sequence may ever occupy (prompt + max_tokens).
    pub fn budget(&self) -> usize {
        self.prompt.len() + self.max_tokens
    }
    /// Tokens the prefill feeds: the prompt and the generated tokens being resumed.
    pub fn context_len(&self) -> usize {
        self.prompt.len() + self.resumed
    }
    fn prefill_done(&self) -> bool {
        self.prefilled == self.context_len()
    }
    /// Context tokens `start..end` (prompt, then resumed generated tokens).
    fn context(&self, start: usize, end: usize) -> Vec<u32> {
        self.prompt
            .iter()
            .chain(&self.generated[..self.resumed])
            .copied()
            .skip(start)
            .take(end - start)
            .collect()
    }
    /// Prepares the sequence to run again from scratch on a new epoch (fresh KV): the prompt and
    /// every token generated so far are fed again; sampling continues at `generated.len()`.
    pub fn reset_for_resume(&mut self) {
        self.prefilled = 0;
        self.resumed = self.generated.len();
    }
}

/// Limits of the batching policy.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_step_tokens: usize,
    pub max_batch: usize,
    pub block_size: usize,
}

/// Waiting and running sequences of one group, and its pool.
#[derive(Debug)]
pub struct GroupSched<T> {
    pub waiting: VecDeque<Seq<T>>,
    pub running: Vec<Seq<T>>,
    pub pool: BlockPool,
    pub limits: Limits,
    /// Sequences released since the last step (told to the ranks with the next step).
    pub released: Vec<u64>,
}

impl<T> GroupSched<T> {
    pub fn new(limits: Limits, blocks: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            running: Vec::new(),
            pool: BlockPool::new(blocks),
            limits,
            released: Vec::new(),
        }
    }

    /// Admits waiting sequences FIFO while their blocks fit and the batch has room.
    pub fn admit(&mut self) {
        while self.running.len() < self.limits.max_batch {
            let Some(front) = self.waiting.front() else { break };
            let need = blocks_for(front.budget(), self.limits.block_size);
            let Some(blocks) = self.pool.alloc(need) else { break };
            let mut seq = self.waiting.pop_front().expect("front exists");
            seq.blocks = blocks;
            self.running.push(seq);
        }
    }

    /// Removes the running or waiting sequences for which `gone` holds, returning their blocks
    /// to the pool; returns them (the caller ends their streams).
    pub fn remove_where(&mut self, mut gone: impl FnMut(&Seq<T>) -> bool) -> Vec<Seq<T>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if gone(&self.running[i]) {
                let mut s = self.running.swap_remove(i);
                self.pool.release(std::mem::take(&mut s.blocks));
                self.released.push(s.id);
                out.push(s);
            } else {
                i += 1;
            }
        }
        let (keep, drop): (VecDeque<_>, VecDeque<_>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|s| !gone(s));
        self.waiting = keep;
        out.extend(drop);
        out
    }

    /// Removes every sequence (running and waiting), returning blocks.
    pub fn drain_all(&mut self) -> Vec<Seq<T>> {
        self.remove_where(|_| true)
    }

    /// The sequences of the next step under the token budget: decodes, then prefill chunks.
    /// Running order is admission order (stable: `swap_remove` is avoided for that reason in
    /// `finish`; `remove_where` may reorder, which only changes which prefill goes first).
    pub fn build(&mut self) -> Vec<SeqStep> {
        let mut budget = self.limits.max_step_tokens;
        let bs = self.limits.block_size;
        let mut steps = Vec::new();
        let table = |s: &Seq<T>, end: usize| s.blocks[..blocks_for(end, bs)].to_vec();
        for s in self.running.iter().filter(|s| s.prefill_done()) {
            if budget == 0 {
                break;
            }
            // The last generated token is fed; its position is prompt + generated - 1.
            let last = *s.generated.last().expect("a prefilled sequence has sampled once");
            let pos = s.prompt.len() + s.generated.len() - 1;
            steps.push(SeqStep {
                seq_id: s.id,
                token_ids: vec![last],
                start_position: pos as u32,
                block_table: table(s, pos + 1),
                sample: true,
                sampling: Some(s.sampling.clone()),
                seed: s.seed,
                generated: s.generated.len() as u32,
                outputs: Some(s.outputs),
            });
            budget -= 1;
        }
        for s in self.running.iter_mut().filter(|s| !s.prefill_done()) {
            if budget == 0 {
                break;
            }
            let n = (s.context_len() - s.prefilled).min(budget);
            let start = s.prefilled;
            let end = start + n;
            let sample = end == s.context_len();
            steps.push(SeqStep {
                seq_id: s.id,
                token_ids: s.context(start, end),
                start_position: start as u32,
                block_table: s.blocks[..blocks_for(end, bs)].to_vec(),
                sample,
                sampling: Some(s.sampling.clone()),
                seed: s.seed,
                // The sample index: tokens generated so far (resumed ones included).
                generated: s.resumed as u32,
                outputs: Some(s.outputs),
            });
            s.prefilled = end;
            budget -= n;
        }
        steps
    }

    /// Index of running sequence `id`.
    pub fn position(&self, id: u64) -> Option<usize> {
        self.running.iter().position(|s| s.id == id)
    }

    /// Moves every running sequence back to the front of the queue (admission order kept), its
    /// blocks freed and its prefill reset for a new epoch ([`Seq::reset_for_resume`]); forgets
    /// the releases owed to the old epoch's ranks. Returns how many sequences moved.
    pub fn requeue_running(&mut self) -> usize {
        let n = self.running.len();
        for mut s in self.running.drain(..).rev() {
            self.pool.release(std::mem::take(&mut s.blocks));
            s.reset_for_resume();
            self.waiting.push_front(s);
        }
        self.released.clear();
        n
    }

    /// Removes running sequence at `index` (keeping admission order) and frees its blocks.
    pub fn finish(&mut self, index: usize) -> Seq<T> {
        let mut s = self.running.remove(index);
        self.pool.release(std::mem::take(&mut s.blocks));
        self.released.push(s.id);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(id: u64, prompt: usize, max_tokens: usize) -> Seq<()> {
        Seq {
            id,
            prompt: (0..prompt as u32).collect(),
            generated: Vec::new(),
            prefilled: 0,
            resumed: 0,
            max_tokens,
            sampling: SamplingParams::default(),
            seed: 0,
            outputs: SeqOutputs::default(),
            blocks: Vec::new(),
            tag: (),
        }
    }

    fn limits(tokens: usize) -> Limits {
        Limits { max_step_tokens: tokens, max_batch: 8, block_size: 4 }
    }

    #[test]
    fn pool_alloc_release_keeps_accounting() {
        let mut p = BlockPool::new(5);
        let a = p.alloc(3).unwrap();
        assert_eq!(a, vec![0, 1, 2]);
        assert!(p.alloc(3).is_none());
        assert_eq!((p.used(), p.free()), (3, 2));
        p.release(a);
        assert_eq!((p.used(), p.free()), (0, 5));
    }

    #[test]
    fn admission_waits_for_blocks() {
        let mut g = GroupSched::new(limits(100), 4);
        g.waiting.push_back(seq(1, 6, 2)); // 8 tokens = 2 blocks
        g.waiting.push_back(seq(2, 6, 3)); // 9 tokens = 3 blocks
        g.admit();
        assert_eq!(g.running.len(), 1);
        assert_eq!(g.waiting.len(), 1);
        let i = g.position(1).unwrap();
        g.finish(i);
        g.admit();
        assert_eq!(g.running[0].id, 2);
        assert_eq!(g.pool.used(), 3);
    }

    #[test]
    fn chunked_prefill_then_decode_under_budget() {
        let mut g = GroupSched::new(limits(5), 100);
        g.waiting.push_back(seq(1, 7, 3));
        g.waiting.push_back(seq(2, 2, 3));
        g.admit();
        let s1 = g.build();
        assert_eq!(s1.len(), 1);
        assert_eq!((s1[0].token_ids.len(), s1[0].sample), (5, false));
        let s2 = g.build();
        // seq 1's last 2 tokens and seq 2's 2 tokens, both sample.
        assert_eq!(
            s2.iter().map(|s| (s.seq_id, s.token_ids.len(), s.sample)).collect::<Vec<_>>(),
            vec![(1, 2, true), (2, 2, true)]
        );
        assert_eq!(s2[0].start_position, 5);
        assert_eq!(s2[0].block_table, vec![0, 1]);
        g.running[0].generated.push(9);
        g.running[1].generated.push(8);
        let s3 = g.build();
        assert_eq!(
            s3.iter()
                .map(|s| (s.seq_id, s.token_ids.clone(), s.start_position))
                .collect::<Vec<_>>(),
            vec![(1, vec![9], 7), (2, vec![8], 2)]
        );
    }

    #[test]
    fn requeued_sequence_reprefills_prompt_and_generated_then_samples_next_index() {
        let mut g = GroupSched::new(limits(4), 100);
        g.waiting.push_back(seq(1, 3, 10));
        g.waiting.push_back(seq(2, 2, 10));
        g.admit();
        g.build();
        g.running[0].generated.extend([7, 8]);
        g.running[1].generated.push(9);
        let blocks = g.pool.used();
        assert!(blocks > 0);
        assert_eq!(g.requeue_running(), 2);
        assert_eq!((g.pool.used(), g.running.len(), g.waiting.len()), (0, 0, 2));
        assert_eq!(g.waiting[0].id, 1, "admission order kept");
        g.admit();
        // Budget 4: seq 1's context [0, 1, 2, 7, 8] is fed over two steps.
        let s1 = g.build();
        assert_eq!(
            s1.iter().map(|s| (s.seq_id, s.token_ids.clone(), s.sample)).collect::<Vec<_>>(),
            vec![(1, vec![0, 1, 2, 7], false)]
        );
        let s2 = g.build();
        assert_eq!(
            s2.iter()
                .map(|s| (s.seq_id, s.token_ids.clone(), s.start_position, s.sample, s.generated))
                .collect::<Vec<_>>(),
            vec![(1, vec![8], 4, true, 2), (2, vec![0, 1, 9], 0, true, 1)]
        );
        // After the resumed sample, decoding continues at the next position.
        g.running[0].generated.push(5);
        let s3 = g.build();
        assert_eq!(
            (s3[0].token_ids.clone(), s3[0].start_position, s3[0].generated),
            (vec![5], 5, 3)
        );
    }

    #[test]
    fn remove_where_frees_blocks_and_reports_release() {
        let mut g = GroupSched::new(limits(5), 10);
        g.waiting.push_back(seq(1, 4, 4));
        g.waiting.push_back(seq(2, 4, 4));
        g.waiting.push_back(seq(3, 40, 4));
        g.admit();
        assert_eq!(g.pool.used(), 4);
        let gone = g.remove_where(|s| s.id != 2);
        assert_eq!(gone.len(), 2);
        assert_eq!(g.pool.used(), 2);
        assert_eq!(g.released, vec![1]);
    }
}
