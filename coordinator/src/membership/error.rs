//! [`MembershipError`]: everything that can go wrong talking to the membership store.
//!
//! Structured fields name what failed; messages never contain prompt data (the membership store
//! never sees any). [`MembershipError::retryable`] is an exhaustive match so a new variant must
//! decide whether retrying the same call can succeed.

use fathom_common::ids::Epoch;
use std::time::Duration;

/// Errors of the membership layer (etcd or in-memory).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// The store could not be reached or refused the call for a transient reason.
    #[error("membership store unavailable during {op}: {message}")]
    Unavailable { op: &'static str, message: String },
    /// The store did not answer in time.
    #[error("membership {op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// A plan write lost the compare-and-swap: the stored plan is not at `proposed - 1`
    /// (someone else wrote first, or the caller skipped an epoch). `current` 0 means no plan.
    #[error("plan conflict: proposed epoch {proposed} but the stored plan is at epoch {current}")]
    PlanConflict { proposed: Epoch, current: Epoch },
    /// Another live lease holds `workers/<id>` (e.g. the previous incarnation of this worker,
    /// until its lease expires).
    #[error("worker id {id:?} is already registered under another lease")]
    AlreadyRegistered { id: String },
    /// The epoch's rendezvous data was already published with different bytes.
    #[error("rendezvous of epoch {epoch} already published with different data")]
    RendezvousConflict { epoch: Epoch },
    /// A stored value could not be decoded.
    #[error("malformed value under {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// A caller-supplied argument is invalid.
    #[error("invalid {what}: {reason}")]
    InvalidArgument { what: &'static str, reason: String },
    /// The lease was not found by the store (expired or revoked).
    #[error("lease {lease:x} no longer exists")]
    LeaseLost { lease: i64 },
    /// A watch asked for history the store no longer keeps.
    #[error("watch history from revision {revision} is no longer available")]
    Compacted { revision: i64 },
    /// The store handle was shut down.
    #[error("membership store closed")]
    Closed,
}

impl MembershipError {
    /// Whether repeating the same call later can succeed without the caller changing anything.
    pub fn retryable(&self) -> bool {
        match self {
            MembershipError::Unavailable { .. } => true,
            MembershipError::Timeout { .. } => true,
            // The old lease holding the id expires within its TTL.
            MembershipError::AlreadyRegistered { .. } => true,
            // Registering again grants a fresh lease.
            MembershipError::LeaseLost { .. } => true,
            // Re-listing and watching from the current revision works.
            MembershipError::Compacted { .. } => true,
            // The caller must re-read the plan and decide again.
            MembershipError::PlanConflict { .. } => false,
            MembershipError::RendezvousConflict { .. } => false,
            MembershipError::Corrupt { .. } => false,
            MembershipError::InvalidArgument { .. } => false,
            MembershipError::Closed => false,
        }
    }
}

/// Result alias of the membership layer.
pub type Result<T, E = MembershipError> = std::result::Result<T, E>;
