//! Process-wide telemetry of the `fathom` binary: the `tracing` subscriber (text or JSON logs on
//! stderr), the optional OpenTelemetry trace pipeline (OTLP over gRPC), and the Prometheus
//! `/metrics` HTTP endpoint.
//!
//! Owns: the global flags `--log-format` and `--otlp-endpoint`, the subscriber, the tracer
//! provider and its exporter runtime ([`Telemetry`] flushes and stops them on drop), and the
//! minimal HTTP/1.1 server of `/metrics` ([`serve_metrics`]). The environment is read by `main`
//! only and handed in as [`TelemetryEnv`].
//!
//! Filters: logs follow `FATHOM_LOG` (else `RUST_LOG`, default `warn`); exported spans follow
//! `FATHOM_TRACE` (default [`DEFAULT_TRACE_FILTER`]: request and step spans of the coordinator
//! and the workers, not the libraries'), independently of the log level.
//!
//! Invariants: nothing here records request content; spans and events are only as the
//! libraries emit them (request ids, counts, timings).

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use prometheus::Encoder as _;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Spans exported over OTLP unless `FATHOM_TRACE` says otherwise.
pub const DEFAULT_TRACE_FILTER: &str =
    "warn,fathom=info,fathom_coordinator=debug,fathom_worker=debug";

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (with the span path of each event).
    Json,
}

/// Flags every subcommand accepts.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export traces over OTLP/gRPC to this endpoint (e.g. http://127.0.0.1:4317); default:
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT; none: no export.
    #[arg(long, global = true)]
    pub otlp_endpoint: Option<String>,
}

impl TelemetryArgs {
    /// The flags to give a child `fathom` process so it logs and exports the same way.
    pub fn child_args(&self) -> Vec<String> {
        let mut out = vec![
            "--log-format".to_string(),
            match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
            .to_string(),
        ];
        if let Some(e) = &self.otlp_endpoint {
            out.extend(["--otlp-endpoint".to_string(), e.clone()]);
        }
        out
    }
}

/// What `main` read from the environment for telemetry.
#[derive(Debug, Clone, Default)]
pub struct TelemetryEnv {
    /// `FATHOM_LOG`, else `RUST_LOG`.
    pub log_filter: Option<String>,
    /// `FATHOM_TRACE`.
    pub trace_filter: Option<String>,
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: Option<String>,
    /// `OTEL_SERVICE_NAME`.
    pub service_name: Option<String>,
    /// `OTEL_SDK_DISABLED=true`.
    pub sdk_disabled: bool,
    /// `OTEL_BSP_SCHEDULE_DELAY` (ms).
    pub schedule_delay_ms: Option<u64>,
}

impl TelemetryEnv {
    /// Reads the variables through `var` (main passes `std::env::var`).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        Self {
            log_filter: var("FATHOM_LOG").or_else(|| var("RUST_LOG")),
            trace_filter: var("FATHOM_TRACE"),
            otlp_endpoint: var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT")),
            service_name: var("OTEL_SERVICE_NAME"),
            sdk_disabled: var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")),
            schedule_delay_ms: var("OTEL_BSP_SCHEDULE_DELAY").and_then(|v| v.parse().ok()),
        }
    }
}

/// The installed telemetry; dropping it flushes pending spans and stops the exporter.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            // Flushes the batch (the exporter's channel runs on `runtime`, still alive here).
            let _ = p.shutdown();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Installs the global subscriber: logs on stderr, plus an OTLP trace exporter when an endpoint
/// is configured. `service` names this process in traces (e.g. `fathom-worker`).
pub fn init(args: &TelemetryArgs, env: &TelemetryEnv, service: &str) -> Result<Telemetry> {
    // Progress events are drawn by the progress layer, not logged.
    let log_filter = EnvFilter::try_new(env.log_filter.as_deref().unwrap_or("warn"))
        .context("FATHOM_LOG / RUST_LOG is not a valid filter")?
        .add_directive(format!("{}=off", crate::progress::TARGET).parse()?);
    let fmt = match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(log_filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .with_filter(log_filter)
            .boxed(),
    };
    let endpoint = args.otlp_endpoint.clone().or_else(|| env.otlp_endpoint.clone());
    let (otel, telemetry) = match endpoint.filter(|_| !env.sdk_disabled) {
        None => (None, Telemetry { provider: None, runtime: None }),
        Some(endpoint) => {
            let trace_filter =
                EnvFilter::try_new(env.trace_filter.as_deref().unwrap_or(DEFAULT_TRACE_FILTER))
                    .context("FATHOM_TRACE is not a valid filter")?;
            let name = env.service_name.clone().unwrap_or_else(|| service.to_string());
            let (provider, runtime) = otlp_provider(&endpoint, &name, env.schedule_delay_ms)?;
            let tracer = provider.tracer("fathom");
            let layer =
                tracing_opentelemetry::layer().with_tracer(tracer).with_filter(trace_filter);
            (Some(layer), Telemetry { provider: Some(provider), runtime: Some(runtime) })
        }
    };
    let progress = crate::progress::ProgressLayer::default().with_filter(
        tracing_subscriber::filter::filter_fn(|m| m.target() == crate::progress::TARGET),
    );
    tracing_subscriber::registry()
        .with(fmt)
        .with(progress)
        .with(otel)
        .try_init()
        .context("installing the tracing subscriber")?;
    Ok(telemetry)
}

/// A tracer provider exporting batches over OTLP/gRPC to `endpoint`. The exporter's channel
/// lives on a small runtime of its own (the batch processor exports from its own thread).
fn otlp_provider(
    endpoint: &str,
    service: &str,
    schedule_delay_ms: Option<u64>,
) -> Result<(SdkTracerProvider, tokio::runtime::Runtime)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fathom-otlp")
        .enable_all()
        .build()
        .context("starting the OTLP exporter runtime")?;
    let exporter = {
        let _rt = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .with_context(|| format!("OTLP exporter for {endpoint}"))?
    };
    let mut batch = BatchConfigBuilder::default();
    if let Some(ms) = schedule_delay_ms {
        batch = batch.with_scheduled_delay(Duration::from_millis(ms));
    }
    let processor = BatchSpanProcessor::builder(exporter).with_batch_config(batch.build()).build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(Resource::builder_empty().with_service_name(service.to_string()).build())
        .build();
    Ok((provider, runtime))
}

/// Serves the Prometheus text exposition of `registry` at `GET /metrics` on `listener` (any other
/// path: 404) until the task is dropped. One request per connection.
pub async fn serve_metrics(listener: tokio::net::TcpListener, registry: prometheus::Registry) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { continue };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            // The request head only (bounded); a client that sends nothing is dropped.
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let head = String::from_utf8_lossy(&buf);
            let mut first = head.lines().next().unwrap_or("").split_whitespace();
            let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
            let (status, ctype, body) = if method == "GET" && path == "/metrics" {
                let mut out = Vec::new();
                match prometheus::TextEncoder::new().encode(&registry.gather(), &mut out) {
                    Ok(()) => ("200 OK", prometheus::TEXT_FORMAT, out),
                    Err(e) => ("500 Internal Server Error", "text/plain", e.to_string().into()),
                }
            } else {
                ("404 Not Found", "text/plain", b"not found: try /metrics\n".to_vec())
            };
            let header = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(header.as_bytes()).await;
            let _ = conn.write_all(&body).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// Binds `addr` and serves `registry` there in a task of the current runtime; returns the bound
/// address.
pub async fn start_metrics(
    addr: &str,
    registry: prometheus::Registry,
) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve_metrics(listener, registry));
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_prefers_specific_variables() {
        let vars = [
            ("RUST_LOG", "debug"),
            ("FATHOM_LOG", "info"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4317"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ];
        let env = TelemetryEnv::from_vars(|k| {
            vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        });
        assert_eq!(env.log_filter.as_deref(), Some("info"));
        assert_eq!(env.otlp_endpoint.as_deref(), Some("http://b:4317"));
        assert_eq!(env.schedule_delay_ms, Some(100));
        assert!(env.sdk_disabled);
        assert_eq!(TelemetryEnv::from_vars(|_| None).log_filter, None);
    }

    #[tokio::test]
    async fn metrics_endpoint_serves_text_and_404() {
        let registry = prometheus::Registry::new();
        let c = prometheus::IntCounter::new("fathom_test_total", "test").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        c.inc_by(3);
        let addr = start_metrics("127.0.0.1:0", registry).await.unwrap();
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("\r\n\r\n") && ok.contains("fathom_test_total 3"), "{ok}");
        let missing = get("/other").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    }
}
