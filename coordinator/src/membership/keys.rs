//! The etcd key layout (ARCHITECTURE §3), in one place. The in-memory store uses the same keys.
//!
//! ```text
//! /fathom/<cluster>/workers/<worker-id>        leased; JSON WorkerInfo
//! /fathom/<cluster>/coordinator/leader         leased; the leader's candidate id (UTF-8)
//! /fathom/<cluster>/plan                       "FPLN" + epoch (u64 big-endian) + plan bytes
//! /fathom/<cluster>/epoch/<n>/rendezvous       rank 0's rendezvous bytes for epoch n
//! ```
//!
//! Invariant: `cluster` is non-empty and contains no `/`, so one cluster's prefix never
//! contains another's keys.

use super::WorkerId;
use super::error::{MembershipError, Result};
use fathom_common::ids::Epoch;

/// Builds every key of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// Keys of cluster `cluster` (non-empty, no `/`).
    pub fn new(cluster: &str) -> Result<Self> {
        if cluster.is_empty() || cluster.contains('/') {
            return Err(MembershipError::InvalidArgument {
                what: "cluster name",
                reason: format!("{cluster:?} must be non-empty without '/'"),
            });
        }
        Ok(Self { root: format!("/fathom/{cluster}/") })
    }

    /// `/fathom/<cluster>/`.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// `/fathom/<cluster>/workers/` (the prefix every worker key starts with).
    pub fn workers_prefix(&self) -> String {
        format!("{}workers/", self.root)
    }

    /// `/fathom/<cluster>/workers/<id>`.
    pub fn worker(&self, id: &WorkerId) -> String {
        format!("{}workers/{}", self.root, id.as_str())
    }

    /// The worker id of a key under [`workers_prefix`](Self::workers_prefix).
    pub fn worker_id_of(&self, key: &str) -> Option<WorkerId> {
        key.strip_prefix(&self.workers_prefix()).and_then(|id| WorkerId::new(id).ok())
    }

    /// `/fathom/<cluster>/coordinator/leader`.
    pub fn leader(&self) -> String {
        format!("{}coordinator/leader", self.root)
    }

    /// `/fathom/<cluster>/plan`.
    pub fn plan(&self) -> String {
        format!("{}plan", self.root)
    }

    /// `/fathom/<cluster>/epoch/<n>/`.
    pub fn epoch_prefix(&self, epoch: Epoch) -> String {
        format!("{}epoch/{}/", self.root, epoch.0)
    }

    /// `/fathom/<cluster>/epoch/<n>/rendezvous`.
    pub fn rendezvous(&self, epoch: Epoch) -> String {
        format!("{}rendezvous", self.epoch_prefix(epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_architecture() {
        let k = Keys::new("prod").unwrap();
        let id = WorkerId::new("gpu-0.node-3").unwrap();
        assert_eq!(k.worker(&id), "/fathom/prod/workers/gpu-0.node-3");
        assert_eq!(k.worker_id_of(&k.worker(&id)), Some(id));
        assert_eq!(k.leader(), "/fathom/prod/coordinator/leader");
        assert_eq!(k.plan(), "/fathom/prod/plan");
        assert_eq!(k.rendezvous(Epoch(7)), "/fathom/prod/epoch/7/rendezvous");
        assert_eq!(k.worker_id_of("/fathom/other/workers/x"), None);
    }

    #[test]
    fn bad_cluster_names_are_rejected() {
        assert!(Keys::new("").is_err());
        let e = Keys::new("a/b").unwrap_err();
        assert!(e.to_string().contains("a/b"), "{e}");
    }
}
