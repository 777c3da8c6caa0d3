//! `fathom admin`: the operator client of the coordinator's `fathom.v1.Admin` service (CLI.md).
//!
//! `fathom admin --endpoint URL [--token T] [--json] status | experts load | experts set ... |
//! experts rebalance [--dry-run]`. The token goes as `authorization: Bearer T` on every call
//! (`--token`, else `FATHOM_ADMIN_TOKEN`, resolved by clap in `main`). Without `--json` each
//! command prints a short table; with it one JSON object on stdout.
//!
//! Adding a subcommand: one [`AdminCommand`] variant and one arm in [`run_command`] calling an
//! `async fn(&mut Client, ...) -> Result<Value>` that returns the JSON; `print` renders it.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use fathom_proto::v1::admin_client::AdminClient;
use fathom_proto::v1::{
    ClusterStatusRequest, DrainRequest, ExpertLoadRequest, ExpertReplicaCount, ExplicitReplicas,
    RebalanceRequest, SetExpertReplicasRequest, set_expert_replicas_request,
};
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::Channel;

#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// Coordinator gRPC endpoint, e.g. http://127.0.0.1:50051 (or HOST:PORT).
    #[arg(long)]
    pub endpoint: String,
    /// Admin token (default: the FATHOM_ADMIN_TOKEN environment variable).
    #[arg(long, env = "FATHOM_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AdminCommand {
    /// Workers, ranks, groups, epoch and KV usage.
    Status,
    /// Drain a worker: no new work goes to it, its sequences resume on an epoch without it
    /// (no client sees an error), then it is asked to shut down. Returns once that epoch serves.
    Drain {
        /// Worker id (as in `status`).
        worker: String,
    },
    /// Expert load and replicas.
    #[command(subcommand)]
    Experts(ExpertsCommand),
}

/// How long a drain may take (a new epoch is prepared and the worker's sequences migrate).
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Debug, Clone, Subcommand)]
pub enum ExpertsCommand {
    /// Tokens per expert over the load window, per-rank load, balancedness.
    Load,
    /// Set replica counts: `redundant N`, or `LAYER:EXPERT=COUNT ...` (LAYER may be `*`: every
    /// MoE layer). Applied live at a step boundary once the workers loaded the weights.
    Set {
        /// `redundant N` or one or more `LAYER:EXPERT=COUNT`.
        #[arg(required = true, num_args = 1..)]
        spec: Vec<String>,
    },
    /// Recompute the placement from the measured load (EPLB-style) and apply it live.
    Rebalance {
        /// Report what would change without applying it.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Debug, Clone)]
struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Client = AdminClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

pub fn run(args: AdminArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let out = rt.block_on(async {
        let url = if args.endpoint.contains("://") {
            args.endpoint.clone()
        } else {
            format!("http://{}", args.endpoint)
        };
        let channel = tonic::transport::Endpoint::from_shared(url)
            .with_context(|| format!("endpoint {:?}", args.endpoint))?
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.endpoint))?;
        let auth = match &args.token {
            Some(t) => {
                Some(format!("Bearer {t}").parse().context("the admin token is not valid ASCII")?)
            }
            None => None,
        };
        let mut client = AdminClient::with_interceptor(channel, Auth(auth));
        run_command(&mut client, &args.command).await
    })?;
    print(&args.command, &out, args.json);
    Ok(())
}

async fn run_command(c: &mut Client, cmd: &AdminCommand) -> Result<Value> {
    match cmd {
        AdminCommand::Status => status(c).await,
        AdminCommand::Drain { worker } => drain(c, worker).await,
        AdminCommand::Experts(ExpertsCommand::Load) => expert_load(c).await,
        AdminCommand::Experts(ExpertsCommand::Set { spec }) => set(c, spec).await,
        AdminCommand::Experts(ExpertsCommand::Rebalance { dry_run }) => {
            rebalance(c, *dry_run).await
        }
    }
}

/// One line naming the gRPC code and message.
fn rpc_error(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {:?}: {}", s.code(), s.message())
}

async fn drain(c: &mut Client, worker: &str) -> Result<Value> {
    let mut req = tonic::Request::new(DrainRequest { worker_id: worker.to_string() });
    req.set_timeout(DRAIN_TIMEOUT);
    let epoch = c
        .drain(req)
        .await
        .map_err(|e| rpc_error(&format!("drain {worker}"), e))?
        .into_inner()
        .epoch;
    Ok(json!({ "worker": worker, "epoch": epoch }))
}

async fn status(c: &mut Client) -> Result<Value> {
    let s = c
        .cluster_status(ClusterStatusRequest {})
        .await
        .map_err(|e| rpc_error("status", e))?
        .into_inner();
    Ok(json!({
        "cluster": s.cluster,
        "epoch": s.epoch,
        "state": s.state().as_str_name(),
        "world_size": s.world_size,
        "tp": s.tp,
        "queue_depth": s.queue_depth,
        "workers": s.workers.iter().map(|w| json!({
            "worker_id": w.worker_id, "address": w.address, "rank": w.rank, "group": w.group,
            "health": w.health().as_str_name(), "last_seen_ms": w.last_seen_ms,
        })).collect::<Vec<_>>(),
        "groups": s.groups.iter().map(|g| json!({
            "group": g.group, "ranks": g.ranks, "kv_blocks_used": g.kv_blocks_used,
            "kv_blocks_total": g.kv_blocks_total, "running_sequences": g.running_sequences,
        })).collect::<Vec<_>>(),
    }))
}

async fn expert_load(c: &mut Client) -> Result<Value> {
    let r = c
        .expert_load(ExpertLoadRequest { window_ms: 0 })
        .await
        .map_err(|e| rpc_error("experts load", e))?
        .into_inner();
    Ok(json!({
        "window_ms": r.window_ms,
        "window_steps": r.window_steps,
        "placement_version": r.placement_version,
        "pending_placement_version": r.pending_placement_version,
        "placement_steps": r.placement_steps,
        "balancedness": r.balancedness,
        "max_over_mean": r.max_over_mean,
        "rank_tokens": r.rank_tokens,
        "layers": r.layers.iter().map(|l| json!({
            "layer": l.layer, "tokens": l.tokens, "replicas": l.replicas,
            "rank_tokens": l.rank_tokens,
        })).collect::<Vec<_>>(),
    }))
}

/// Parses `LAYER:EXPERT=COUNT` (`LAYER` may be `*`).
fn parse_count(s: &str) -> Result<(Option<u32>, u32, u32)> {
    let bad = || anyhow::anyhow!("{s:?} is not LAYER:EXPERT=COUNT (or `redundant N`)");
    let (le, count) = s.split_once('=').ok_or_else(bad)?;
    let (layer, expert) = le.split_once(':').ok_or_else(bad)?;
    let layer = if layer == "*" { None } else { Some(layer.parse().map_err(|_| bad())?) };
    Ok((layer, expert.parse().map_err(|_| bad())?, count.parse().map_err(|_| bad())?))
}

async fn set(c: &mut Client, spec: &[String]) -> Result<Value> {
    let replicas = if spec[0] == "redundant" {
        let [_, n] = spec else { bail!("usage: experts set redundant N") };
        let n: u32 = n.parse().map_err(|_| anyhow::anyhow!("redundant {n:?}: not a count"))?;
        set_expert_replicas_request::Replicas::Redundant(n)
    } else {
        let parsed: Vec<_> = spec.iter().map(|s| parse_count(s)).collect::<Result<_>>()?;
        let every: Vec<u32> = if parsed.iter().any(|p| p.0.is_none()) {
            let load = c
                .expert_load(ExpertLoadRequest { window_ms: 0 })
                .await
                .map_err(|e| rpc_error("experts load", e))?
                .into_inner();
            load.layers.iter().map(|l| l.layer).collect()
        } else {
            Vec::new()
        };
        let mut experts = Vec::new();
        for (layer, expert, count) in parsed {
            let layers = layer.map_or_else(|| every.clone(), |l| vec![l]);
            experts.extend(layers.into_iter().map(|layer| ExpertReplicaCount {
                layer,
                expert,
                count,
            }));
        }
        set_expert_replicas_request::Replicas::Explicit(ExplicitReplicas {
            layers: Vec::new(),
            experts,
        })
    };
    let r = c
        .set_expert_replicas(SetExpertReplicasRequest { replicas: Some(replicas) })
        .await
        .map_err(|e| rpc_error("experts set", e))?
        .into_inner();
    Ok(json!({
        "epoch": r.epoch, "placement_version": r.placement_version,
        "moved": r.moved, "dropped": r.dropped,
    }))
}

async fn rebalance(c: &mut Client, dry_run: bool) -> Result<Value> {
    let r = c
        .rebalance(RebalanceRequest { dry_run })
        .await
        .map_err(|e| rpc_error("experts rebalance", e))?
        .into_inner();
    Ok(json!({
        "epoch": r.epoch, "placement_version": r.placement_version, "dry_run": dry_run,
        "balancedness_before": r.balancedness_before, "balancedness_after": r.balancedness_after,
        "moved": r.moved, "dropped": r.dropped,
    }))
}

fn print(cmd: &AdminCommand, v: &Value, as_json: bool) {
    if as_json {
        println!("{v}");
        return;
    }
    match cmd {
        AdminCommand::Status => {
            println!(
                "cluster {} epoch {} {} W={} T={} queue {}",
                v["cluster"], v["epoch"], v["state"], v["world_size"], v["tp"], v["queue_depth"]
            );
            for w in v["workers"].as_array().into_iter().flatten() {
                println!(
                    "  rank {:>3}  {:<20} {:<22} {}",
                    w["rank"], w["worker_id"], w["address"], w["health"]
                );
            }
        }
        AdminCommand::Drain { .. } => {
            println!(
                "fathom: worker {} drained; epoch {} serves without the drained process",
                v["worker"].as_str().unwrap_or_default(),
                v["epoch"]
            );
        }
        AdminCommand::Experts(ExpertsCommand::Load) => {
            println!(
                "placement v{} (pending {}), {} steps ({} ms), balancedness {:.3}, max/mean {:.3}",
                v["placement_version"],
                v["pending_placement_version"],
                v["window_steps"],
                v["window_ms"],
                v["balancedness"].as_f64().unwrap_or(0.0),
                v["max_over_mean"].as_f64().unwrap_or(0.0)
            );
            println!("  rank tokens {}", v["rank_tokens"]);
            for l in v["layers"].as_array().into_iter().flatten() {
                println!(
                    "  layer {:>3} tokens {} replicas {}",
                    l["layer"], l["tokens"], l["replicas"]
                );
            }
        }
        AdminCommand::Experts(_) => {
            let pairs: Vec<String> =
                v.as_object().into_iter().flatten().map(|(k, x)| format!("{k} {x}")).collect();
            println!("{}", pairs.join(", "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_parse_or_name_the_bad_spec() {
        assert_eq!(parse_count("3:17=2").unwrap(), (Some(3), 17, 2));
        assert_eq!(parse_count("*:5=1").unwrap(), (None, 5, 1));
        for bad in ["3:17", "3=2", "x:1=2", "1:2=-1", ""] {
            let e = parse_count(bad).unwrap_err().to_string();
            assert!(e.contains("LAYER:EXPERT=COUNT"), "{bad}: {e}");
        }
    }
}
