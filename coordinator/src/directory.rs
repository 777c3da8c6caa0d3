//! Worker directories: how the engine learns which workers are live.
//!
//! [`StaticDirectory`] is a fixed list given on the command line (`fathom up` without etcd: the
//! coordinator is told the id and address of each worker it spawned). Membership-backed
//! directories (etcd, in-memory) implement the same [`WorkerDirectory`] trait over the
//! `Membership` trait once it is merged.

use crate::engine::WorkerDirectory;
use crate::planner::Member;
use futures::future::BoxFuture;

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
