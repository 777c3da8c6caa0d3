//! Recovery of the engine loop (a child module of `run.rs`): who may join the next epoch, what
//! happens to requests when an epoch ends, and drains.
//!
//! Owns:
//! - **probing**: before a plan is formed every registered worker is connected and asked for
//!   its health (bounded by [`PROBE_TIMEOUT`]); a worker that does not answer (killed, stopped,
//!   partitioned) is left out even while its lease lingers, so a dead rank is never planned
//!   again and a restarted worker at the same address is taken as soon as it answers;
//! - **migration**: when an epoch fails (a rank died, its stream broke, the step deadline
//!   passed) or is ended for a drain, every running sequence goes back to the front of its
//!   group's queue with its tokens ([`GroupSched::requeue_running`]): on the next epoch it is
//!   re-prefilled with prompt + generated tokens and sampling continues at the next index, so
//!   the client stream goes on without duplicates or gaps;
//! - **the hold window**: requests wait for a new epoch at most `migrate_timeout` after the
//!   failure; after that every held request ends UNAVAILABLE (0 disables holding: the issue-5
//!   behaviour, every request in flight ends UNAVAILABLE at once);
//! - **drains**: a drained worker is excluded from plans while it is the process that was drained
//!   (its health reports a prepared epoch); the epoch containing it ends at a step boundary and
//!   its sequences migrate and it is asked to shut down. A fresh process under the same id
//!   (health epoch 0: restarted, e.g. upgraded) may join again; the drain is answered once an
//!   epoch without the drained process serves;
//! - **joining spares** (elastic growth): while serving below `max_world_size`, a background
//!   check probes the registered workers outside the plan; once T of them answer, the epoch ends
//!   at a step boundary (sequences migrate, as for a drain) so that the next plan includes them.
//!   Not done with holding disabled (the requests in flight would end UNAVAILABLE);
//! - **group count**: a new epoch of another world size gets W/T group schedulers; the queued
//!   sequences (all of them: running ones were requeued) are dealt out round-robin in order.
//!
//! Invariant: a request is never answered twice; held requests still see cancellation and
//! deadlines (reaped while holding).

use super::{Engine, GroupSched, LinkError};
use crate::engine::EngineError;
use crate::engine::Event;
use crate::engine::link::{connect, health};
use crate::planner::Member;
use fathom_proto::v1::worker_client::WorkerClient;
use fathom_proto::v1::{ShutdownRequest, WorkerHealthResponse};
use futures::FutureExt;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Bound on connecting to a worker and its health answer when probing.
pub(super) const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// A worker that answered the probe.
pub(super) struct Probed {
    pub member: Member,
    pub client: WorkerClient<Channel>,
}

/// An operator request to the engine loop.
#[derive(Debug)]
pub(crate) enum Control {
    /// Drain a worker; the reply carries the epoch that excludes it.
    Drain { worker_id: String, reply: tokio::sync::oneshot::Sender<Result<u64, EngineError>> },
}

async fn probe(m: Member) -> Result<(Probed, WorkerHealthResponse), String> {
    let mut client = connect(&m.address, PROBE_TIMEOUT).await?;
    let h = health(&mut client, PROBE_TIMEOUT).await?;
    if h.worker_id != m.worker_id {
        return Err(format!("answers as worker {:?}", h.worker_id));
    }
    Ok((Probed { member: m, client }, h))
}

impl Engine {
    /// The registered workers that answer their health check, drained ones left out.
    pub(super) async fn probe_members(&mut self, members: Vec<Member>) -> Vec<Probed> {
        let answers = futures::future::join_all(members.into_iter().map(|m| async move {
            let id = m.worker_id.clone();
            (id, probe(m).await)
        }))
        .await;
        let mut out = Vec::new();
        for (id, a) in answers {
            match a {
                Ok((p, h)) => {
                    if self.draining.contains(&id) {
                        if h.epoch != 0 {
                            tracing::debug!(worker = %id, "drained worker left out of the plan");
                            continue;
                        }
                        tracing::info!(worker = %id, "a fresh process of a drained worker joins again");
                        self.draining.remove(&id);
                        self.status.lock().unwrap_or_else(|p| p.into_inner()).draining =
                            self.draining.iter().cloned().collect();
                    }
                    out.push(p);
                }
                Err(e) => tracing::info!(worker = %id, "left out of the plan: {e}"),
            }
        }
        out
    }

    /// Ends the current epoch's requests' tie to their ranks: every running sequence goes back
    /// to the queue to resume on the next epoch (or, with holding disabled, every request ends
    /// UNAVAILABLE). Starts the hold window if it is not running.
    pub(super) fn migrate(&mut self, why: &str) {
        if self.cfg.migrate_timeout.is_zero() {
            for g in &mut self.groups {
                for mut s in g.drain_all() {
                    s.tag.trace.finish(crate::metrics::status::UNAVAILABLE);
                    let _ = s.tag.tx.try_send(Event::Error(EngineError::Unavailable(why.into())));
                }
                g.released.clear();
            }
            self.fail_queued(why);
            return;
        }
        let mut moved = 0;
        for g in &mut self.groups {
            moved += g.requeue_running();
        }
        // Requeued sequences wait for admission again.
        self.pending.fetch_add(moved, Ordering::SeqCst);
        {
            let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            st.epochs_failed += 1;
            st.sequences_migrated += moved as u64;
            st.draining = self.draining.iter().cloned().collect();
        }
        self.held_since.get_or_insert_with(Instant::now);
        tracing::info!(moved, "sequences migrate to the next epoch: {why}");
    }

    /// Called while no epoch serves, after a failed attempt to form one: takes new
    /// submissions into the queue (held), reaps cancelled and expired requests, and ends every
    /// held request UNAVAILABLE once the hold window has passed.
    pub(super) fn hold_or_fail(&mut self, why: &str) {
        if self.cfg.migrate_timeout.is_zero() {
            self.fail_queued(why);
            return;
        }
        while let Ok(sub) = self.rx.try_recv() {
            self.enqueue(sub);
        }
        self.reap();
        let held = self.groups.iter().map(|g| g.waiting.len()).sum::<usize>();
        if held == 0 {
            self.held_since = None;
            return;
        }
        let since = *self.held_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.cfg.migrate_timeout {
            let msg = format!(
                "no epoch could serve within {:?} of the failure: {why}",
                self.cfg.migrate_timeout
            );
            self.fail_queued(&msg);
            self.held_since = None;
        }
    }

    /// Handles pending operator requests. `Err` ends the serving epoch at this step boundary
    /// (its sequences migrate).
    /// `plan` is the serving epoch's (worker id, address) per rank; empty while none serves
    /// (then drains are answered once an epoch without the worker serves).
    pub(super) fn control(&mut self, plan: &[(String, String)]) -> Result<(), LinkError> {
        let mut end = None;
        while let Ok(c) = self.control_rx.try_recv() {
            match c {
                Control::Drain { worker_id, reply } => {
                    tracing::info!(worker = %worker_id, "drain requested");
                    self.draining.insert(worker_id.clone());
                    self.status.lock().unwrap_or_else(|p| p.into_inner()).draining =
                        self.draining.iter().cloned().collect();
                    match plan.iter().find(|(w, _)| *w == worker_id) {
                        Some((_, addr)) => {
                            self.drained_addrs.insert(worker_id.clone(), addr.clone());
                            self.drain_replies.push((worker_id.clone(), reply));
                            end.get_or_insert(worker_id);
                        }
                        None if plan.is_empty() => self.drain_replies.push((worker_id, reply)),
                        None => {
                            let _ = reply.send(Ok(self.epoch));
                        }
                    }
                }
            }
        }
        match end {
            None => Ok(()),
            Some(id) => Err(LinkError {
                worker_id: id,
                address: String::new(),
                reason: "drained: the epoch ends at a step boundary".into(),
            }),
        }
    }

    /// Asks the drained workers that left the plan (their epoch ended, their sequences already
    /// migrated) to shut down, in the background. A supervisor that restarts them (`fathom up`,
    /// Kubernetes) brings a fresh process back, which may join again — so a drain also
    /// completes when no spare can take the worker's rank.
    pub(super) fn shutdown_drained(&mut self) {
        let epoch = self.epoch;
        for (id, addr) in self.drained_addrs.drain() {
            tokio::spawn(async move {
                let Ok(mut c) = connect(&addr, PROBE_TIMEOUT).await else { return };
                let reason = format!("drained (out of epoch {epoch})");
                let req = ShutdownRequest { reason, grace_ms: 1000 };
                let _ = tokio::time::timeout(PROBE_TIMEOUT, c.shutdown(req)).await;
                tracing::info!(worker = %id, "drained worker asked to shut down");
            });
        }
    }

    /// After a new epoch serves: answers the drains it completes — the drained process is not
    /// in it (the worker is absent, or a fresh process under its id took its place, which
    /// cleared its draining mark).
    pub(super) fn drains_done(&mut self, plan: &[(String, String)]) {
        let epoch = self.epoch;
        let mut left = Vec::new();
        for (id, reply) in self.drain_replies.drain(..) {
            if self.draining.contains(&id) && plan.iter().any(|(w, _)| *w == id) {
                left.push((id, reply));
            } else {
                let _ = reply.send(Ok(epoch));
            }
        }
        self.drain_replies = left;
    }

    /// Between epochs: makes `d` group schedulers (no-op when unchanged). Every sequence is
    /// waiting then; they are dealt out round-robin, keeping each queue's order (migrated
    /// sequences, at the fronts, stay ahead).
    pub(super) fn resize_groups(&mut self, d: usize) {
        let d = d.max(1);
        if d == self.groups.len() {
            return;
        }
        let Some(first) = self.groups.first() else { return };
        let limits = first.limits;
        let mut queues = Vec::with_capacity(self.groups.len());
        for g in &mut self.groups {
            // Nothing runs between epochs (migrate requeued it); kept for safety.
            let moved = g.requeue_running();
            self.pending.fetch_add(moved, Ordering::SeqCst);
            queues.push(std::mem::take(&mut g.waiting).into_iter());
        }
        let mut groups: Vec<_> =
            (0..d).map(|_| GroupSched::new(limits, self.cfg.kv_blocks)).collect();
        let mut next = 0;
        loop {
            let mut any = false;
            for q in &mut queues {
                if let Some(s) = q.next() {
                    groups[next % d].waiting.push_back(s);
                    next += 1;
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        tracing::info!(from = self.groups.len(), to = d, "attention groups resized");
        self.groups = groups;
    }

    /// While serving: starts (every [`super::JOIN_POLL`]) a background check for registered
    /// workers outside `plan` that answer their health check, and ends the epoch (`Err`, no
    /// worker named) once at least T of them could join below `max_world_size`.
    pub(super) fn spares_join(&mut self, plan: &[(String, String)]) -> Result<(), LinkError> {
        let t = self.cfg.tp.max(1);
        if plan.len() + t > self.cfg.max_world_size || self.cfg.migrate_timeout.is_zero() {
            return Ok(());
        }
        if let Some(h) = self.join_check.as_mut() {
            let Some(done) = h.now_or_never() else { return Ok(()) };
            self.join_check = None;
            let n = done.unwrap_or(0);
            if n >= t {
                return Err(LinkError {
                    worker_id: String::new(),
                    address: String::new(),
                    reason: format!(
                        "{n} spare worker(s) can join: the epoch ends at a step boundary to grow \
                         the world of {} (max {})",
                        plan.len(),
                        self.cfg.max_world_size
                    ),
                });
            }
            return Ok(());
        }
        if self.last_join_check.elapsed() < super::JOIN_POLL {
            return Ok(());
        }
        self.last_join_check = Instant::now();
        let directory = self.directory.clone();
        let known: HashSet<String> = plan.iter().map(|(w, _)| w.clone()).collect();
        let draining = self.draining.clone();
        self.join_check = Some(tokio::spawn(async move {
            let Ok(members) = directory.live_workers().await else { return 0 };
            let spares = members.into_iter().filter(|m| !known.contains(&m.worker_id));
            let answers = futures::future::join_all(spares.map(probe)).await;
            answers
                .into_iter()
                .filter(|a| {
                    a.as_ref()
                        .is_ok_and(|(p, h)| !draining.contains(&p.member.worker_id) || h.epoch == 0)
                })
                .count()
        }));
        Ok(())
    }
}
