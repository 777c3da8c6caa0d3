//! W3C trace context received from the coordinator: parses `traceparent` (gRPC metadata of
//! PrepareEpoch and of the step stream's opening; `StepRequest.trace_context` per step) and
//! makes it the parent of the worker's span, so one trace spans the cluster.
//!
//! Owns only the parsing (W3C Trace Context level 1, version `00`) and the parent link; the
//! subscriber and exporter are the binary's. A missing or malformed header leaves the span a
//! root (tracing must never fail a step).

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use std::collections::HashMap;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header carrying the parent span.
pub const TRACEPARENT: &str = "traceparent";

/// Parses a `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`); `None` when malformed or
/// all-zero.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex(trace) || !hex(span) || flags.len() != 2 || !hex(flags) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    let sc = SpanContext::new(trace_id, span_id, flags, true, TraceState::default());
    sc.is_valid().then_some(sc)
}

/// Makes the span named by `traceparent` the parent of `span` (no-op when absent, malformed,
/// or when `span` is not recorded).
pub fn set_remote_parent(span: &Span, traceparent: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    if let Some(sc) = traceparent.and_then(parse_traceparent) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

/// [`set_remote_parent`] from a step's `trace_context` carrier.
pub fn parent_from_carrier(span: &Span, carrier: &HashMap<String, String>) {
    set_remote_parent(span, carrier.get(TRACEPARENT).map(String::as_str));
}

/// [`set_remote_parent`] from a gRPC request's metadata.
pub fn parent_from_metadata(span: &Span, metadata: &tonic::metadata::MetadataMap) {
    set_remote_parent(span, metadata.get(TRACEPARENT).and_then(|v| v.to_str().ok()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_and_rejects_malformed() {
        let sc = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert!(parse_traceparent(bad).is_none(), "accepted {bad:?}");
        }
    }
}
