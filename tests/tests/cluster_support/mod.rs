//! Shared by the `cluster_*` tests: the built `fathom` binary, a synthesized tiny model, a
//! cluster of real processes (`fathom worker` ×W + `fathom coordinator`) on loopback, a gRPC
//! client, and the in-process reference (the same model run directly, greedy).
//!
//! Every process is killed and reaped when its [`Cluster`] drops.

#![allow(dead_code)]

use anyhow::{Context, Result, bail};
use fathom_proto::v1::inference_client::InferenceClient;
use fathom_proto::v1::{
    GenerateRequest, SamplingParams, TokenIds, generate_request, generate_response,
};
use fathom_worker::model::{ForwardOptions, Model, SeqInput, ShardSpec};
use fathom_worker::weights::{CheckpointReader, SynthOptions, synth_checkpoint};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "test-admin-token";

/// The `fathom` binary, built (or confirmed up to date) once per test process with the same
/// cargo that runs the tests.
pub fn fathom_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "fathom", "--bin", "fathom"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build -p fathom");
        assert!(status.success(), "cargo build -p fathom failed");
        // tests/ -> workspace root -> target/debug/fathom (the tests' own profile dir).
        let exe = std::env::current_exe().expect("test exe");
        let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
        let bin = profile_dir.join("fathom");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}

/// The tiny model synthesized once per test process (f32, seed 0, with tokenizer.json).
pub fn tiny_model() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("fathom-tiny-").tempdir().unwrap();
        synth_checkpoint(&fathom_common::ModelConfig::tiny(), &SynthOptions::default(), dir.path())
            .expect("synth tiny");
        dir
    })
    .path()
    .to_path_buf()
}

/// A free loopback port.
pub fn port() -> u16 {
    fathom_tests::free_port().expect("free port")
}

/// Coordinator flags for a test cluster.
#[derive(Debug, Clone)]
pub struct Opts {
    pub workers: usize,
    pub extra: Vec<String>,
    /// etcd client URL: both roles read a config file naming it, and the coordinator discovers
    /// the workers through membership instead of `--static-worker`.
    pub etcd: Option<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Self { workers: 1, extra: Vec::new(), etcd: None }
    }
}

/// Real processes: W workers and a coordinator.
#[derive(Debug)]
pub struct Cluster {
    pub workers: Vec<Child>,
    pub coordinator: Child,
    pub addr: String,
    pub model: PathBuf,
    /// Listen/advertise address of each worker.
    pub worker_addrs: Vec<String>,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.workers.iter_mut().chain(std::iter::once(&mut self.coordinator)) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    /// Starts the processes and waits for `fathom: serving on ADDR` (at most 60 s).
    pub fn start(opts: Opts) -> Result<Self> {
        Self::start_with_model(opts, tiny_model())
    }

    /// [`Cluster::start`] serving the checkpoint in `model` instead of the tiny one.
    pub fn start_with_model(opts: Opts, model: PathBuf) -> Result<Self> {
        let bin = fathom_bin();
        let dir = tempfile::Builder::new().prefix("fathom-cluster-").tempdir()?;
        let config = dir.path().join("cluster.toml");
        let mut toml = String::from("cluster = \"test\"\n");
        if let Some(e) = &opts.etcd {
            toml.push_str(&format!("[membership]\netcd_endpoints = [\"{e}\"]\nlease_ttl_s = 2\n"));
        }
        std::fs::write(&config, toml)?;
        let mut workers = Vec::new();
        let mut worker_addrs = Vec::new();
        let mut statics = Vec::new();
        for i in 0..opts.workers {
            let addr = format!("127.0.0.1:{}", port());
            let id = format!("w{i}");
            workers.push(
                Command::new(&bin)
                    .args(["worker", "--id", &id, "--listen", &addr, "--advertise", &addr])
                    .arg("--config")
                    .arg(&config)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("spawning fathom worker")?,
            );
            worker_addrs.push(addr.clone());
            if opts.etcd.is_none() {
                statics.push(format!("--static-worker={id}={addr}"));
            }
        }
        let listen = format!("127.0.0.1:{}", port());
        let extra: Vec<String> = statics.iter().chain(&opts.extra).cloned().collect();
        let (coordinator, rx) =
            spawn_test_coordinator(&config, &model, &listen, opts.workers, &extra)?;
        let mut cluster = Cluster {
            workers,
            coordinator,
            addr: String::new(),
            model,
            worker_addrs,
            config: config.clone(),
            _dir: dir,
        };
        cluster.addr = rx
            .recv_timeout(Duration::from_secs(60))
            .context("the coordinator did not print `fathom: serving on` within 60 s")?;
        Ok(cluster)
    }

    /// Starts worker `i` again (same id and address) after it was killed.
    pub fn restart_worker(&mut self, i: usize) -> Result<()> {
        let addr = self.worker_addrs[i].clone();
        let id = format!("w{i}");
        self.workers[i] = Command::new(fathom_bin())
            .args(["worker", "--id", &id, "--listen", &addr, "--advertise", &addr])
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("respawning fathom worker")?;
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Result<InferenceClient<tonic::transport::Channel>> {
        Ok(InferenceClient::connect(self.url()).await?)
    }
}

/// A greedy request of `n` tokens that ignores EOS.
pub fn greedy_request(prompt: &[u32], n: u32) -> GenerateRequest {
    GenerateRequest {
        input: Some(generate_request::Input::TokenIds(TokenIds { ids: prompt.to_vec() })),
        sampling: Some(SamplingParams { max_tokens: n, ignore_eos: true, ..Default::default() }),
        ..Default::default()
    }
}

/// Runs `req` to completion; returns the generated ids (error: the status).
pub async fn generate(
    client: &mut InferenceClient<tonic::transport::Channel>,
    req: GenerateRequest,
) -> std::result::Result<Vec<u32>, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut ids = Vec::new();
    let mut finished = false;
    while let Some(msg) = stream.message().await? {
        match msg.kind {
            Some(generate_response::Kind::Chunk(c)) => ids.extend(c.token_ids),
            Some(generate_response::Kind::Final(f)) => {
                assert_eq!(f.usage.expect("usage").completion_tokens as usize, ids.len());
                finished = true;
            }
            None => {}
        }
    }
    assert!(finished, "stream ended without a final message");
    Ok(ids)
}

/// The same model run in this process: greedy, `n` tokens, no EOS stop.
#[derive(Debug)]
pub struct Reference {
    model: Model,
}

impl Reference {
    pub fn load(dir: &Path) -> Result<Self> {
        let reader = CheckpointReader::open(dir)?;
        let cfg = reader.config().clone();
        let model = Model::load(&reader, cfg.clone(), ShardSpec::full(&cfg))?;
        Ok(Self { model })
    }

    pub fn greedy(&self, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
        self.generate(prompt, n, &fathom_worker::sampling::SamplingParams::greedy())
    }

    /// `n` tokens drawn with `p` (token i from the request's stream at index i).
    pub fn generate(
        &self,
        prompt: &[u32],
        n: usize,
        p: &fathom_worker::sampling::SamplingParams,
    ) -> Result<Vec<u32>> {
        let bs = 16;
        let blocks = (prompt.len() + n).div_ceil(bs);
        let mut cache = self.model.new_cache(bs, blocks)?;
        let table: Vec<u32> = (0..blocks as u32).collect();
        let mut out = Vec::new();
        let mut feed = prompt.to_vec();
        let mut pos = 0;
        while out.len() < n {
            let end = pos + feed.len();
            let seqs = [SeqInput {
                tokens: &feed,
                start_pos: pos,
                block_table: &table[..end.div_ceil(bs)],
            }];
            let f = self.model.forward(&seqs, &mut cache, &ForwardOptions::default())?;
            let t = fathom_worker::sampling::sample(&f.logits, p, out.len() as u64)?.token;
            out.push(t);
            pos = end;
            feed = vec![t];
        }
        Ok(out)
    }
}

/// Waits until `f` holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("condition not met within {timeout:?}")
}

/// Starts `fathom coordinator` on `listen` for a plan of `world` ranks (admin token, 256 KV
/// blocks of 16) with `extra` flags; the receiver gets the address once it prints
/// `fathom: serving on`.
fn spawn_test_coordinator(
    config: &Path,
    model: &Path,
    listen: &str,
    world: usize,
    extra: &[String],
) -> Result<(Child, std::sync::mpsc::Receiver<String>)> {
    let mut coordinator = Command::new(fathom_bin())
        .arg("coordinator")
        .arg("--config")
        .arg(config)
        .arg("--model")
        .arg(model)
        .args(["--listen", listen, "--world-size", &world.to_string()])
        .args(["--admin-token", ADMIN_TOKEN, "--kv-blocks", "256", "--kv-block-size", "16"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning fathom coordinator")?;
    let stdout = coordinator.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(a) = line.strip_prefix("fathom: serving on ") {
                let _ = tx.send(a.to_string());
            }
        }
    });
    Ok((coordinator, rx))
}

// ---- Fault-tolerance helpers (issue 10) ----

/// Sends `signal` (e.g. "KILL", "STOP", "CONT") to process `pid` with `kill(1)`.
pub fn signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{signal} {pid} failed");
}

impl Cluster {
    /// A cluster whose workers register in the coordinator's in-memory registry (no etcd, no
    /// static list): `workers` worker processes `w0..`, a plan of `world` ranks (workers beyond
    /// it are spares), coordinator flags `extra`.
    pub fn start_registry(workers: usize, world: usize, extra: Vec<String>) -> Result<Self> {
        Self::start_registry_with(workers, world, extra, "", tiny_model())
    }

    /// [`start_registry`](Self::start_registry) with `toml` appended to the cluster config
    /// (e.g. a `[parallel]` section), serving the checkpoint in `model`.
    pub fn start_registry_with(
        workers: usize,
        world: usize,
        extra: Vec<String>,
        toml: &str,
        model: PathBuf,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fathom-cluster-").tempdir()?;
        let config = dir.path().join("cluster.toml");
        std::fs::write(
            &config,
            format!("cluster = \"test\"\n[membership]\nlease_ttl_s = 2\n{toml}"),
        )?;
        let listen = format!("127.0.0.1:{}", port());
        let (coordinator, rx) = spawn_test_coordinator(&config, &model, &listen, world, &extra)?;
        let mut cluster = Cluster {
            workers: Vec::new(),
            coordinator,
            addr: String::new(),
            model,
            worker_addrs: Vec::new(),
            config,
            _dir: dir,
        };
        for i in 0..workers {
            let addr = format!("127.0.0.1:{}", port());
            cluster.worker_addrs.push(addr);
            cluster.workers.push(cluster.spawn_registry_worker(i, &listen)?);
        }
        cluster.addr = rx
            .recv_timeout(Duration::from_secs(60))
            .context("the coordinator did not print `fathom: serving on` within 60 s")?;
        Ok(cluster)
    }

    fn spawn_registry_worker(&self, i: usize, registry: &str) -> Result<Child> {
        let addr = &self.worker_addrs[i];
        let id = format!("w{i}");
        Command::new(fathom_bin())
            .args(["worker", "--id", &id, "--listen", addr, "--advertise", addr])
            .args(["--registry", registry])
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning fathom worker")
    }

    /// Starts one more worker (`w<n>`, a new address) in a
    /// [`start_registry`](Self::start_registry) cluster; returns its index.
    pub fn add_registry_worker(&mut self) -> Result<usize> {
        let i = self.workers.len();
        self.worker_addrs.push(format!("127.0.0.1:{}", port()));
        let child = self.spawn_registry_worker(i, &self.addr.clone())?;
        self.workers.push(child);
        Ok(i)
    }

    /// Starts worker `i` of a [`start_registry`](Self::start_registry) cluster again.
    pub fn restart_registry_worker(&mut self, i: usize) -> Result<()> {
        self.workers[i] = self.spawn_registry_worker(i, &self.addr.clone())?;
        Ok(())
    }

    /// The coordinator's cluster status (Admin API).
    pub async fn status(&self) -> fathom_proto::v1::ClusterStatusResponse {
        let mut admin = fathom_proto::v1::admin_client::AdminClient::connect(self.url())
            .await
            .expect("admin connect");
        let mut req = tonic::Request::new(fathom_proto::v1::ClusterStatusRequest {});
        req.metadata_mut()
            .insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
        admin.cluster_status(req).await.expect("cluster status").into_inner()
    }
}

/// One stream's tokens with the time each arrived.
#[derive(Debug, Default, Clone)]
pub struct Timed {
    pub ids: Vec<u32>,
    pub at: Vec<Instant>,
}

/// Runs `req` to completion recording arrival times; `progress` counts every token received.
pub async fn generate_timed(
    client: &mut InferenceClient<tonic::transport::Channel>,
    req: GenerateRequest,
    progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> std::result::Result<Timed, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Timed::default();
    let mut finished = false;
    while let Some(msg) = stream.message().await? {
        match msg.kind {
            Some(generate_response::Kind::Chunk(c)) => {
                let now = Instant::now();
                for t in c.token_ids {
                    out.ids.push(t);
                    out.at.push(now);
                    progress.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            Some(generate_response::Kind::Final(f)) => {
                assert_eq!(f.usage.expect("usage").completion_tokens as usize, out.ids.len());
                finished = true;
            }
            None => {}
        }
    }
    assert!(finished, "stream ended without a final message");
    Ok(out)
}

/// `fathom up` as a real process: its coordinator address and the pid of each worker, kept up
/// to date from its stderr (`fathom: worker ID pid P on ADDR`, printed at every (re)start).
#[derive(Debug)]
pub struct Up {
    pub child: Child,
    pub addr: String,
    pub cache: tempfile::TempDir,
    pids: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u32>>>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Up {
    fn drop(&mut self) {
        // SIGTERM first so `fathom up` reaps its workers; then make sure.
        signal_quiet(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in self.pids.lock().unwrap().values() {
            signal_quiet(*pid, "KILL");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal_quiet(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

impl Up {
    /// Runs `fathom up ARGS --cache-dir TMP` and waits for `fathom: serving on` (120 s).
    pub fn start(args: &[&str]) -> Result<Self> {
        let cache = tempfile::Builder::new().prefix("fathom-up-cache-").tempdir()?;
        let mut child = Command::new(fathom_bin())
            .arg("up")
            .args(args)
            .arg("--cache-dir")
            .arg(cache.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning fathom up")?;
        let pids = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped");
        let (p, l) = (pids.clone(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                let words: Vec<&str> = line.split_whitespace().collect();
                if let ["fathom:", "worker", id, "pid", pid, "on", _] = words.as_slice()
                    && let Ok(pid) = pid.parse::<u32>()
                {
                    p.lock().unwrap().insert(id.to_string(), pid);
                }
                l.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if let Some(a) = line.strip_prefix("fathom: serving on ") {
                    let _ = tx.send(a.to_string());
                }
            }
        });
        let mut up = Up { child, addr: String::new(), cache, pids, log };
        up.addr = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(a) => a,
            Err(_) => bail!("fathom up did not serve within 120 s; stderr: {:?}", up.stderr()),
        };
        Ok(up)
    }

    /// The current pid of worker `id`.
    pub fn pid(&self, id: &str) -> Option<u32> {
        self.pids.lock().unwrap().get(id).copied()
    }

    /// Everything `fathom up` printed on stderr so far.
    pub fn stderr(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The synthesized model directory.
    pub fn model(&self) -> PathBuf {
        self.cache.path().join("tiny-f32-seed0")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Cluster {
    /// Another coordinator process on this cluster's config and model (e.g. a standby);
    /// returns it and a receiver of the address it prints in `fathom: serving on ADDR`.
    pub fn spawn_coordinator(
        &self,
        world: usize,
        extra: &[String],
    ) -> Result<(Child, std::sync::mpsc::Receiver<String>)> {
        let listen = format!("127.0.0.1:{}", port());
        let mut child = Command::new(fathom_bin())
            .arg("coordinator")
            .arg("--config")
            .arg(&self.config)
            .arg("--model")
            .arg(&self.model)
            .args(["--listen", &listen, "--world-size", &world.to_string()])
            .args(["--admin-token", ADMIN_TOKEN, "--kv-blocks", "256", "--kv-block-size", "16"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning another fathom coordinator")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if let Some(a) = line.strip_prefix("fathom: serving on ") {
                    let _ = tx.send(a.to_string());
                }
            }
        });
        Ok((child, rx))
    }
}

/// `GET /metrics` at `addr` → `series (name{labels}) → value`.
pub fn scrape(addr: &str) -> Result<HashMap<String, f64>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET /metrics at {addr}: {head}");
    }
    let mut out = HashMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').context("metric line without value")?;
        out.insert(series.to_string(), value.parse::<f64>()?);
    }
    Ok(out)
}
