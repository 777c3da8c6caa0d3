//! etcd outages: a real etcd is killed and restarted on the same port and data directory while
//! clients keep running. The plan must survive, registrations must come back without restarting
//! the process, and watches must resume (including changes that happened during the outage).

use fathom_common::ids::Epoch;
use fathom_coordinator::membership::{
    EtcdMembership, EtcdOptions, LeaseState, Membership, PlanRecord, WorkerEvent, WorkerId,
    WorkerInfo,
};
use fathom_tests::EtcdServer;
use futures::StreamExt;
use futures::stream::BoxStream;
use std::time::Duration;
use tokio::time::timeout;

const TTL: Duration = Duration::from_secs(2);

fn worker(id: &str) -> WorkerInfo {
    WorkerInfo {
        id: WorkerId::new(id).unwrap(),
        address: "127.0.0.1:1".into(),
        device: "cpu".into(),
        memory_bytes: 0,
    }
}

async fn connect(etcd: &EtcdServer) -> EtcdMembership {
    let opts = EtcdOptions { op_timeout: Duration::from_millis(500) };
    EtcdMembership::connect(&[etcd.endpoint()], "outage", opts).await.unwrap()
}

async fn next_event(stream: &mut BoxStream<'static, WorkerEvent>, within: Duration) -> WorkerEvent {
    timeout(within, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no worker event within {within:?}"))
        .expect("watch stream ended")
}

/// Blocking harness calls must not stall the runtime's keep-alive tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_plan_and_worker_reacquires_its_lease() {
    let mut etcd = blocking(EtcdServer::start).unwrap();
    let m = connect(&etcd).await;
    let plan = PlanRecord { epoch: Epoch(1), data: b"plan-1".to_vec() };
    m.write_plan(plan.clone()).await.unwrap();
    let reg = m.register_worker(worker("w1"), TTL).await.unwrap();
    let mut watch = m.watch_workers().await.unwrap();
    assert_eq!(next_event(&mut watch, TTL).await, WorkerEvent::Added(worker("w1")));

    blocking(|| etcd.stop());
    // The hard deadline fires although the store cannot be reached.
    timeout(TTL * 2, reg.lost()).await.expect("lease reported lost while etcd is down");
    assert_eq!(reg.state(), LeaseState::Lost);
    assert!(m.list_workers().await.is_err(), "etcd is down");

    blocking(|| etcd.restart()).unwrap();
    timeout(TTL * 5, reg.held()).await.expect("lease re-acquired after etcd returned");
    assert!(matches!(reg.state(), LeaseState::Held { .. }));
    assert_eq!(m.read_plan().await.unwrap(), Some(plan));
    let listed: Vec<_> = m.list_workers().await.unwrap().into_iter().map(|w| w.id).collect();
    assert_eq!(listed, [WorkerId::new("w1").unwrap()]);
    // The registration keeps holding after recovery (keep-alives work again).
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    assert!(matches!(reg.state(), LeaseState::Held { .. }));

    // The watch resumed: a new registration after the restart is seen.
    let r2 = m.register_worker(worker("w2"), TTL).await.unwrap();
    loop {
        match next_event(&mut watch, TTL * 3).await {
            WorkerEvent::Added(w) if w.id.as_str() == "w2" => break,
            // w1 may be reported again if its key was re-created with a new lease.
            WorkerEvent::Added(w) if w.id.as_str() == "w1" => continue,
            other => panic!("unexpected event {other:?}"),
        }
    }
    r2.release().await.unwrap();
    reg.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_a_worker_that_died_during_the_outage() {
    let mut etcd = blocking(EtcdServer::start).unwrap();
    let m = connect(&etcd).await;
    let keep = m.register_worker(worker("stays"), TTL).await.unwrap();
    let dies = m.register_worker(worker("dies"), TTL).await.unwrap();
    let mut watch = m.watch_workers().await.unwrap();
    let mut seen = vec![next_event(&mut watch, TTL).await, next_event(&mut watch, TTL).await];
    seen.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(seen, [WorkerEvent::Added(worker("dies")), WorkerEvent::Added(worker("stays"))]);

    blocking(|| etcd.stop());
    drop(dies); // crashes while etcd is away: no keep-alive will ever come again
    tokio::time::sleep(Duration::from_millis(500)).await;
    blocking(|| etcd.restart()).unwrap();

    // etcd restores leases with a fresh TTL on restart; "dies" expires a TTL later.
    let ev = next_event(&mut watch, TTL * 4).await;
    assert_eq!(ev, WorkerEvent::Removed(WorkerId::new("dies").unwrap()));
    timeout(TTL * 5, keep.held()).await.expect("survivor holds its lease");
    let listed: Vec<_> = m.list_workers().await.unwrap().into_iter().map(|w| w.id).collect();
    assert_eq!(listed, [WorkerId::new("stays").unwrap()]);
    keep.release().await.unwrap();
}

#[tokio::test]
async fn connecting_to_a_dead_endpoint_is_a_retryable_error() {
    let port = fathom_tests::free_port().unwrap();
    let opts = EtcdOptions { op_timeout: Duration::from_millis(500) };
    let started = std::time::Instant::now();
    let err = EtcdMembership::connect(&[format!("http://127.0.0.1:{port}")], "x", opts)
        .await
        .unwrap_err();
    assert!(err.retryable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "bounded by op_timeout");
    let err = EtcdMembership::connect(&[], "x", EtcdOptions::default()).await.unwrap_err();
    assert!(!err.retryable(), "{err}");
}
