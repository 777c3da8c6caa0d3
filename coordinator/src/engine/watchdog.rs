//! The step watchdog (a child module of `run.rs`): waits for every rank's result of one step,
//! and when the step is still outstanding at the watchdog deadline, reports which ranks have not
//! answered and the last progress each reported (`StepProgress`): `queued` when it never
//! reported for this step, `started` once it began executing, then the layer and phase its
//! forward was in (`layer 3 dispatch`: sampled by the worker every 100 ms while the step runs,
//! so a rank stuck in a collective names the layer and phase it waits in; a rank stopped
//! mid-step names where it was at most one sampling period before it stopped). Phases: see
//! [`place`].
//!
//! The report is a diagnosis, not a verdict: it is logged (WARN), kept in the status snapshot
//! (ClusterStatus.watchdog, newest first, at most [`HISTORY`]) and counted (the status counter,
//! and `fathom_watchdog_stalls_total{worker, phase}` per stalled rank); the stalled ranks
//! are marked unhealthy with a detail naming the step. The verdict comes at the step timeout
//! (the link's bounded `recv`): the epoch fails and its sequences migrate. A rank that answers
//! after the report (e.g. a stopped process continued) clears its mark.
//!
//! The first rank failure ends the wait at once (no waiting for the others).

use super::{Engine, LinkError, WorkerLink};
use crate::engine::{RankStalled, WatchdogEntry};
use fathom_proto::v1::StepResult;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Reports kept in the status snapshot.
pub(super) const HISTORY: usize = 32;

impl Engine {
    /// Every rank's result of step `step_id`, in link order; the first failure ends the wait.
    pub(super) async fn collect_results(
        &mut self,
        links: &mut [WorkerLink],
        step_id: u64,
    ) -> Result<Vec<StepResult>, LinkError> {
        let started = Instant::now();
        let timeout = self.cfg.step_timeout;
        let progress: Vec<_> = links.iter().map(|l| l.progress()).collect();
        let ranks: Vec<(u32, String)> =
            links.iter().map(|l| (l.rank, l.worker_id.clone())).collect();
        let mut results: Vec<Option<StepResult>> = vec![None; links.len()];
        let mut pending: FuturesUnordered<_> = links
            .iter_mut()
            .enumerate()
            .map(|(i, l)| async move { (i, l.recv(timeout).await) })
            .collect();
        let alarm = tokio::time::sleep(self.cfg.watchdog);
        tokio::pin!(alarm);
        let mut reported = false;
        loop {
            tokio::select! {
                next = pending.next() => match next {
                    None => break,
                    Some((i, r)) => {
                        let r = r?;
                        if reported {
                            self.clear_stall(ranks[i].0);
                        }
                        results[i] = Some(r);
                    }
                },
                _ = &mut alarm, if !reported => {
                    reported = true;
                    let missing: Vec<RankStalled> = results
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| r.is_none())
                        .map(|(i, _)| {
                            let p = progress[i].lock().unwrap_or_else(|p| p.into_inner()).clone();
                            let (layer, phase) = match p {
                                Some(p) if p.step_id == step_id => (p.layer, p.phase),
                                _ => (-1, "queued".to_string()),
                            };
                            RankStalled { rank: ranks[i].0, worker_id: ranks[i].1.clone(), layer, phase }
                        })
                        .collect();
                    self.report_stall(step_id, started, missing);
                }
            }
        }
        Ok(results.into_iter().map(|r| r.expect("every rank answered")).collect())
    }

    fn report_stall(&mut self, step_id: u64, started: Instant, missing: Vec<RankStalled>) {
        let stalled_ms = started.elapsed().as_millis() as u64;
        for m in &missing {
            self.metrics.watchdog_stalls.with_label_values(&[m.worker_id.as_str(), &m.phase]).inc();
            tracing::warn!(
                epoch = self.epoch,
                step_id,
                rank = m.rank,
                worker = %m.worker_id,
                phase = %m.phase,
                layer = m.layer,
                stalled_ms,
                "watchdog: step not completed by its deadline: rank {} at {}",
                m.rank,
                place(m)
            );
        }
        let entry = WatchdogEntry {
            epoch: self.epoch,
            step_id,
            stalled_ms,
            missing,
            reported_at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        for m in &entry.missing {
            if let Some(r) = st.ranks.iter_mut().find(|r| r.rank == m.rank) {
                r.healthy = false;
                r.detail = format!(
                    "watchdog: step {step_id} of epoch {} outstanding after {stalled_ms} ms (at {})",
                    entry.epoch,
                    place(m)
                );
            }
        }
        st.watchdog_reports += 1;
        st.watchdog.insert(0, entry);
        st.watchdog.truncate(HISTORY);
    }

    fn clear_stall(&mut self, rank: u32) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = st.ranks.iter_mut().find(|r| r.rank == rank) {
            r.healthy = true;
            r.detail.clear();
        }
    }
}

/// Where a stalled rank was, for logs and the worker detail: `layer 3 dispatch` for a phase
/// inside a layer (attention, ffn, dispatch, experts, combine), else the phase alone (`queued`,
/// `started`, `head`, `sample`).
pub(crate) fn place(m: &RankStalled) -> String {
    if m.layer >= 0 { format!("layer {} {}", m.layer, m.phase) } else { m.phase.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn place_names_the_layer_when_there_is_one() {
        let m = |layer: i32, phase: &str| RankStalled {
            rank: 1,
            worker_id: "w1".into(),
            layer,
            phase: phase.into(),
        };
        assert_eq!(place(&m(3, "dispatch")), "layer 3 dispatch");
        assert_eq!(place(&m(0, "attention")), "layer 0 attention");
        assert_eq!(place(&m(-1, "queued")), "queued");
        assert_eq!(place(&m(-1, "head")), "head");
    }
}
