//! [`LocalComm`]: W ranks as threads of one process, messages handed over through shared
//! mailboxes (one copy per message, no sockets).
//!
//! A rank that drops its last communicator (root and sub-communicators share one
//! [`LocalLink`]) is marked gone in every peer's mailbox, so peers waiting for it fail with
//! `PeerLost` naming it instead of waiting out the deadline — the thread analogue of a process
//! whose sockets close when it dies.

use super::CommOptions;
use super::communicator::{Communicator, Link, LinkError};
use super::mailbox::{Mailbox, Tag};
use std::sync::Arc;
use std::time::Instant;

/// The in-process implementation of [`super::Collective`].
pub type LocalComm = Communicator<LocalLink>;

/// One rank's view of the shared mailboxes.
#[derive(Debug)]
pub struct LocalLink {
    rank: usize,
    boxes: Arc<[Mailbox]>,
}

impl LocalComm {
    /// `world` communicators (rank `i` at index `i`) with default options; hand one to each
    /// thread.
    pub fn create(world: usize) -> Vec<LocalComm> {
        Self::create_with(world, CommOptions::default())
    }

    /// Same, with a deadline and other settings.
    pub fn create_with(world: usize, opts: CommOptions) -> Vec<LocalComm> {
        let boxes: Arc<[Mailbox]> = (0..world).map(|_| Mailbox::default()).collect();
        (0..world)
            .map(|rank| {
                Communicator::root(Arc::new(LocalLink { rank, boxes: boxes.clone() }), opts)
            })
            .collect()
    }
}

impl Link for LocalLink {
    fn world_rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.boxes.len()
    }

    fn mailbox(&self) -> &Mailbox {
        &self.boxes[self.rank]
    }

    fn send(
        &self,
        to: usize,
        comm: u64,
        seq: u64,
        payload: &[u8],
        _deadline: Instant,
    ) -> Result<(), LinkError> {
        if let Some(reason) = self.mailbox().gone_reason(to) {
            return Err(LinkError::Gone(reason));
        }
        self.boxes[to].deliver(Tag { comm, seq, src: self.rank }, payload.to_vec());
        Ok(())
    }
}

impl Drop for LocalLink {
    fn drop(&mut self) {
        for (r, mb) in self.boxes.iter().enumerate() {
            if r != self.rank {
                mb.mark_gone(self.rank, format!("LocalComm rank {} was dropped", self.rank));
            }
        }
    }
}
