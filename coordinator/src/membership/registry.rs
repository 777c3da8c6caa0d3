//! The registry: the coordinator's in-memory store ([`MemoryStore`]) served over gRPC
//! (`fathom.v1.Registry`, [`RegistryService`]) and its client, [`RemoteStore`], a [`KvStore`]
//! whose every primitive is one RPC. A worker of a cluster without etcd registers through
//! `StoreMembership<RemoteStore>` — the same registration code (lease, keep-alive at TTL/2,
//! hard deadline, re-acquire) as over etcd; the coordinator reads the same store directly through
//! `MemoryMembership`, so discovery, plans and epochs follow one code path with and without etcd.
//!
//! Invariants: the service only touches keys under the cluster's worker prefix (INVALID_ARGUMENT
//! otherwise), so a worker cannot overwrite the plan; every client call is bounded by its
//! timeout (a dead coordinator is `Unavailable`/`Timeout`, never a hang); the client never
//! watches (the store's watch is not served): `watch_prefix` fails `Unavailable`, which the
//! resyncing watcher turns into periodic re-listing.
//!
//! Does not own: the store's semantics (`memory.rs`), registration policy (`lease.rs`).

use super::error::{MembershipError, Result};
use super::keys::Keys;
use super::memory::MemoryStore;
use super::store::{KvEntry, KvEvent, KvStore, LeaseId};
use fathom_proto::v1::registry_client::RegistryClient;
use fathom_proto::v1::registry_server::Registry;
use fathom_proto::v1::{
    RegistryDeleteRequest, RegistryDeleteResponse, RegistryEntry, RegistryGetRequest,
    RegistryGetResponse, RegistryGrantRequest, RegistryGrantResponse, RegistryKeepAliveRequest,
    RegistryKeepAliveResponse, RegistryPutIfRequest, RegistryPutIfResponse, RegistryRevokeRequest,
    RegistryRevokeResponse,
};
use futures::stream::BoxStream;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

pub use fathom_proto::v1::registry_server::RegistryServer;

/// Longest lease a worker may ask for.
const MAX_TTL: Duration = Duration::from_secs(3600);

/// `fathom.v1.Registry` over the coordinator's [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct RegistryService {
    store: MemoryStore,
    keys: Keys,
}

impl RegistryService {
    /// Serves `store` (shared with the coordinator's `MemoryMembership`) for cluster `keys`.
    pub fn new(store: MemoryStore, keys: Keys) -> Self {
        Self { store, keys }
    }

    /// A tonic service for a server router.
    pub fn into_server(self) -> RegistryServer<Self> {
        RegistryServer::new(self)
    }

    fn check_key(&self, key: &str) -> std::result::Result<(), Status> {
        let prefix = self.keys.workers_prefix();
        if key.starts_with(&prefix) {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!("key {key:?} is outside {prefix}")))
        }
    }
}

fn status(e: MembershipError) -> Status {
    match e {
        MembershipError::LeaseLost { .. } => Status::not_found(e.to_string()),
        MembershipError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

fn wire(e: KvEntry) -> RegistryEntry {
    RegistryEntry { key: e.key, value: e.value, mod_revision: e.mod_revision, lease: e.lease }
}

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn grant(
        &self,
        request: Request<RegistryGrantRequest>,
    ) -> std::result::Result<Response<RegistryGrantResponse>, Status> {
        let ttl = Duration::from_millis(request.into_inner().ttl_ms);
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(Status::invalid_argument(format!("lease ttl {ttl:?} outside (0, 1 h]")));
        }
        let lease = self.store.grant(ttl).await.map_err(status)?;
        Ok(Response::new(RegistryGrantResponse { lease }))
    }

    async fn keep_alive(
        &self,
        request: Request<RegistryKeepAliveRequest>,
    ) -> std::result::Result<Response<RegistryKeepAliveResponse>, Status> {
        let alive = self.store.keep_alive(request.into_inner().lease).await.map_err(status)?;
        Ok(Response::new(RegistryKeepAliveResponse { alive }))
    }

    async fn revoke(
        &self,
        request: Request<RegistryRevokeRequest>,
    ) -> std::result::Result<Response<RegistryRevokeResponse>, Status> {
        self.store.revoke(request.into_inner().lease).await.map_err(status)?;
        Ok(Response::new(RegistryRevokeResponse {}))
    }

    async fn get(
        &self,
        request: Request<RegistryGetRequest>,
    ) -> std::result::Result<Response<RegistryGetResponse>, Status> {
        let req = request.into_inner();
        self.check_key(&req.key)?;
        if req.prefix {
            let (entries, revision) = self.store.get_prefix(&req.key).await.map_err(status)?;
            let entries = entries.into_iter().map(wire).collect();
            return Ok(Response::new(RegistryGetResponse { entries, revision }));
        }
        let entry = self.store.get(&req.key).await.map_err(status)?;
        Ok(Response::new(RegistryGetResponse {
            entries: entry.into_iter().map(wire).collect(),
            revision: 0,
        }))
    }

    async fn put_if(
        &self,
        request: Request<RegistryPutIfRequest>,
    ) -> std::result::Result<Response<RegistryPutIfResponse>, Status> {
        let r = request.into_inner();
        self.check_key(&r.key)?;
        let succeeded =
            self.store.put_if(&r.key, r.value, r.lease, r.expected).await.map_err(status)?;
        Ok(Response::new(RegistryPutIfResponse { succeeded }))
    }

    async fn delete(
        &self,
        request: Request<RegistryDeleteRequest>,
    ) -> std::result::Result<Response<RegistryDeleteResponse>, Status> {
        let key = request.into_inner().key;
        self.check_key(&key)?;
        let deleted = self.store.delete(&key).await.map_err(status)?;
        Ok(Response::new(RegistryDeleteResponse { deleted }))
    }
}

/// A [`KvStore`] served by a coordinator's registry at `host:port`. Cloning shares the channel.
#[derive(Debug, Clone)]
pub struct RemoteStore {
    client: RegistryClient<Channel>,
    address: String,
    timeout: Duration,
}

impl RemoteStore {
    /// A store at `address` (`host:port`). Connects lazily: the coordinator may start later, and
    /// the channel reconnects by itself after it restarts. Every call is bounded by `timeout`.
    pub fn new(address: &str, timeout: Duration) -> Result<Self> {
        let ep = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| MembershipError::InvalidArgument {
                what: "registry address",
                reason: format!("{address:?}: {e}"),
            })?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        Ok(Self {
            client: RegistryClient::new(ep.connect_lazy()),
            address: address.to_string(),
            timeout,
        })
    }

    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(RegistryClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<T>, Status>>,
    {
        match tokio::time::timeout(self.timeout, f(self.client.clone())).await {
            Err(_) => Err(MembershipError::Timeout { op, after: self.timeout }),
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(match s.code() {
                tonic::Code::InvalidArgument => MembershipError::InvalidArgument {
                    what: "registry call",
                    reason: s.message().into(),
                },
                _ => MembershipError::Unavailable {
                    op,
                    message: format!("registry {}: {}", self.address, s.message()),
                },
            }),
        }
    }
}

fn entry(e: RegistryEntry) -> KvEntry {
    KvEntry { key: e.key, value: e.value, mod_revision: e.mod_revision, lease: e.lease }
}

impl KvStore for RemoteStore {
    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl_ms = ttl.as_millis() as u64;
        let r =
            self.call("lease grant", |mut c| async move {
                c.grant(RegistryGrantRequest { ttl_ms }).await
            })
            .await?;
        Ok(r.lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
        let r = self
            .call("lease keep-alive", |mut c| async move {
                c.keep_alive(RegistryKeepAliveRequest { lease }).await
            })
            .await?;
        Ok(r.alive)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.call("lease revoke", |mut c| async move {
            c.revoke(RegistryRevokeRequest { lease }).await
        })
        .await?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        let req = RegistryGetRequest { key: key.to_string(), prefix: false };
        let r = self.call("get", |mut c| async move { c.get(req).await }).await?;
        Ok(r.entries.into_iter().next().map(entry))
    }

    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KvEntry>, i64)> {
        let req = RegistryGetRequest { key: prefix.to_string(), prefix: true };
        let r = self.call("get prefix", |mut c| async move { c.get(req).await }).await?;
        Ok((r.entries.into_iter().map(entry).collect(), r.revision))
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
        expected: i64,
    ) -> Result<bool> {
        let req = RegistryPutIfRequest { key: key.to_string(), value, lease, expected };
        let op = "txn put";
        match tokio::time::timeout(self.timeout, self.client.clone().put_if(req)).await {
            Err(_) => Err(MembershipError::Timeout { op, after: self.timeout }),
            Ok(Ok(r)) => Ok(r.into_inner().succeeded),
            Ok(Err(s)) if s.code() == tonic::Code::NotFound => {
                Err(MembershipError::LeaseLost { lease })
            }
            Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => {
                Err(MembershipError::InvalidArgument {
                    what: "registry key",
                    reason: s.message().into(),
                })
            }
            Ok(Err(s)) => Err(MembershipError::Unavailable {
                op,
                message: format!("registry {}: {}", self.address, s.message()),
            }),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let req = RegistryDeleteRequest { key: key.to_string() };
        let r = self.call("delete", |mut c| async move { c.delete(req).await }).await?;
        Ok(r.deleted)
    }

    async fn watch_prefix(
        &self,
        _prefix: &str,
        _from: i64,
    ) -> Result<BoxStream<'static, Result<KvEvent>>> {
        Err(MembershipError::Unavailable {
            op: "watch",
            message: "the registry serves no watches (callers re-list)".into(),
        })
    }
}
