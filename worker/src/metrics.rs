//! A worker's Prometheus metrics and the per-step report executors hand to them.
//!
//! Owns: [`WorkerMetrics`] (registered into a registry the binary owns and passes in; no global
//! registry): `fathom_step_seconds{phase}`, `fathom_expert_tokens_total{layer,expert}`,
//! `fathom_expert_balancedness{layer}`, `fathom_worker_up`, `fathom_epoch`; and [`StepReport`] /
//! [`ExpertTally`], what an executor measured in one step.
//!
//! Expert counts come from one hook: an executor turns the counters its MoE layers kept for the
//! tokens its rank routed in a step (`model::StepLoad`, counted in the layer from its assignment
//! list — no routing capture) into an [`ExpertTally`] (a dense `[moe_layer][expert]` array),
//! returns it in its [`StepReport`], and [`WorkerMetrics::observe_step`] adds each non-zero cell
//! to its counter once per step. A token is counted by exactly one rank (the rank that routed
//! it: in a group of T ranks each routes its own slice of the tokens), so summing the counter
//! over every worker gives `tokens × top_k × moe_layers`.
//!
//! Balancedness of a layer is mean / max of its experts' cumulative token counts on this worker
//! (1 = perfectly even; 1/E = every token on one expert).
//!
//! Does not own: serving `/metrics` (the binary), the coordinator's request metrics.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use std::sync::Mutex;
use std::time::Duration;

/// Tokens routed per (MoE layer, logical expert) in one step on this rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertTally {
    /// Model layer index of each MoE layer (the `layer` label).
    pub layers: Vec<usize>,
    pub experts: usize,
    /// `[moe_layers * experts]`, row-major by MoE layer.
    pub counts: Vec<u64>,
}

impl ExpertTally {
    /// An empty tally over MoE layers `layers` (model layer indices) of `experts` experts.
    pub fn new(layers: Vec<usize>, experts: usize) -> Self {
        Self { counts: vec![0; layers.len() * experts], layers, experts }
    }

    pub fn moe_layers(&self) -> usize {
        self.layers.len()
    }

    /// An empty tally over `cfg`'s MoE layers and routed experts (`None`: the model has none).
    pub fn for_model(cfg: &fathom_common::ModelConfig) -> Option<Self> {
        let layers: Vec<usize> =
            (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)).collect();
        (!layers.is_empty() && cfg.n_routed_experts > 0)
            .then(|| Self::new(layers, cfg.n_routed_experts))
    }

    /// Adds a rank's step counters: `routed` is `[moe_layers][experts]` flattened (as
    /// `parallel::StepLoad::routed`).
    pub fn add_counts(&mut self, routed: &[u32]) {
        for (c, &r) in self.counts.iter_mut().zip(routed) {
            *c += u64::from(r);
        }
    }

    /// Adds a forward's recorded routing: per token row, per MoE layer, the expert ids (what
    /// tests compare the in-layer counters with). Ids or layers outside the tally are ignored
    /// (they cannot come from a model of this shape).
    pub fn add_routing(&mut self, per_token: &[Vec<Vec<u32>>]) {
        let (layers, e) = (self.moe_layers(), self.experts);
        for row in per_token {
            for (m, ids) in row.iter().enumerate().take(layers) {
                let base = m * e;
                for &id in ids {
                    if (id as usize) < e {
                        self.counts[base + id as usize] += 1;
                    }
                }
            }
        }
    }

    /// Sum over every cell.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// What an executor measured in one step (all optional: an executor may report nothing).
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// The model forward (attention, MoE dispatch/experts/combine and collectives together).
    pub forward: Option<Duration>,
    /// Sampling and result encoding.
    pub sample: Option<Duration>,
    /// Tokens this rank routed, by (layer, expert).
    pub experts: Option<ExpertTally>,
}

/// Every metric a worker exports. Share with `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct WorkerMetrics {
    step_seconds: HistogramVec,
    expert_tokens: IntCounterVec,
    balancedness: GaugeVec,
    worker_up: IntGauge,
    epoch: IntGauge,
    /// Cumulative counts and cached counters, `[moe_layer * experts + expert]`.
    experts: Mutex<ExpertState>,
}

#[derive(Debug, Default)]
struct ExpertState {
    layers: Vec<usize>,
    experts: usize,
    totals: Vec<u64>,
    counters: Vec<Option<IntCounter>>,
}

const STEP_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

impl WorkerMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self::unregistered()?;
        registry.register(Box::new(m.step_seconds.clone()))?;
        registry.register(Box::new(m.expert_tokens.clone()))?;
        registry.register(Box::new(m.balancedness.clone()))?;
        registry.register(Box::new(m.worker_up.clone()))?;
        registry.register(Box::new(m.epoch.clone()))?;
        Ok(m)
    }

    /// Metrics registered nowhere (a service built without a registry).
    pub fn detached() -> Self {
        Self::unregistered().expect("static metric definitions are valid")
    }

    fn unregistered() -> Result<Self, prometheus::Error> {
        Ok(Self {
            step_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "fathom_step_seconds",
                    "Worker time per step by phase: step (receive to result), forward, sample.",
                )
                .buckets(STEP_BUCKETS.to_vec()),
                &["phase"],
            )?,
            expert_tokens: IntCounterVec::new(
                Opts::new(
                    "fathom_expert_tokens_total",
                    "Tokens this worker routed to each logical expert of each MoE layer.",
                ),
                &["layer", "expert"],
            )?,
            balancedness: GaugeVec::new(
                Opts::new(
                    "fathom_expert_balancedness",
                    "Mean / max of the experts' cumulative token counts per MoE layer.",
                ),
                &["layer"],
            )?,
            worker_up: IntGauge::new(
                "fathom_worker_up",
                "1 while this worker holds a prepared epoch, else 0.",
            )?,
            epoch: IntGauge::new("fathom_epoch", "The epoch this worker is prepared for.")?,
            experts: Mutex::new(ExpertState::default()),
        })
    }

    /// An epoch was prepared (`up`) or failed / is being replaced (`!up`).
    pub fn set_epoch(&self, epoch: u64, up: bool) {
        self.epoch.set(epoch as i64);
        self.worker_up.set(up as i64);
    }

    /// The worker is stopping.
    pub fn set_down(&self) {
        self.worker_up.set(0);
    }

    /// Records one executed step: its wall time and what the executor reported.
    pub fn observe_step(&self, total: Duration, report: &StepReport) {
        let phases = &self.step_seconds;
        phases.with_label_values(&["step"]).observe(total.as_secs_f64());
        if let Some(d) = report.forward {
            phases.with_label_values(&["forward"]).observe(d.as_secs_f64());
        }
        if let Some(d) = report.sample {
            phases.with_label_values(&["sample"]).observe(d.as_secs_f64());
        }
        if let Some(t) = &report.experts {
            self.add_experts(t);
        }
    }

    fn add_experts(&self, t: &ExpertTally) {
        if t.total() == 0 {
            return;
        }
        let mut st = self.experts.lock().unwrap_or_else(|p| p.into_inner());
        if st.experts != t.experts || st.layers != t.layers || st.totals.len() != t.counts.len() {
            // First step, or a new epoch with another model: start the balance over (the
            // counters themselves keep counting).
            *st = ExpertState {
                layers: t.layers.clone(),
                experts: t.experts,
                totals: vec![0; t.counts.len()],
                counters: vec![None; t.counts.len()],
            };
        }
        let e = t.experts;
        for m in 0..t.moe_layers() {
            let row = m * e..(m + 1) * e;
            if t.counts[row.clone()].iter().all(|&c| c == 0) {
                continue;
            }
            let layer = t.layers[m].to_string();
            for i in row.clone() {
                let c = t.counts[i];
                if c == 0 {
                    continue;
                }
                st.totals[i] += c;
                let counter = st.counters[i].get_or_insert_with(|| {
                    let expert = (i - m * e).to_string();
                    self.expert_tokens.with_label_values(&[layer.as_str(), expert.as_str()])
                });
                counter.inc_by(c);
            }
            let totals = &st.totals[row];
            let max = totals.iter().copied().max().unwrap_or(0);
            if max > 0 {
                let mean = totals.iter().sum::<u64>() as f64 / e as f64;
                self.balancedness.with_label_values(&[layer.as_str()]).set(mean / max as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn tally_counts_every_routing_decision() {
        let mut t = ExpertTally::new(vec![1, 2], 4);
        // Two tokens, two MoE layers, top-2.
        t.add_routing(&[vec![vec![0, 3], vec![1, 2]], vec![vec![0, 1], vec![2, 2]]]);
        assert_eq!(t.counts, vec![2, 1, 0, 1, 0, 1, 3, 0]);
        assert_eq!(t.total(), 8);
    }

    #[test]
    fn observe_step_adds_counts_and_balancedness() {
        let r = Registry::new();
        let m = WorkerMetrics::register(&r).unwrap();
        let mut t = ExpertTally::new(vec![3], 4);
        t.counts = vec![4, 2, 2, 0];
        let report = StepReport { experts: Some(t.clone()), ..Default::default() };
        m.observe_step(Duration::from_millis(3), &report);
        m.observe_step(Duration::from_millis(3), &report);
        m.set_epoch(2, true);
        let mut out = Vec::new();
        prometheus::TextEncoder::new().encode(&r.gather(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for line in [
            "fathom_expert_tokens_total{expert=\"0\",layer=\"3\"} 8",
            "fathom_expert_tokens_total{expert=\"2\",layer=\"3\"} 4",
            "fathom_expert_balancedness{layer=\"3\"} 0.5",
            "fathom_step_seconds_count{phase=\"step\"} 2",
            "fathom_worker_up 1",
            "fathom_epoch 2",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(!text.contains("expert=\"3\""), "an expert with no tokens has no series");
    }
}
