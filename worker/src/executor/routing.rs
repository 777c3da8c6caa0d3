//! [`RoutingCarry`]: routed experts of non-final prefill chunks, held until the sequence samples.
//!
//! The step protocol returns a [`SeqResult`](fathom_proto::v1::SeqResult) only for sequences that
//! sample, and a prompt longer than the step's token budget is prefilled in several chunks of
//! which only the last samples. Without a carry the routed experts of the earlier chunks would be
//! lost, and the answer would depend on how the scheduler chunked the prompt. The executor packs
//! every chunk's rows as usual; a non-sampling chunk is stashed here, and the next sampling step
//! of the sequence sends stash + its own rows as one contiguous [`RoutedExperts`] (so the first
//! chunk the client sees still covers the whole prompt, from position 0).
//!
//! Invariants: a stash is only ever extended or sent when it ends exactly where the new rows
//! start (same `moe_layers`/`top_k`/`bytes_per_id`); anything else (a preempted sequence
//! prefilled again from position 0, a gap) drops the stale stash first, so rows never repeat or
//! skip. Entries of released sequences are dropped ([`RoutingCarry::release`]). Sequences that
//! did not ask for routed experts never get an entry.

use fathom_proto::v1::RoutedExperts;
use std::collections::HashMap;

/// Per sequence id, the packed routed experts of chunks that did not sample yet.
#[derive(Debug, Default)]
pub struct RoutingCarry {
    pending: HashMap<u64, RoutedExperts>,
}

impl RoutingCarry {
    /// Keeps `rows` of non-sampling sequence `seq_id` for its next sampling step.
    pub fn stash(&mut self, seq_id: u64, rows: RoutedExperts) {
        let merged = match self.pending.remove(&seq_id) {
            Some(prev) => join(prev, rows),
            None => rows,
        };
        self.pending.insert(seq_id, merged);
    }

    /// The rows to send with sampling sequence `seq_id`'s result: what was stashed (if it ends
    /// where `rows` start) followed by `rows`.
    pub fn take(&mut self, seq_id: u64, rows: RoutedExperts) -> RoutedExperts {
        match self.pending.remove(&seq_id) {
            Some(prev) => join(prev, rows),
            None => rows,
        }
    }

    /// Forgets released sequences.
    pub fn release(&mut self, seq_ids: &[u64]) {
        for id in seq_ids {
            self.pending.remove(id);
        }
    }

    /// Number of sequences with stashed rows.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing is stashed.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Bytes of packed ids held.
    pub fn bytes(&self) -> usize {
        self.pending.values().map(|r| r.ids.len()).sum()
    }
}

/// `prev` followed by `next` when they are contiguous and alike, else `next` alone (the stash
/// is stale).
fn join(mut prev: RoutedExperts, next: RoutedExperts) -> RoutedExperts {
    let contiguous = prev.start_position + prev.positions == next.start_position
        && (prev.moe_layers, prev.top_k, prev.bytes_per_id)
            == (next.moe_layers, next.top_k, next.bytes_per_id);
    if !contiguous {
        return next;
    }
    prev.positions += next.positions;
    prev.ids.extend_from_slice(&next.ids);
    prev
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(start: u32, positions: u32) -> RoutedExperts {
        RoutedExperts {
            start_position: start,
            positions,
            moe_layers: 2,
            top_k: 2,
            bytes_per_id: 1,
            ids: (0..positions * 4).map(|i| (start * 4 + i) as u8).collect(),
        }
    }

    #[test]
    fn chunks_join_into_one_contiguous_run() {
        let mut c = RoutingCarry::default();
        c.stash(7, rows(0, 3));
        c.stash(7, rows(3, 2));
        assert_eq!((c.len(), c.bytes()), (1, 20));
        let sent = c.take(7, rows(5, 4));
        assert_eq!(sent, rows(0, 9));
        assert!(c.is_empty());
        // Later steps pass through.
        assert_eq!(c.take(7, rows(9, 1)), rows(9, 1));
    }

    #[test]
    fn stale_stash_is_dropped_not_repeated() {
        let mut c = RoutingCarry::default();
        c.stash(1, rows(0, 4));
        // Preempted and prefilled again from position 0: the old rows must not be sent twice.
        c.stash(1, rows(0, 2));
        assert_eq!(c.take(1, rows(2, 2)), rows(0, 4));
        // A gap also drops the stash.
        c.stash(2, rows(0, 3));
        assert_eq!(c.take(2, rows(5, 1)), rows(5, 1));
        c.stash(3, rows(0, 3));
        c.release(&[3, 99]);
        assert!(c.is_empty());
    }
}
