//! etcd outage (issue 10): with etcd stopped for 30 s during streaming, a W=2 cluster keeps
//! serving on its current epoch — no request fails, no process exits or restarts, the epoch does
//! not change — and once etcd is back every worker holds its lease again.

mod cluster_support;

use cluster_support::{Cluster, Opts, Reference, eventually, generate, greedy_request};
use fathom_proto::v1::ClusterState;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const OUTAGE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_stopped_30s_during_streaming_no_request_fails() {
    let mut etcd =
        fathom_tests::EtcdServer::start().expect("etcd (install etcd-server: scripts/deps.sh)");
    let mut c = Cluster::start(Opts {
        workers: 2,
        extra: vec!["--tp".into(), "1".into()],
        etcd: Some(etcd.endpoint()),
    })
    .expect("cluster over etcd, W=2");
    let epoch = c.status().await.epoch;
    let reference = Arc::new(Reference::load(&c.model).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for k in 0..3u32 {
        let mut client = c.client().await.unwrap();
        let (stop, done, reference) = (stop.clone(), done.clone(), reference.clone());
        clients.push(tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let p: Vec<u32> =
                    (0..(2 + (i + k) % 9)).map(|t| (t * 17 + k * 5 + i) % 450).collect();
                let got = generate(&mut client, greedy_request(&p, 12))
                    .await
                    .map_err(|e| format!("client {k} request {i}: {e:?}"))?;
                let want = reference.greedy(&p, 12).unwrap();
                if got != want {
                    return Err(format!("client {k} request {i}: {got:?} != {want:?}"));
                }
                done.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
            Ok::<u32, String>(i)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd.stop();
    let stopped = Instant::now();
    let before = done.load(Ordering::SeqCst);
    tokio::time::sleep(OUTAGE).await;
    let during = done.load(Ordering::SeqCst) - before;
    etcd.restart().expect("etcd restarts");
    eprintln!("ETCD outage of {:?}: {during} requests completed meanwhile", stopped.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    for t in clients {
        t.await.unwrap().expect("no request fails");
    }
    assert!(during > 0, "requests were served while etcd was down");
    for (i, w) in c.workers.iter_mut().enumerate() {
        assert!(w.try_wait().unwrap().is_none(), "worker {i} is still the same process");
    }
    assert!(c.coordinator.try_wait().unwrap().is_none(), "the coordinator is still running");
    let s = c.status().await;
    assert_eq!((s.state, s.epoch), (ClusterState::Serving as i32, epoch), "{s:?}");
    // Leases held again once etcd answers.
    for addr in c.worker_addrs.clone() {
        eventually(Duration::from_secs(20), || {
            let addr = addr.clone();
            async move {
                let Ok(mut w) = fathom_proto::v1::worker_client::WorkerClient::connect(format!(
                    "http://{addr}"
                ))
                .await
                else {
                    return false;
                };
                w.health(fathom_proto::v1::WorkerHealthRequest {})
                    .await
                    .map(|h| h.into_inner().lease_held)
                    .unwrap_or(false)
            }
        })
        .await
        .unwrap_or_else(|e| panic!("worker {addr} holds its lease again: {e}"));
    }
}
