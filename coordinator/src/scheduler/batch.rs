//! [`Scheduler`]: continuous batching over D attention groups with chunked prefill.
//!
//! Policy, per step and per group (vLLM-style, in this priority order):
//! 1. running sequences in admission order, decodes (one pending token) before prefill chunks;
//!    each gets `min(pending, remaining budget)` tokens while the group's token budget
//!    (`max_step_tokens`) and batch size (`max_batch`) last; a decode that needs a new block when
//!    none is free preempts the most recently admitted running sequence of the group that is
//!    not scheduled in this step (its blocks are freed and it goes back to the front of the
//!    queue, keeping its tokens: it is re-prefilled later);
//! 2. waiting requests in FIFO order (no overtaking), each admitted to the group with the most
//!    free blocks that has budget and batch room, and only if blocks for all its pending tokens
//!    (plus one for the next token) are free, so an admitted prefill never has to preempt.
//!
//! A sequence's pending tokens are those not yet in the KV cache: the whole prompt after
//! admission (prompt + generated tokens after a preemption or epoch change), then the one token
//! sampled by the previous step. A chunk samples only when it covers every pending token.
//! One step is in flight at a time: [`Scheduler::schedule`] then [`Scheduler::complete`].
//! Cost per step: O(running + admitted) plus O(blocks allocated or freed).

use super::SchedulerError;
use super::block_pool::{BlockId, BlockPool, BlockTable};
use fathom_common::cluster::CoordinatorSection;
use fathom_common::ids::SeqId;
use std::collections::{HashMap, HashSet, VecDeque};

/// Limits of the scheduler (from the `[coordinator]` section of the cluster config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Attention groups D.
    pub groups: usize,
    /// KV blocks per group and tokens per block.
    pub kv_blocks: usize,
    pub kv_block_size: usize,
    /// Waiting requests beyond this are refused ([`SchedulerError::QueueFull`]).
    pub max_queue: usize,
    /// Tokens per step per group (prefill chunks + decodes).
    pub max_step_tokens: usize,
    /// Sequences per step per group.
    pub max_batch: usize,
}

impl SchedulerConfig {
    /// The limits of the `[coordinator]` config section for a plan with `groups` groups.
    pub fn from_section(c: &CoordinatorSection, groups: usize) -> Self {
        Self {
            groups,
            kv_blocks: c.kv_blocks,
            kv_block_size: c.kv_block_size,
            max_queue: c.max_queue,
            max_step_tokens: c.max_step_tokens,
            max_batch: c.max_batch,
        }
    }

    fn validate(&self) -> Result<(), SchedulerError> {
        let bad = |what, v: usize| {
            Err(SchedulerError::InvalidConfig { what, reason: format!("{v} must be >= 1") })
        };
        match () {
            _ if self.groups == 0 => bad("groups", self.groups),
            _ if self.max_step_tokens == 0 => bad("max_step_tokens", self.max_step_tokens),
            _ if self.max_batch == 0 => bad("max_batch", self.max_batch),
            _ => Ok(()),
        }
    }
}

/// A request to schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqRequest {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// Tokens to generate at most (>= 1).
    pub max_tokens: usize,
    /// Tokens that end generation (the caller adds EOS unless the request ignores it).
    pub stop_token_ids: Vec<u32>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` generated.
    Length,
    /// This stop token was generated.
    Stop(u32),
}

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq_id: SeqId,
    /// Tokens fed this step, starting at absolute position `start_position`.
    pub token_ids: Vec<u32>,
    pub start_position: usize,
    /// Sample a token after the last position.
    pub sample: bool,
    /// Tokens generated so far (the index of the token sampled this step).
    pub generated: usize,
    /// The whole block table after this step's tokens are written.
    pub block_table: Vec<BlockId>,
}

/// The sequences of one group in a step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupBatch {
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences that left the group (finished, cancelled, preempted) since the last step.
    pub released: Vec<SeqId>,
}

/// One step: a batch per group (index = group; empty groups included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub step_id: u64,
    pub groups: Vec<GroupBatch>,
}

/// What a completed step did to one sequence that sampled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqUpdate {
    pub seq_id: SeqId,
    pub token: u32,
    /// Set when this token ended the sequence (its blocks are already freed).
    pub finished: Option<FinishReason>,
}

#[derive(Debug)]
struct Seq {
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose KV is in the cache.
    computed: usize,
    max_tokens: usize,
    stop: Vec<u32>,
    group: Option<usize>,
    table: BlockTable,
    cancelled: bool,
}

impl Seq {
    fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

#[derive(Debug)]
struct Group {
    pool: BlockPool,
    /// Running sequences in admission order.
    running: Vec<SeqId>,
    released: Vec<SeqId>,
}

#[derive(Debug)]
struct InFlight {
    step_id: u64,
    /// (sequence, tokens fed, sampled).
    entries: Vec<(SeqId, usize, bool)>,
}

/// The continuous-batching scheduler (see the module doc for the policy).
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    groups: Vec<Group>,
    seqs: HashMap<SeqId, Seq>,
    waiting: VecDeque<SeqId>,
    next_seq: u64,
    next_step: u64,
    in_flight: Option<InFlight>,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new(cfg: SchedulerConfig) -> Result<Self, SchedulerError> {
        cfg.validate()?;
        let groups = Self::make_groups(&cfg)?;
        Ok(Self {
            cfg,
            groups,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            next_seq: 1,
            next_step: 1,
            in_flight: None,
        })
    }

    fn make_groups(cfg: &SchedulerConfig) -> Result<Vec<Group>, SchedulerError> {
        (0..cfg.groups)
            .map(|_| {
                let pool = BlockPool::new(cfg.kv_blocks, cfg.kv_block_size)?;
                Ok(Group { pool, running: Vec::new(), released: Vec::new() })
            })
            .collect()
    }

    /// Tokens of KV one group holds.
    pub fn group_capacity(&self) -> usize {
        self.cfg.kv_blocks * self.cfg.kv_block_size
    }

    /// Queues a request. Errors: empty prompt, `max_tokens` 0, longer than a group's KV cache,
    /// queue full.
    pub fn submit(&mut self, req: SeqRequest) -> Result<SeqId, SchedulerError> {
        if req.prompt.is_empty() {
            return Err(SchedulerError::InvalidRequest { what: "prompt", reason: "empty".into() });
        }
        if req.max_tokens == 0 {
            return Err(SchedulerError::InvalidRequest {
                what: "max_tokens",
                reason: "must be >= 1".into(),
            });
        }
        let tokens = req.prompt.len() + req.max_tokens;
        if tokens > self.group_capacity() {
            return Err(SchedulerError::TooLong { tokens, capacity: self.group_capacity() });
        }
        if self.waiting.len() >= self.cfg.max_queue {
            return Err(SchedulerError::QueueFull { capacity: self.cfg.max_queue });
        }
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(
            id,
            Seq {
                prompt_len: req.prompt.len(),
                tokens: req.prompt,
                computed: 0,
                max_tokens: req.max_tokens,
                stop: req.stop_token_ids,
                group: None,
                table: BlockTable::default(),
                cancelled: false,
            },
        );
        self.waiting.push_back(id);
        Ok(id)
    }

    /// Requests waiting for admission.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences admitted to a group.
    pub fn running_len(&self) -> usize {
        self.groups.iter().map(|g| g.running.len()).sum()
    }

    /// (used, total) KV blocks of `group`.
    pub fn kv_usage(&self, group: usize) -> Option<(usize, usize)> {
        self.groups.get(group).map(|g| (g.pool.used(), g.pool.total()))
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || self.running_len() > 0
    }

    /// Plans the next step; `None` when there is nothing to run. Allocates the blocks the step
    /// writes. Fails if the previous step was not completed.
    pub fn schedule(&mut self) -> Result<Option<StepPlan>, SchedulerError> {
        if let Some(f) = &self.in_flight {
            return Err(SchedulerError::StepInFlight { step_id: f.step_id });
        }
        let mut batches: Vec<GroupBatch> = vec![GroupBatch::default(); self.groups.len()];
        let mut budget = vec![self.cfg.max_step_tokens; self.groups.len()];
        let mut entries = Vec::new();
        for g in 0..self.groups.len() {
            self.schedule_running(g, &mut batches[g], &mut budget[g], &mut entries)?;
        }
        self.admit(&mut batches, &mut budget, &mut entries)?;
        for (g, group) in self.groups.iter_mut().enumerate() {
            batches[g].released = std::mem::take(&mut group.released);
        }
        if entries.is_empty() {
            return Ok(None);
        }
        let step_id = self.next_step;
        self.next_step += 1;
        self.in_flight = Some(InFlight { step_id, entries });
        Ok(Some(StepPlan { step_id, groups: batches }))
    }

    fn schedule_running(
        &mut self,
        g: usize,
        batch: &mut GroupBatch,
        budget: &mut usize,
        entries: &mut Vec<(SeqId, usize, bool)>,
    ) -> Result<(), SchedulerError> {
        let mut order = self.groups[g].running.clone();
        // Decodes first (stable: admission order within each class).
        order.sort_by_key(|id| self.seqs[id].pending() > 1);
        let mut scheduled: HashSet<SeqId> = HashSet::new();
        for id in order {
            if batch.seqs.len() == self.cfg.max_batch || *budget == 0 {
                break;
            }
            // It may have been preempted by an earlier decode of this step.
            if self.seqs[&id].group != Some(g) {
                continue;
            }
            let pending = self.seqs[&id].pending();
            let mut n = pending.min(*budget);
            loop {
                let seq = &self.seqs[&id];
                let pool = &self.groups[g].pool;
                let missing = seq.table.missing_for(pool, seq.computed + n);
                if missing <= pool.free_count() {
                    break;
                }
                if pending > 1 {
                    // A prefill chunk shrinks to what fits.
                    let fit = (seq.table.blocks().len() + pool.free_count()) * pool.block_size();
                    n = fit.saturating_sub(seq.computed).min(n);
                    break;
                }
                match self.groups[g]
                    .running
                    .iter()
                    .rev()
                    .find(|v| **v != id && !scheduled.contains(v))
                {
                    Some(&victim) => self.preempt(victim)?,
                    None => {
                        n = 0;
                        break;
                    }
                }
            }
            if n == 0 {
                continue;
            }
            self.place(g, id, n, batch, entries)?;
            scheduled.insert(id);
            *budget -= n;
        }
        Ok(())
    }

    fn admit(
        &mut self,
        batches: &mut [GroupBatch],
        budget: &mut [usize],
        entries: &mut Vec<(SeqId, usize, bool)>,
    ) -> Result<(), SchedulerError> {
        while let Some(&id) = self.waiting.front() {
            let pending = self.seqs[&id].pending();
            let group = (0..self.groups.len())
                .filter(|&g| batches[g].seqs.len() < self.cfg.max_batch && budget[g] > 0)
                .filter(|&g| {
                    self.groups[g].pool.blocks_for(pending + 1) <= self.groups[g].pool.free_count()
                })
                .max_by_key(|&g| (self.groups[g].pool.free_count(), std::cmp::Reverse(g)));
            let Some(g) = group else { break };
            self.waiting.pop_front();
            self.seqs.get_mut(&id).expect("waiting seq exists").group = Some(g);
            self.groups[g].running.push(id);
            let n = pending.min(budget[g]);
            self.place(g, id, n, &mut batches[g], entries)?;
            budget[g] -= n;
        }
        Ok(())
    }

    /// Schedules `n` pending tokens of `id` in group `g`, growing its block table.
    fn place(
        &mut self,
        g: usize,
        id: SeqId,
        n: usize,
        batch: &mut GroupBatch,
        entries: &mut Vec<(SeqId, usize, bool)>,
    ) -> Result<(), SchedulerError> {
        let seq = self.seqs.get_mut(&id).expect("scheduled seq exists");
        let start = seq.computed;
        seq.table.grow_to(&mut self.groups[g].pool, start + n)?;
        let sample = n == seq.pending();
        batch.seqs.push(ScheduledSeq {
            seq_id: id,
            token_ids: seq.tokens[start..start + n].to_vec(),
            start_position: start,
            sample,
            generated: seq.generated(),
            block_table: seq.table.blocks().to_vec(),
        });
        entries.push((id, n, sample));
        Ok(())
    }

    /// Frees a running sequence's blocks and puts it back at the front of the queue.
    fn preempt(&mut self, id: SeqId) -> Result<(), SchedulerError> {
        self.leave_group(id)?;
        let seq = self.seqs.get_mut(&id).expect("preempted seq exists");
        seq.computed = 0;
        self.waiting.push_front(id);
        Ok(())
    }

    /// Removes `id` from its group, freeing its blocks.
    fn leave_group(&mut self, id: SeqId) -> Result<(), SchedulerError> {
        let seq = self.seqs.get_mut(&id).expect("seq exists");
        if let Some(g) = seq.group.take() {
            let group = &mut self.groups[g];
            seq.table.release(&mut group.pool)?;
            group.running.retain(|r| *r != id);
            group.released.push(id);
        }
        Ok(())
    }

    /// Applies the results of step `step_id`: `sampled` holds one token per sequence that
    /// sampled. Validated before anything changes.
    pub fn complete(
        &mut self,
        step_id: u64,
        sampled: &[(SeqId, u32)],
    ) -> Result<Vec<SeqUpdate>, SchedulerError> {
        let expected = self.in_flight.as_ref().map(|f| f.step_id);
        if expected != Some(step_id) {
            return Err(SchedulerError::StepMismatch { expected, got: step_id });
        }
        let tokens: HashMap<SeqId, u32> = sampled.iter().copied().collect();
        let entries = &self.in_flight.as_ref().expect("checked").entries;
        let samplers: HashSet<SeqId> = entries.iter().filter(|e| e.2).map(|e| e.0).collect();
        for (seq, _) in sampled {
            if !samplers.contains(seq) {
                return Err(SchedulerError::BadResult { seq: *seq, reason: "did not sample" });
            }
        }
        for s in &samplers {
            if !tokens.contains_key(s) && !self.seqs[s].cancelled {
                return Err(SchedulerError::BadResult { seq: *s, reason: "no token" });
            }
        }
        let entries = self.in_flight.take().expect("checked").entries;
        let mut updates = Vec::new();
        for (id, n, sample) in entries {
            if self.seqs[&id].cancelled {
                self.leave_group(id)?;
                self.seqs.remove(&id);
                continue;
            }
            let seq = self.seqs.get_mut(&id).expect("in-flight seq exists");
            seq.computed += n;
            if !sample {
                continue;
            }
            let token = tokens[&id];
            seq.tokens.push(token);
            let finished = if seq.stop.contains(&token) {
                Some(FinishReason::Stop(token))
            } else if seq.generated() >= seq.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if finished.is_some() {
                self.leave_group(id)?;
                self.seqs.remove(&id);
            }
            updates.push(SeqUpdate { seq_id: id, token, finished });
        }
        Ok(updates)
    }

    /// Cancels a request (the client dropped its stream). Its blocks are freed now, or when the
    /// step it is part of completes. Returns false for an unknown (e.g. finished) id.
    pub fn cancel(&mut self, id: SeqId) -> Result<bool, SchedulerError> {
        let in_flight =
            self.in_flight.as_ref().is_some_and(|f| f.entries.iter().any(|e| e.0 == id));
        let Some(seq) = self.seqs.get_mut(&id) else { return Ok(false) };
        if in_flight {
            seq.cancelled = true;
            return Ok(true);
        }
        self.waiting.retain(|w| *w != id);
        self.leave_group(id)?;
        self.seqs.remove(&id);
        Ok(true)
    }

    /// A new plan epoch with `groups` attention groups: the step in flight is abandoned (fenced),
    /// every block is freed, and running sequences go back to the front of the queue (group by
    /// group, in admission order), keeping their generated tokens (they are re-prefilled).
    pub fn reset_epoch(&mut self, groups: usize) -> Result<(), SchedulerError> {
        let cfg = SchedulerConfig { groups, ..self.cfg.clone() };
        cfg.validate()?;
        self.in_flight = None;
        let mut requeue = Vec::new();
        for group in &self.groups {
            requeue.extend(group.running.iter().copied());
        }
        for id in requeue.iter().rev() {
            let seq = self.seqs.get_mut(id).expect("running seq exists");
            seq.group = None;
            seq.table = BlockTable::default();
            seq.computed = 0;
            if seq.cancelled {
                self.seqs.remove(id);
            } else {
                self.waiting.push_front(*id);
            }
        }
        self.groups = Self::make_groups(&cfg)?;
        self.cfg = cfg;
        Ok(())
    }
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
