//! Worker loss (issue 10): `fathom up --workers 4` (tiny model, workers registered in the
//! coordinator's in-memory registry — no etcd, no static list); during 32 concurrent greedy
//! streams one worker, picked at random, is killed with SIGKILL. `fathom up` restarts it (as a
//! StatefulSet would), the coordinator fences the failed epoch, plans the next one over the
//! live workers and migrates every in-flight request (re-prefill of prompt + streamed tokens).
//! Every stream completes without an error, equal to an undisturbed (in-process) run: no
//! duplicated and no missing token. Prints the time from the kill to the first resumed token.

mod cluster_support;

use cluster_support::{Reference, Timed, Up, generate_timed, greedy_request, signal};
use fathom_proto::v1::ClusterState;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 29 + salt * 13 + 3) % 500).collect()
}

async fn status(up: &Up) -> fathom_proto::v1::ClusterStatusResponse {
    let mut admin =
        fathom_proto::v1::admin_client::AdminClient::connect(up.url()).await.expect("admin");
    let mut req = tonic::Request::new(fathom_proto::v1::ClusterStatusRequest {});
    req.metadata_mut().insert("authorization", "Bearer t".parse().unwrap());
    admin.cluster_status(req).await.expect("cluster status").into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_random_worker_during_32_streams_loses_nothing() {
    const STREAMS: usize = 32;
    const TOKENS: u32 = 24;
    let up = Up::start(&["--workers", "4", "--admin-token", "t", "--migrate-timeout-ms", "90000"])
        .expect("fathom up --workers 4");
    let s = status(&up).await;
    assert_eq!((s.world_size, s.epoch), (4, 1), "{s:?}");
    let reference = Reference::load(&up.model()).unwrap();
    let cases: Vec<Vec<u32>> = (0..STREAMS).map(|i| prompt(1 + (i * 5) % 23, i as u32)).collect();
    let progress = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for p in cases.clone() {
        let mut client =
            fathom_proto::v1::inference_client::InferenceClient::connect(up.url()).await.unwrap();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            generate_timed(&mut client, greedy_request(&p, TOKENS), progress).await
        }));
    }
    // Kill once the streams are well under way (a quarter of all tokens arrived).
    let started = Instant::now();
    while progress.load(Ordering::SeqCst) < STREAMS * TOKENS as usize / 4 {
        assert!(started.elapsed() < Duration::from_secs(120), "streams do not progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    let victim = format!("w{}", nanos % 4);
    // `fathom up` prints each worker's pid on stderr, read by another thread: allow it a moment.
    let mut pid = up.pid(&victim);
    let asked = Instant::now();
    while pid.is_none() && asked.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        pid = up.pid(&victim);
    }
    let pid = pid.unwrap_or_else(|| panic!("no pid of {victim} on stderr: {:?}", up.stderr()));
    let before_kill = progress.load(Ordering::SeqCst);
    signal(pid, "KILL");
    let killed = Instant::now();
    let mut results: Vec<Timed> = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = tokio::time::timeout(Duration::from_secs(180), t)
            .await
            .unwrap_or_else(|_| panic!("stream {i} did not finish within 180 s"))
            .unwrap();
        results.push(r.unwrap_or_else(|e| panic!("stream {i} failed: {e:?}; {:?}", up.stderr())));
    }
    for (i, (p, r)) in cases.iter().zip(&results).enumerate() {
        let want = reference.greedy(p, TOKENS as usize).unwrap();
        assert_eq!(r.ids, want, "stream {i} (prompt of {} tokens)", p.len());
    }
    // Streams that were cut by the kill and resumed: tokens before and after it. A step already
    // answered by every rank when the kill landed may still deliver tokens just after it, so a
    // stream's resumption is the token that ends its longest pause after the kill.
    let resumed: Vec<Duration> = results
        .iter()
        .filter(|r| r.at.iter().any(|t| *t < killed) && r.at.iter().any(|t| *t > killed))
        .map(|r| {
            let mut best = (Duration::ZERO, Duration::ZERO); // (pause, resumed at)
            for j in 0..r.at.len() {
                if r.at[j] <= killed {
                    continue;
                }
                let from = if j > 0 && r.at[j - 1] > killed { r.at[j - 1] } else { killed };
                let pause = r.at[j] - from;
                if pause > best.0 {
                    best = (pause, r.at[j] - killed);
                }
            }
            best.1
        })
        .collect();
    assert!(before_kill < STREAMS * TOKENS as usize, "the kill happened mid-stream");
    assert!(!resumed.is_empty(), "some stream spanned the kill");
    let first = resumed.iter().min().unwrap();
    let last = resumed.iter().max().unwrap();
    eprintln!(
        "RECOVERY victim={victim} streams_resumed={} kill_to_first_resumed_token_ms={} \
         kill_to_last_stream_resumed_ms={}",
        resumed.len(),
        first.as_millis(),
        last.as_millis()
    );
    // Generous bound for a loaded 2-core machine (the target, 5 s, is recorded in docs/perf).
    assert!(*first < Duration::from_secs(60), "first resumed token after {first:?}");
    let s = status(&up).await;
    assert_eq!(s.state, ClusterState::Serving as i32, "{s:?}");
    assert!(s.epoch >= 2, "a new epoch serves: {s:?}");
    let log = up.stderr();
    assert!(
        log.iter()
            .any(|l| l.contains(&format!("worker {victim} exited")) && l.contains("restarting")),
        "fathom up restarted {victim}: {log:?}"
    );
}
