//! Observability of a real cluster (`fathom worker` ×2 + `fathom coordinator` processes on
//! loopback): an OTLP/gRPC collector inside the test receives the spans of every process and
//! they form one trace per request across the cluster; `/metrics` counters move by exactly what
//! was served; prompt text never reaches logs (RUST_LOG=trace) or exported spans.

mod cluster_support;

use anyhow::{Context, Result, bail};
use cluster_support::{fathom_bin, generate, greedy_request, port, scrape, tiny_model};
use fathom_proto::v1::inference_client::InferenceClient;
use fathom_proto::v1::{GenerateRequest, SamplingParams, generate_request};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// The collector: a real OTLP/gRPC trace service on loopback.

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attrs: BTreeMap<String, String>,
    /// Every string in the span (name, attribute and event values, event names, links).
    text: String,
}

#[derive(Debug, Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

fn value_text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), value_text(&kv.value))).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| attrs(&r.attributes)).unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let mut text = s.name.clone();
                    for kv in &s.attributes {
                        text.push_str(&format!(" {}={}", kv.key, value_text(&kv.value)));
                    }
                    for e in &s.events {
                        text.push_str(&format!(" event:{}", e.name));
                        for kv in &e.attributes {
                            text.push_str(&format!(" {}={}", kv.key, value_text(&kv.value)));
                        }
                    }
                    for l in &s.links {
                        for kv in &l.attributes {
                            text.push_str(&format!(" {}={}", kv.key, value_text(&kv.value)));
                        }
                    }
                    if let Some(st) = &s.status {
                        text.push_str(&format!(" status:{}", st.message));
                    }
                    out.push(Span {
                        service: service.clone(),
                        name: s.name.clone(),
                        trace_id: s.trace_id.clone(),
                        span_id: s.span_id.clone(),
                        parent: s.parent_span_id.clone(),
                        attrs: attrs(&s.attributes),
                        text,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// Serves on a free loopback port; returns the endpoint URL.
    async fn start(&self) -> Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok(format!("http://{addr}"))
    }

    fn snapshot(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `done(spans)` holds (spans arrive in batches every 100 ms).
    async fn wait_for(&self, what: &str, done: impl Fn(&[Span]) -> bool) -> Result<Vec<Span>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.snapshot();
            if done(&spans) {
                return Ok(spans);
            }
            if Instant::now() > deadline {
                let names: Vec<_> = spans.iter().map(|s| (&s.service, &s.name)).collect();
                bail!("{what}: not received within 20 s; got {} spans: {names:?}", spans.len());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster: real processes with their metrics ports known and their stderr captured.

#[derive(Debug)]
struct Procs {
    children: Vec<Child>,
    addr: String,
    coordinator_metrics: String,
    worker_metrics: Vec<String>,
    /// stderr of the coordinator, then of each worker.
    logs: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Debug, Default)]
struct Setup {
    otlp: Option<String>,
    env: Vec<(&'static str, &'static str)>,
    coordinator_flags: Vec<&'static str>,
}

impl Procs {
    fn start(workers: usize, setup: &Setup) -> Result<Self> {
        let bin = fathom_bin();
        let model = tiny_model();
        let dir = tempfile::Builder::new().prefix("fathom-obs-").tempdir()?;
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, "cluster = \"obs\"\n")?;
        let common = |cmd: &mut Command| {
            cmd.env_remove("FATHOM_LOG")
                .env_remove("FATHOM_TRACE")
                .env_remove("RUST_LOG")
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .env("OTEL_BSP_SCHEDULE_DELAY", "100")
                .envs(setup.env.iter().copied())
                .stdin(Stdio::null());
            if let Some(e) = &setup.otlp {
                cmd.args(["--otlp-endpoint", e]);
            }
        };
        let mut children = Vec::new();
        let mut logs = vec![dir.path().join("coordinator.log")];
        let mut statics = Vec::new();
        let mut worker_metrics = Vec::new();
        for i in 0..workers {
            let addr = format!("127.0.0.1:{}", port());
            let metrics = format!("127.0.0.1:{}", port());
            let log = dir.path().join(format!("w{i}.log"));
            let mut cmd = Command::new(&bin);
            cmd.args(["worker", "--id", &format!("w{i}"), "--listen", &addr])
                .args(["--advertise", &addr, "--metrics-listen", &metrics])
                .arg("--config")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?);
            common(&mut cmd);
            children.push(cmd.spawn().context("spawning fathom worker")?);
            logs.push(log);
            statics.push(format!("--static-worker=w{i}={addr}"));
            worker_metrics.push(metrics);
        }
        let listen = format!("127.0.0.1:{}", port());
        let mut cmd = Command::new(&bin);
        cmd.arg("coordinator")
            .arg("--config")
            .arg(&config)
            .arg("--model")
            .arg(&model)
            .args(["--listen", &listen, "--world-size", &workers.to_string()])
            .args(["--kv-blocks", "256", "--kv-block-size", "16"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(&statics)
            .args(&setup.coordinator_flags)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&logs[0])?);
        common(&mut cmd);
        let mut coordinator = cmd.spawn().context("spawning fathom coordinator")?;
        let stdout = coordinator.stdout.take().expect("piped");
        children.push(coordinator);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                let _ = tx.send(line);
            }
        });
        let mut procs = Procs {
            children,
            addr: String::new(),
            coordinator_metrics: String::new(),
            worker_metrics,
            logs,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while procs.addr.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).context("the coordinator did not serve in 60 s")?;
            if let Some(a) = line.strip_prefix("fathom: metrics on http://") {
                procs.coordinator_metrics = a.trim_end_matches("/metrics").to_string();
            } else if let Some(a) = line.strip_prefix("fathom: serving on ") {
                procs.addr = a.to_string();
            }
        }
        if procs.coordinator_metrics.is_empty() {
            bail!("`fathom: metrics on http://…/metrics` was not printed before serving");
        }
        Ok(procs)
    }

    async fn client(&self) -> Result<InferenceClient<tonic::transport::Channel>> {
        Ok(InferenceClient::connect(format!("http://{}", self.addr)).await?)
    }

    fn log_text(&self) -> Vec<(String, String)> {
        self.logs
            .iter()
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(p).unwrap_or_default())
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus scraping.

fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

fn sum_prefix(m: &HashMap<String, f64>, prefix: &str) -> f64 {
    m.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum()
}

fn text_request(id: &str, text: &str, n: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        input: Some(generate_request::Input::Text(text.into())),
        sampling: Some(SamplingParams { max_tokens: n, ignore_eos: true, ..Default::default() }),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_coordinator_and_workers_with_parent_links() {
    let collector = Collector::default();
    let endpoint = collector.start().await.unwrap();
    // Trace level: the workers' per-layer phase spans are exported too.
    let setup = Setup {
        otlp: Some(endpoint),
        env: vec![("FATHOM_TRACE", "trace,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off")],
        ..Default::default()
    };
    let procs = Procs::start(2, &setup).expect("cluster");
    let mut client = procs.client().await.unwrap();
    let n = 4;
    let mut req = greedy_request(&[5, 17, 42, 99, 7], n);
    req.request_id = "obs-trace-1".into();
    generate(&mut client, req).await.unwrap();

    let is_request = |s: &Span| {
        s.service == "fathom-coordinator"
            && s.name == "request"
            && s.attrs.get("request_id").map(String::as_str) == Some("obs-trace-1")
    };
    // Every worker answers every step: 2 ranks × n steps.
    let spans = collector
        .wait_for("the request's spans from every process", |spans| {
            let Some(r) = spans.iter().find(|s| is_request(s)) else { return false };
            let worker_steps = spans
                .iter()
                .filter(|s| s.service == "fathom-worker" && s.name == "step")
                .filter(|s| s.trace_id == r.trace_id)
                .count();
            worker_steps >= 2 * n as usize
        })
        .await
        .unwrap();
    let request = spans.iter().find(|s| is_request(s)).unwrap();
    let trace = &request.trace_id;
    assert!(request.parent.is_empty(), "the request span is the trace's root");
    assert_eq!(request.attrs.get("prompt_tokens").map(String::as_str), Some("5"));
    let coord = |name: &str| -> Vec<&Span> {
        spans
            .iter()
            .filter(|s| s.service == "fathom-coordinator" && s.name == name && &s.trace_id == trace)
            .collect()
    };
    let (queue, prefill, decode) = (coord("queue"), coord("prefill"), coord("decode"));
    for (name, phase) in [("queue", &queue), ("prefill", &prefill), ("decode", &decode)] {
        assert_eq!(phase.len(), 1, "one {name} span");
        assert_eq!(phase[0].parent, request.span_id, "{name} is a child of the request span");
    }
    let steps = coord("step");
    assert_eq!(steps.len(), n as usize, "one coordinator step span per generated token");
    let under = |p: &Span| steps.iter().filter(|s| s.parent == p.span_id).count();
    assert_eq!(under(prefill[0]), 1, "the prefill step hangs under prefill");
    assert_eq!(under(decode[0]), n as usize - 1, "decode steps hang under decode");

    // Worker step spans: same trace, each a child of a coordinator step span, one per rank.
    for rank in ["0", "1"] {
        let mine: Vec<&Span> = spans
            .iter()
            .filter(|s| s.service == "fathom-worker" && s.name == "step")
            .filter(|s| s.attrs.get("rank").map(String::as_str) == Some(rank))
            .filter(|s| &s.trace_id == trace)
            .collect();
        assert_eq!(mine.len(), n as usize, "rank {rank}: one step span per step");
        for c in &steps {
            let children = mine.iter().filter(|w| w.parent == c.span_id).count();
            assert_eq!(children, 1, "rank {rank}: exactly one child of coordinator step {c:?}");
        }
    }

    // Worker phases (attention, MoE dispatch, experts, combine) hang under a worker step span.
    let by_id: HashMap<&[u8], &Span> = spans.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    let under_worker_step = |s: &Span| {
        let mut cur = s;
        for _ in 0..8 {
            match by_id.get(cur.parent.as_slice()) {
                Some(p) if p.service == "fathom-worker" && p.name == "step" => return true,
                Some(p) => cur = p,
                None => return false,
            }
        }
        false
    };
    for phase in ["attention", "dispatch", "experts", "combine"] {
        let found: Vec<&Span> = spans
            .iter()
            .filter(|s| s.service == "fathom-worker" && s.name == phase && &s.trace_id == trace)
            .collect();
        assert!(!found.is_empty(), "worker {phase} spans are exported");
        assert!(found.iter().all(|s| under_worker_step(s)), "{phase} spans hang under a step");
    }

    // PrepareEpoch carried the context in gRPC metadata: the workers' prepare spans hang under
    // the coordinator's.
    let prep = spans
        .iter()
        .find(|s| s.service == "fathom-coordinator" && s.name == "prepare_epoch")
        .expect("coordinator prepare_epoch span");
    let worker_preps: Vec<&Span> = spans
        .iter()
        .filter(|s| s.service == "fathom-worker" && s.name == "prepare_epoch")
        .collect();
    assert_eq!(worker_preps.len(), 2, "one prepare span per worker");
    for w in worker_preps {
        assert_eq!((&w.trace_id, &w.parent), (&prep.trace_id, &prep.span_id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_exactly_what_was_served() {
    metrics_check(2, 1).await;
}

/// T = 2: the group's routing is gathered on both ranks; only the group's rank 0 counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_each_token_once_with_tensor_parallel_groups() {
    metrics_check(2, 2).await;
}

/// W = 1 (the single-rank executor): its MoE layers count the tokens themselves; no request
/// here asks for routed experts, so nothing records routing and the counters still move by
/// exactly tokens fed × top_k × MoE layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_expert_tokens_on_one_rank() {
    metrics_check(1, 1).await;
}

/// `workers` workers with tensor-parallel size `tp`: counters move by exactly what was served.
async fn metrics_check(workers: usize, tp: usize) {
    let tp_flag: &'static str = if tp == 1 { "--tp=1" } else { "--tp=2" };
    let setup = Setup { coordinator_flags: vec![tp_flag], ..Default::default() };
    let procs = Procs::start(workers, &setup).expect("cluster");
    let groups = (workers / tp) as f64;
    let cfg = fathom_common::ModelConfig::tiny();
    let per_token = (cfg.num_experts_per_tok * cfg.num_moe_layers()) as f64;
    assert!(per_token > 0.0, "the tiny model has MoE layers");
    let scrape_all = || -> (HashMap<String, f64>, Vec<HashMap<String, f64>>) {
        let c = scrape(&procs.coordinator_metrics).unwrap();
        let w = procs.worker_metrics.iter().map(|a| scrape(a).unwrap()).collect();
        (c, w)
    };
    let (c0, w0) = scrape_all();
    assert_eq!(get(&c0, "fathom_epoch"), 1.0);
    for w in &w0 {
        assert_eq!((get(w, "fathom_epoch"), get(w, "fathom_worker_up")), (1.0, 1.0));
    }
    for i in 0..workers {
        assert_eq!(get(&c0, &format!("fathom_worker_up{{worker=\"w{i}\"}}")), 1.0);
    }

    let mut client = procs.client().await.unwrap();
    let cases: [(usize, u32); 3] = [(3, 5), (11, 1), (24, 7)];
    let (mut prompt, mut generated, mut fed, mut intervals) = (0.0, 0.0, 0.0, 0.0);
    for (i, (len, n)) in cases.into_iter().enumerate() {
        let p: Vec<u32> = (0..len as u32).map(|t| (t * 31 + i as u32 * 7 + 3) % 400).collect();
        let got = generate(&mut client, greedy_request(&p, n)).await.unwrap();
        assert_eq!(got.len(), n as usize);
        prompt += len as f64;
        generated += n as f64;
        // The model is fed the prompt and every generated token but the last.
        fed += (len + n as usize - 1) as f64;
        intervals += (n - 1) as f64;
    }
    // Two refused requests: counted under their status, nothing served.
    for bad in [
        GenerateRequest { sampling: Some(Default::default()), ..greedy_request(&[1, 2, 3], 2) },
        greedy_request(&[cfg.vocab_size as u32], 2),
    ] {
        let e = generate(&mut client, bad).await.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    }
    let (c1, w1) = scrape_all();
    let d = |s: &str| get(&c1, s) - get(&c0, s);
    assert_eq!(d("fathom_requests_total{status=\"invalid_argument\"}"), 2.0);
    assert_eq!(d("fathom_requests_total{status=\"ok\"}"), cases.len() as f64);
    assert_eq!(d("fathom_tokens_total{kind=\"prompt\"}"), prompt);
    assert_eq!(d("fathom_tokens_total{kind=\"generated\"}"), generated);
    assert_eq!(d("fathom_time_to_first_token_seconds_count"), cases.len() as f64);
    assert_eq!(d("fathom_time_per_output_token_seconds_count"), intervals);
    assert_eq!(get(&c1, "fathom_queue_depth"), 0.0);
    assert_eq!(get(&c1, "fathom_running_sequences"), 0.0);
    assert_eq!(get(&c1, "fathom_kv_blocks{state=\"used\"}"), 0.0);
    assert_eq!(get(&c1, "fathom_kv_blocks{state=\"free\"}"), groups * 256.0, "groups × 256");
    let steps = d("fathom_step_seconds_count{phase=\"execute\"}");
    assert!(steps >= generated, "at least one step per generated token: {steps}");

    let expert_delta: f64 = w0
        .iter()
        .zip(&w1)
        .map(|(a, b)| {
            sum_prefix(b, "fathom_expert_tokens_total{")
                - sum_prefix(a, "fathom_expert_tokens_total{")
        })
        .sum();
    assert_eq!(expert_delta, fed * per_token, "expert tokens = tokens fed × top_k × MoE layers");
    for (i, (a, b)) in w0.iter().zip(&w1).enumerate() {
        // Every rank executes every step (also with no sequences of its group).
        let d = get(b, "fathom_step_seconds_count{phase=\"step\"}")
            - get(a, "fathom_step_seconds_count{phase=\"step\"}");
        assert_eq!(d, steps, "worker {i} executed every step");
        let bal: Vec<f64> = b
            .iter()
            .filter(|(k, _)| k.starts_with("fathom_expert_balancedness{"))
            .map(|(_, v)| *v)
            .collect();
        assert!(bal.iter().all(|v| *v > 0.0 && *v <= 1.0), "balancedness in (0, 1]: {bal:?}");
    }
    // Without a TTY, weight loading reports plain progress lines on each worker's stderr.
    for (name, log) in &procs.log_text()[1..] {
        assert!(log.contains("fathom: loading weights: "), "{name}: no progress lines:\n{log}");
    }
    let routed: usize =
        w1.iter().filter(|w| sum_prefix(w, "fathom_expert_balancedness{") > 0.0).count();
    assert!(routed >= 1, "some worker routed tokens and reports balancedness");
}

/// Appears only in the prompt; must never appear in any log line or exported span.
const CANARY: &str = "zanzibar quokka canary 4471";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_text_never_reaches_logs_or_spans() {
    let collector = Collector::default();
    let endpoint = collector.start().await.unwrap();
    let setup = Setup {
        otlp: Some(endpoint),
        // Every span of ours at every level (the exporter's own gRPC stack stays out of the
        // exported spans, or exporting would trace itself).
        env: vec![
            ("RUST_LOG", "trace"),
            ("FATHOM_TRACE", "trace,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off"),
        ],
        coordinator_flags: vec!["--log-format", "json"],
    };
    let procs = Procs::start(2, &setup).expect("cluster");
    let mut client = procs.client().await.unwrap();
    let mut stream =
        client.generate(text_request("obs-req-77", CANARY, 3)).await.unwrap().into_inner();
    let mut finals = 0;
    while let Some(msg) = stream.message().await.unwrap() {
        if let Some(fathom_proto::v1::generate_response::Kind::Final(f)) = msg.kind {
            assert_eq!(f.request_id, "obs-req-77");
            finals += 1;
        }
    }
    assert_eq!(finals, 1, "the request finished");
    let spans = collector
        .wait_for("the request span and worker steps", |spans| {
            spans.iter().any(|s| s.text.contains("obs-req-77"))
                && spans.iter().filter(|s| s.service == "fathom-worker" && s.name == "step").count()
                    >= 6
        })
        .await
        .unwrap();
    // Stragglers of the last batch.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = [spans, collector.snapshot()].concat();
    let words: Vec<&str> = CANARY.split(' ').filter(|w| w.len() >= 6).collect();
    for s in &spans {
        for w in &words {
            assert!(!s.text.contains(w), "prompt word {w:?} in exported span {s:?}");
        }
    }
    let logs = procs.log_text();
    let total: usize = logs.iter().map(|(_, t)| t.len()).sum();
    assert!(total > 10_000, "RUST_LOG=trace produced logs ({total} bytes)");
    for (name, text) in &logs {
        for w in &words {
            assert!(!text.contains(w), "prompt word {w:?} in {name}");
        }
    }
    // The request id is what identifies the request in logs; the coordinator logs JSON.
    let (_, coordinator) = &logs[0];
    assert!(coordinator.contains("obs-req-77"), "the coordinator's logs name the request id");
    let json_lines = coordinator.lines().filter(|l| !l.starts_with("fathom: ")).count();
    assert!(json_lines > 0);
    for line in coordinator.lines().filter(|l| !l.starts_with("fathom: ")) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("--log-format json line is not JSON ({e}): {line}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{line}");
    }
}

#[test]
fn fathom_up_prints_the_coordinators_metrics_address() -> Result<()> {
    let cache = tempfile::tempdir()?;
    let mut child = Command::new(fathom_bin())
        .args(["up", "--workers", "1", "--port", "0"])
        .arg("--model")
        .arg(tiny_model())
        .arg("--cache-dir")
        .arg(cache.path())
        .env_remove("RUST_LOG")
        .env_remove("FATHOM_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            let _ = tx.send(line);
        }
    });
    let result = (|| -> Result<()> {
        let mut metrics = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))?;
            if let Some(a) = line.strip_prefix("fathom: metrics on http://") {
                let a = a.strip_suffix("/metrics").context("URL ends in /metrics")?;
                metrics = Some(a.to_string());
            }
            if line.starts_with("fathom: serving on ") {
                break;
            }
        }
        let addr = metrics.context("no `fathom: metrics on` line before serving")?;
        assert!(addr.starts_with("127.0.0.1:"), "{addr}");
        let m = scrape(&addr)?;
        assert_eq!(get(&m, "fathom_epoch"), 1.0);
        assert_eq!(get(&m, "fathom_worker_up{worker=\"w0\"}"), 1.0);
        Ok(())
    })();
    // SIGTERM: `fathom up` stops its workers itself (SIGKILL would orphan them).
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[test]
fn checkpoint_synth_reports_progress_lines_without_a_tty() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = Command::new(fathom_bin())
        .args(["checkpoint", "synth", "--preset", "tiny", "--out"])
        .arg(dir.path().join("m"))
        .stdin(Stdio::null())
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8(out.stderr)?;
    let last = err.lines().rfind(|l| l.starts_with("fathom: synthesizing the checkpoint: "));
    let last = last.context("no progress line on stderr")?;
    assert!(last.contains(": 100% ("), "the last progress line says done: {last}");
    assert!(!err.contains('\r'), "no bar drawing without a TTY");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_shows_down_and_its_request_unavailable() {
    let mut procs = Procs::start(2, &Setup::default()).expect("cluster");
    let before = scrape(&procs.coordinator_metrics).unwrap();
    assert_eq!(get(&before, "fathom_worker_up{worker=\"w1\"}"), 1.0);
    // Worker w1 is children[1] (workers first, then the coordinator).
    procs.children[1].kill().unwrap();
    procs.children[1].wait().unwrap();
    let mut client = procs.client().await.unwrap();
    let status = generate(&mut client, greedy_request(&[1, 2, 3], 8)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let after = scrape(&procs.coordinator_metrics).unwrap();
    assert_eq!(get(&after, "fathom_worker_up{worker=\"w1\"}"), 0.0, "the killed worker is down");
    let d = |s: &str| get(&after, s) - get(&before, s);
    assert_eq!(d("fathom_requests_total{status=\"unavailable\"}"), 1.0);
    assert_eq!(d("fathom_requests_total{status=\"ok\"}"), 0.0);
}
