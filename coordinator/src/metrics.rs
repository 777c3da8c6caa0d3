//! The coordinator's Prometheus metrics: one [`CoordinatorMetrics`] registered into a registry
//! the binary owns and passes in (no global registry), updated by the engine loop.
//!
//! Owns the metric names and label sets (docs/observability.md lists them):
//! `fathom_requests_total{status}`, `fathom_time_to_first_token_seconds`,
//! `fathom_time_per_output_token_seconds`, `fathom_queue_depth`, `fathom_running_sequences`,
//! `fathom_kv_blocks{state}`, `fathom_step_seconds{phase}`, `fathom_tokens_total{kind}`,
//! `fathom_worker_up{worker}`, `fathom_epoch`. Does not own: serving `/metrics` over HTTP (the
//! binary), the workers' metrics (`fathom-worker::metrics`).
//!
//! Invariants: every request the engine accepted is counted exactly once in
//! `fathom_requests_total` (see `telemetry::RequestTrace`); `fathom_tokens_total{kind="prompt"}`
//! counts a request's prompt tokens once, when its prefill produced the first token;
//! `{kind="generated"}` counts every token streamed to a client.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Request outcomes used as the `status` label.
pub mod status {
    /// Finished by a stop token or its length limit.
    pub const OK: &str = "ok";
    /// The client went away before the end.
    pub const CANCELLED: &str = "cancelled";
    /// The request's deadline passed.
    pub const DEADLINE_EXCEEDED: &str = "deadline_exceeded";
    /// Its epoch failed or the cluster stopped serving (also: refused while not serving).
    pub const UNAVAILABLE: &str = "unavailable";
    /// Refused before it reached the engine: a bad field, an unknown model, an oversize body.
    pub const INVALID_ARGUMENT: &str = "invalid_argument";
    /// Refused because the admission queue was full.
    pub const RESOURCE_EXHAUSTED: &str = "resource_exhausted";
    /// Ended by an internal error.
    pub const INTERNAL: &str = "internal";

    /// The label of a request refused or ended with `e`.
    pub fn of(e: &crate::engine::EngineError) -> &'static str {
        use crate::engine::EngineError as E;
        match e {
            E::InvalidArgument { .. } => INVALID_ARGUMENT,
            E::QueueFull { .. } => RESOURCE_EXHAUSTED,
            E::Unavailable(_) => UNAVAILABLE,
            E::DeadlineExceeded { .. } => DEADLINE_EXCEEDED,
            E::Internal(_) => INTERNAL,
        }
    }
}

/// Latency buckets (seconds) shared by the latency histograms: 1 ms .. 60 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Every metric the coordinator exports. Cheap to share (`Arc`); all methods take `&self`.
#[derive(Debug, Clone)]
pub struct CoordinatorMetrics {
    pub requests_total: IntCounterVec,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub queue_depth: IntGauge,
    pub running_sequences: IntGauge,
    pub kv_blocks: IntGaugeVec,
    pub step_seconds: HistogramVec,
    pub tokens_total: IntCounterVec,
    pub worker_up: IntGaugeVec,
    pub epoch: IntGauge,
    pub watchdog_stalls: IntCounterVec,
}

impl CoordinatorMetrics {
    /// Creates the metrics and registers them in `registry`. Fails when a metric of the same
    /// name is already registered there.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::unregistered()?;
        registry.register(Box::new(m.requests_total.clone()))?;
        registry.register(Box::new(m.ttft.clone()))?;
        registry.register(Box::new(m.tpot.clone()))?;
        registry.register(Box::new(m.queue_depth.clone()))?;
        registry.register(Box::new(m.running_sequences.clone()))?;
        registry.register(Box::new(m.kv_blocks.clone()))?;
        registry.register(Box::new(m.step_seconds.clone()))?;
        registry.register(Box::new(m.tokens_total.clone()))?;
        registry.register(Box::new(m.worker_up.clone()))?;
        registry.register(Box::new(m.epoch.clone()))?;
        registry.register(Box::new(m.watchdog_stalls.clone()))?;
        Ok(m)
    }

    /// Metrics registered nowhere (an engine started without a registry still updates them;
    /// nobody reads them).
    pub fn detached() -> Self {
        Self::unregistered().expect("static metric definitions are valid")
    }

    fn unregistered() -> Result<Self, prometheus::Error> {
        let hist = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
        };
        Ok(Self {
            requests_total: IntCounterVec::new(
                Opts::new("fathom_requests_total", "Requests ended, by outcome."),
                &["status"],
            )?,
            ttft: hist(
                "fathom_time_to_first_token_seconds",
                "From the engine accepting a request to its first generated token.",
            )?,
            tpot: hist(
                "fathom_time_per_output_token_seconds",
                "Time between consecutive generated tokens of one request.",
            )?,
            queue_depth: IntGauge::new(
                "fathom_queue_depth",
                "Requests accepted and not yet admitted to a batch.",
            )?,
            running_sequences: IntGauge::new(
                "fathom_running_sequences",
                "Sequences admitted and generating (all attention groups).",
            )?,
            kv_blocks: IntGaugeVec::new(
                Opts::new("fathom_kv_blocks", "KV cache blocks (all attention groups) by state."),
                &["state"],
            )?,
            step_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "fathom_step_seconds",
                    "Coordinator time per step by phase: schedule (build the step), execute \
                     (wait for every rank), stream (apply and stream results).",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["phase"],
            )?,
            tokens_total: IntCounterVec::new(
                Opts::new(
                    "fathom_tokens_total",
                    "Tokens served: prompt (prefilled) and generated (streamed).",
                ),
                &["kind"],
            )?,
            worker_up: IntGaugeVec::new(
                Opts::new(
                    "fathom_worker_up",
                    "1 while the worker is a rank of the serving epoch, 0 after it failed.",
                ),
                &["worker"],
            )?,
            epoch: IntGauge::new("fathom_epoch", "The epoch being served (0: none yet).")?,
            watchdog_stalls: IntCounterVec::new(
                Opts::new(
                    "fathom_watchdog_stalls_total",
                    "Ranks the step watchdog reported as not having answered a step by its \
                     deadline, by worker and the phase the rank last reported (queued, started, \
                     attention, dispatch, experts, combine, head, ...).",
                ),
                &["worker", "phase"],
            )?,
        })
    }

    /// Counts one ended request.
    pub fn request_ended(&self, status: &str) {
        self.requests_total.with_label_values(&[status]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn registers_every_name_once_and_renders() {
        let r = Registry::new();
        let m = CoordinatorMetrics::register(&r).unwrap();
        m.request_ended(status::OK);
        m.tokens_total.with_label_values(&["prompt"]).inc_by(7);
        m.kv_blocks.with_label_values(&["free"]).set(3);
        m.step_seconds.with_label_values(&["execute"]).observe(0.01);
        m.worker_up.with_label_values(&["w0"]).set(1);
        m.watchdog_stalls.with_label_values(&["w1", "dispatch"]).inc();
        let mut out = Vec::new();
        prometheus::TextEncoder::new().encode(&r.gather(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for line in [
            "fathom_requests_total{status=\"ok\"} 1",
            "fathom_tokens_total{kind=\"prompt\"} 7",
            "fathom_kv_blocks{state=\"free\"} 3",
            "fathom_step_seconds_count{phase=\"execute\"} 1",
            "fathom_worker_up{worker=\"w0\"} 1",
            "fathom_watchdog_stalls_total{phase=\"dispatch\",worker=\"w1\"} 1",
            "fathom_epoch 0",
            "fathom_queue_depth 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(CoordinatorMetrics::register(&r).is_err(), "second registration must fail");
    }
}
