//! Leased keys: a worker's registration and a coordinator's leadership ([`LeasedKey`]), kept
//! alive by one background task each.
//!
//! Follows the discovery/lease design of ai-dynamo's etcd transport: keep-alive every TTL/2; a
//! hard deadline of TTL after the last *sent* successful keep-alive, at which the holder is told
//! the lease is lost ([`LeaseState::Lost`]) even if the store is unreachable (it may already have
//! expired server-side); revoke on an explicit release. Unlike dynamo's, a lost registration is
//! re-acquired when the store answers again (first by keeping the old lease alive if the store
//! still has it, e.g. after an etcd restart, else with a new lease), so an etcd blip never
//! requires restarting the worker. Leadership is never re-acquired silently: once lost it stays
//! lost, because another coordinator may have led meanwhile.
//!
//! Does not own: what the key means (service.rs decides keys and values).

use super::error::{MembershipError, Result};
use super::store::{KvStore, LeaseId};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// State of a leased key as its holder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// The key exists under this lease and keep-alives are succeeding.
    Held { lease: LeaseId },
    /// The lease expired or could not be refreshed before its deadline. Registrations try to
    /// re-acquire and go back to `Held`; leadership stays `Lost`.
    Lost,
    /// Released by the holder (revoked); final.
    Released,
}

/// What to do when the lease is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnLoss {
    Reacquire,
    GiveUp,
}

/// A key held under a lease with a keep-alive task: a worker registration or a leadership.
///
/// Dropping it stops keep-alives *without* revoking (like a crash: the key disappears when the
/// lease expires); call [`release`](Self::release) on orderly shutdown.
#[derive(Debug)]
pub struct LeasedKey {
    key: String,
    state: watch::Receiver<LeaseState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<()>>>,
}

/// A worker's registration under `workers/<id>`.
pub type Registration = LeasedKey;
/// A coordinator's leadership under `coordinator/leader`.
pub type Leadership = LeasedKey;

impl LeasedKey {
    /// Takes ownership of `lease` (already granted, `key` already put under it) and starts the
    /// keep-alive task.
    pub(crate) fn start<S: KvStore>(
        store: Arc<S>,
        key: String,
        value: Vec<u8>,
        ttl: Duration,
        lease: LeaseId,
        granted_at: Instant,
        on_loss: OnLoss,
    ) -> Self {
        let (state_tx, state) = watch::channel(LeaseState::Held { lease });
        let (stop_tx, stop) = oneshot::channel();
        let keeper = Keeper { store, key: key.clone(), value, ttl, on_loss, state: state_tx };
        let task = tokio::spawn(keeper.run(lease, granted_at, stop));
        Self { key, state, stop: Some(stop_tx), task: Some(task) }
    }

    /// The store key held.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Current state.
    pub fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// A receiver of state changes (the "lease lost" notification and its recovery).
    pub fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Resolves when the key is no longer held (lost or released).
    pub async fn lost(&self) {
        let mut rx = self.state.clone();
        let _ = rx.wait_for(|s| !matches!(s, LeaseState::Held { .. })).await;
    }

    /// Resolves when the key is held (immediately if it is).
    pub async fn held(&self) {
        let mut rx = self.state.clone();
        let _ = rx.wait_for(|s| matches!(s, LeaseState::Held { .. })).await;
    }

    /// Stops keep-alives and revokes the lease (the key is deleted at once). An error means the
    /// revoke could not be delivered; the key then disappears when the lease expires.
    pub async fn release(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(|e| MembershipError::Unavailable {
                op: "release",
                message: format!("keep-alive task failed: {e}"),
            })?,
            None => Ok(()),
        }
    }
}

impl Drop for LeasedKey {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct Keeper<S> {
    store: Arc<S>,
    key: String,
    value: Vec<u8>,
    ttl: Duration,
    on_loss: OnLoss,
    state: watch::Sender<LeaseState>,
}

impl<S: KvStore> Keeper<S> {
    async fn run(
        self,
        mut lease: LeaseId,
        granted_at: Instant,
        mut stop: oneshot::Receiver<()>,
    ) -> Result<()> {
        let interval = self.ttl / 2;
        let retry = (self.ttl / 8).clamp(Duration::from_millis(50), Duration::from_millis(250));
        let mut held = true;
        let mut deadline = granted_at + self.ttl;
        let mut next = granted_at + interval;
        loop {
            tokio::select! {
                _ = &mut stop => {
                    let r = if held { self.store.revoke(lease).await } else { Ok(()) };
                    self.state.send_replace(LeaseState::Released);
                    return r;
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            if held {
                let sent = Instant::now();
                let outcome = tokio::time::timeout_at(deadline, self.store.keep_alive(lease)).await;
                match outcome {
                    Ok(Ok(true)) => {
                        deadline = sent + self.ttl;
                        next = sent + interval;
                    }
                    Ok(Ok(false)) => {
                        tracing::warn!(key = %self.key, lease, "lease expired in the store");
                        held = false;
                        self.state.send_replace(LeaseState::Lost);
                        next = Instant::now();
                    }
                    Ok(Err(e)) if Instant::now() < deadline => {
                        tracing::debug!(key = %self.key, error = %e, "keep-alive failed; retrying");
                        next = Instant::now() + retry;
                    }
                    Ok(Err(_)) | Err(_) => {
                        tracing::warn!(key = %self.key, lease, "lease deadline passed without keep-alive");
                        held = false;
                        self.state.send_replace(LeaseState::Lost);
                        next = Instant::now();
                    }
                }
                if !held && self.on_loss == OnLoss::GiveUp {
                    // Wait for release (or drop) without touching the store again.
                    let _ = stop.await;
                    self.state.send_replace(LeaseState::Released);
                    return Ok(());
                }
            } else {
                let attempt = Instant::now();
                match reacquire(&*self.store, &self.key, &self.value, self.ttl, lease).await {
                    Ok(new) => {
                        tracing::info!(key = %self.key, lease = new, "lease re-acquired");
                        lease = new;
                        held = true;
                        deadline = attempt + self.ttl;
                        next = attempt + interval;
                        self.state.send_replace(LeaseState::Held { lease });
                    }
                    Err(e) => {
                        tracing::debug!(key = %self.key, error = %e, "re-acquire failed; retrying");
                        next = Instant::now() + retry;
                    }
                }
            }
        }
    }
}

/// Gets `key` held under a live lease again: the old lease if the store still has it, else a
/// new one. Fails with [`MembershipError::AlreadyRegistered`] while another lease holds the key.
async fn reacquire<S: KvStore>(
    store: &S,
    key: &str,
    value: &[u8],
    ttl: Duration,
    old: LeaseId,
) -> Result<LeaseId> {
    if store.keep_alive(old).await? {
        match store.get(key).await? {
            Some(e) if e.lease == old => return Ok(old),
            Some(_) => {}
            None => {
                if store.put_if(key, value.to_vec(), old, 0).await? {
                    return Ok(old);
                }
            }
        }
    }
    acquire(store, key, value, ttl).await.map(|(lease, _)| lease)
}

/// Grants a lease and creates `key` under it (only if absent). Returns the lease and the time
/// the grant was requested (the conservative start of its TTL).
pub(crate) async fn acquire<S: KvStore>(
    store: &S,
    key: &str,
    value: &[u8],
    ttl: Duration,
) -> Result<(LeaseId, Instant)> {
    let t0 = Instant::now();
    let lease = store.grant(ttl).await?;
    match store.put_if(key, value.to_vec(), lease, 0).await {
        Ok(true) => Ok((lease, t0)),
        Ok(false) => {
            let _ = store.revoke(lease).await;
            Err(MembershipError::AlreadyRegistered {
                id: key.rsplit('/').next().unwrap_or(key).to_string(),
            })
        }
        Err(e) => {
            let _ = store.revoke(lease).await;
            Err(e)
        }
    }
}
