//! [`StoreMembership`]: the [`Membership`] trait implemented once over any [`KvStore`];
//! [`EtcdMembership`] and [`MemoryMembership`] are its two instances.
//!
//! Owns value encodings (worker info as JSON; plan as `"FPLN"` + epoch u64 big-endian + bytes),
//! the plan compare-and-swap, rendezvous publication, the campaign loop and the resyncing
//! watcher that turns store watches (which break when the store restarts) into streams that
//! never miss a net change: on any watch failure it re-lists the prefix after `retry` and emits
//! the difference against what it had reported.

use super::error::{MembershipError, Result};
use super::etcd::{EtcdOptions, EtcdStore};
use super::keys::Keys;
use super::lease::{LeasedKey, OnLoss, acquire};
use super::memory::MemoryStore;
use super::store::{KvEntry, KvStore};
use super::{Leadership, Membership, PlanRecord, Registration, WorkerEvent, WorkerInfo};
use fathom_common::ids::Epoch;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Pause between attempts when the store is unreachable.
const RETRY: Duration = Duration::from_millis(200);
/// Shortest lease TTL accepted (keep-alive runs at TTL/2; etcd's own minimum is about 2 s).
pub const MIN_TTL: Duration = Duration::from_secs(2);
const PLAN_MAGIC: &[u8; 4] = b"FPLN";

/// Membership over a [`KvStore`].
#[derive(Debug)]
pub struct StoreMembership<S: KvStore> {
    store: Arc<S>,
    keys: Keys,
}

/// Membership on etcd.
pub type EtcdMembership = StoreMembership<EtcdStore>;
/// Membership in this process's memory (single host).
pub type MemoryMembership = StoreMembership<MemoryStore>;
/// Membership in a coordinator's memory, reached over gRPC (`fathom.v1.Registry`).
pub type RemoteMembership = StoreMembership<super::registry::RemoteStore>;

impl<S: KvStore> StoreMembership<S> {
    /// Membership of cluster `cluster` on `store`.
    pub fn with_store(store: S, cluster: &str) -> Result<Self> {
        Ok(Self { store: Arc::new(store), keys: Keys::new(cluster)? })
    }

    /// The underlying store.
    pub fn store(&self) -> &S {
        &self.store
    }
}

impl StoreMembership<EtcdStore> {
    /// Connects to etcd (`endpoints` are client URLs such as `http://127.0.0.1:2379`).
    pub async fn connect(
        endpoints: &[String],
        cluster: &str,
        options: EtcdOptions,
    ) -> Result<Self> {
        Self::with_store(EtcdStore::connect(endpoints, options).await?, cluster)
    }
}

impl StoreMembership<MemoryStore> {
    /// A fresh in-memory store (must be called inside a tokio runtime).
    pub fn new(cluster: &str) -> Result<Self> {
        Self::with_store(MemoryStore::new()?, cluster)
    }
}

fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl < MIN_TTL {
        return Err(MembershipError::InvalidArgument {
            what: "lease ttl",
            reason: format!("{ttl:?} is below the minimum {MIN_TTL:?}"),
        });
    }
    Ok(())
}

fn encode_plan(plan: &PlanRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + plan.data.len());
    v.extend_from_slice(PLAN_MAGIC);
    v.extend_from_slice(&plan.epoch.0.to_be_bytes());
    v.extend_from_slice(&plan.data);
    v
}

fn decode_plan(key: &str, bytes: &[u8]) -> Result<PlanRecord> {
    if bytes.len() < 12 || &bytes[..4] != PLAN_MAGIC {
        return Err(MembershipError::Corrupt {
            key: key.into(),
            reason: format!("{} bytes without the FPLN header", bytes.len()),
        });
    }
    let epoch = u64::from_be_bytes(bytes[4..12].try_into().expect("8 bytes"));
    Ok(PlanRecord { epoch: Epoch(epoch), data: bytes[12..].to_vec() })
}

fn decode_worker(key: &str, bytes: &[u8]) -> Result<WorkerInfo> {
    serde_json::from_slice(bytes)
        .map_err(|e| MembershipError::Corrupt { key: key.into(), reason: e.to_string() })
}

/// A net change under a watched prefix.
enum Change {
    Put(String, Vec<u8>),
    Delete(String),
}

/// Watches `prefix`: first the current keys as `Put`s, then changes; bridges broken watches by
/// re-listing. The task ends when the receiver is dropped.
async fn watch_resync<S: KvStore>(store: Arc<S>, prefix: String) -> Result<mpsc::Receiver<Change>> {
    let (entries, revision) = store.get_prefix(&prefix).await?;
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let mut known = BTreeMap::new();
        if !send_diff(&tx, &mut known, entries).await {
            return;
        }
        let mut from = revision + 1;
        loop {
            match store.watch_prefix(&prefix, from).await {
                Ok(mut stream) => loop {
                    let item = tokio::select! {
                        _ = tx.closed() => return,
                        item = stream.next() => item,
                    };
                    let ev = match item {
                        Some(Ok(ev)) => ev,
                        Some(Err(e)) => {
                            tracing::debug!(%prefix, error = %e, "watch broke; re-listing");
                            break;
                        }
                        None => break,
                    };
                    let change = match ev.value {
                        Some(v) if known.get(&ev.key) == Some(&v) => continue,
                        Some(v) => {
                            known.insert(ev.key.clone(), v.clone());
                            Change::Put(ev.key, v)
                        }
                        None if known.remove(&ev.key).is_none() => continue,
                        None => Change::Delete(ev.key),
                    };
                    if tx.send(change).await.is_err() {
                        return;
                    }
                },
                Err(e) => tracing::debug!(%prefix, error = %e, "watch failed; re-listing"),
            }
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
                if let Ok((entries, revision)) = store.get_prefix(&prefix).await {
                    if !send_diff(&tx, &mut known, entries).await {
                        return;
                    }
                    from = revision + 1;
                    break;
                }
            }
        }
    });
    Ok(rx)
}

/// Emits the difference between `known` and the listing `entries`; false if the receiver is gone.
async fn send_diff(
    tx: &mpsc::Sender<Change>,
    known: &mut BTreeMap<String, Vec<u8>>,
    entries: Vec<KvEntry>,
) -> bool {
    let now: BTreeMap<String, Vec<u8>> = entries.into_iter().map(|e| (e.key, e.value)).collect();
    let gone: Vec<String> = known.keys().filter(|k| !now.contains_key(*k)).cloned().collect();
    for k in gone {
        if tx.send(Change::Delete(k)).await.is_err() {
            return false;
        }
    }
    for (k, v) in &now {
        if known.get(k) != Some(v) && tx.send(Change::Put(k.clone(), v.clone())).await.is_err() {
            return false;
        }
    }
    *known = now;
    true
}

impl<S: KvStore> StoreMembership<S> {
    async fn read_plan_entry(&self) -> Result<Option<(PlanRecord, i64)>> {
        let key = self.keys.plan();
        match self.store.get(&key).await? {
            Some(e) => Ok(Some((decode_plan(&key, &e.value)?, e.mod_revision))),
            None => Ok(None),
        }
    }

    async fn write_plan_impl(&self, plan: PlanRecord) -> Result<()> {
        if plan.epoch.0 == 0 {
            return Err(MembershipError::InvalidArgument {
                what: "plan epoch",
                reason: "epochs start at 1".into(),
            });
        }
        let current = self.read_plan_entry().await?;
        let (current_epoch, revision) = current.map_or((0, 0), |(p, r)| (p.epoch.0, r));
        let conflict = |current: u64| MembershipError::PlanConflict {
            proposed: plan.epoch,
            current: Epoch(current),
        };
        if current_epoch + 1 != plan.epoch.0 {
            return Err(conflict(current_epoch));
        }
        if self.store.put_if(&self.keys.plan(), encode_plan(&plan), 0, revision).await? {
            return Ok(());
        }
        let now = self.read_plan_entry().await?.map_or(0, |(p, _)| p.epoch.0);
        Err(conflict(now))
    }

    async fn watch_plan_impl(&self) -> Result<BoxStream<'static, PlanRecord>> {
        let key = self.keys.plan();
        let rx = watch_resync(self.store.clone(), key.clone()).await?;
        let mut last = 0u64;
        let stream = ReceiverStream::new(rx).filter_map(move |change| {
            let out = match change {
                Change::Put(k, v) => match decode_plan(&k, &v) {
                    Ok(p) if p.epoch.0 > last => {
                        last = p.epoch.0;
                        Some(p)
                    }
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring malformed plan");
                        None
                    }
                },
                Change::Delete(_) => {
                    tracing::warn!(%key, "plan key deleted");
                    None
                }
            };
            futures::future::ready(out)
        });
        Ok(stream.boxed())
    }

    async fn watch_workers_impl(&self) -> Result<BoxStream<'static, WorkerEvent>> {
        let keys = self.keys.clone();
        let rx = watch_resync(self.store.clone(), keys.workers_prefix()).await?;
        let stream = ReceiverStream::new(rx).filter_map(move |change| {
            let out = match change {
                Change::Put(k, v) => match decode_worker(&k, &v) {
                    Ok(info) => Some(WorkerEvent::Added(info)),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring malformed worker record");
                        None
                    }
                },
                Change::Delete(k) => keys.worker_id_of(&k).map(WorkerEvent::Removed),
            };
            futures::future::ready(out)
        });
        Ok(stream.boxed())
    }

    async fn publish_rendezvous_impl(&self, epoch: Epoch, data: Vec<u8>) -> Result<()> {
        let key = self.keys.rendezvous(epoch);
        if self.store.put_if(&key, data.clone(), 0, 0).await? {
            return Ok(());
        }
        match self.store.get(&key).await? {
            Some(e) if e.value == data => Ok(()),
            Some(_) => Err(MembershipError::RendezvousConflict { epoch }),
            // Deleted between the two calls: try once more.
            None if self.store.put_if(&key, data, 0, 0).await? => Ok(()),
            None => Err(MembershipError::RendezvousConflict { epoch }),
        }
    }

    async fn wait_rendezvous_impl(&self, epoch: Epoch, timeout: Duration) -> Result<Vec<u8>> {
        let op = "wait rendezvous";
        let wait = async {
            let mut rx = watch_resync(self.store.clone(), self.keys.rendezvous(epoch)).await?;
            while let Some(change) = rx.recv().await {
                if let Change::Put(_, v) = change {
                    return Ok(v);
                }
            }
            Err(MembershipError::Closed)
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Err(MembershipError::Timeout { op, after: timeout }))
    }

    async fn campaign_impl(&self, candidate: String, ttl: Duration) -> Result<Leadership> {
        check_ttl(ttl)?;
        if candidate.is_empty() {
            return Err(MembershipError::InvalidArgument {
                what: "candidate",
                reason: "must be non-empty".into(),
            });
        }
        let key = self.keys.leader();
        loop {
            match acquire(&*self.store, &key, candidate.as_bytes(), ttl).await {
                Ok((lease, t0)) => {
                    let value = candidate.into_bytes();
                    let store = self.store.clone();
                    return Ok(LeasedKey::start(store, key, value, ttl, lease, t0, OnLoss::GiveUp));
                }
                Err(MembershipError::AlreadyRegistered { .. }) => self.wait_vacant(&key, ttl).await,
                Err(e) if e.retryable() => tokio::time::sleep(RETRY).await,
                Err(e) => return Err(e),
            }
        }
    }

    /// Returns when `key` is deleted, or after `ttl` (then the caller simply tries again).
    async fn wait_vacant(&self, key: &str, ttl: Duration) {
        let wait = async {
            let Ok(Some(current)) = self.store.get(key).await else { return };
            let Ok(mut stream) = self.store.watch_prefix(key, current.mod_revision + 1).await
            else {
                return tokio::time::sleep(RETRY).await;
            };
            while let Some(item) = stream.next().await {
                match item {
                    Ok(ev) if ev.key == key && ev.value.is_none() => return,
                    Ok(_) => {}
                    Err(_) => return tokio::time::sleep(RETRY).await,
                }
            }
        };
        let _ = tokio::time::timeout(ttl, wait).await;
    }
}

impl<S: KvStore> Membership for StoreMembership<S> {
    fn keys(&self) -> &Keys {
        &self.keys
    }

    fn register_worker(
        &self,
        info: WorkerInfo,
        ttl: Duration,
    ) -> BoxFuture<'_, Result<Registration>> {
        async move {
            check_ttl(ttl)?;
            let key = self.keys.worker(&info.id);
            let value = serde_json::to_vec(&info).expect("WorkerInfo serializes");
            let (lease, t0) = match acquire(&*self.store, &key, &value, ttl).await {
                Err(MembershipError::AlreadyRegistered { .. }) => {
                    return Err(MembershipError::AlreadyRegistered { id: info.id.to_string() });
                }
                other => other?,
            };
            let store = self.store.clone();
            Ok(LeasedKey::start(store, key, value, ttl, lease, t0, OnLoss::Reacquire))
        }
        .boxed()
    }

    fn list_workers(&self) -> BoxFuture<'_, Result<Vec<WorkerInfo>>> {
        async move {
            let (entries, _) = self.store.get_prefix(&self.keys.workers_prefix()).await?;
            let mut out = Vec::with_capacity(entries.len());
            for e in entries {
                match decode_worker(&e.key, &e.value) {
                    Ok(info) => out.push(info),
                    Err(err) => tracing::warn!(error = %err, "ignoring malformed worker record"),
                }
            }
            out.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(out)
        }
        .boxed()
    }

    fn watch_workers(&self) -> BoxFuture<'_, Result<BoxStream<'static, WorkerEvent>>> {
        self.watch_workers_impl().boxed()
    }

    fn read_plan(&self) -> BoxFuture<'_, Result<Option<PlanRecord>>> {
        async move { Ok(self.read_plan_entry().await?.map(|(p, _)| p)) }.boxed()
    }

    fn write_plan(&self, plan: PlanRecord) -> BoxFuture<'_, Result<()>> {
        self.write_plan_impl(plan).boxed()
    }

    fn watch_plan(&self) -> BoxFuture<'_, Result<BoxStream<'static, PlanRecord>>> {
        self.watch_plan_impl().boxed()
    }

    fn publish_rendezvous(&self, epoch: Epoch, data: Vec<u8>) -> BoxFuture<'_, Result<()>> {
        self.publish_rendezvous_impl(epoch, data).boxed()
    }

    fn wait_rendezvous(&self, epoch: Epoch, timeout: Duration) -> BoxFuture<'_, Result<Vec<u8>>> {
        self.wait_rendezvous_impl(epoch, timeout).boxed()
    }

    fn read_rendezvous(&self, epoch: Epoch) -> BoxFuture<'_, Result<Option<Vec<u8>>>> {
        async move { Ok(self.store.get(&self.keys.rendezvous(epoch)).await?.map(|e| e.value)) }
            .boxed()
    }

    fn prune_epochs(&self, keep_from: Epoch) -> BoxFuture<'_, Result<usize>> {
        async move {
            let prefix = format!("{}epoch/", self.keys.root());
            let (entries, _) = self.store.get_prefix(&prefix).await?;
            let mut deleted = 0;
            for e in entries {
                let epoch =
                    e.key[prefix.len()..].split('/').next().and_then(|n| n.parse::<u64>().ok());
                if epoch.is_some_and(|n| n < keep_from.0) && self.store.delete(&e.key).await? {
                    deleted += 1;
                }
            }
            Ok(deleted)
        }
        .boxed()
    }

    fn campaign(&self, candidate: String, ttl: Duration) -> BoxFuture<'_, Result<Leadership>> {
        self.campaign_impl(candidate, ttl).boxed()
    }

    fn leader(&self) -> BoxFuture<'_, Result<Option<String>>> {
        async move {
            let key = self.keys.leader();
            match self.store.get(&key).await? {
                Some(e) => String::from_utf8(e.value)
                    .map(Some)
                    .map_err(|err| MembershipError::Corrupt { key, reason: err.to_string() }),
                None => Ok(None),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_encoding_round_trips_and_rejects_garbage() {
        let p = PlanRecord { epoch: Epoch(42), data: vec![1, 2, 3] };
        assert_eq!(decode_plan("k", &encode_plan(&p)).unwrap(), p);
        let e = decode_plan("/fathom/x/plan", b"nope").unwrap_err();
        assert!(matches!(e, MembershipError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("/fathom/x/plan"));
    }

    #[test]
    fn short_ttl_is_rejected() {
        let e = check_ttl(Duration::from_millis(1500)).unwrap_err();
        assert!(!e.retryable());
    }
}
