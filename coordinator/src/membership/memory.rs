//! [`MemoryStore`]: the in-memory [`KvStore`] for a single host (`fathom up` without etcd) with
//! etcd's semantics: revisions, leases that expire with time, prefix watches with history.
//!
//! Design: one `std::sync::Mutex` around the state (never held across an await); every change
//! bumps the revision, is appended to a bounded history (for watches that start in the past) and
//! broadcast to live watchers while the lock is held, so a watcher subscribing under the lock
//! sees a gap-free sequence. A reaper task (holding only a `Weak`) expires leases every
//! [`REAP_INTERVAL`]; operations also expire due leases first, so expiry never waits on the task.
//! Cost: O(log n) per key operation, O(keys of the lease) per expiry.

use super::error::{MembershipError, Result};
use super::store::{KvEntry, KvEvent, KvStore, LeaseId};
use futures::StreamExt;
use futures::stream::BoxStream;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::Instant;

/// How often the reaper looks for expired leases.
pub const REAP_INTERVAL: Duration = Duration::from_millis(50);
/// Changes kept for watches that start in the past.
const HISTORY: usize = 4096;
/// Live watch buffer; a watcher lagging further is told to resync ([`MembershipError::Compacted`]).
const WATCH_BUFFER: usize = 1024;

#[derive(Debug)]
struct Stored {
    value: Vec<u8>,
    mod_revision: i64,
    lease: LeaseId,
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Debug)]
struct State {
    revision: i64,
    kvs: BTreeMap<String, Stored>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    history: VecDeque<KvEvent>,
    /// Highest revision dropped from `history` (watches from at or below it must resync).
    forgotten: i64,
    events: broadcast::Sender<KvEvent>,
}

impl State {
    fn record(&mut self, key: String, value: Option<Vec<u8>>) {
        self.revision += 1;
        let ev = KvEvent { key, value, revision: self.revision };
        if self.history.len() == HISTORY
            && let Some(old) = self.history.pop_front()
        {
            self.forgotten = old.revision;
        }
        self.history.push_back(ev.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(ev);
    }

    fn expire(&mut self, now: Instant) {
        let dead: Vec<LeaseId> =
            self.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        for id in dead {
            self.drop_lease(id);
        }
    }

    fn drop_lease(&mut self, id: LeaseId) {
        if self.leases.remove(&id).is_none() {
            return;
        }
        let keys: Vec<String> =
            self.kvs.iter().filter(|(_, s)| s.lease == id).map(|(k, _)| k.clone()).collect();
        for k in keys {
            self.kvs.remove(&k);
            self.record(k, None);
        }
    }
}

/// In-memory store with etcd semantics. Cloning shares the store.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl MemoryStore {
    /// Creates an empty store and starts its lease reaper on the current tokio runtime.
    pub fn new() -> Result<Self> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            MembershipError::InvalidArgument {
                what: "runtime",
                reason: "MemoryStore::new must be called inside a tokio runtime".into(),
            }
        })?;
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let state = Arc::new(Mutex::new(State {
            revision: 0,
            kvs: BTreeMap::new(),
            leases: HashMap::new(),
            next_lease: 0x1000,
            history: VecDeque::new(),
            forgotten: 0,
            events,
        }));
        let weak: Weak<Mutex<State>> = Arc::downgrade(&state);
        handle.spawn(async move {
            loop {
                tokio::time::sleep(REAP_INTERVAL).await;
                let Some(state) = weak.upgrade() else { return };
                lock(&state).expire(Instant::now());
            }
        });
        Ok(Self { state })
    }

    /// Locks the state after expiring due leases.
    fn live(&self) -> std::sync::MutexGuard<'_, State> {
        let mut s = lock(&self.state);
        s.expire(Instant::now());
        s
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave the maps half-updated in a way later calls
    // would misread (each mutation is a single insert/remove + record), so poisoning is ignored.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl KvStore for MemoryStore {
    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        let mut s = self.live();
        s.next_lease += 1;
        let id = s.next_lease;
        s.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl });
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
        let mut s = self.live();
        match s.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + l.ttl;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.live().drop_lease(lease);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        let s = self.live();
        Ok(s.kvs.get(key).map(|v| KvEntry {
            key: key.to_string(),
            value: v.value.clone(),
            mod_revision: v.mod_revision,
            lease: v.lease,
        }))
    }

    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KvEntry>, i64)> {
        let s = self.live();
        let entries = s
            .kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| KvEntry {
                key: k.clone(),
                value: v.value.clone(),
                mod_revision: v.mod_revision,
                lease: v.lease,
            })
            .collect();
        Ok((entries, s.revision))
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
        expected: i64,
    ) -> Result<bool> {
        let mut s = self.live();
        let current = s.kvs.get(key).map_or(0, |v| v.mod_revision);
        if current != expected {
            return Ok(false);
        }
        if lease != 0 && !s.leases.contains_key(&lease) {
            return Err(MembershipError::LeaseLost { lease });
        }
        let mod_revision = s.revision + 1;
        s.kvs.insert(key.to_string(), Stored { value: value.clone(), mod_revision, lease });
        s.record(key.to_string(), Some(value));
        Ok(true)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let mut s = self.live();
        if s.kvs.remove(key).is_none() {
            return Ok(false);
        }
        s.record(key.to_string(), None);
        Ok(true)
    }

    async fn watch_prefix(
        &self,
        prefix: &str,
        from: i64,
    ) -> Result<BoxStream<'static, Result<KvEvent>>> {
        let s = self.live();
        if from <= s.forgotten {
            return Err(MembershipError::Compacted { revision: from });
        }
        let prefix = prefix.to_string();
        let replay: Vec<Result<KvEvent>> = s
            .history
            .iter()
            .filter(|e| e.revision >= from && e.key.starts_with(&prefix))
            .cloned()
            .map(Ok)
            .collect();
        let rx = s.events.subscribe();
        drop(s);
        let live =
            futures::stream::unfold((rx, prefix, from), |(mut rx, prefix, from)| async move {
                loop {
                    match rx.recv().await {
                        Ok(ev) if ev.revision >= from && ev.key.starts_with(&prefix) => {
                            return Some((Ok(ev), (rx, prefix, from)));
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let e = MembershipError::Compacted { revision: from };
                            return Some((Err(e), (rx, prefix, from)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
        Ok(futures::stream::iter(replay).chain(live).boxed())
    }
}
