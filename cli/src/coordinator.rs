//! `fathom coordinator`: the coordinator process, as Kubernetes runs it (and as `fathom up` runs
//! it in-process).
//!
//! Reads the cluster config, applies flags, starts the engine and the gRPC server, and prints
//! `fathom: serving on ADDR` on stdout once the first epoch serves (then, when the
//! OpenAI-compatible HTTP API is on, `fathom: http on http://ADDR/v1`). Exits on Ctrl-C or SIGTERM.
//!
//! Workers come from `--static-worker ID=HOST:PORT` (repeatable: a fixed list, only when asked
//! for), else from membership: etcd (`membership.etcd_endpoints`), or without etcd the
//! coordinator's own in-memory store, which it serves to the workers as `fathom.v1.Registry` on
//! its port (`fathom worker --registry ADDR`). Either way workers register with a lease and the
//! engine forms plans from the live ones; plans are published to the store.
//!
//! High availability (`--ha-id ID`, etcd only): the process campaigns for
//! `/fathom/<cluster>/coordinator/leader` before it starts serving; a standby waits in the
//! campaign and, when the leader's lease ends (it died), takes over: it forms the next epoch
//! (the stored plan's epoch + 1) over the live workers, which fences the old leader's steps.
//! A leader that loses its lease (etcd unreachable) keeps serving and campaigns again; it steps
//! down (exits with an error) only once etcd names another leader.

use crate::worker::load_config;
use anyhow::{Context, Result, bail};
use clap::Args;
use fathom_common::cluster::ClusterConfig;
use fathom_coordinator::directory::{MembershipDirectory, StaticDirectory};
use fathom_coordinator::engine::{ServingState, WorkerDirectory};
use fathom_coordinator::membership::{
    EtcdMembership, EtcdOptions, Leadership, Membership, MemoryMembership, MemoryStore,
    RegistryService,
};
use fathom_coordinator::metrics::CoordinatorMetrics;
use fathom_coordinator::server::{Coordinator, StartOptions, start_with};
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
    /// Admin API token (overrides `coordinator.admin_token`; default: FATHOM_ADMIN_TOKEN).
    #[arg(long, env = "FATHOM_ADMIN_TOKEN", hide_env_values = true)]
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
    /// A step outstanding this many ms is reported by the watchdog (default: a quarter of the
    /// step timeout).
    #[arg(long)]
    pub watchdog_ms: Option<u64>,
    /// How long requests of a failed epoch wait to resume on a new one, in ms (0: they end
    /// UNAVAILABLE at once).
    #[arg(long, default_value_t = 30_000)]
    pub migrate_timeout_ms: u64,
    /// High availability: campaign for leadership of the cluster in etcd as this candidate id;
    /// serve only while leading (a standby waits, then takes over the plan and the workers).
    #[arg(long)]
    pub ha_id: Option<String>,
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

    fn start_options(&self, cfg: &ClusterConfig) -> StartOptions {
        let mut o = StartOptions::new(self.step_timeout(cfg));
        if let Some(ms) = self.watchdog_ms {
            o.watchdog = Duration::from_millis(ms);
        }
        o.migrate_timeout = Duration::from_millis(self.migrate_timeout_ms);
        o
    }

    /// The worker directory, and the registry to serve when membership is in this process.
    async fn directory(
        &self,
        cfg: &ClusterConfig,
    ) -> Result<(Arc<dyn WorkerDirectory>, Option<RegistryService>)> {
        if !self.static_workers.is_empty() {
            return Ok((Arc::new(StaticDirectory::parse(&self.static_workers)?), None));
        }
        if !cfg.membership.etcd_endpoints.is_empty() {
            let m = EtcdMembership::connect(
                &cfg.membership.etcd_endpoints,
                &cfg.cluster,
                EtcdOptions::default(),
            )
            .await
            .context("connecting to etcd")?;
            return Ok((Arc::new(MembershipDirectory::new(Arc::new(m))), None));
        }
        let store = MemoryStore::new()?;
        let m = MemoryMembership::with_store(store.clone(), &cfg.cluster)?;
        let registry = RegistryService::new(store, m.keys().clone());
        Ok((Arc::new(MembershipDirectory::new(Arc::new(m))), Some(registry)))
    }
}

/// Starts a coordinator in this runtime; `shutdown` stops its server. Also returns the address
/// `/metrics` is served on (`None`: metrics off).
pub async fn start_coordinator(
    args: &CoordinatorArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(Coordinator, Option<std::net::SocketAddr>)> {
    let cfg = args.resolve()?;
    let (directory, registry) = args.directory(&cfg).await?;
    let prom = prometheus::Registry::new();
    let metrics = Arc::new(CoordinatorMetrics::register(&prom)?);
    let metrics_addr = match cfg.coordinator.metrics_listen.as_str() {
        "" => None,
        addr => Some(crate::telemetry::start_metrics(addr, prom).await?),
    };
    let listener = tokio::net::TcpListener::bind(&cfg.coordinator.listen)
        .await
        .with_context(|| format!("binding {}", cfg.coordinator.listen))?;
    let mut opts = args.start_options(&cfg);
    opts.registry = registry;
    opts.metrics = metrics;
    let c = start_with(&cfg, directory, listener, opts, shutdown).await?;
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

/// Becomes the leader of the cluster in etcd as `id` (waits while another coordinator leads).
async fn campaign(args: &CoordinatorArgs, id: &str) -> Result<(Arc<dyn Membership>, Leadership)> {
    let cfg = args.resolve()?;
    if cfg.membership.etcd_endpoints.is_empty() {
        bail!("--ha-id needs etcd (membership.etcd_endpoints)");
    }
    let m: Arc<dyn Membership> = Arc::new(
        EtcdMembership::connect(
            &cfg.membership.etcd_endpoints,
            &cfg.cluster,
            EtcdOptions::default(),
        )
        .await
        .context("connecting to etcd")?,
    );
    let ttl = Duration::from_secs(cfg.membership.lease_ttl_s);
    if let Ok(Some(leader)) = m.leader().await {
        say!("fathom: coordinator {id} stands by (leader: {leader})");
    }
    let l = m.campaign(id.to_string(), ttl).await.context("campaigning for leadership")?;
    say!("fathom: coordinator {id} leads cluster {}", cfg.cluster);
    Ok((m, l))
}

/// Resolves (with the reason) once another coordinator leads: after this one's leadership was
/// lost (e.g. etcd unreachable past the lease), it keeps serving and campaigns again; it only
/// gives up when etcd names another leader (who then owns the plan and the workers).
async fn superseded(m: Arc<dyn Membership>, id: String, mut leadership: Leadership) -> String {
    loop {
        leadership.lost().await;
        tracing::warn!("leadership lost; serving on while etcd names no other leader");
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match m.leader().await {
                Ok(Some(other)) if other != id => return format!("coordinator {other} leads now"),
                Ok(None) => {
                    let ttl = Duration::from_secs(2);
                    if let Ok(Ok(l)) = tokio::time::timeout(ttl, m.campaign(id.clone(), ttl)).await
                    {
                        say!("fathom: coordinator {id} leads again");
                        leadership = l;
                        break;
                    }
                }
                // Our own key (re-acquired elsewhere) or etcd unreachable: keep serving.
                _ => {}
            }
        }
    }
}

pub fn run(args: &CoordinatorArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut lead: std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>> =
            Box::pin(std::future::pending());
        if let Some(id) = &args.ha_id {
            let (m, l) = tokio::select! {
                r = campaign(args, id) => r?,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            lead = Box::pin(superseded(m, id.clone(), l));
        }
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
                why = &mut lead => {
                    let _ = tx.send(true);
                    bail!("stepping down: {why}");
                }
            }
        }
        let _ = tx.send(true);
        Ok(())
    })
}
