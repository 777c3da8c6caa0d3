//! `fathom coordinator`: the coordinator process, as Kubernetes runs it (and as `fathom up` runs
//! it in-process).
//!
//! Reads the cluster config, applies flags, starts the engine and the gRPC server, and prints
//! `fathom: serving on ADDR` on stdout once the first epoch serves (then, when the
//! OpenAI-compatible HTTP API is on, `fathom: http on http://ADDR/v1`). Exits on Ctrl-C or SIGTERM.
//!
//! Workers come from `--static-worker ID=HOST:PORT` (repeatable), else from etcd membership
//! (`membership.etcd_endpoints`), where plans are also published.

use crate::worker::load_config;
use anyhow::{Context, Result, bail};
use clap::Args;
use fathom_common::cluster::ClusterConfig;
use fathom_coordinator::directory::{MembershipDirectory, StaticDirectory};
use fathom_coordinator::engine::{ServingState, WorkerDirectory};
use fathom_coordinator::membership::{EtcdMembership, EtcdOptions};
use fathom_coordinator::metrics::CoordinatorMetrics;
use fathom_coordinator::server::{Coordinator, start_with_metrics};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct CoordinatorArgs {
    /// Cluster config file (TOML, as the Helm chart writes it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Listen address (overrides `coordinator.listen`).
    #[arg(long)]
    pub listen: Option<String>,
    /// Serve the OpenAI-compatible HTTP API on ADDR, e.g. 0.0.0.0:8000 (overrides
    /// `coordinator.http_listen`; "" turns it off). Off unless given here or in the config.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// Model directory (overrides `model.path`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// World size W (overrides `parallel.world_size`).
    #[arg(long)]
    pub world_size: Option<usize>,
    /// Tensor-parallel size T (overrides `parallel.tp`).
    #[arg(long)]
    pub tp: Option<usize>,
    /// A worker given explicitly, `ID=HOST:PORT` (repeatable); replaces membership discovery.
    #[arg(long = "static-worker")]
    pub static_workers: Vec<String>,
    /// Admin API token (overrides `coordinator.admin_token`).
    #[arg(long)]
    pub admin_token: Option<String>,
    /// KV blocks per attention group (overrides `coordinator.kv_blocks`).
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// Tokens per KV block (overrides `coordinator.kv_block_size`).
    #[arg(long)]
    pub kv_block_size: Option<usize>,
    /// Admission queue bound (overrides `coordinator.max_queue`).
    #[arg(long)]
    pub max_queue: Option<usize>,
    /// Token budget per step and group (overrides `coordinator.max_step_tokens`).
    #[arg(long)]
    pub max_step_tokens: Option<usize>,
    /// Sequences per step and group (overrides `coordinator.max_batch`).
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// A step not answered by every rank within this many ms fails the epoch (default:
    /// `worker.step_deadline_s`).
    #[arg(long)]
    pub step_timeout_ms: Option<u64>,
    /// Prometheus `/metrics` listen address (overrides `coordinator.metrics_listen`; empty:
    /// off).
    #[arg(long)]
    pub metrics_listen: Option<String>,
}

impl CoordinatorArgs {
    /// The config file with the flags applied, validated.
    pub fn resolve(&self) -> Result<ClusterConfig> {
        let mut cfg = load_config(self.config.as_ref())?;
        let c = &mut cfg.coordinator;
        if let Some(v) = &self.listen {
            c.listen = v.clone();
        }
        if let Some(v) = &self.http {
            c.http_listen = v.clone();
        }
        if let Some(v) = &self.admin_token {
            c.admin_token = Some(v.clone());
        }
        if let Some(v) = self.kv_blocks {
            c.kv_blocks = v;
        }
        if let Some(v) = self.kv_block_size {
            c.kv_block_size = v;
        }
        if let Some(v) = self.max_queue {
            c.max_queue = v;
        }
        if let Some(v) = self.max_step_tokens {
            c.max_step_tokens = v;
        }
        if let Some(v) = self.max_batch {
            c.max_batch = v;
        }
        if let Some(v) = &self.metrics_listen {
            c.metrics_listen = v.clone();
        }
        if let Some(v) = &self.model {
            cfg.model.path = v.clone();
        }
        if let Some(v) = self.world_size {
            cfg.parallel.world_size = v;
        }
        if let Some(v) = self.tp {
            cfg.parallel.tp = v;
        }
        cfg.validate()?;
        if cfg.model.path.as_os_str().is_empty() {
            bail!("no model: give --model DIR or model.path in the config");
        }
        Ok(cfg)
    }

    fn step_timeout(&self, cfg: &ClusterConfig) -> Duration {
        self.step_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(cfg.worker.step_deadline_s))
    }

    async fn directory(&self, cfg: &ClusterConfig) -> Result<Arc<dyn WorkerDirectory>> {
        if !self.static_workers.is_empty() {
            return Ok(Arc::new(StaticDirectory::parse(&self.static_workers)?));
        }
        if !cfg.membership.etcd_endpoints.is_empty() {
            let m = EtcdMembership::connect(
                &cfg.membership.etcd_endpoints,
                &cfg.cluster,
                EtcdOptions::default(),
            )
            .await
            .context("connecting to etcd")?;
            return Ok(Arc::new(MembershipDirectory::new(Arc::new(m))));
        }
        bail!("no workers: give --static-worker ID=HOST:PORT or membership.etcd_endpoints");
    }
}

/// Starts a coordinator in this runtime; `shutdown` stops its server. Also returns the address
/// `/metrics` is served on (`None`: metrics off).
pub async fn start_coordinator(
    args: &CoordinatorArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(Coordinator, Option<std::net::SocketAddr>)> {
    let cfg = args.resolve()?;
    let directory = args.directory(&cfg).await?;
    let registry = prometheus::Registry::new();
    let metrics = Arc::new(CoordinatorMetrics::register(&registry)?);
    let metrics_addr = match cfg.coordinator.metrics_listen.as_str() {
        "" => None,
        addr => Some(crate::telemetry::start_metrics(addr, registry).await?),
    };
    let listener = tokio::net::TcpListener::bind(&cfg.coordinator.listen)
        .await
        .with_context(|| format!("binding {}", cfg.coordinator.listen))?;
    let step_timeout = args.step_timeout(&cfg);
    let c = start_with_metrics(&cfg, directory, listener, step_timeout, shutdown, metrics).await?;
    Ok((c, metrics_addr))
}

/// Waits until the coordinator serves (or its server ends).
pub async fn wait_serving(c: &mut Coordinator, timeout: Duration) -> Result<()> {
    let mut state = c.state.clone();
    match tokio::time::timeout(timeout, state.wait_for(|s| *s == ServingState::Serving)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => bail!("the engine stopped before serving"),
        Err(_) => bail!(
            "not serving after {timeout:?} (state {:?}; are the workers up?)",
            *c.state.borrow()
        ),
    }
}

pub fn run(args: &CoordinatorArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let (mut c, metrics) = start_coordinator(args, async move {
            let _ = rx.wait_for(|s| *s).await;
        })
        .await?;
        if let Some(a) = metrics {
            println!("fathom: metrics on http://{a}/metrics");
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let mut announced = false;
        let mut state = c.state.clone();
        loop {
            if !announced && *state.borrow_and_update() == ServingState::Serving {
                println!("fathom: serving on {}", c.addr);
                if let Some(h) = c.http_addr {
                    println!("fathom: http on http://{h}/v1");
                }
                announced = true;
            }
            tokio::select! {
                r = state.changed() => if r.is_err() { break },
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                r = &mut c.server => { r??; break }
            }
        }
        let _ = tx.send(true);
        Ok(())
    })
}
