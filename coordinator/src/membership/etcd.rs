//! [`EtcdStore`]: the [`KvStore`] on a real etcd cluster (etcd-client 0.21, etcd v3 API; checked
//! against etcd 3.4.23).
//!
//! Owns the mapping of the primitive operations to etcd calls and of etcd errors to
//! [`MembershipError`]. Every unary call is bounded by `op_timeout`, so a dead etcd turns into
//! [`MembershipError::Timeout`]/[`MembershipError::Unavailable`] instead of a hang; the client's
//! channel reconnects by itself when etcd comes back, so no call here needs a new client.
//!
//! Mapping: `put_if` is one txn `mod_revision(key) == expected ? put : nothing`; keep-alive opens
//! a keep-alive stream, sends one request and reads one answer (TTL 0 = lease gone); watches are
//! etcd prefix watches from a start revision (compaction → [`MembershipError::Compacted`]).

use super::error::{MembershipError, Result};
use super::store::{KvEntry, KvEvent, KvStore, LeaseId};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use futures::StreamExt;
use futures::stream::BoxStream;
use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Bound on every unary call (and on connecting).
    pub op_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self { op_timeout: Duration::from_secs(2) }
    }
}

/// A handle on an etcd cluster. Cloning shares the connection.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
    options: EtcdOptions,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("endpoints", &self.endpoints).finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects and checks that etcd answers (one read), so a wrong endpoint fails here.
    pub async fn connect(endpoints: &[String], options: EtcdOptions) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(MembershipError::InvalidArgument {
                what: "etcd endpoints",
                reason: "no endpoint given".into(),
            });
        }
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.op_timeout)
            .with_keep_alive(Duration::from_secs(2), options.op_timeout);
        let client = bounded("connect", options.op_timeout, async {
            Client::connect(endpoints, Some(connect)).await
        })
        .await?;
        let store = Self { client, endpoints: endpoints.to_vec(), options };
        store.get("/fathom/").await?;
        Ok(store)
    }

    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        bounded(op, self.options.op_timeout, f(self.client.clone())).await
    }
}

async fn bounded<T>(
    op: &'static str,
    after: Duration,
    fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r.map_err(|e| map_err(op, e)),
        Err(_) => Err(MembershipError::Timeout { op, after }),
    }
}

fn map_err(op: &'static str, e: etcd_client::Error) -> MembershipError {
    match e {
        etcd_client::Error::InvalidArgs(m) | etcd_client::Error::EndpointError(m) => {
            MembershipError::InvalidArgument { what: "etcd endpoint", reason: m }
        }
        other => MembershipError::Unavailable { op, message: other.to_string() },
    }
}

fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        _ => false,
    }
}

fn entry(kv: &etcd_client::KeyValue) -> Result<KvEntry> {
    let key = kv.key_str().map_err(|e| MembershipError::Corrupt {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        reason: e.to_string(),
    })?;
    Ok(KvEntry {
        key: key.to_string(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    })
}

impl KvStore for EtcdStore {
    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let r = self.call("lease grant", |mut c| async move { c.lease_grant(secs, None).await });
        Ok(r.await?.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
        let op = "lease keep-alive";
        match tokio::time::timeout(self.options.op_timeout, async {
            let mut c = self.client.clone();
            c.lease_keep_alive(lease).await
        })
        .await
        {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if is_lease_not_found(&e) => Ok(false),
            Ok(Err(e)) => Err(map_err(op, e)),
            Err(_) => Err(MembershipError::Timeout { op, after: self.options.op_timeout }),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        let op = "lease revoke";
        match tokio::time::timeout(self.options.op_timeout, async {
            let mut c = self.client.clone();
            c.lease_revoke(lease).await
        })
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if is_lease_not_found(&e) => Ok(()),
            Ok(Err(e)) => Err(map_err(op, e)),
            Err(_) => Err(MembershipError::Timeout { op, after: self.options.op_timeout }),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        let key = key.to_string();
        let resp = self.call("get", |mut c| async move { c.get(key, None).await }).await?;
        resp.kvs().first().map(entry).transpose()
    }

    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KvEntry>, i64)> {
        let prefix = prefix.to_string();
        let resp = self
            .call("get prefix", |mut c| async move {
                c.get(prefix, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let entries = resp.kvs().iter().map(entry).collect::<Result<Vec<_>>>()?;
        Ok((entries, revision))
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
        expected: i64,
    ) -> Result<bool> {
        let put_opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(key, value, put_opts)]);
        match tokio::time::timeout(self.options.op_timeout, async {
            let mut c = self.client.clone();
            c.txn(txn).await
        })
        .await
        {
            Ok(Ok(r)) => Ok(r.succeeded()),
            Ok(Err(e)) if is_lease_not_found(&e) => Err(MembershipError::LeaseLost { lease }),
            Ok(Err(e)) => Err(map_err("txn put", e)),
            Err(_) => {
                Err(MembershipError::Timeout { op: "txn put", after: self.options.op_timeout })
            }
        }
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let key = key.to_string();
        let resp = self.call("delete", |mut c| async move { c.delete(key, None).await }).await?;
        Ok(resp.deleted() > 0)
    }

    async fn watch_prefix(
        &self,
        prefix: &str,
        from: i64,
    ) -> Result<BoxStream<'static, Result<KvEvent>>> {
        let prefix = prefix.to_string();
        let stream = self
            .call("watch", |mut c| async move {
                let opts = WatchOptions::new().with_prefix().with_start_revision(from);
                c.watch(prefix, Some(opts)).await
            })
            .await?;
        let state = (stream, VecDeque::<KvEvent>::new(), false);
        let events =
            futures::stream::unfold(state, move |(mut stream, mut buf, done)| async move {
                loop {
                    if let Some(ev) = buf.pop_front() {
                        return Some((Ok(ev), (stream, buf, done)));
                    }
                    if done {
                        return None;
                    }
                    let resp = match stream.message().await {
                        Ok(Some(r)) => r,
                        Ok(None) => return None,
                        Err(e) => {
                            let err = map_err("watch", e);
                            return Some((Err(err), (stream, buf, true)));
                        }
                    };
                    if resp.compact_revision() > 0 {
                        let err = MembershipError::Compacted { revision: from };
                        return Some((Err(err), (stream, buf, true)));
                    }
                    if resp.canceled() {
                        let err = MembershipError::Unavailable {
                            op: "watch",
                            message: "watch canceled by etcd".into(),
                        };
                        return Some((Err(err), (stream, buf, true)));
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        let value = match ev.event_type() {
                            EventType::Put => Some(kv.value().to_vec()),
                            EventType::Delete => None,
                        };
                        buf.push_back(KvEvent { key, value, revision: kv.mod_revision() });
                    }
                }
            });
        Ok(events.boxed())
    }
}
