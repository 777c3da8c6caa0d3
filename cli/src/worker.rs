//! `fathom worker`: one worker process (one rank), as Kubernetes runs it.
//!
//! Reads the cluster config (`--config`, the file the Helm chart writes), applies flags, serves
//! `fathom.v1.Worker` on `--listen` and waits for the coordinator's PrepareEpoch. Exits on the
//! Shutdown RPC, Ctrl-C or SIGTERM. Prints `fathom: worker ID listening on ADDR` to stderr once
//! the port is bound.
//!
//! Membership: with `membership.etcd_endpoints` the worker registers in etcd; with `--registry
//! ADDR` (a cluster without etcd) in the coordinator's in-memory registry over gRPC — the same
//! `Membership::register_worker` either way (a lease kept alive at TTL/2, re-acquired after an
//! outage). The first registration is retried while the store is unreachable or the previous
//! incarnation's lease still holds the id (a restarted worker), so start order does not matter.

use anyhow::{Context, Result, bail};
use clap::Args;
use fathom_common::cluster::ClusterConfig;
use fathom_coordinator::membership::{
    EtcdMembership, EtcdOptions, LeaseState, Membership, Registration, RemoteMembership,
    RemoteStore, WorkerId, WorkerInfo,
};
use fathom_proto::v1::worker_server::WorkerServer;
use fathom_worker::executor::DefaultFactory;
use fathom_worker::metrics::WorkerMetrics;
use fathom_worker::service::WorkerService;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_stream::wrappers::TcpListenerStream;

/// Largest step message accepted from the coordinator.
const MAX_STEP_BYTES: usize = 64 << 20;
/// How long open streams may delay the exit after a stop request.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Cluster config file (TOML, as the Helm chart writes it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Stable worker id (its membership key).
    #[arg(long)]
    pub id: String,
    /// Address the coordinator reaches this worker on (default: the listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Listen address (overrides `worker.listen`).
    #[arg(long)]
    pub listen: Option<String>,
    /// `cpu` or `cuda[:N]` (overrides `worker.device`).
    #[arg(long)]
    pub device: Option<String>,
    /// Prometheus `/metrics` listen address (overrides `worker.metrics_listen`; empty: off).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Register in the coordinator's in-memory membership at `HOST:PORT` (clusters without
    /// etcd, e.g. `fathom up`).
    #[arg(long)]
    pub registry: Option<String>,
}

/// How long a worker keeps retrying its first registration.
const REGISTER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

/// Registers in etcd membership when the config names endpoints, else in the coordinator's
/// registry when `registry` is given (lease kept alive until the returned registration is
/// released or dropped).
async fn register(
    cfg: &ClusterConfig,
    id: &str,
    bound: std::net::SocketAddr,
    registry: Option<&str>,
) -> Result<Option<Registration>> {
    let m: Arc<dyn Membership> = if !cfg.membership.etcd_endpoints.is_empty() {
        Arc::new(
            EtcdMembership::connect(
                &cfg.membership.etcd_endpoints,
                &cfg.cluster,
                EtcdOptions::default(),
            )
            .await
            .context("connecting to etcd")?,
        )
    } else if let Some(addr) = registry {
        let store = RemoteStore::new(addr, std::time::Duration::from_secs(2))?;
        Arc::new(RemoteMembership::with_store(store, &cfg.cluster)?)
    } else {
        return Ok(None);
    };
    let info = WorkerInfo {
        id: WorkerId::new(id)?,
        address: cfg.worker.advertise.clone().unwrap_or_else(|| bound.to_string()),
        device: cfg.worker.device.clone(),
        memory_bytes: 0,
    };
    let ttl = std::time::Duration::from_secs(cfg.membership.lease_ttl_s);
    let started = std::time::Instant::now();
    let r = loop {
        match m.register_worker(info.clone(), ttl).await {
            Ok(r) => break r,
            Err(e) if e.retryable() && started.elapsed() < REGISTER_PATIENCE => {
                tracing::debug!(error = %e, "registration not possible yet; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e).context("registering in membership"),
        }
    };
    say!("fathom: worker {id} registered in cluster {}", cfg.cluster);
    Ok(Some(r))
}

/// Loads `--config` (or defaults) for either role.
pub fn load_config(path: Option<&PathBuf>) -> Result<ClusterConfig> {
    Ok(match path {
        Some(p) => ClusterConfig::from_file(p)?,
        None => ClusterConfig::from_toml_str("", "defaults")?,
    })
}

pub fn run(args: &WorkerArgs) -> Result<()> {
    let mut cfg = load_config(args.config.as_ref())?;
    if let Some(l) = &args.listen {
        cfg.worker.listen = l.clone();
    }
    if let Some(d) = &args.device {
        cfg.worker.device = d.clone();
    }
    if let Some(a) = &args.advertise {
        cfg.worker.advertise = Some(a.clone());
    }
    if let Some(m) = &args.metrics_listen {
        cfg.worker.metrics_listen = m.clone();
    }
    cfg.validate()?;
    let factory = executor_factory(&cfg.worker.device)?;
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(serve(cfg, args.id.clone(), factory, args.registry.clone()));
    // A step still running on a blocking thread must not hold the exit.
    rt.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

/// `cpu`: the reference executors ([`DefaultFactory`]); `cuda[:N]`: the GPU executor on GPU N
/// (opened now, so a machine without a driver fails at start in one line).
fn executor_factory(device: &str) -> Result<Arc<dyn fathom_worker::executor::ExecutorFactory>> {
    use fathom_worker::model_cuda::{DeviceChoice, executor::CudaFactory, open_gpu};
    match device.parse::<DeviceChoice>().map_err(|e| anyhow::anyhow!(e))? {
        DeviceChoice::Cpu => Ok(Arc::new(DefaultFactory)),
        DeviceChoice::Cuda(n) => {
            let lib_dirs: Vec<PathBuf> = std::env::var_os("FATHOM_CUDA_LIB_DIRS")
                .map(|v| std::env::split_paths(&v).collect())
                .unwrap_or_default();
            let cache =
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/fathom/kernels"));
            let dev = open_gpu(n, lib_dirs, cache.clone())?;
            let kc = cache.map(fathom_kernels::cuda::KernelCache::new);
            Ok(Arc::new(CudaFactory::new(dev, kc)))
        }
    }
}

async fn serve(
    cfg: ClusterConfig,
    id: String,
    factory: Arc<dyn fathom_worker::executor::ExecutorFactory>,
    registry: Option<String>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(&cfg.worker.listen)
        .await
        .with_context(|| format!("binding {}", cfg.worker.listen))?;
    let addr = listener.local_addr()?;
    let prom = prometheus::Registry::new();
    let metrics = Arc::new(WorkerMetrics::register(&prom)?);
    if !cfg.worker.metrics_listen.is_empty() {
        let a = crate::telemetry::start_metrics(&cfg.worker.metrics_listen, prom).await?;
        say!("fathom: worker {id} metrics on http://{a}/metrics");
    }
    let service =
        WorkerService::new(id.clone(), cfg.worker.device.clone(), factory).with_metrics(metrics);
    let mut stop = service.shutdown_signal();
    say!("fathom: worker {id} listening on {addr}");
    // Serve while registering: the coordinator may probe this worker before the registration
    // succeeds (e.g. while the previous incarnation's lease still holds the id).
    let registering = {
        let (cfg, id, flag) = (cfg.clone(), id.clone(), service.lease_flag());
        tokio::spawn(async move {
            let registration = register(&cfg, &id, addr, registry.as_deref()).await?;
            if let Some(r) = &registration {
                let mut states = r.subscribe();
                tokio::spawn(async move {
                    loop {
                        let held = matches!(*states.borrow_and_update(), LeaseState::Held { .. });
                        flag.store(held, std::sync::atomic::Ordering::Relaxed);
                        if states.changed().await.is_err() {
                            break;
                        }
                    }
                });
            }
            anyhow::Ok(registration)
        })
    };
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                WorkerServer::new(service)
                    .max_decoding_message_size(MAX_STEP_BYTES)
                    .max_encoding_message_size(MAX_STEP_BYTES),
            )
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = rx.wait_for(|s| *s).await;
            }),
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut registering = registering;
    let mut registration = None;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            r = &mut registering, if registration.is_none() => {
                match r {
                    Ok(Ok(reg)) => registration = Some(reg),
                    Ok(Err(e)) => {
                        let _ = tx.send(true);
                        return Err(e);
                    }
                    Err(e) => bail!("registration task: {e}"),
                }
            }
        }
    }
    registering.abort();
    let _ = tx.send(true);
    // Graceful stop waits for open streams (the coordinator's step stream); bound it.
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(r)) => r.context("worker server")?,
        Ok(Err(e)) => bail!("worker server task: {e}"),
        Err(_) => {}
    }
    if let Some(r) = registration.flatten() {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, r.release()).await;
    }
    say!("fathom: worker {id} stopped");
    Ok(())
}
