//! The cluster with real etcd membership: workers register (leased), the coordinator discovers
//! them there, publishes the plan (epoch 1) and serves; output equals the in-process model.
//! Also `fathom up` end to end (one prompt, clean exit) and the standard health service of the
//! coordinator.

mod cluster_support;

use cluster_support::{Cluster, Opts, Reference, fathom_bin, generate, greedy_request};
use fathom_coordinator::membership::{EtcdMembership, EtcdOptions, Membership};
use prost::Message;
use std::process::Command;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_found_through_etcd_and_plan_published() {
    let etcd =
        fathom_tests::EtcdServer::start().expect("etcd (install etcd-server: scripts/deps.sh)");
    let c = Cluster::start(Opts { etcd: Some(etcd.endpoint()), ..Default::default() })
        .expect("cluster over etcd");
    let mut client = c.client().await.unwrap();
    let p = vec![3, 1, 4, 1, 5, 9, 2, 6];
    let got = generate(&mut client, greedy_request(&p, 10)).await.unwrap();
    assert_eq!(got, Reference::load(&c.model).unwrap().greedy(&p, 10).unwrap());
    // The plan of epoch 1 and the worker's leased key are in etcd.
    let m =
        EtcdMembership::connect(&[etcd.endpoint()], "test", EtcdOptions::default()).await.unwrap();
    let plan = m.read_plan().await.unwrap().expect("a stored plan");
    assert_eq!(plan.epoch.0, 1);
    let plan = fathom_proto::v1::Plan::decode(plan.data.as_slice()).unwrap();
    assert_eq!((plan.world_size, plan.ranks[0].worker_id.as_str()), (1, "w0"));
    let workers = m.list_workers().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].address, plan.ranks[0].address);
    // The worker reports its lease and its prepared epoch.
    let mut w = fathom_proto::v1::worker_client::WorkerClient::connect(format!(
        "http://{}",
        c.worker_addrs[0]
    ))
    .await
    .unwrap();
    let h = w.health(fathom_proto::v1::WorkerHealthRequest {}).await.unwrap().into_inner();
    assert!(h.lease_held, "{h:?}");
    assert_eq!((h.epoch, h.rank), (1, Some(0)));
    assert_eq!(h.state, fathom_proto::v1::WorkerState::Ready as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_once_the_epoch_serves() {
    let c = Cluster::start(Opts::default()).expect("cluster");
    let channel =
        tonic::transport::Endpoint::from_shared(c.url()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "fathom.v1.Inference"] {
        let r = health
            .check(HealthCheckRequest { service: service.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "service {service:?}");
    }
}

#[test]
fn fathom_up_answers_one_prompt_and_exits_cleanly() {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(fathom_bin())
        .args(["up", "--workers", "1", "--prompt-ids", "1,2,3", "--max-new-tokens", "6"])
        .args(["--ignore-eos", "--json", "--cache-dir"])
        .arg(cache.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout {stdout}\nstderr {stderr}");
    assert!(stdout.contains("fathom: serving on 127.0.0.1:"), "{stdout}");
    let json = stdout.lines().find(|l| l.starts_with('{')).expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["prompt_ids"], serde_json::json!([1, 2, 3]));
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 6);
    assert_eq!(v["finish_reason"], "length");
    let model = cache.path().join("tiny-f32-seed0");
    let want = Reference::load(&model).unwrap().greedy(&[1, 2, 3], 6).unwrap();
    let got: Vec<u32> =
        v["generated_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert_eq!(got, want);
    assert!(stderr.contains("worker w0 stopped"), "the worker was shut down: {stderr}");
}
