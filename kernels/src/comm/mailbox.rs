//! [`Mailbox`]: the receive side every host transport shares — messages parked by tag until the
//! op that expects them takes them, plus the set of peers known to be gone.
//!
//! A message is keyed by [`Tag`] `(communicator id, sequence number, source world rank)`. Each
//! communicator numbers its rounds 0, 1, 2, … identically on every member, so a message that
//! arrives late (or early) for one round can never be taken by another round or by another
//! communicator sharing the same transport. Invariants: at most one message per tag; a peer once
//! marked gone stays gone; a message that arrived before its sender died is still delivered.

use super::error::CommError;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Identifies one message: which communicator, which round of it, and who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag {
    pub comm: u64,
    pub seq: u64,
    pub src: usize,
}

#[derive(Debug, Default)]
struct State {
    msgs: HashMap<Tag, Vec<u8>>,
    /// World rank → why it is gone.
    gone: BTreeMap<usize, String>,
}

/// Messages for one rank (shared by all communicators of that rank).
#[derive(Debug, Default)]
pub struct Mailbox {
    state: Mutex<State>,
    arrived: Condvar,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves only plain maps behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parks a message. A second message with the same tag is a transport bug; the first wins.
    pub fn deliver(&self, tag: Tag, payload: Vec<u8>) {
        let mut st = self.lock();
        debug_assert!(!st.msgs.contains_key(&tag), "duplicate message {tag:?}");
        st.msgs.entry(tag).or_insert(payload);
        drop(st);
        self.arrived.notify_all();
    }

    /// Records that `rank` is gone (first reason wins) and wakes every waiter.
    pub fn mark_gone(&self, rank: usize, reason: String) {
        self.lock().gone.entry(rank).or_insert(reason);
        self.arrived.notify_all();
    }

    /// Why `rank` is gone, if it is.
    pub fn gone_reason(&self, rank: usize) -> Option<String> {
        self.lock().gone.get(&rank).cloned()
    }

    /// Waits until a message from every source in `srcs` (world ranks) for round
    /// `(comm, seq)` is here, and takes them, in the order of `srcs`.
    ///
    /// Errors: a missing source is gone → `PeerLost` at once (the lowest such rank);
    /// `deadline` passes → `Timeout` naming every source still missing.
    pub fn take_all(
        &self,
        op: &'static str,
        comm: u64,
        seq: u64,
        srcs: &[usize],
        started: Instant,
        deadline: Instant,
    ) -> Result<Vec<Vec<u8>>, CommError> {
        let mut st = self.lock();
        loop {
            let missing: Vec<usize> = srcs
                .iter()
                .copied()
                .filter(|&src| !st.msgs.contains_key(&Tag { comm, seq, src }))
                .collect();
            if missing.is_empty() {
                return Ok(srcs
                    .iter()
                    .map(|&src| st.msgs.remove(&Tag { comm, seq, src }).unwrap_or_default())
                    .collect());
            }
            if let Some((&rank, reason)) = st.gone.iter().find(|(r, _)| missing.contains(r)) {
                return Err(CommError::PeerLost { op, rank, reason: reason.clone() });
            }
            let now = Instant::now();
            if now >= deadline {
                let mut missing_ranks = missing;
                missing_ranks.sort_unstable();
                return Err(CommError::Timeout { op, missing_ranks, waited: now - started });
            }
            let wait = (deadline - now).min(Duration::from_secs(1));
            st = self.arrived.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_in_source_order_and_ignores_other_rounds() {
        let mb = Mailbox::default();
        mb.deliver(Tag { comm: 1, seq: 0, src: 2 }, vec![2]);
        mb.deliver(Tag { comm: 1, seq: 1, src: 0 }, vec![9]); // next round: must stay
        mb.deliver(Tag { comm: 1, seq: 0, src: 0 }, vec![0]);
        let t = Instant::now();
        let got = mb.take_all("t", 1, 0, &[0, 2], t, t + Duration::from_secs(1)).unwrap();
        assert_eq!(got, vec![vec![0], vec![2]]);
        let got = mb.take_all("t", 1, 1, &[0], t, t + Duration::from_secs(1)).unwrap();
        assert_eq!(got, vec![vec![9]]);
    }

    #[test]
    fn timeout_names_missing_and_gone_peer_is_lost() {
        let mb = Mailbox::default();
        mb.deliver(Tag { comm: 0, seq: 0, src: 1 }, vec![]);
        let t = Instant::now();
        let e = mb.take_all("x", 0, 0, &[1, 3, 2], t, t + Duration::from_millis(30)).unwrap_err();
        assert!(
            matches!(e, CommError::Timeout { ref missing_ranks, .. } if missing_ranks == &[2, 3])
        );
        mb.mark_gone(3, "closed".into());
        let e = mb.take_all("x", 0, 0, &[1, 3], t, t + Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, CommError::PeerLost { rank: 3, .. }), "{e}");
    }
}
