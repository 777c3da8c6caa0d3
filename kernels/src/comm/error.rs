//! [`CommError`]: every way a collective can fail, with the ranks involved.
//!
//! Ranks named in errors are always *world* ranks (positions in the root communicator that
//! `LocalComm::create` or the TCP rendezvous produced), also for ops on a sub-communicator, so
//! that an operator can map them to a worker without knowing the group layout.

use std::time::Duration;

/// A collective failed. After any variant other than [`CommError::InvalidArgument`] the
/// communicator is poisoned: later ops return [`CommError::Poisoned`] (ranks may be out of step,
/// so continuing could pair messages of different ops). Rebuild it (a new plan epoch).
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The op's deadline passed before these ranks sent their part.
    #[error("{op}: timed out after {waited:?}; ranks {missing_ranks:?} did not arrive")]
    Timeout { op: &'static str, missing_ranks: Vec<usize>, waited: Duration },
    /// A peer closed its connection (process died, or its communicator was dropped).
    #[error("{op}: rank {rank} is gone: {reason}")]
    PeerLost { op: &'static str, rank: usize, reason: String },
    /// The caller's arguments are inconsistent; nothing was sent and the communicator is intact.
    #[error("{op}: invalid argument: {what}")]
    InvalidArgument { op: &'static str, what: String },
    /// A peer sent a part of the wrong size: the ranks disagree about the op's shape.
    #[error("{op}: rank {rank} sent {got} bytes, expected {expected}")]
    SizeMismatch { op: &'static str, rank: usize, expected: usize, got: usize },
    /// The ranks passed different arguments to an op that needs them identical (e.g. `split`).
    #[error("{op}: ranks disagree: {what}")]
    Mismatch { op: &'static str, what: String },
    /// An earlier op on this communicator failed.
    #[error("communicator unusable after an earlier error: {first}")]
    Poisoned { first: String },
    /// Building the TCP mesh failed.
    #[error("rendezvous: {what}")]
    Rendezvous { what: String },
    /// An I/O error outside a specific peer exchange (binding a listener, ...).
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

impl CommError {
    /// Ranks this error blames (the missing, lost or disagreeing peer), for watchdog reports.
    pub fn ranks(&self) -> Vec<usize> {
        match self {
            CommError::Timeout { missing_ranks, .. } => missing_ranks.clone(),
            CommError::PeerLost { rank, .. } | CommError::SizeMismatch { rank, .. } => vec![*rank],
            CommError::InvalidArgument { .. }
            | CommError::Mismatch { .. }
            | CommError::Poisoned { .. }
            | CommError::Rendezvous { .. }
            | CommError::Io { .. } => Vec::new(),
        }
    }

    /// Whether the communicator survives this error (only argument errors leave it usable).
    pub fn poisons(&self) -> bool {
        !matches!(self, CommError::InvalidArgument { .. })
    }
}
