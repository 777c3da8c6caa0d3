//! Coordinator high availability (issue 10): two coordinators campaign in etcd (`--ha-id`);
//! the leader serves, the standby does not. The leader is killed (SIGKILL): its clients get
//! UNAVAILABLE (they retry on the service address), and the standby takes over — it forms the
//! next epoch over the same worker and serves new requests within a bounded time, equal to the
//! in-process model.

mod cluster_support;

use cluster_support::{Cluster, Opts, Reference, generate, greedy_request};
use fathom_proto::v1::inference_client::InferenceClient;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_standby_serves_within_bounded_time() {
    let etcd =
        fathom_tests::EtcdServer::start().expect("etcd (install etcd-server: scripts/deps.sh)");
    let mut c = Cluster::start(Opts {
        workers: 1,
        extra: vec!["--ha-id=a".into()],
        etcd: Some(etcd.endpoint()),
    })
    .expect("leader a serves");
    let (mut standby, serving) = c.spawn_coordinator(1, &["--ha-id=b".into()]).unwrap();
    let reference = Reference::load(&c.model).unwrap();
    let p = [3u32, 1, 4, 1, 5];
    let mut client = c.client().await.unwrap();
    assert_eq!(
        generate(&mut client, greedy_request(&p, 6)).await.unwrap(),
        reference.greedy(&p, 6).unwrap()
    );
    // The standby waits while a leads.
    std::thread::sleep(Duration::from_secs(2));
    assert!(serving.try_recv().is_err(), "the standby must not serve while a leads");
    assert!(standby.try_wait().unwrap().is_none(), "the standby waits");
    c.coordinator.kill().unwrap();
    c.coordinator.wait().unwrap();
    let killed = Instant::now();
    let err = generate(&mut client, greedy_request(&p, 2)).await.unwrap_err();
    // A dead process answers nothing: the client's gRPC library reports the broken connection,
    // as UNAVAILABLE (no connection) or CANCELLED from the transport ("connection closed") when
    // the call raced the close. Both are transport failures a client retries elsewhere.
    let transport = err.code() == tonic::Code::Unavailable
        || (err.code() == tonic::Code::Cancelled
            && format!("{err:?}").contains("connection closed"));
    assert!(transport, "clients of the dead leader see a transport failure: {err:?}");
    let addr = serving
        .recv_timeout(Duration::from_secs(40))
        .expect("the standby serves within 40 s of the leader's death");
    let took = killed.elapsed();
    eprintln!("HA standby serving {} ms after the leader was killed", took.as_millis());
    let mut client = InferenceClient::connect(format!("http://{addr}")).await.unwrap();
    let q = [7u32, 8, 9];
    assert_eq!(
        generate(&mut client, greedy_request(&q, 5)).await.unwrap(),
        reference.greedy(&q, 5).unwrap()
    );
    let m = fathom_coordinator::membership::EtcdMembership::connect(
        &[etcd.endpoint()],
        "test",
        fathom_coordinator::membership::EtcdOptions::default(),
    )
    .await
    .unwrap();
    use fathom_coordinator::membership::Membership;
    assert_eq!(m.leader().await.unwrap().as_deref(), Some("b"));
    assert!(m.read_plan().await.unwrap().unwrap().epoch.0 >= 2, "b planned a new epoch");
    let _ = standby.kill();
    let _ = standby.wait();
}
