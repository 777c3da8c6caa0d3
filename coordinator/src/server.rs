//! The coordinator process's gRPC server: Inference, Admin, `grpc.health.v1` and reflection on
//! one listener, with the engine behind them.
//!
//! Health: the overall status ("") and `fathom.v1.Inference` are SERVING only while the engine
//! serves an epoch (NOT_SERVING while waiting for workers, preparing, or reconfiguring).
//! Message limits: requests above [`MAX_REQUEST_BYTES`] are refused by tonic.
//! When `coordinator.http_listen` is set, the OpenAI-compatible HTTP API (`crate::http`) is served
//! there too, over the same engine, with the same body limit; it stops with the gRPC server.

use crate::api::admin::AdminApi;
use crate::api::inference::InferenceApi;
use crate::engine::detok::TextCodec;
use crate::engine::{
    EngineConfig, EngineHandle, ServingState, WorkerDirectory, spawn_engine_with_metrics,
};
use crate::metrics::CoordinatorMetrics;
use fathom_common::ModelConfig;
use fathom_common::cluster::ClusterConfig;
use fathom_proto::v1::admin_server::AdminServer;
use fathom_proto::v1::inference_server::InferenceServer;
use futures::FutureExt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

/// Largest Generate/ModelInfo request accepted (a prompt of ~1M token ids fits).
pub const MAX_REQUEST_BYTES: usize = 8 << 20;

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("model config: {0}")]
    Model(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("listening: {0}")]
    Listen(String),
}

/// A started coordinator.
#[derive(Debug)]
pub struct Coordinator {
    pub addr: SocketAddr,
    /// Where the OpenAI-compatible HTTP API listens (`None`: not enabled).
    pub http_addr: Option<SocketAddr>,
    pub engine: EngineHandle,
    pub state: watch::Receiver<ServingState>,
    pub server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Settings of [`start_with`] beyond the cluster config.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// A step not answered by every rank within this time fails its epoch.
    pub step_timeout: Duration,
    /// A step outstanding this long is reported by the watchdog.
    pub watchdog: Duration,
    /// How long requests of a failed epoch wait to resume on a new one (0: they fail at once).
    pub migrate_timeout: Duration,
    /// The in-memory membership registry workers register with (clusters without etcd).
    pub registry: Option<crate::membership::RegistryService>,
    /// The engine's metrics (registered by the caller, who serves them; default: registered
    /// nowhere).
    pub metrics: Arc<CoordinatorMetrics>,
}

impl StartOptions {
    /// Defaults for `step_timeout`: watchdog at a quarter of it, requests held 30 s, no registry.
    pub fn new(step_timeout: Duration) -> Self {
        Self {
            step_timeout,
            watchdog: step_timeout / 4,
            migrate_timeout: Duration::from_secs(30),
            registry: None,
            metrics: Arc::new(CoordinatorMetrics::detached()),
        }
    }
}

/// Starts the engine and the gRPC server on `listener`; the server stops when `shutdown`
/// completes. The engine's metrics are registered nowhere (see [`StartOptions::metrics`]).
pub async fn start(
    cfg: &ClusterConfig,
    directory: Arc<dyn WorkerDirectory>,
    listener: TcpListener,
    step_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Coordinator, ServerError> {
    start_with(cfg, directory, listener, StartOptions::new(step_timeout), shutdown).await
}

/// [`start`] with [`StartOptions`]: also serves `fathom.v1.Registry` when a registry is given.
pub async fn start_with(
    cfg: &ClusterConfig,
    directory: Arc<dyn WorkerDirectory>,
    listener: TcpListener,
    opts: StartOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Coordinator, ServerError> {
    let step_timeout = opts.step_timeout;
    let model_dir = &cfg.model.path;
    let model = ModelConfig::from_file(&model_dir.join("config.json"))
        .map_err(|e| ServerError::Model(e.to_string()))?;
    let codec =
        TextCodec::load_dir(model_dir).map_err(|e| ServerError::Tokenizer(e.to_string()))?;
    let c = &cfg.coordinator;
    let max_context = model.max_position_embeddings.min(c.kv_blocks * c.kv_block_size);
    let engine_cfg = EngineConfig {
        max_queue: c.max_queue,
        max_step_tokens: c.max_step_tokens,
        max_batch: c.max_batch,
        kv_block_size: c.kv_block_size,
        kv_blocks: c.kv_blocks,
        step_timeout,
        watchdog: opts.watchdog,
        migrate_timeout: opts.migrate_timeout,
        world_size: cfg.parallel.world_size,
        tp: cfg.parallel.tp,
        min_world_size: cfg.parallel.min_world(),
        max_world_size: cfg.parallel.max_world(),
        model_path: model_dir.display().to_string(),
        comm: cfg.worker.comm.clone(),
        eos_ids: model.eos_ids(),
        cluster: cfg.cluster.clone(),
        experts: crate::experts::ExpertsConfig::from_cluster(cfg),
    };
    let (engine, state) = spawn_engine_with_metrics(
        engine_cfg,
        model.clone(),
        codec.clone(),
        directory,
        opts.metrics.clone(),
    );
    let shutdown = shutdown.shared();
    let http_addr = if c.http_listen.is_empty() {
        None
    } else {
        let limits =
            crate::api::validate::RequestLimits { vocab_size: model.vocab_size, max_context };
        let served = crate::http::Served::new(model_name(model_dir), codec.clone(), limits);
        let api =
            crate::http::HttpApi::new(engine.clone(), served, model.eos_ids(), MAX_REQUEST_BYTES);
        let http = TcpListener::bind(&c.http_listen)
            .await
            .map_err(|e| ServerError::Listen(format!("http {}: {e}", c.http_listen)))?;
        let addr = http.local_addr().map_err(|e| ServerError::Listen(e.to_string()))?;
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(http, Arc::new(api), stop).await {
                tracing::error!("http server on {addr}: {e}");
            }
        });
        Some(addr)
    };
    let inference =
        InferenceApi::new(engine.clone(), model, model_name(model_dir), codec, max_context);
    let admin = AdminApi::new(engine.clone(), c.admin_token.clone(), cfg.cluster.clone());

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter.set_not_serving::<InferenceServer<InferenceApi>>().await;
    reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    let mut watch_state = state.clone();
    tokio::spawn(async move {
        loop {
            let serving = *watch_state.borrow_and_update() == ServingState::Serving;
            let status = if serving {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            if serving {
                reporter.set_serving::<InferenceServer<InferenceApi>>().await;
            } else {
                reporter.set_not_serving::<InferenceServer<InferenceApi>>().await;
            }
            if watch_state.changed().await.is_err() {
                break;
            }
        }
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fathom_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let addr = listener.local_addr().map_err(|e| ServerError::Listen(e.to_string()))?;
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(InferenceServer::new(inference).max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_service(AdminServer::new(admin).max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_optional_service(opts.registry.map(|r| r.into_server()));
    let server = tokio::spawn(
        router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown),
    );
    Ok(Coordinator { addr, http_addr, engine, state, server })
}

fn model_name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}
