//! `fathom.v1.Admin`: operator API. Every call needs `authorization: Bearer <token>` matching the
//! configured token (UNAUTHENTICATED otherwise; PERMISSION_DENIED when no token is configured).
//!
//! ClusterStatus is served from the engine's snapshot (with the watchdog's recent reports and
//! the workers being drained). Drain asks the engine to drain a worker and answers once an epoch
//! without it serves. ExpertLoad, SetExpertReplicas and Rebalance go to the engine's expert
//! runtime (`crate::experts`). Every error maps to a status through `api/status.rs` (invalid
//! layer/expert/count → INVALID_ARGUMENT, a change still loading or no epoch → UNAVAILABLE).

use crate::engine::EngineError;
use crate::engine::{EngineHandle, ServingState};
use fathom_common::plan::ReplicaRequest;
use fathom_proto::v1::admin_server::Admin;
use fathom_proto::v1::{
    ClusterState, ClusterStatusRequest, ClusterStatusResponse, DrainRequest, DrainResponse,
    ExpertLoadRequest, ExpertLoadResponse, GroupStatus, LayerLoad, RankProgress, RebalanceRequest,
    RebalanceResponse, SetExpertReplicasRequest, SetExpertReplicasResponse, WatchdogReport,
    WorkerHealth, WorkerStatus, set_expert_replicas_request,
};
use std::collections::BTreeMap;
use tonic::{Request, Response, Status};

/// The Admin service.
#[derive(Debug, Clone)]
pub struct AdminApi {
    engine: EngineHandle,
    token: Option<String>,
    cluster: String,
}

impl AdminApi {
    pub fn new(engine: EngineHandle, token: Option<String>, cluster: String) -> Self {
        Self { engine, token, cluster }
    }

    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Err(Status::permission_denied("the admin API is disabled (no admin token)"));
        };
        let got = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        match got.and_then(|v| v.strip_prefix("Bearer ")) {
            Some(t) if constant_time_eq(t.as_bytes(), token.as_bytes()) => Ok(()),
            _ => Err(Status::unauthenticated("missing or wrong admin token")),
        }
    }
}

fn invalid(reason: String) -> Status {
    EngineError::InvalidArgument { field: "expert replicas", reason }.into()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.check(&request)?;
        let s = self.engine.status();
        let state = match s.state {
            ServingState::WaitingForWorkers => ClusterState::WaitingForWorkers,
            ServingState::Preparing => ClusterState::Preparing,
            ServingState::Serving => ClusterState::Serving,
            ServingState::Reconfiguring => ClusterState::Reconfiguring,
        };
        let tp = s.tp.max(1);
        let workers = s
            .ranks
            .iter()
            .map(|r| WorkerStatus {
                worker_id: r.worker_id.clone(),
                address: r.address.clone(),
                device: String::new(),
                rank: Some(r.rank),
                group: Some(r.rank / tp),
                health: if s.draining.contains(&r.worker_id) {
                    WorkerHealth::Draining
                } else if s.state == ServingState::Serving && r.healthy {
                    WorkerHealth::Serving
                } else {
                    WorkerHealth::Unhealthy
                } as i32,
                last_seen_ms: r.last_seen.elapsed().as_millis() as u64,
                detail: r.detail.clone(),
                epoch_loaded_bytes: r.prepared.loaded_bytes,
                epoch_loaded_expert_bytes: r.prepared.loaded_expert_bytes,
                epoch_reused_bytes: r.prepared.reused_bytes,
            })
            .collect();
        let groups = s
            .groups
            .iter()
            .enumerate()
            .map(|(g, u)| GroupStatus {
                group: g as u32,
                ranks: (g as u32 * tp..(g as u32 + 1) * tp).collect(),
                kv_blocks_total: u.total,
                kv_blocks_used: u.used,
                kv_block_size: s.kv_block_size,
                running_sequences: u.running,
            })
            .collect();
        Ok(Response::new(ClusterStatusResponse {
            cluster: self.cluster.clone(),
            epoch: s.epoch,
            state: state as i32,
            leader: String::new(),
            workers,
            world_size: s.world_size,
            tp: s.tp,
            groups,
            queue_depth: s.queue_depth,
            watchdog: s
                .watchdog
                .iter()
                .map(|w| WatchdogReport {
                    epoch: w.epoch,
                    step_id: w.step_id,
                    stalled_ms: w.stalled_ms,
                    missing: w
                        .missing
                        .iter()
                        .map(|m| RankProgress {
                            rank: m.rank,
                            layer: m.layer,
                            phase: m.phase.clone(),
                        })
                        .collect(),
                    reported_at_unix_ms: w.reported_at_unix_ms,
                })
                .collect(),
        }))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        self.check(&request)?;
        let worker_id = request.into_inner().worker_id;
        if worker_id.is_empty() {
            return Err(Status::invalid_argument("worker_id is empty"));
        }
        let epoch = self.engine.drain(worker_id).await.map_err(Status::from)?;
        Ok(Response::new(DrainResponse { epoch }))
    }

    async fn expert_load(
        &self,
        request: Request<ExpertLoadRequest>,
    ) -> Result<Response<ExpertLoadResponse>, Status> {
        self.check(&request)?;
        // The window is the coordinator's whole window (`coordinator.expert_load_window_steps`);
        // `window_ms` in the answer says how much wall time it covers.
        let s = self.engine.experts().snapshot();
        Ok(Response::new(ExpertLoadResponse {
            window_ms: s.window.as_millis() as u64,
            layers: s
                .layers
                .into_iter()
                .map(|l| LayerLoad {
                    layer: l.layer as u32,
                    tokens: l.tokens,
                    replicas: l.replicas,
                    rank_tokens: l.rank_tokens,
                })
                .collect(),
            balancedness: s.balancedness,
            rank_tokens: s.rank_tokens,
            max_over_mean: s.max_over_mean,
            placement_version: s.placement_version,
            pending_placement_version: s.pending_version.unwrap_or(0),
            window_steps: s.window_steps,
            placement_steps: s.placement_steps,
        }))
    }

    async fn set_expert_replicas(
        &self,
        request: Request<SetExpertReplicasRequest>,
    ) -> Result<Response<SetExpertReplicasResponse>, Status> {
        self.check(&request)?;
        let experts = self.engine.experts();
        let req = match request.into_inner().replicas {
            Some(set_expert_replicas_request::Replicas::Redundant(n)) => {
                ReplicaRequest::Redundant(n as usize)
            }
            Some(set_expert_replicas_request::Replicas::Explicit(x)) => {
                let mut layers = BTreeMap::new();
                for l in x.layers {
                    let counts = l.counts.iter().map(|&c| c as usize).collect();
                    if layers.insert(l.layer as usize, counts).is_some() {
                        return Err(invalid(format!("layer {} is listed twice", l.layer)));
                    }
                }
                let sparse: Vec<(usize, usize, usize)> = x
                    .experts
                    .iter()
                    .map(|e| (e.layer as usize, e.expert as usize, e.count as usize))
                    .collect();
                experts.explicit_request(&layers, &sparse).map_err(EngineError::from)?
            }
            None => return Err(invalid("give explicit counts or redundant N".into())),
        };
        let s = experts.set_replicas(&req).map_err(EngineError::from)?;
        Ok(Response::new(SetExpertReplicasResponse {
            epoch: self.engine.status().epoch,
            placement_version: s.placement_version,
            moved: s.moved as u64,
            dropped: s.dropped as u64,
        }))
    }

    async fn rebalance(
        &self,
        request: Request<RebalanceRequest>,
    ) -> Result<Response<RebalanceResponse>, Status> {
        self.check(&request)?;
        let dry_run = request.into_inner().dry_run;
        let s = self.engine.experts().rebalance(dry_run).map_err(EngineError::from)?;
        Ok(Response::new(RebalanceResponse {
            epoch: self.engine.status().epoch,
            balancedness_before: s.balancedness_before,
            balancedness_after: s.balancedness_after,
            placement_version: s.placement_version,
            moved: s.moved as u64,
            dropped: s.dropped as u64,
        }))
    }
}
