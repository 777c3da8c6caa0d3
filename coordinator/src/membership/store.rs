//! [`KvStore`]: the small key-value + lease interface the membership logic is written against,
//! implemented by etcd ([`super::etcd::EtcdStore`]) and in memory
//! ([`super::memory::MemoryStore`]).
//!
//! Owns only the shape of the primitive operations. All membership semantics (registration,
//! keep-alive, watch resync, plan CAS, election) live once, in `service.rs` and `lease.rs`, so
//! both stores behave the same by construction and the conformance suite checks the primitives.
//!
//! Semantics every implementation must provide (etcd's):
//! - a store-wide revision that increases with every change; `mod_revision` of a key is the
//!   revision of its last change, 0 for an absent key;
//! - leases expire `ttl` after the last keep-alive; expiry or revoke deletes the attached keys
//!   and produces `Delete` watch events;
//! - a watch from revision `r` delivers every change with revision >= r in order, or fails with
//!   [`MembershipError::Compacted`] when that history is gone.

use super::error::Result;
use futures::stream::BoxStream;
use std::future::Future;
use std::time::Duration;

/// A lease id (etcd's i64).
pub type LeaseId = i64;

/// One stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last change to this key.
    pub mod_revision: i64,
    /// Attached lease, 0 if none.
    pub lease: LeaseId,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEvent {
    pub key: String,
    /// `Some(value)` for a put, `None` for a delete (including lease expiry).
    pub value: Option<Vec<u8>>,
    /// Revision of the change.
    pub revision: i64,
}

/// Primitive operations of a membership store.
pub trait KvStore: Send + Sync + std::fmt::Debug + 'static {
    /// Grants a lease of `ttl` (rounded up to whole seconds by etcd).
    fn grant(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId>> + Send;
    /// Refreshes a lease to its full TTL. `Ok(false)` when the lease no longer exists.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<bool>> + Send;
    /// Revokes a lease (deleting its keys). Revoking an unknown lease is not an error.
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<()>> + Send;
    /// Reads one key.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KvEntry>>> + Send;
    /// Reads every key starting with `prefix`, sorted by key, and the store revision of the read.
    fn get_prefix(&self, prefix: &str) -> impl Future<Output = Result<(Vec<KvEntry>, i64)>> + Send;
    /// Puts `value` (attached to `lease` when non-zero) only if the key's `mod_revision` equals
    /// `expected` (0: only if absent). `Ok(false)` when the comparison failed.
    fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
        expected: i64,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// Deletes one key; `Ok(false)` if it did not exist.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool>> + Send;
    /// Watches keys starting with `prefix` from revision `from` (inclusive). The stream ends or
    /// yields an error when the watch breaks; callers re-list and watch again.
    fn watch_prefix(
        &self,
        prefix: &str,
        from: i64,
    ) -> impl Future<Output = Result<BoxStream<'static, Result<KvEvent>>>> + Send;
}
