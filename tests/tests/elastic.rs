//! Elastic epochs (issues 9 and 10), real processes: `fathom coordinator` with its in-memory
//! registry and `fathom worker` processes of the tiny model on loopback.
//!
//! - **Shrink**: W = 4, T = 1, 5 redundant expert slots per rank (every expert on ≥ 2 ranks), no
//!   spare and nobody restarts the victim: a SIGKILL of one worker during concurrent greedy
//!   streams gives a W' = 3 epoch at once over the survivors (no replacement awaited), every
//!   stream completes equal to an undisturbed run, and the survivors read 0 expert bytes to
//!   prepare it (they keep their experts: `WorkerStatus.epoch_loaded_expert_bytes`).
//! - **Grow**: W = 2 with `parallel.max_world_size = 3`: a third worker started while streams
//!   run joins at the next epoch boundary as rank 2 with redundant replicas of the hot experts;
//!   streams in flight continue unchanged, the old ranks reload no expert, and the measured
//!   max/mean per-rank expert load does not get worse (a checkpoint whose router favours experts
//!   0..4, all on rank 0: it drops from 2 to about 1.5).
//!
//! Without enough redundancy the cluster waits for a replacement as before (`fault_recovery`,
//! `fault_watchdog`; planner unit tests).

mod cluster_support;

use cluster_support::{ADMIN_TOKEN, Cluster, Reference, Timed, generate_timed, greedy_request};
use fathom_proto::v1::admin_client::AdminClient;
use fathom_proto::v1::{
    ClusterState, ClusterStatusResponse, ExpertLoadRequest, ExpertLoadResponse,
};
use fathom_worker::weights::{SynthOptions, synth_checkpoint};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The tiny model with a router bias that sends every token to experts 0..4 of every MoE layer
/// (all on rank 0 of two): hot experts whose replicas a new rank should take.
fn skewed_model() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("fathom-skewed-").tempdir().unwrap();
        let opts = SynthOptions { router_skew: 8.0, ..SynthOptions::default() };
        synth_checkpoint(&fathom_common::ModelConfig::tiny(), &opts, dir.path()).expect("synth");
        dir
    })
    .path()
    .to_path_buf()
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 31 + salt * 17 + 5) % 500).collect()
}

async fn expert_load(c: &Cluster) -> ExpertLoadResponse {
    let mut admin = AdminClient::connect(c.url()).await.expect("admin connect");
    let mut req = tonic::Request::new(ExpertLoadRequest { window_ms: 0 });
    req.metadata_mut().insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
    admin.expert_load(req).await.expect("ExpertLoad").into_inner()
}

/// Starts one greedy stream per prompt; `progress` counts tokens received.
async fn start_streams(
    c: &Cluster,
    prompts: &[Vec<u32>],
    tokens: u32,
    progress: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Result<Timed, tonic::Status>>> {
    let mut tasks = Vec::new();
    for p in prompts {
        let mut client = c.client().await.expect("client");
        let (p, progress) = (p.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            generate_timed(&mut client, greedy_request(&p, tokens), progress).await
        }));
    }
    tasks
}

async fn wait_progress(progress: &AtomicUsize, at_least: usize) {
    let started = Instant::now();
    while progress.load(Ordering::SeqCst) < at_least {
        assert!(started.elapsed() < Duration::from_secs(60), "streams do not progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every stream completes and equals the in-process reference.
async fn check_streams(
    tasks: Vec<tokio::task::JoinHandle<Result<Timed, tonic::Status>>>,
    prompts: &[Vec<u32>],
    tokens: u32,
    reference: &Reference,
) {
    for (i, (t, p)) in tasks.into_iter().zip(prompts).enumerate() {
        let r = tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .unwrap_or_else(|_| panic!("stream {i} did not finish within 120 s"))
            .unwrap()
            .unwrap_or_else(|e| panic!("stream {i} failed: {e:?}"));
        let want = reference.greedy(p, tokens as usize).unwrap();
        assert_eq!(r.ids, want, "stream {i} (prompt of {} tokens)", p.len());
    }
}

fn serving_ids(s: &ClusterStatusResponse) -> Vec<String> {
    s.workers.iter().map(|w| w.worker_id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_without_spare_shrinks_onto_survivors_that_reload_no_expert() {
    const STREAMS: usize = 8;
    const TOKENS: u32 = 16;
    let mut c = Cluster::start_registry_with(
        4,
        4,
        vec!["--migrate-timeout-ms".into(), "60000".into()],
        "[parallel]\nredundant_slots_per_rank = 5\n",
        cluster_support::tiny_model(),
    )
    .expect("cluster of 4");
    let s = c.status().await;
    assert_eq!((s.world_size, s.epoch), (4, 1), "{s:?}");
    assert!(
        s.workers.iter().all(|w| w.epoch_loaded_expert_bytes > 0),
        "the first epoch loads experts everywhere: {s:?}"
    );
    let reference = Reference::load(&c.model).unwrap();
    let prompts: Vec<Vec<u32>> = (0..STREAMS).map(|i| prompt(2 + (i * 7) % 19, i as u32)).collect();
    let progress = Arc::new(AtomicUsize::new(0));
    let tasks = start_streams(&c, &prompts, TOKENS, &progress).await;
    wait_progress(&progress, STREAMS * TOKENS as usize / 4).await;
    let victim = 1;
    c.workers[victim].kill().expect("SIGKILL w1");
    let killed = Instant::now();
    check_streams(tasks, &prompts, TOKENS, &reference).await;
    eprintln!("SHRINK streams done {} ms after the kill", killed.elapsed().as_millis());
    let s = c.status().await;
    assert_eq!(s.state, ClusterState::Serving as i32, "{s:?}");
    assert_eq!(s.world_size, 3, "the survivors serve without a replacement: {s:?}");
    assert!(s.epoch >= 2, "{s:?}");
    assert_eq!(serving_ids(&s), ["w0", "w2", "w3"], "survivors keep their order: {s:?}");
    for w in &s.workers {
        assert_eq!(w.epoch_loaded_expert_bytes, 0, "{} reloaded experts: {s:?}", w.worker_id);
        assert!(w.epoch_reused_bytes > 0, "{} kept its weights: {s:?}", w.worker_id);
    }
    let load = expert_load(&c).await;
    assert_eq!(load.rank_tokens.len(), 3, "{load:?}");
    // New requests are served by the shrunk world too.
    let mut client = c.client().await.unwrap();
    let p = prompt(9, 99);
    let got = cluster_support::generate(&mut client, greedy_request(&p, 8)).await.unwrap();
    assert_eq!(got, reference.greedy(&p, 8).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_while_serving_joins_with_replicas_of_hot_experts() {
    const STREAMS: usize = 8;
    const TOKENS: u32 = 16;
    let mut c = Cluster::start_registry_with(
        2,
        2,
        vec!["--migrate-timeout-ms".into(), "60000".into()],
        "[parallel]\nmax_world_size = 3\n",
        skewed_model(),
    )
    .expect("cluster of 2");
    let s = c.status().await;
    assert_eq!((s.world_size, s.epoch), (2, 1), "{s:?}");
    let reference = Reference::load(&c.model).unwrap();
    let prompts: Vec<Vec<u32>> =
        (0..STREAMS).map(|i| prompt(3 + (i * 5) % 17, 40 + i as u32)).collect();
    // Measured load on W = 2.
    let progress = Arc::new(AtomicUsize::new(0));
    let tasks = start_streams(&c, &prompts, TOKENS, &progress).await;
    check_streams(tasks, &prompts, TOKENS, &reference).await;
    let before = expert_load(&c).await;
    assert!(before.max_over_mean > 0.0, "load measured on W=2: {before:?}");
    // Streams in flight while a third worker starts.
    let progress = Arc::new(AtomicUsize::new(0));
    let tasks = start_streams(&c, &prompts, TOKENS, &progress).await;
    wait_progress(&progress, STREAMS * TOKENS as usize / 4).await;
    c.add_registry_worker().expect("a third worker");
    check_streams(tasks, &prompts, TOKENS, &reference).await;
    cluster_support::eventually(Duration::from_secs(30), || async {
        let s = c.status().await;
        s.world_size == 3 && s.state == ClusterState::Serving as i32
    })
    .await
    .expect("the third worker joins");
    let s = c.status().await;
    assert_eq!(serving_ids(&s), ["w0", "w1", "w2"], "{s:?}");
    for w in &s.workers {
        let new = w.worker_id == "w2";
        assert_eq!(w.epoch_loaded_expert_bytes > 0, new, "{}: {s:?}", w.worker_id);
        assert_eq!(w.epoch_reused_bytes > 0, !new, "{}: {s:?}", w.worker_id);
    }
    // The same workload on W = 3.
    let progress = Arc::new(AtomicUsize::new(0));
    let tasks = start_streams(&c, &prompts, TOKENS, &progress).await;
    check_streams(tasks, &prompts, TOKENS, &reference).await;
    let after = expert_load(&c).await;
    assert_eq!(after.rank_tokens.len(), 3, "{after:?}");
    assert!(after.rank_tokens[2] > 0, "the new rank computes expert tokens: {after:?}");
    for l in &after.layers {
        assert!(
            l.replicas.iter().sum::<u32>() > l.replicas.len() as u32,
            "layer {}: the new rank holds redundant replicas: {:?}",
            l.layer,
            l.replicas
        );
    }
    eprintln!(
        "GROW max/mean per-rank expert load: W=2 {:.3} -> W=3 {:.3}",
        before.max_over_mean, after.max_over_mean
    );
    assert!(
        after.max_over_mean <= before.max_over_mean + 1e-9,
        "max/mean got worse: {} -> {}",
        before.max_over_mean,
        after.max_over_mean
    );
}
