//! Weight-loading progress as `tracing` events: [`ProgressSource`] wraps the checkpoint source
//! an executor loads its shard from and reports how many values were delivered.
//!
//! Events have target [`PROGRESS_TARGET`] and the fields `task` (what), `done` and `total`
//! (values; `total` 0 when unknown) and `finished`, at most every [`EVERY`] and once (with
//! `finished = true`) at [`ProgressSource::finish`].
//! The binary renders them (a progress bar on a TTY, plain log lines otherwise); this module never
//! writes to the terminal itself.

use crate::weights::{TensorSource, WeightsError};
use fathom_kernels::Tensor;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The `tracing` target of progress events.
pub const PROGRESS_TARGET: &str = "fathom_progress";

/// Minimum time between two progress events of one task.
pub const EVERY: Duration = Duration::from_millis(250);

/// Emits one progress event.
pub fn report(task: &str, done: u64, total: u64, finished: bool) {
    tracing::info!(target: PROGRESS_TARGET, task, done, total, finished);
}

/// A source that counts delivered f32 values and reports them as progress of `task`.
pub struct ProgressSource<'a> {
    inner: &'a dyn TensorSource,
    task: &'static str,
    total: u64,
    done: AtomicU64,
    last: Mutex<Instant>,
}

impl std::fmt::Debug for ProgressSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressSource")
            .field("task", &self.task)
            .field("done", &self.done.load(Ordering::Relaxed))
            .field("total", &self.total)
            .finish()
    }
}

impl<'a> ProgressSource<'a> {
    /// `total`: the values expected (0: unknown).
    pub fn new(inner: &'a dyn TensorSource, task: &'static str, total: u64) -> Self {
        report(task, 0, total, false);
        Self { inner, task, total, done: AtomicU64::new(0), last: Mutex::new(Instant::now()) }
    }

    fn count(&self, t: &Tensor) {
        let done = self.done.fetch_add(t.len() as u64, Ordering::Relaxed) + t.len() as u64;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= EVERY {
            *last = Instant::now();
            report(self.task, done, self.total, false);
        }
    }

    /// Reports the end (done = total when a total was given).
    pub fn finish(&self) {
        let done = self.done.load(Ordering::Relaxed);
        report(self.task, if self.total > 0 { self.total } else { done }, self.total, true);
    }
}

impl TensorSource for ProgressSource<'_> {
    fn load(&self, name: &str) -> Result<Tensor, WeightsError> {
        let t = self.inner.load(name)?;
        self.count(&t);
        Ok(t)
    }

    fn load_slice(
        &self,
        name: &str,
        dim: usize,
        start: usize,
        end: usize,
    ) -> Result<Tensor, WeightsError> {
        let t = self.inner.load_slice(name, dim, start, end)?;
        self.count(&t);
        Ok(t)
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
}
