//! The membership conformance suite: one generic set of tests run against every implementation
//! (in-memory store, real etcd started by `fathom-tests`). Each test uses its own cluster name
//! (and, for etcd, its own server) so tests are independent.

use fathom_common::ids::Epoch;
use fathom_coordinator::membership::{
    EtcdMembership, EtcdOptions, LeaseState, Membership, MembershipError, MemoryMembership,
    MemoryStore, PlanRecord, StoreMembership, WorkerEvent, WorkerId, WorkerInfo,
};
use fathom_tests::EtcdServer;
use futures::StreamExt;
use futures::stream::BoxStream;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::{Instant, timeout};

const TTL: Duration = Duration::from_secs(2);

/// Makes clients of one store (several clients = several coordinators/workers).
enum Fixture {
    Memory(MemoryStore),
    Etcd(EtcdServer),
}

impl Fixture {
    fn memory() -> Self {
        Fixture::Memory(MemoryStore::new().expect("inside a runtime"))
    }

    fn etcd() -> Self {
        Fixture::Etcd(EtcdServer::start().expect("start etcd"))
    }

    async fn client(&self) -> Arc<dyn Membership> {
        match self {
            Fixture::Memory(store) => {
                Arc::new(StoreMembership::with_store(store.clone(), "conf").unwrap())
                    as Arc<dyn Membership>
            }
            Fixture::Etcd(server) => Arc::new(
                EtcdMembership::connect(&[server.endpoint()], "conf", EtcdOptions::default())
                    .await
                    .expect("connect to etcd"),
            ),
        }
    }
}

fn worker(id: &str) -> WorkerInfo {
    WorkerInfo {
        id: WorkerId::new(id).unwrap(),
        address: format!("127.0.0.1:{}", 50000 + id.len()),
        device: "cpu".into(),
        memory_bytes: 1 << 30,
    }
}

async fn next_event(stream: &mut BoxStream<'static, WorkerEvent>, within: Duration) -> WorkerEvent {
    timeout(within, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no worker event within {within:?}"))
        .expect("watch stream ended")
}

async fn ids(m: &dyn Membership) -> Vec<String> {
    m.list_workers().await.unwrap().into_iter().map(|w| w.id.to_string()).collect()
}

/// Generic tests: each takes a fixture and runs against its clients.
mod suite {
    use super::*;

    pub async fn register_list_watch_and_revoke(f: &Fixture) {
        let m = f.client().await;
        let r1 = m.register_worker(worker("w1"), TTL).await.unwrap();
        let mut watch = m.watch_workers().await.unwrap();
        // Existing workers come first, as Added.
        assert_eq!(next_event(&mut watch, TTL).await, WorkerEvent::Added(worker("w1")));
        let r2 = m.register_worker(worker("w2"), TTL).await.unwrap();
        assert_eq!(next_event(&mut watch, TTL).await, WorkerEvent::Added(worker("w2")));
        assert_eq!(ids(&*m).await, ["w1", "w2"]);
        assert!(matches!(r1.state(), LeaseState::Held { .. }));
        assert_eq!(r1.key(), "/fathom/conf/workers/w1");
        r1.release().await.unwrap();
        let ev = next_event(&mut watch, TTL).await;
        assert_eq!(ev, WorkerEvent::Removed(WorkerId::new("w1").unwrap()));
        assert_eq!(ids(&*m).await, ["w2"]);
        drop(r2);
    }

    pub async fn lease_expiry_removes_worker(f: &Fixture) {
        let m = f.client().await;
        let mut watch = m.watch_workers().await.unwrap();
        let reg = m.register_worker(worker("crashy"), TTL).await.unwrap();
        assert_eq!(next_event(&mut watch, TTL).await, WorkerEvent::Added(worker("crashy")));
        // Dropping without release stops keep-alives, like a crashed worker.
        let dropped_at = Instant::now();
        drop(reg);
        let ev = next_event(&mut watch, TTL * 3).await;
        let elapsed = dropped_at.elapsed();
        assert_eq!(ev, WorkerEvent::Removed(WorkerId::new("crashy").unwrap()));
        assert!(elapsed >= TTL / 2, "removed after {elapsed:?}: before the lease could expire");
        assert!(ids(&*m).await.is_empty());
    }

    pub async fn keep_alive_keeps_worker(f: &Fixture) {
        let m = f.client().await;
        let reg = m.register_worker(worker("steady"), TTL).await.unwrap();
        let mut watch = m.watch_workers().await.unwrap();
        assert_eq!(next_event(&mut watch, TTL).await, WorkerEvent::Added(worker("steady")));
        // Well past two TTLs: only keep-alives can keep it.
        let quiet = timeout(TTL * 2 + Duration::from_millis(500), watch.next()).await;
        assert!(quiet.is_err(), "unexpected event while kept alive: {quiet:?}");
        assert_eq!(ids(&*m).await, ["steady"]);
        assert!(matches!(reg.state(), LeaseState::Held { .. }));
        reg.release().await.unwrap();
    }

    pub async fn duplicate_id_is_refused_until_released(f: &Fixture) {
        let a = f.client().await;
        let b = f.client().await;
        let reg = a.register_worker(worker("dup"), TTL).await.unwrap();
        let err = b.register_worker(worker("dup"), TTL).await.unwrap_err();
        assert_eq!(err, MembershipError::AlreadyRegistered { id: "dup".into() });
        assert!(err.retryable());
        reg.release().await.unwrap();
        let again = b.register_worker(worker("dup"), TTL).await.unwrap();
        again.release().await.unwrap();
    }

    pub async fn plan_compare_and_swap(f: &Fixture) {
        let a = f.client().await;
        let b = f.client().await;
        assert_eq!(a.read_plan().await.unwrap(), None);
        let plan = |e: u64, d: &[u8]| PlanRecord { epoch: Epoch(e), data: d.to_vec() };
        // Skipping an epoch is a conflict, as is epoch 0.
        let e = a.write_plan(plan(2, b"x")).await.unwrap_err();
        assert_eq!(e, MembershipError::PlanConflict { proposed: Epoch(2), current: Epoch(0) });
        assert!(!e.retryable());
        assert!(a.write_plan(plan(0, b"x")).await.is_err());
        a.write_plan(plan(1, b"a1")).await.unwrap();
        b.write_plan(plan(2, b"b2")).await.unwrap();
        // A computed epoch 2 from epoch 1 too, but B wrote first.
        let e = a.write_plan(plan(2, b"a2")).await.unwrap_err();
        assert_eq!(e, MembershipError::PlanConflict { proposed: Epoch(2), current: Epoch(2) });
        assert_eq!(a.read_plan().await.unwrap(), Some(plan(2, b"b2")));
        // Racing writers of the same epoch: exactly one wins.
        let (ra, rb) = tokio::join!(a.write_plan(plan(3, b"a3")), b.write_plan(plan(3, b"b3")));
        assert!(ra.is_ok() != rb.is_ok(), "exactly one winner: {ra:?} {rb:?}");
        let stored = a.read_plan().await.unwrap().unwrap();
        assert_eq!(stored.epoch, Epoch(3));
        assert_eq!(stored.data, if ra.is_ok() { b"a3".to_vec() } else { b"b3".to_vec() });
    }

    pub async fn watch_plan_sees_current_then_newer(f: &Fixture) {
        let m = f.client().await;
        let plan = |e: u64| PlanRecord { epoch: Epoch(e), data: vec![e as u8; 3] };
        m.write_plan(plan(1)).await.unwrap();
        let mut watch = m.watch_plan().await.unwrap();
        assert_eq!(timeout(TTL, watch.next()).await.unwrap(), Some(plan(1)));
        m.write_plan(plan(2)).await.unwrap();
        m.write_plan(plan(3)).await.unwrap();
        assert_eq!(timeout(TTL, watch.next()).await.unwrap(), Some(plan(2)));
        assert_eq!(timeout(TTL, watch.next()).await.unwrap(), Some(plan(3)));
    }

    pub async fn rendezvous_publish_and_wait(f: &Fixture) {
        let rank0 = f.client().await;
        let rank1 = f.client().await;
        let waiter = tokio::spawn({
            let rank1 = rank1.clone();
            async move { rank1.wait_rendezvous(Epoch(5), Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(rank0.read_rendezvous(Epoch(5)).await.unwrap(), None);
        rank0.publish_rendezvous(Epoch(5), b"127.0.0.1:4000".to_vec()).await.unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), b"127.0.0.1:4000");
        // Idempotent with the same bytes, a conflict with others.
        rank0.publish_rendezvous(Epoch(5), b"127.0.0.1:4000".to_vec()).await.unwrap();
        let e = rank1.publish_rendezvous(Epoch(5), b"other".to_vec()).await.unwrap_err();
        assert_eq!(e, MembershipError::RendezvousConflict { epoch: Epoch(5) });
        // Already published: no wait. Unpublished epoch: a timeout error naming the wait.
        let got = rank1.wait_rendezvous(Epoch(5), Duration::from_millis(500)).await.unwrap();
        assert_eq!(got, b"127.0.0.1:4000");
        let e = rank1.wait_rendezvous(Epoch(6), Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(e, MembershipError::Timeout { op: "wait rendezvous", .. }), "{e}");
    }

    pub async fn prune_epochs_keeps_recent_ones(f: &Fixture) {
        let m = f.client().await;
        for e in [1u64, 2, 9, 10, 11] {
            m.publish_rendezvous(Epoch(e), vec![e as u8]).await.unwrap();
        }
        assert_eq!(m.prune_epochs(Epoch(10)).await.unwrap(), 3);
        for (e, kept) in [(1u64, false), (2, false), (9, false), (10, true), (11, true)] {
            let got = m.read_rendezvous(Epoch(e)).await.unwrap();
            assert_eq!(got.is_some(), kept, "epoch {e}");
        }
        assert_eq!(m.prune_epochs(Epoch(10)).await.unwrap(), 0);
    }

    pub async fn leader_election(f: &Fixture) {
        let a = f.client().await;
        let b = f.client().await;
        assert_eq!(a.leader().await.unwrap(), None);
        let lead_a = a.campaign("coord-a".into(), TTL).await.unwrap();
        assert_eq!(lead_a.key(), "/fathom/conf/coordinator/leader");
        assert_eq!(b.leader().await.unwrap().as_deref(), Some("coord-a"));
        let b_campaign = tokio::spawn({
            let b = b.clone();
            async move { b.campaign("coord-b".into(), TTL).await }
        });
        // B waits while A leads (A keeps its lease alive past a TTL).
        tokio::time::sleep(TTL + Duration::from_millis(500)).await;
        assert!(!b_campaign.is_finished(), "B became leader while A still led");
        assert_eq!(a.leader().await.unwrap().as_deref(), Some("coord-a"));
        let resigned_at = Instant::now();
        lead_a.release().await.unwrap();
        let lead_b = timeout(TTL * 2, b_campaign).await.expect("B elected").unwrap().unwrap();
        assert!(resigned_at.elapsed() < TTL, "resign should hand over promptly");
        assert_eq!(a.leader().await.unwrap().as_deref(), Some("coord-b"));
        // A leader that dies without resigning is replaced once its lease expires.
        drop(lead_b);
        let lead_a2 = timeout(TTL * 3, a.campaign("coord-a".into(), TTL))
            .await
            .expect("A re-elected after B's lease expired")
            .unwrap();
        assert_eq!(b.leader().await.unwrap().as_deref(), Some("coord-a"));
        lead_a2.release().await.unwrap();
        assert_eq!(b.leader().await.unwrap(), None);
    }

    pub async fn invalid_arguments_are_named(f: &Fixture) {
        let m = f.client().await;
        let e = WorkerId::new("a/b").unwrap_err();
        assert!(e.to_string().contains("worker id"), "{e}");
        let e = m.register_worker(worker("short"), Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(e, MembershipError::InvalidArgument { what: "lease ttl", .. }), "{e}");
        let e = m.campaign(String::new(), TTL).await.unwrap_err();
        assert!(matches!(e, MembershipError::InvalidArgument { what: "candidate", .. }), "{e}");
    }
}

macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            conformance!(@tests $make;
                register_list_watch_and_revoke, lease_expiry_removes_worker,
                keep_alive_keeps_worker, duplicate_id_is_refused_until_released,
                plan_compare_and_swap, watch_plan_sees_current_then_newer,
                rendezvous_publish_and_wait, prune_epochs_keeps_recent_ones, leader_election, invalid_arguments_are_named);
        }
    };
    (@tests $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let fixture = $make;
                suite::$name(&fixture).await;
            }
        )*
    };
}

conformance!(memory, Fixture::memory());
conformance!(etcd, Fixture::etcd());

#[tokio::test]
async fn memory_membership_constructor_uses_the_same_layout() {
    let m = MemoryMembership::new("solo").unwrap();
    let reg = m.register_worker(worker("w"), TTL).await.unwrap();
    assert_eq!(reg.key(), "/fathom/solo/workers/w");
    assert_eq!(m.keys().plan(), "/fathom/solo/plan");
}
