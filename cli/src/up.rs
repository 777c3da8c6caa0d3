//! `fathom up`: a whole cluster on this machine — the coordinator in this process and W worker
//! processes spawned as `fathom worker --id wN --listen 127.0.0.1:P --advertise 127.0.0.1:P
//! --config FILE` (explicit flags, never environment variables).
//!
//! Membership: workers register with a lease either way — without `--etcd` in the coordinator's
//! in-memory registry (`fathom worker --registry ADDR`: the coordinator starts first, in this
//! process, and serves it on its port), with `--etcd URL` in etcd — and the coordinator forms
//! its plans from the live registrations (one code path).
//!
//! Worker loss: a worker that exits is restarted with the same id and address (as a Kubernetes
//! StatefulSet restarts a pod; `--no-restart` disables it); the coordinator migrates the
//! requests of the failed epoch and resumes them on the next epoch, which takes the restarted
//! worker back. Each start prints `fathom: worker ID pid P on ADDR` on stderr.
//!
//! Without `--model` the `tiny` preset is synthesized once into the cache directory
//! (`--cache-dir`, default `$XDG_CACHE_HOME/fathom` or `~/.cache/fathom`, resolved by `main`).
//!
//! The OpenAI-compatible HTTP API is always on here (`--http-port`, default any free port); its
//! URL is printed after the gRPC address as `fathom: http on http://127.0.0.1:P/v1`.
//!
//! Children are owned by a guard that kills and reaps every one of them on every exit path
//! (success, error, Ctrl-C): no process outlives `fathom up`.

use crate::client::{GenerateArgs, generate_remote};
use crate::coordinator::{CoordinatorArgs, start_coordinator, wait_serving};
use crate::telemetry::TelemetryArgs;
use anyhow::{Context, Result, bail};
use clap::Args;
use fathom_common::ModelConfig;
use fathom_common::cluster::ClusterConfig;
use fathom_proto::v1::ShutdownRequest;
use fathom_proto::v1::worker_client::WorkerClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Model directory; default: the synthesized `tiny` checkpoint in the cache directory.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Worker processes (W).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Tensor-parallel size T (divides W).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Coordinator port (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Port of the OpenAI-compatible HTTP API (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub http_port: u16,
    /// etcd client URL for membership (default: workers given to the coordinator directly).
    #[arg(long)]
    pub etcd: Option<String>,
    /// `cpu`, `cuda` (with several workers: worker i on GPU i) or `cuda:N` (every worker on GPU N).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Send one prompt, print the streamed answer and timings, then shut down.
    #[arg(long, conflicts_with = "prompt_ids")]
    pub prompt: Option<String>,
    /// The prompt as token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: u32,
    /// Do not stop at EOS (exactly `--max-new-tokens` tokens).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print the answer as one JSON object (as `fathom generate --json`).
    #[arg(long)]
    pub json: bool,
    /// Where the synthesized model is cached.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// KV blocks per group.
    #[arg(long, default_value_t = 512)]
    pub kv_blocks: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub kv_block_size: usize,
    /// Admin API token (default: FATHOM_ADMIN_TOKEN, else a random one, printed to stderr).
    #[arg(long, env = "FATHOM_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// How long to wait for the workers to load and the cluster to serve.
    #[arg(long, default_value_t = 120)]
    pub ready_timeout_s: u64,
    /// The coordinator's Prometheus `/metrics` address (port 0: any free port; empty: off).
    /// Each worker serves its own on a free port, printed on stderr.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_listen: String,
    /// Do not restart a worker that exits (by default it is restarted with the same id and
    /// address, as a Kubernetes StatefulSet would, and rejoins at the next epoch).
    #[arg(long)]
    pub no_restart: bool,
    /// How long requests of a failed epoch wait to resume on a new one, in ms.
    #[arg(long, default_value_t = 30_000)]
    pub migrate_timeout_ms: u64,
}

/// One worker process as `fathom up` runs it (like a StatefulSet pod: a stable id and address).
#[derive(Debug)]
struct WorkerProc {
    id: String,
    addr: String,
    child: Child,
    started: Instant,
    /// Exits within [`QUICK_EXIT`] of starting, in a row.
    quick_exits: u32,
}

/// Every worker process; killed and reaped on drop. Dead workers are restarted with the same id
/// and address (unless disabled), so the coordinator's next epoch can take them back.
#[derive(Debug)]
struct Children {
    exe: PathBuf,
    config: PathBuf,
    /// The coordinator's registry address (clusters without etcd).
    registry: Option<String>,
    restart: bool,
    workers: Vec<WorkerProc>,
    /// Metrics and telemetry flags every worker gets.
    extra_args: Vec<String>,
    /// `--device` of each worker id ([`worker_device`]).
    devices: std::collections::HashMap<String, String>,
}

/// The `--device` worker `index` of `workers` gets from `fathom up --device D`: a bare `cuda`
/// with several workers means one GPU per worker, `cuda:<index>` (a machine with fewer GPUs
/// makes the extra workers fail at start in one line); anything else (`cpu`, `cuda:N`) is
/// passed to every worker as is.
pub fn worker_device(device: &str, index: usize, workers: usize) -> String {
    if device == "cuda" && workers > 1 { format!("cuda:{index}") } else { device.to_string() }
}

/// The flags `fathom up` passes on to each worker: a free metrics port when the coordinator
/// serves metrics, and the telemetry settings (log format, OTLP endpoint).
fn worker_extra_args(args: &UpArgs, telemetry: &TelemetryArgs) -> Vec<String> {
    let metrics = if args.metrics_listen.is_empty() { "" } else { "127.0.0.1:0" };
    let mut v = vec!["--metrics-listen".to_string(), metrics.to_string()];
    v.extend(telemetry.child_args());
    v
}

/// A worker exiting this soon after its start counts as a failed start.
const QUICK_EXIT: Duration = Duration::from_secs(3);
/// Failed starts in a row after which `fathom up` gives up on a worker.
const MAX_QUICK_EXITS: u32 = 5;

impl Children {
    fn spawn(&self, id: &str, addr: &str) -> Result<Child> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("worker").arg("--config").arg(&self.config).args([
            "--id",
            id,
            "--listen",
            addr,
            "--advertise",
            addr,
        ]);
        if let Some(r) = &self.registry {
            cmd.args(["--registry", r]);
        }
        cmd.args(&self.extra_args);
        if let Some(d) = self.devices.get(id) {
            cmd.args(["--device", d]);
        }
        let child =
            cmd.stdin(Stdio::null()).spawn().with_context(|| format!("spawning worker {id}"))?;
        say!("fathom: worker {id} pid {} on {addr}", child.id());
        Ok(child)
    }

    fn start(&mut self, id: String, addr: String) -> Result<()> {
        let child = self.spawn(&id, &addr)?;
        self.workers.push(WorkerProc { id, addr, child, started: Instant::now(), quick_exits: 0 });
        Ok(())
    }

    /// Restarts workers that exited (or fails when restarting is off, or a worker keeps failing
    /// to start).
    fn check(&mut self) -> Result<()> {
        for i in 0..self.workers.len() {
            let Some(status) = self.workers[i].child.try_wait()? else { continue };
            let w = &self.workers[i];
            if !self.restart {
                bail!("worker {} exited with {status}", w.id);
            }
            let quick = if w.started.elapsed() < QUICK_EXIT { w.quick_exits + 1 } else { 0 };
            if quick >= MAX_QUICK_EXITS {
                bail!("worker {} failed to start {quick} times in a row (last: {status})", w.id);
            }
            say!("fathom: worker {} exited with {status}; restarting it", w.id);
            let child = self.spawn(&w.id, &w.addr)?;
            let w = &mut self.workers[i];
            (w.child, w.started, w.quick_exits) = (child, Instant::now(), quick);
        }
        Ok(())
    }

    /// Waits up to `grace` for every child to exit by itself, then kills the rest.
    fn reap(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        for w in &mut self.workers {
            while Instant::now() < deadline {
                if matches!(w.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for mut w in self.workers.drain(..) {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.reap(Duration::ZERO);
    }
}

/// The model directory to serve: `--model`, or the `tiny` preset synthesized into `cache`.
fn model_dir(args: &UpArgs, cache: &Path) -> Result<PathBuf> {
    if let Some(m) = &args.model {
        return Ok(m.clone());
    }
    let dir = cache.join("tiny-f32-seed0");
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    say!("fathom: synthesizing the tiny model into {}", dir.display());
    // Synthesize beside the target and rename, so a crash never leaves a half-written model.
    let tmp = cache.join(format!("tiny-f32-seed0.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let opts = fathom_worker::weights::SynthOptions::default();
    fathom_worker::weights::synth_checkpoint(&ModelConfig::tiny(), &opts, &tmp)
        .context("synthesizing the tiny checkpoint")?;
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join("config.json").exists() {
            return Err(e).context("moving the synthesized model into place");
        }
    }
    Ok(dir)
}

/// `fathom up`. `cache` is the resolved cache directory.
pub fn run(args: &UpArgs, cache: &Path, telemetry: &TelemetryArgs) -> Result<()> {
    if args.workers == 0 || args.tp == 0 || args.workers % args.tp != 0 {
        bail!("--tp {} must divide --workers {} (both >= 1)", args.tp, args.workers);
    }
    let model = model_dir(args, cache)?;
    let run_dir = tempfile::Builder::new().prefix("fathom-up-").tempdir()?;
    let mut cfg = ClusterConfig::from_toml_str("", "defaults")?;
    cfg.model.path = model.clone();
    cfg.parallel.world_size = args.workers;
    cfg.parallel.tp = args.tp;
    cfg.worker.device = args.device.clone();
    if let Some(e) = &args.etcd {
        cfg.membership.etcd_endpoints = vec![e.clone()];
    }
    cfg.coordinator.listen = format!("127.0.0.1:{}", args.port);
    cfg.coordinator.http_listen = format!("127.0.0.1:{}", args.http_port);
    cfg.coordinator.kv_blocks = args.kv_blocks;
    cfg.coordinator.kv_block_size = args.kv_block_size;
    cfg.validate()?;
    let config_path = run_dir.path().join("cluster.toml");
    std::fs::write(&config_path, cfg.to_toml())?;

    let exe = std::env::current_exe().context("locating the fathom binary")?;
    // Distinct ports: every probe listener stays bound until all are picked.
    let probes = (0..args.workers)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("picking worker ports")?;
    let ports = probes
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<Vec<_>>>()?;
    drop(probes);
    let workers: Vec<(String, String)> = ports
        .into_iter()
        .enumerate()
        .map(|(i, port)| (format!("w{i}"), format!("127.0.0.1:{port}")))
        .collect();
    let mut children = Children {
        exe,
        config: config_path.clone(),
        registry: None,
        restart: !args.no_restart,
        workers: Vec::new(),
        extra_args: worker_extra_args(args, telemetry),
        devices: workers
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (id.clone(), worker_device(&args.device, i, args.workers)))
            .collect(),
    };
    // Workers register through membership: etcd with `--etcd`, else the coordinator's own
    // in-memory registry (the coordinator starts first so its address is known).
    let coord_args = CoordinatorArgs {
        config: Some(config_path.clone()),
        listen: None,
        http: None,
        model: None,
        world_size: None,
        tp: None,
        static_workers: Vec::new(),
        admin_token: Some(match &args.admin_token {
            Some(t) => t.clone(),
            None => {
                let t = random_token()?;
                say!("fathom: admin token {t}");
                t
            }
        }),
        kv_blocks: None,
        kv_block_size: None,
        max_queue: None,
        max_step_tokens: None,
        max_batch: None,
        step_timeout_ms: None,
        metrics_listen: Some(args.metrics_listen.clone()),
        watchdog_ms: None,
        migrate_timeout_ms: args.migrate_timeout_ms,
        ha_id: None,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(serve(args, &coord_args, &mut children, &workers));
    let addrs: Vec<String> = workers.iter().map(|(_, a)| a.clone()).collect();
    rt.block_on(stop_workers(&addrs));
    children.reap(Duration::from_secs(5));
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// 128 random bits as hex, from the OS.
fn random_token() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom for an admin token")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

async fn serve(
    args: &UpArgs,
    coord_args: &CoordinatorArgs,
    children: &mut Children,
    workers: &[(String, String)],
) -> Result<()> {
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let (mut c, metrics) = start_coordinator(coord_args, async move {
        let _ = rx.wait_for(|s| *s).await;
    })
    .await?;
    if let Some(a) = metrics {
        println!("fathom: metrics on http://{a}/metrics");
    }
    if args.etcd.is_none() {
        children.registry = Some(c.addr.to_string());
    }
    for (id, addr) in workers {
        children.start(id.clone(), addr.clone())?;
    }
    let ready = Duration::from_secs(args.ready_timeout_s);
    let started = Instant::now();
    tokio::select! {
        r = wait_serving(&mut c, ready) => r?,
        _ = tokio::signal::ctrl_c() => { let _ = tx.send(true); bail!("interrupted") }
        r = watch_children(children) => { let _ = tx.send(true); r?; }
    }
    println!("fathom: serving on {}", c.addr);
    if let Some(h) = c.http_addr {
        println!("fathom: http on http://{h}/v1");
    }
    say!("fathom: cluster ready in {:.1} s", started.elapsed().as_secs_f64());
    let outcome = if args.prompt.is_some() || args.prompt_ids.is_some() {
        let g = GenerateArgs {
            model: None,
            endpoint: Some(c.addr.to_string()),
            prompt: args.prompt.clone(),
            prompt_ids: args.prompt_ids.clone(),
            max_new_tokens: args.max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop_ids: Vec::new(),
            ignore_eos: args.ignore_eos,
            json: args.json,
            logits_topk: 0,
            return_routed_experts: false,
            return_logprobs: false,
            world_size: 1,
            tp: 1,
            comm: "local".into(),
            device: args.device.clone(),
            timeout_ms: 0,
        };
        let endpoint = c.addr.to_string();
        tokio::select! {
            r = generate_remote(&endpoint, &g, !args.json) => r.and_then(|(out, t)| {
                out.print(args.json)?;
                t.print();
                Ok(())
            }),
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    } else {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = term.recv() => Ok(()),
            r = watch_children(children) => r,
        }
    };
    let _ = tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), &mut c.server).await;
    outcome
}

/// Restarts workers that exit; resolves with an error when that is not possible.
async fn watch_children(children: &mut Children) -> Result<()> {
    loop {
        children.check()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks every worker to stop (best effort, bounded).
async fn stop_workers(addrs: &[String]) {
    for a in addrs {
        let call = async {
            let mut w = WorkerClient::connect(format!("http://{a}")).await.ok()?;
            w.shutdown(ShutdownRequest { reason: "fathom up is stopping".into(), grace_ms: 1000 })
                .await
                .ok()
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), call).await;
    }
}

#[cfg(test)]
mod tests {
    use super::worker_device;

    #[test]
    fn bare_cuda_gives_each_worker_its_gpu() {
        assert_eq!(worker_device("cuda", 0, 2), "cuda:0");
        assert_eq!(worker_device("cuda", 1, 2), "cuda:1");
        assert_eq!(worker_device("cuda", 0, 1), "cuda");
        assert_eq!(worker_device("cuda:1", 0, 2), "cuda:1");
        assert_eq!(worker_device("cpu", 1, 2), "cpu");
    }
}
