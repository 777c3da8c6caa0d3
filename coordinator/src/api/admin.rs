//! `fathom.v1.Admin`: operator API. Every call needs `authorization: Bearer <token>` matching the
//! configured token (UNAUTHENTICATED otherwise; PERMISSION_DENIED when no token is configured).
//!
//! ClusterStatus is served from the engine's snapshot (with the watchdog's recent reports and
//! the workers being drained). Drain asks the engine to drain a worker and answers once an epoch
//! without it serves. Expert load, replicas and rebalance are answered UNIMPLEMENTED until their
//! engine support exists.

use crate::engine::{EngineHandle, ServingState};
use fathom_proto::v1::admin_server::Admin;
use fathom_proto::v1::{
    ClusterState, ClusterStatusRequest, ClusterStatusResponse, DrainRequest, DrainResponse,
    ExpertLoadRequest, ExpertLoadResponse, GroupStatus, RankProgress, RebalanceRequest,
    RebalanceResponse, SetExpertReplicasRequest, SetExpertReplicasResponse, WatchdogReport,
    WorkerHealth, WorkerStatus,
};
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
        Err(Status::unimplemented("expert load tracking is not implemented yet"))
    }

    async fn set_expert_replicas(
        &self,
        request: Request<SetExpertReplicasRequest>,
    ) -> Result<Response<SetExpertReplicasResponse>, Status> {
        self.check(&request)?;
        Err(Status::unimplemented("expert replicas are not implemented yet"))
    }

    async fn rebalance(
        &self,
        request: Request<RebalanceRequest>,
    ) -> Result<Response<RebalanceResponse>, Status> {
        self.check(&request)?;
        Err(Status::unimplemented("rebalance is not implemented yet"))
    }
}
