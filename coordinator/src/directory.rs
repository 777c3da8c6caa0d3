//! Worker directories: how the engine learns which workers are live.
//!
//! [`StaticDirectory`] is a fixed list given on the command line (`fathom up` without etcd: the
//! coordinator is told the id and address of each worker it spawned, so no store has to be
//! shared between processes). [`MembershipDirectory`] reads the live workers from the
//! [`Membership`] trait (etcd in production) and publishes every plan there (`/plan`, epoch
//! compare-and-swap), so a restarted coordinator continues the epoch sequence.

use crate::engine::WorkerDirectory;
use crate::membership::{Membership, PlanRecord};
use crate::planner::Member;
use fathom_common::ids::Epoch;
use fathom_proto::v1::Plan;
use futures::future::BoxFuture;
use prost::Message;
use std::sync::Arc;

/// A fixed set of workers (liveness is discovered when the engine connects).
#[derive(Debug, Clone)]
pub struct StaticDirectory {
    members: Vec<Member>,
}

/// Why a static worker list is malformed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("worker {spec:?}: {reason}")]
pub struct StaticWorkerError {
    pub spec: String,
    pub reason: &'static str,
}

impl StaticDirectory {
    pub fn new(members: Vec<Member>) -> Self {
        Self { members }
    }

    /// Parses `ID=HOST:PORT` entries.
    pub fn parse(specs: &[String]) -> Result<Self, StaticWorkerError> {
        let mut members = Vec::new();
        for spec in specs {
            let (id, addr) = spec
                .split_once('=')
                .ok_or(StaticWorkerError { spec: spec.clone(), reason: "expected ID=HOST:PORT" })?;
            if id.is_empty() || !addr.contains(':') {
                return Err(StaticWorkerError {
                    spec: spec.clone(),
                    reason: "expected ID=HOST:PORT",
                });
            }
            if members.iter().any(|m: &Member| m.worker_id == id) {
                return Err(StaticWorkerError {
                    spec: spec.clone(),
                    reason: "duplicate worker id",
                });
            }
            members.push(Member { worker_id: id.into(), address: addr.into() });
        }
        Ok(Self { members })
    }
}

impl WorkerDirectory for StaticDirectory {
    fn live_workers(&self) -> BoxFuture<'_, Result<Vec<Member>, String>> {
        Box::pin(async move { Ok(self.members.clone()) })
    }
}

/// Live workers from a membership store; plans are published to it.
#[derive(Debug, Clone)]
pub struct MembershipDirectory {
    membership: Arc<dyn Membership>,
}

impl MembershipDirectory {
    pub fn new(membership: Arc<dyn Membership>) -> Self {
        Self { membership }
    }
}

impl WorkerDirectory for MembershipDirectory {
    fn live_workers(&self) -> BoxFuture<'_, Result<Vec<Member>, String>> {
        Box::pin(async move {
            let workers = self.membership.list_workers().await.map_err(|e| e.to_string())?;
            Ok(workers
                .into_iter()
                .map(|w| Member { worker_id: w.id.as_str().to_string(), address: w.address })
                .collect())
        })
    }

    fn current_epoch(&self) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            let plan = self.membership.read_plan().await.map_err(|e| e.to_string())?;
            Ok(plan.map(|p| p.epoch.0).unwrap_or(0))
        })
    }

    fn publish_plan(&self, plan: &Plan) -> BoxFuture<'_, Result<(), String>> {
        let record = PlanRecord { epoch: Epoch(plan.epoch), data: plan.encode_to_vec() };
        Box::pin(async move { self.membership.write_plan(record).await.map_err(|e| e.to_string()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let d = StaticDirectory::parse(&["w0=127.0.0.1:1".into(), "w1=h:2".into()]).unwrap();
        assert_eq!(d.members.len(), 2);
        assert!(StaticDirectory::parse(&["nope".into()]).is_err());
        assert!(StaticDirectory::parse(&["a=h:1".into(), "a=h:2".into()]).is_err());
    }
}
