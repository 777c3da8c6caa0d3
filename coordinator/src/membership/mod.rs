//! Cluster membership: which workers are alive, the current plan, per-epoch rendezvous data and
//! coordinator leadership, behind one async trait, [`Membership`], with two implementations:
//! [`EtcdMembership`] (production; etcd v3) and [`MemoryMembership`] (single host; same
//! semantics, including leases that expire with time).
//!
//! Layout: the membership logic ([`StoreMembership`], `service.rs`; leases in `lease.rs`) is
//! written once against a small key-value + lease interface ([`KvStore`], `store.rs`) that
//! `etcd.rs` and `memory.rs` implement; `registry.rs` serves the in-memory store to workers of
//! a cluster without etcd over gRPC ([`RemoteMembership`] on their side). Keys are in `keys.rs` (ARCHITECTURE §3):
//! `/fathom/<cluster>/workers/<id>`, `/coordinator/leader`, `/plan`, `/epoch/<n>/rendezvous`.
//!
//! Invariants:
//! - a worker key exists only while its lease lives; expiry and revoke delete it, and every
//!   watcher sees `Removed`;
//! - the stored plan's epoch only increases, by exactly one per write (compare-and-swap);
//! - watch streams never end while their consumer holds them: when the store connection breaks
//!   they re-list and emit the difference (so no event is lost, though a short-lived change that
//!   came and went during the outage may be invisible);
//! - a registration survives a store outage: it reports [`LeaseState::Lost`] at its hard
//!   deadline and re-acquires the key when the store is back, without a process restart.
//!
//! Does not own: deciding plans (the planner), what plan bytes mean (protobuf `fathom.v1.Plan`
//! by convention), or serving RPCs.

mod error;
mod etcd;
mod keys;
mod lease;
mod memory;
mod registry;
mod service;
mod store;

pub use error::{MembershipError, Result};
pub use etcd::{EtcdOptions, EtcdStore};
pub use keys::Keys;
pub use lease::{Leadership, LeaseState, LeasedKey, Registration};
pub use memory::MemoryStore;
pub use registry::{RegistryServer, RegistryService, RemoteStore};
pub use service::{EtcdMembership, MemoryMembership, RemoteMembership, StoreMembership};
pub use store::{KvEntry, KvEvent, KvStore, LeaseId};

use fathom_common::ids::Epoch;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A worker's stable id: 1..=128 characters of `[A-Za-z0-9._-]` (it is a key segment).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WorkerId(String);

impl WorkerId {
    /// Validates an id.
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= 128
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(id))
        } else {
            Err(MembershipError::InvalidArgument {
                what: "worker id",
                reason: format!("{id:?} must be 1..=128 characters of [A-Za-z0-9._-]"),
            })
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for WorkerId {
    type Error = MembershipError;
    fn try_from(s: String) -> Result<Self> {
        Self::new(s)
    }
}

impl From<WorkerId> for String {
    fn from(id: WorkerId) -> String {
        id.0
    }
}

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a worker announces about itself (stored as JSON under `workers/<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: WorkerId,
    /// gRPC address of its `fathom.v1.Worker` service (`host:port`).
    pub address: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Device memory (host memory for cpu), bytes.
    pub memory_bytes: u64,
}

/// A change in the set of live workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerEvent {
    /// A worker registered, or (for an id already seen) changed its info.
    Added(WorkerInfo),
    /// A worker's key disappeared (revoked, or its lease expired).
    Removed(WorkerId),
}

/// A plan as stored: its epoch and opaque bytes (by convention an encoded `fathom.v1.Plan`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRecord {
    pub epoch: Epoch,
    pub data: Vec<u8>,
}

/// The membership store, as the coordinator and workers use it. Object safe
/// (`Arc<dyn Membership>`). Dropping a future mid-call never corrupts state; at worst a key
/// created under a lease by a cancelled `register_worker`/`campaign` lingers until its TTL.
pub trait Membership: Send + Sync + std::fmt::Debug {
    /// The key layout of this cluster.
    fn keys(&self) -> &Keys;

    /// Registers `info` under `workers/<id>` with a lease of `ttl` (>= 2 s) kept alive in the
    /// background (see [`Registration`]). Fails with [`MembershipError::AlreadyRegistered`]
    /// while another live lease holds the id.
    fn register_worker(
        &self,
        info: WorkerInfo,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Registration>>;

    /// The live workers, sorted by id.
    fn list_workers(&self) -> BoxFuture<'_, Result<Vec<WorkerInfo>>>;

    /// Current workers as `Added` events, then every change. The first read must succeed (its
    /// error is returned); later outages are bridged by re-listing (see the module invariants).
    fn watch_workers(&self) -> BoxFuture<'_, Result<BoxStream<'static, WorkerEvent>>>;

    /// The stored plan, if any.
    fn read_plan(&self) -> BoxFuture<'_, Result<Option<PlanRecord>>>;

    /// Writes `plan` if the stored plan is at epoch `plan.epoch - 1` (no plan counts as epoch
    /// 0), atomically; else [`MembershipError::PlanConflict`] naming the stored epoch.
    fn write_plan(&self, plan: PlanRecord) -> BoxFuture<'_, Result<()>>;

    /// The current plan (if any) and then every newer one, in increasing epoch order (an epoch
    /// may be skipped if two writes happen during a store outage).
    fn watch_plan(&self) -> BoxFuture<'_, Result<BoxStream<'static, PlanRecord>>>;

    /// Publishes rank 0's rendezvous bytes for `epoch` (`epoch/<n>/rendezvous`). Publishing the
    /// same bytes again is a no-op; different bytes fail with
    /// [`MembershipError::RendezvousConflict`].
    fn publish_rendezvous(&self, epoch: Epoch, data: Vec<u8>) -> BoxFuture<'_, Result<()>>;

    /// Waits up to `timeout` for the rendezvous bytes of `epoch`.
    fn wait_rendezvous(&self, epoch: Epoch, timeout: Duration) -> BoxFuture<'_, Result<Vec<u8>>>;

    /// The rendezvous bytes of `epoch`, if published.
    fn read_rendezvous(&self, epoch: Epoch) -> BoxFuture<'_, Result<Option<Vec<u8>>>>;

    /// Deletes the per-epoch keys (`epoch/<n>/...`) of every epoch below `keep_from`; returns
    /// how many keys were deleted. The leader calls it after a new epoch is serving.
    fn prune_epochs(&self, keep_from: Epoch) -> BoxFuture<'_, Result<usize>>;

    /// Becomes the leading coordinator as `candidate` (waits while another leads). The
    /// leadership lasts while its lease is kept alive; once [`LeaseState::Lost`] it is over.
    /// Resign with [`LeasedKey::release`].
    fn campaign(&self, candidate: String, ttl: Duration) -> BoxFuture<'_, Result<Leadership>>;

    /// The current leader's candidate id.
    fn leader(&self) -> BoxFuture<'_, Result<Option<String>>>;
}
