//! Drain (issue 10, issue 5's Admin Drain): `fathom admin drain w0` during streaming on a cluster of
//! three registered workers and a plan of two ranks: the epoch holding w0 ends at a step
//! boundary, its sequences resume on a new epoch over the spare w2 (in w0's rank) and w1, no
//! client sees an error and every stream equals an undisturbed run; w0 is asked to shut down and
//! exits.

mod cluster_support;

use cluster_support::{
    ADMIN_TOKEN, Cluster, Reference, eventually, fathom_bin, generate, greedy_request,
};
use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_during_streaming_no_client_error() {
    let mut c = Cluster::start_registry(3, 2, vec!["--migrate-timeout-ms=60000".into()])
        .expect("registry cluster: 3 workers, W=2");
    let s = c.status().await;
    let ranks: Vec<&str> = s.workers.iter().map(|w| w.worker_id.as_str()).collect();
    assert_eq!(ranks, ["w0", "w1"], "the first two ids take the ranks: {s:?}");
    let reference = Reference::load(&c.model).unwrap();
    let cases: Vec<(Vec<u32>, usize)> = (0..8)
        .map(|i| ((0..(3 + i * 2) as u32).map(|t| (t * 7 + i as u32) % 400).collect(), 200))
        .collect();
    let mut tasks = Vec::new();
    for (p, n) in cases.clone() {
        let mut client = c.client().await.unwrap();
        tasks.push(tokio::spawn(async move {
            generate(&mut client, greedy_request(&p, n as u32)).await
        }));
    }
    eventually(Duration::from_secs(30), || async {
        c.status().await.groups.iter().map(|g| g.running_sequences).sum::<u32>() > 0
    })
    .await
    .expect("streams run");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let unfinished = tasks.iter().filter(|t| !t.is_finished()).count();
    assert!(unfinished > 0, "the drain happens during streaming");
    let url = c.url();
    let t0 = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(fathom_bin())
            .args(["admin", "--endpoint", &url, "--token", ADMIN_TOKEN, "drain", "w0"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("worker w0 drained; epoch 2"), "{stdout}");
    eprintln!("DRAIN took {} ms with {unfinished} streams running", t0.elapsed().as_millis());
    for ((p, n), t) in cases.iter().zip(tasks) {
        let got = t.await.unwrap().expect("no client error during the drain");
        assert_eq!(got, reference.greedy(p, *n).unwrap(), "prompt of {} tokens", p.len());
    }
    let s = c.status().await;
    let ranks: Vec<&str> = s.workers.iter().map(|w| w.worker_id.as_str()).collect();
    // The spare takes the drained worker's rank; w1 keeps its own (and its weights).
    assert_eq!((s.epoch, ranks), (2, vec!["w2", "w1"]), "{s:?}");
    // The drained worker was asked to leave.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = c.workers[0].try_wait().unwrap() {
            eprintln!("w0 exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "w0 did not exit after its drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
