//! Request tracing on the coordinator and W3C trace-context propagation to the workers.
//!
//! Owns: [`RequestTrace`], the per-request span tree (`request` → `queue` → `prefill` →
//! `decode`, with one `step` span per engine step under the phase span of the step's leading
//! request) and the request's metrics (TTFT, time per output token, tokens, outcome); and the
//! W3C `traceparent` encoding of a span ([`trace_context`], [`inject_metadata`]) carried to the
//! workers in gRPC metadata (unary calls and the step stream's opening) and per step in
//! `StepRequest.trace_context` (a stream has no per-message metadata).
//!
//! Does not own: subscriber and exporter set-up (the binary; without an OpenTelemetry layer the
//! spans are plain `tracing` spans and the carried context is empty).
//!
//! Invariants: no span or event here carries prompt text or token ids — only the request id,
//! counts and timings; every [`RequestTrace`] counts its request exactly once in
//! `fathom_requests_total` (explicitly through [`RequestTrace::finish`], else as `cancelled` when
//! dropped unfinished, which is how a client that went away leaves the engine).

use crate::metrics::{CoordinatorMetrics, status};
use opentelemetry::trace::TraceContextExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header (and `StepRequest.trace_context` key) carrying the parent span.
pub const TRACEPARENT: &str = "traceparent";

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queued,
    Prefill,
    Decode,
    Done,
}

/// One request's spans and metric bookkeeping, owned by the engine with the sequence.
#[derive(Debug)]
pub struct RequestTrace {
    metrics: Arc<CoordinatorMetrics>,
    span: Span,
    /// The current phase's span (`queue`, `prefill`, `decode`), child of `span`.
    phase_span: Span,
    phase: Phase,
    accepted: Instant,
    last_token: Option<Instant>,
    prompt_tokens: usize,
    generated: usize,
}

impl RequestTrace {
    /// Opens the `request` span (request id, prompt length and token budget — never the
    /// prompt) and its `queue` span.
    pub fn new(
        metrics: Arc<CoordinatorMetrics>,
        request_id: &str,
        prompt_tokens: usize,
        max_tokens: usize,
    ) -> Self {
        let span = tracing::info_span!(
            parent: None,
            "request",
            request_id,
            prompt_tokens,
            max_tokens,
            generated = tracing::field::Empty,
            status = tracing::field::Empty,
        );
        let phase_span = tracing::info_span!(parent: &span, "queue");
        Self {
            metrics,
            span,
            phase_span,
            phase: Phase::Queued,
            accepted: Instant::now(),
            last_token: None,
            prompt_tokens,
            generated: 0,
        }
    }

    /// The span a step that serves this request hangs under (the current phase's).
    pub fn step_parent(&self) -> &Span {
        &self.phase_span
    }

    /// The request's root span.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The request entered a batch (idempotent): `queue` ends, `prefill` starts.
    pub fn scheduled(&mut self) {
        if self.phase == Phase::Queued {
            self.phase_span = tracing::info_span!(parent: &self.span, "prefill");
            self.phase = Phase::Prefill;
        }
    }

    /// One generated token was streamed to the client: the first ends `prefill` (TTFT, prompt
    /// tokens counted) and starts `decode`; later ones record the time per output token.
    pub fn token(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => {
                self.metrics.ttft.observe((now - self.accepted).as_secs_f64());
                self.metrics
                    .tokens_total
                    .with_label_values(&["prompt"])
                    .inc_by(self.prompt_tokens as u64);
                self.phase_span = tracing::info_span!(parent: &self.span, "decode");
                self.phase = Phase::Decode;
            }
            Some(prev) => self.metrics.tpot.observe((now - prev).as_secs_f64()),
        }
        self.last_token = Some(now);
        self.generated += 1;
        self.metrics.tokens_total.with_label_values(&["generated"]).inc();
        tracing::trace!(parent: &self.phase_span, n = self.generated, "token streamed");
    }

    /// Ends the request with `status` (a [`status`] constant); later calls are ignored.
    pub fn finish(&mut self, outcome: &str) {
        if self.phase == Phase::Done {
            return;
        }
        self.phase = Phase::Done;
        self.metrics.request_ended(outcome);
        self.span.record("generated", self.generated);
        self.span.record("status", outcome);
        self.phase_span = Span::none();
        tracing::debug!(parent: &self.span, status = outcome, generated = self.generated, "request ended");
    }
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        self.finish(status::CANCELLED);
    }
}

/// Opens the `step` span of one engine step under `parent` (the leading request's phase span),
/// linked to the other requests of the step (`others`).
pub fn step_span<'a>(
    parent: Option<&Span>,
    others: impl Iterator<Item = &'a Span>,
    epoch: u64,
    step_id: u64,
    seqs: usize,
) -> Span {
    let span = match parent {
        Some(p) => tracing::debug_span!(parent: p, "step", epoch, step_id, seqs),
        None => tracing::debug_span!(parent: None, "step", epoch, step_id, seqs),
    };
    if !span.is_disabled() {
        for o in others {
            let cx = o.context();
            let sc = cx.span().span_context().clone();
            if sc.is_valid() {
                span.add_link(sc);
            }
        }
    }
    span
}

/// The W3C `traceparent` of `span` (`00-<trace id>-<span id>-<flags>`), or `None` when the span
/// is not recorded by an OpenTelemetry layer.
pub fn traceparent(span: &Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let otel = cx.span();
    let sc = otel.span_context();
    sc.is_valid()
        .then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// The carrier of `span`'s context for `StepRequest.trace_context` (empty when untraced).
pub fn trace_context(span: &Span) -> HashMap<String, String> {
    traceparent(span).map(|v| HashMap::from([(TRACEPARENT.to_string(), v)])).unwrap_or_default()
}

/// Puts `span`'s `traceparent` into a gRPC request's metadata (nothing when untraced).
pub fn inject_metadata<T>(span: &Span, request: &mut tonic::Request<T>) {
    if let Some(v) = traceparent(span).and_then(|v| v.parse().ok()) {
        request.metadata_mut().insert(TRACEPARENT, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Registry;

    #[test]
    fn request_counts_once_and_tokens_exactly() {
        let m = Arc::new(CoordinatorMetrics::register(&Registry::new()).unwrap());
        {
            let mut t = RequestTrace::new(m.clone(), "r1", 5, 3);
            t.scheduled();
            t.token();
            t.token();
            t.token();
            t.finish(status::OK);
            t.finish(status::UNAVAILABLE);
        }
        drop(RequestTrace::new(m.clone(), "r2", 4, 3)); // client went away while queued
        assert_eq!(m.requests_total.with_label_values(&[status::OK]).get(), 1);
        assert_eq!(m.requests_total.with_label_values(&[status::CANCELLED]).get(), 1);
        assert_eq!(m.requests_total.with_label_values(&[status::UNAVAILABLE]).get(), 0);
        assert_eq!(m.tokens_total.with_label_values(&["prompt"]).get(), 5, "r2 never prefilled");
        assert_eq!(m.tokens_total.with_label_values(&["generated"]).get(), 3);
        assert_eq!(m.ttft.get_sample_count(), 1);
        assert_eq!(m.tpot.get_sample_count(), 2);
    }

    #[test]
    fn untraced_spans_carry_no_context() {
        let span = tracing::info_span!("x");
        assert_eq!(traceparent(&span), None);
        assert!(trace_context(&span).is_empty());
        let mut req = tonic::Request::new(());
        inject_metadata(&span, &mut req);
        assert!(req.metadata().get(TRACEPARENT).is_none());
    }
}
