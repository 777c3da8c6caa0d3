//! `fathom admin drain WORKER` (wired temporarily as `fathom drain`): asks the coordinator's
//! Admin API to drain one worker — no new work goes to it, its sequences resume on an epoch
//! without it, and it is asked to shut down — and prints the epoch that excludes it.
//!
//! The call returns once that epoch serves (bounded by `--timeout-s`).

use anyhow::{Context, Result};
use clap::Args;
use fathom_proto::v1::DrainRequest;
use fathom_proto::v1::admin_client::AdminClient;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct DrainArgs {
    /// Worker id to drain.
    pub worker: String,
    /// Coordinator address (`host:port` or a URL).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub endpoint: String,
    /// Admin API token.
    #[arg(long)]
    pub admin_token: Option<String>,
}

/// How long a drain may take (a new epoch is prepared).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Drains `worker` through the Admin API at `endpoint`; prints the excluding epoch.
pub fn run_drain(endpoint: &str, token: Option<&str>, worker: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let epoch = rt.block_on(drain(endpoint, token, worker))?;
    println!("fathom: worker {worker} drained; epoch {epoch} serves without the drained process");
    Ok(())
}

/// The drain call itself (returns the epoch that excludes the worker).
pub async fn drain(endpoint: &str, token: Option<&str>, worker: &str) -> Result<u64> {
    let url =
        if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    let mut admin =
        AdminClient::connect(url.clone()).await.with_context(|| format!("connecting to {url}"))?;
    let mut req = tonic::Request::new(DrainRequest { worker_id: worker.to_string() });
    req.set_timeout(DRAIN_TIMEOUT);
    if let Some(t) = token {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().context("the admin token is not valid metadata")?,
        );
    }
    let r = admin
        .drain(req)
        .await
        .map_err(|s| anyhow::anyhow!("drain {worker}: {:?}: {}", s.code(), s.message()))?;
    Ok(r.into_inner().epoch)
}

/// `fathom drain` (temporary wiring until `fathom admin drain`).
pub fn run(args: &DrainArgs) -> Result<()> {
    run_drain(&args.endpoint, args.admin_token.as_deref(), &args.worker)
}
