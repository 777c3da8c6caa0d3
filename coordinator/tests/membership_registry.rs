//! The coordinator-served registry (`fathom.v1.Registry` over the coordinator's `MemoryStore`):
//! a worker registers through `RemoteMembership` exactly as over etcd and the coordinator's
//! `MemoryMembership` sees it (list and watch); keep-alives hold the lease past its TTL; a
//! dropped registration expires; keys outside the worker prefix are refused; and when the
//! coordinator restarts with an empty store, the worker's registration is re-acquired without
//! a worker restart. Real gRPC on loopback.

use fathom_coordinator::membership::{
    KvStore, LeaseState, Membership, MembershipError, MemoryMembership, MemoryStore,
    RegistryService, RemoteMembership, RemoteStore, WorkerEvent, WorkerId, WorkerInfo,
};
use futures::StreamExt;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

const TTL: Duration = Duration::from_secs(2);

/// Serves a fresh store's registry on `listener`; returns the coordinator-side membership,
/// the server task and its stop switch ("kill the coordinator": connections are closed).
fn serve(
    listener: TcpListener,
) -> (MemoryMembership, tokio::task::JoinHandle<()>, tokio::sync::oneshot::Sender<()>) {
    let store = MemoryStore::new().unwrap();
    let m = MemoryMembership::with_store(store.clone(), "reg").unwrap();
    let svc = RegistryService::new(store, m.keys().clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc.into_server())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (m, task, stop)
}

fn info(id: &str) -> WorkerInfo {
    WorkerInfo {
        id: WorkerId::new(id).unwrap(),
        address: "127.0.0.1:1".into(),
        device: "cpu".into(),
        memory_bytes: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_through_the_coordinator_registry() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (coord, server, stop) = serve(listener);
    let remote = RemoteStore::new(&addr.to_string(), Duration::from_secs(2)).unwrap();
    let worker = RemoteMembership::with_store(remote.clone(), "reg").unwrap();
    let mut watch = coord.watch_workers().await.unwrap();
    let reg = worker.register_worker(info("w0"), TTL).await.unwrap();
    let ev = tokio::time::timeout(TTL, watch.next()).await.unwrap().unwrap();
    assert_eq!(ev, WorkerEvent::Added(info("w0")));
    // A second registration of the same id is refused while the lease lives.
    let e = worker.register_worker(info("w0"), TTL).await.unwrap_err();
    assert!(matches!(e, MembershipError::AlreadyRegistered { .. }), "{e}");
    // Keep-alives hold it beyond the TTL.
    tokio::time::sleep(TTL * 2).await;
    assert!(matches!(reg.state(), LeaseState::Held { .. }));
    assert_eq!(coord.list_workers().await.unwrap(), vec![info("w0")]);
    // The registry serves worker keys only.
    let e = remote.put_if("/fathom/reg/plan", b"x".to_vec(), 0, 0).await.unwrap_err();
    assert!(matches!(e, MembershipError::InvalidArgument { .. }), "{e}");
    // Dropped without release (a crash): the key expires with its lease.
    drop(reg);
    let ev = tokio::time::timeout(TTL * 3, watch.next()).await.unwrap().unwrap();
    assert_eq!(ev, WorkerEvent::Removed(WorkerId::new("w0").unwrap()));

    // Coordinator restart: a fresh, empty store on the same port. The worker's lease is gone
    // there; its registration goes Lost and is re-acquired without restarting the worker.
    let reg = worker.register_worker(info("w1"), TTL).await.unwrap();
    let _ = stop.send(());
    let _ = server.await;
    let mut states = reg.subscribe();
    tokio::time::timeout(TTL * 3, states.wait_for(|s| *s == LeaseState::Lost))
        .await
        .expect("lost while the coordinator is down")
        .unwrap();
    let listener = TcpListener::bind(addr).await.unwrap();
    let (coord2, _server2, _stop2) = serve(listener);
    tokio::time::timeout(TTL * 5, states.wait_for(|s| matches!(s, LeaseState::Held { .. })))
        .await
        .expect("re-acquired once the coordinator is back")
        .unwrap();
    assert_eq!(coord2.list_workers().await.unwrap(), vec![info("w1")]);
}
