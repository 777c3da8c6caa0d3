//! Step progress on the worker's step stream (issue 10): while a step runs, the layer and phase
//! it is in ([`StepPhase`], written by the forward) go to the coordinator as `StepProgress`
//! events, so its watchdog names where a stalled step stopped (`layer 3 dispatch`), not only
//! that it started.
//!
//! Owns [`report_while`]: runs the step's future and samples the cell every [`EVERY`], sending
//! an event only when the (layer, phase) changed. A step shorter than [`EVERY`] sends nothing
//! extra. Does not own the stream itself (`service.rs`) or the watchdog (coordinator).
//!
//! Invariants: every event carries the step's epoch, step id and rank; no event of a step is
//! sent after [`report_while`] returned (the sampling runs inside the same future, not in a
//! detached task), so the step's result is always the last message of its step.

use crate::model::StepPhase;
use fathom_proto::v1::{StepEvent, StepProgress, step_event};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How often a running step's phase is sampled.
pub const EVERY: Duration = Duration::from_millis(100);

/// Runs `work` (the step) to completion; meanwhile every `every`, when `phase` shows a
/// (layer, phase) other than the last one sent, sends a `StepProgress` built on `base` (epoch,
/// step id, rank) to `tx`. The caller resets `phase` to `started` (and has sent `started`)
/// *before* it starts `work`: resetting here would race with a step that already entered a
/// phase and then blocked in a collective — the cell would read `started` for the rest of the
/// stall. Without a cell (an executor that does not track phases) it only awaits `work`. A
/// closed `tx` stops the reporting, not the step.
pub async fn report_while<T>(
    work: impl Future<Output = T>,
    phase: Option<Arc<StepPhase>>,
    tx: &mpsc::Sender<Result<StepEvent, tonic::Status>>,
    base: StepProgress,
    every: Duration,
) -> T {
    let Some(phase) = phase else { return work.await };
    let mut last = (-1, crate::model::Phase::Started); // what the caller sent before the step
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    tokio::pin!(work);
    let mut open = true;
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick(), if open => {
                let now = phase.get();
                if now == last {
                    continue;
                }
                last = now;
                let (layer, p) = now;
                let progress = StepProgress { layer, phase: p.name().into(), ..base.clone() };
                let event = StepEvent { kind: Some(step_event::Kind::Progress(progress)) };
                open = tx.send(Ok(event)).await.is_ok();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Phase;

    #[tokio::test]
    async fn a_slow_step_reports_its_layer_and_phase_once_per_change() {
        let (tx, mut rx) = mpsc::channel(16);
        let cell = Arc::new(StepPhase::default());
        cell.set(Some(9), Phase::Combine); // stale from the previous step: the caller resets
        cell.reset();
        let c = cell.clone();
        let work = async move {
            tokio::time::sleep(Duration::from_millis(60)).await;
            c.set(Some(3), Phase::Dispatch);
            tokio::time::sleep(Duration::from_millis(120)).await;
            c.set(None, Phase::Sample);
            tokio::time::sleep(Duration::from_millis(60)).await;
            7
        };
        let base = StepProgress { epoch: 2, step_id: 5, rank: 1, ..Default::default() };
        let every = Duration::from_millis(20);
        assert_eq!(report_while(work, Some(cell), &tx, base, every).await, 7);
        drop(tx);
        let mut got = Vec::new();
        while let Some(Ok(StepEvent { kind: Some(step_event::Kind::Progress(p)) })) =
            rx.recv().await
        {
            assert_eq!((p.epoch, p.step_id, p.rank), (2, 5, 1));
            got.push((p.layer, p.phase));
        }
        assert_eq!(got, vec![(3, "dispatch".to_string()), (-1, "sample".to_string())]);
    }

    /// The step runs on the blocking pool and may enter a phase (and block in its collective)
    /// before the reporter's first look: that phase must still be reported (it once was reset
    /// to `started` here and the stall read `started` to the end).
    #[tokio::test]
    async fn a_phase_entered_before_reporting_starts_is_reported() {
        let (tx, mut rx) = mpsc::channel(16);
        let cell = Arc::new(StepPhase::default());
        cell.reset(); // the caller, before starting the step
        cell.set(Some(1), Phase::Dispatch); // the step, before the reporter runs
        let work = tokio::time::sleep(Duration::from_millis(80));
        let every = Duration::from_millis(10);
        report_while(work, Some(cell), &tx, StepProgress::default(), every).await;
        drop(tx);
        let Some(Ok(StepEvent { kind: Some(step_event::Kind::Progress(p)) })) = rx.recv().await
        else {
            panic!("no progress sent");
        };
        assert_eq!((p.layer, p.phase.as_str()), (1, "dispatch"));
    }

    #[tokio::test]
    async fn without_a_cell_or_a_receiver_the_step_still_completes() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let base = StepProgress::default();
        assert_eq!(report_while(async { 1 }, None, &tx, base.clone(), EVERY).await, 1);
        let cell = Arc::new(StepPhase::default());
        let c = cell.clone();
        let work = async move {
            c.set(Some(0), Phase::Attention);
            tokio::time::sleep(Duration::from_millis(50)).await;
            2
        };
        let every = Duration::from_millis(5);
        assert_eq!(report_while(work, Some(cell), &tx, base, every).await, 2);
    }
}
