//! Progress of long operations (checkpoint synthesis, weight loading): an indicatif bar when
//! stderr is a terminal, plain periodic lines (`fathom: TASK: 42% (…)`) otherwise.
//!
//! Owns [`Progress`] (one task's display) and [`ProgressLayer`], the `tracing` layer that turns
//! the libraries' progress events (target `fathom_progress`, fields `task`, `done`, `total`; see
//! `fathom_worker::executor::progress`) into a [`Progress`] per task. Libraries never draw.

use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// Plain lines at most this often.
const LINE_EVERY: Duration = Duration::from_secs(2);

/// One task's progress display.
#[derive(Debug)]
pub struct Progress {
    task: String,
    unit: &'static str,
    total: u64,
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
    done: u64,
}

fn human(n: u64, unit: &str) -> String {
    if unit == "bytes" {
        let f = n as f64;
        return match n {
            0..1024 => format!("{n} B"),
            1024..1048576 => format!("{:.1} KiB", f / 1024.0),
            1048576..1073741824 => format!("{:.1} MiB", f / 1048576.0),
            _ => format!("{:.2} GiB", f / 1073741824.0),
        };
    }
    format!("{n} {unit}")
}

impl Progress {
    /// `total` 0: unknown. Draws a bar when stderr is a terminal.
    pub fn new(task: &str, total: u64, unit: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = if total > 0 { ProgressBar::new(total) } else { ProgressBar::new_spinner() };
            let template = if total > 0 {
                "{msg} [{bar:40}] {percent:>3}% {elapsed_precise} (eta {eta})"
            } else {
                "{msg} {spinner} {pos} {elapsed_precise}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(format!("fathom: {task}"));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self { task: task.to_string(), unit, total, bar, last_line: None, done: 0 }
    }

    /// `done` units so far (clamped to the total).
    pub fn set(&mut self, done: u64) {
        self.done = if self.total > 0 { done.min(self.total) } else { done };
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
            return;
        }
        if self.last_line.is_none_or(|t| t.elapsed() >= LINE_EVERY) {
            self.last_line = Some(Instant::now());
            self.line();
        }
    }

    fn line(&self) {
        match (self.done * 100).checked_div(self.total) {
            Some(pct) => eprintln!(
                "fathom: {}: {pct}% ({} of {})",
                self.task,
                human(self.done, self.unit),
                human(self.total, self.unit)
            ),
            None => eprintln!("fathom: {}: {}", self.task, human(self.done, self.unit)),
        }
    }

    /// The task ended.
    pub fn finish(&mut self) {
        if self.total > 0 {
            self.done = self.total;
        }
        match &self.bar {
            Some(bar) => {
                bar.set_position(self.done);
                bar.finish();
            }
            None => self.line(),
        }
    }
}

/// Renders `fathom_progress` events (see the module doc).
#[derive(Debug, Default)]
pub struct ProgressLayer {
    tasks: Mutex<HashMap<String, Progress>>,
}

#[derive(Default)]
struct Fields {
    task: String,
    done: u64,
    total: u64,
    finished: bool,
}

impl Visit for Fields {
    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "finished" {
            self.finished = value;
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "done" => self.done = value,
            "total" => self.total = value,
            _ => {}
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record_u64(field, value.max(0) as u64);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "task" {
            self.task = value.to_string();
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "task" {
            self.task = format!("{value:?}").trim_matches('"').to_string();
        }
    }
}

/// The target the libraries emit progress events on.
pub const TARGET: &str = "fathom_progress";

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ProgressLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let p = tasks
            .entry(f.task.clone())
            .or_insert_with(|| Progress::new(&f.task, f.total, "values"));
        p.set(f.done);
        if f.finished {
            p.finish();
            tasks.remove(&f.task);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human(512, "bytes"), "512 B");
        assert_eq!(human(3 << 20, "bytes"), "3.0 MiB");
        assert_eq!(human(7, "values"), "7 values");
    }
}
