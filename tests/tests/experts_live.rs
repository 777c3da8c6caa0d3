//! Expert replicas while serving (issue 9), on real processes over loopback: W `fathom worker`
//! processes + `fathom coordinator`, a synthesized tiny checkpoint whose router bias sends every
//! token to experts 0..4 (all on rank 0 under the even placement), the Admin API and
//! `fathom admin`.
//!
//! - `rebalance_cuts_the_hottest_rank_load`: after `fathom admin experts rebalance`, max/mean
//!   per-rank expert load measured by the workers' own counters drops by >= 30%, and the same
//!   requests give the same tokens as before.
//! - `replica_changes_during_32_streams_change_no_output`: two placement changes applied while 32
//!   greedy streams run; nothing is lost and every output equals a run without changes.
//! - `invalid_requests_and_bad_tokens_are_refused`: unknown layer/expert, too many or zero
//!   replicas → INVALID_ARGUMENT; a missing or wrong token → UNAUTHENTICATED.

mod cluster_support;

use anyhow::{Context, Result};
use cluster_support::{ADMIN_TOKEN, eventually, fathom_bin, generate, greedy_request, port};
use fathom_proto::v1::admin_client::AdminClient;
use fathom_proto::v1::inference_client::InferenceClient;
use fathom_proto::v1::{
    ExpertLoadRequest, ExpertLoadResponse, ExpertReplicaCount, ExplicitReplicas,
    SetExpertReplicasRequest, set_expert_replicas_request::Replicas,
};
use fathom_worker::weights::{SynthOptions, synth_checkpoint};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;
use tonic::transport::Channel;

/// The tiny model with `router_skew` on experts 0..top_k (4): every token picks them.
fn skewed_model() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("fathom-skewed-").tempdir().unwrap();
        let opts = SynthOptions { router_skew: 8.0, ..SynthOptions::default() };
        synth_checkpoint(&fathom_common::ModelConfig::tiny(), &opts, dir.path())
            .expect("synth skewed tiny");
        dir
    })
    .path()
    .to_path_buf()
}

/// W workers + a coordinator with 2 redundant slots per rank, none filled at start.
struct Cluster {
    children: Vec<Child>,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Cluster {
    fn start(workers: usize, model: &Path) -> Result<Self> {
        let bin = fathom_bin();
        let dir = tempfile::Builder::new().prefix("fathom-experts-").tempdir()?;
        let config = dir.path().join("cluster.toml");
        std::fs::write(
            &config,
            "cluster = \"experts\"\n[parallel]\nredundant_slots_per_rank = 2\nredundant_experts = 0\n",
        )?;
        let mut children = Vec::new();
        let mut statics = Vec::new();
        for i in 0..workers {
            let addr = format!("127.0.0.1:{}", port());
            let id = format!("w{i}");
            children.push(
                Command::new(&bin)
                    .args(["worker", "--id", &id, "--listen", &addr, "--advertise", &addr])
                    .arg("--config")
                    .arg(&config)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("spawning fathom worker")?,
            );
            statics.push(format!("--static-worker={id}={addr}"));
        }
        let listen = format!("127.0.0.1:{}", port());
        let mut coordinator = Command::new(&bin)
            .arg("coordinator")
            .arg("--config")
            .arg(&config)
            .arg("--model")
            .arg(model)
            .args(["--listen", &listen, "--world-size", &workers.to_string()])
            .args(["--admin-token", ADMIN_TOKEN, "--kv-blocks", "512", "--kv-block-size", "16"])
            .args(&statics)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning fathom coordinator")?;
        let stdout = coordinator.stdout.take().expect("piped");
        children.push(coordinator);
        let mut cluster = Cluster { children, url: String::new(), _dir: dir };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if let Some(a) = line.strip_prefix("fathom: serving on ") {
                    let _ = tx.send(a.to_string());
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(90)).context("coordinator not serving")?;
        cluster.url = format!("http://{addr}");
        Ok(cluster)
    }

    async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::connect(self.url.clone()).await.expect("admin client")
    }

    async fn inference(&self) -> InferenceClient<Channel> {
        InferenceClient::connect(self.url.clone()).await.expect("inference client")
    }

    /// `fathom admin --endpoint URL --token T ARGS --json`, parsed.
    fn cli(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new(fathom_bin())
            .args(["admin", "--endpoint", &self.url, "--token", ADMIN_TOKEN, "--json"])
            .args(args)
            .output()
            .expect("running fathom admin");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    }
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

async fn load(admin: &mut AdminClient<Channel>) -> ExpertLoadResponse {
    admin
        .expert_load(authed(ExpertLoadRequest { window_ms: 0 }, ADMIN_TOKEN))
        .await
        .expect("ExpertLoad")
        .into_inner()
}

/// Waits until `version` is in effect with nothing pending.
async fn wait_version(admin: &mut AdminClient<Channel>, version: u64) {
    let admin = std::sync::Arc::new(tokio::sync::Mutex::new(admin.clone()));
    eventually(Duration::from_secs(30), || {
        let admin = admin.clone();
        async move {
            let l = load(&mut *admin.lock().await).await;
            l.placement_version == version && l.pending_placement_version == 0
        }
    })
    .await
    .unwrap_or_else(|e| panic!("placement {version} not in effect: {e}"));
}

/// `n` prompts of a few tokens each, all different.
fn prompts(n: usize) -> Vec<Vec<u32>> {
    (0..n).map(|i| (0..3 + i % 5).map(|j| ((i * 31 + j * 7) % 500) as u32 + 1).collect()).collect()
}

/// Runs every prompt at once, greedy, `tokens` each.
async fn run_all(c: &Cluster, prompts: &[Vec<u32>], tokens: u32) -> Vec<Vec<u32>> {
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (url, p) = (c.url.clone(), p.clone());
            tokio::spawn(async move {
                let mut client = InferenceClient::connect(url).await.expect("client");
                generate(&mut client, greedy_request(&p, tokens)).await.expect("generate")
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("request task"));
    }
    out
}

/// Mean over layers of max/mean of the measured per-rank expert load.
fn max_over_mean(l: &ExpertLoadResponse) -> f64 {
    let per_layer: Vec<f64> = l
        .layers
        .iter()
        .filter(|x| x.rank_tokens.iter().any(|&t| t > 0))
        .map(|x| {
            let max = *x.rank_tokens.iter().max().unwrap() as f64;
            let mean = x.rank_tokens.iter().sum::<u64>() as f64 / x.rank_tokens.len() as f64;
            max / mean
        })
        .collect();
    assert!(!per_layer.is_empty(), "no rank load measured: {l:?}");
    per_layer.iter().sum::<f64>() / per_layer.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebalance_cuts_the_hottest_rank_load() {
    let c = Cluster::start(4, &skewed_model()).unwrap();
    let mut admin = c.admin().await;
    let work = prompts(16);
    let first = run_all(&c, &work, 8).await;

    let before = load(&mut admin).await;
    assert_eq!(before.placement_version, 0);
    // The router bias sends every token to experts 0..4 of every MoE layer.
    for l in &before.layers {
        let hot: u64 = l.tokens[..4].iter().sum();
        assert!(
            hot > 0 && hot == l.tokens.iter().sum::<u64>(),
            "layer {}: {:?}",
            l.layer,
            l.tokens
        );
        assert!(l.replicas.iter().all(|&r| r == 1), "{:?}", l.replicas);
    }
    let skewed = max_over_mean(&before);
    assert!((before.max_over_mean - skewed).abs() < 1e-9, "the service's own max/mean");
    assert!(skewed > 3.0, "all hot experts on rank 0: {skewed} ({before:?})");

    let dry = c.cli(&["experts", "rebalance", "--dry-run"]);
    assert_eq!(dry["placement_version"], 0, "{dry}");
    let r = c.cli(&["experts", "rebalance"]);
    assert_eq!(r["placement_version"], 1, "{r}");
    assert!(r["moved"].as_u64().unwrap() > 0, "{r}");
    assert!(r["balancedness_after"].as_f64() > r["balancedness_before"].as_f64(), "{r}");
    // Applied at a step boundary while idle (the engine steps to collect the ranks' loads).
    wait_version(&mut admin, 1).await;

    let second = run_all(&c, &work, 8).await;
    assert_eq!(second, first, "the placement changed an output");
    let after = load(&mut admin).await;
    assert!(after.layers.iter().all(|l| l.replicas[..4].iter().all(|&r| r > 1)), "{after:?}");
    assert!(after.rank_tokens.iter().all(|&t| t > 0), "every rank computes: {after:?}");
    let balanced = max_over_mean(&after);
    eprintln!("max/mean per-rank expert load: {skewed:.3} before, {balanced:.3} after rebalance");
    assert!(balanced <= 0.7 * skewed, "max/mean {skewed:.3} -> {balanced:.3}: less than 30% drop");
    let text = c.cli(&["experts", "load"]);
    assert_eq!(text["placement_version"], 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn replica_changes_during_32_streams_change_no_output() {
    let c = Cluster::start(4, &skewed_model()).unwrap();
    let mut admin = c.admin().await;
    let work = prompts(32);
    let tokens = 48;
    let baseline = run_all(&c, &work, tokens).await;
    assert!(baseline.iter().all(|o| o.len() == tokens as usize));

    // The same 32 streams again; two placement changes land while they run.
    let (done_tx, done_rx) = tokio::sync::watch::channel(0usize);
    let done_tx = std::sync::Arc::new(done_tx);
    let handles: Vec<_> = work
        .iter()
        .map(|p| {
            let (url, p, done) = (c.url.clone(), p.clone(), done_tx.clone());
            tokio::spawn(async move {
                let mut client = InferenceClient::connect(url).await.expect("client");
                let out = generate(&mut client, greedy_request(&p, tokens)).await;
                done.send_modify(|n| *n += 1);
                out
            })
        })
        .collect();
    // Wait until the streams are producing (some tokens counted).
    let probe = std::sync::Arc::new(tokio::sync::Mutex::new(admin.clone()));
    eventually(Duration::from_secs(30), || {
        let probe = probe.clone();
        async move { load(&mut *probe.lock().await).await.placement_steps > 3 }
    })
    .await
    .unwrap();
    let set = admin
        .set_expert_replicas(authed(
            SetExpertReplicasRequest { replicas: Some(Replicas::Redundant(8)) },
            ADMIN_TOKEN,
        ))
        .await
        .expect("redundant 8")
        .into_inner();
    assert_eq!(set.placement_version, 1);
    wait_version(&mut admin, 1).await;
    let first_switch_done = *done_rx.borrow();
    let layer = load(&mut admin).await.layers[0].layer;
    let explicit = Replicas::Explicit(ExplicitReplicas {
        layers: Vec::new(),
        experts: vec![
            ExpertReplicaCount { layer, expert: 0, count: 4 },
            ExpertReplicaCount { layer, expert: 1, count: 4 },
            ExpertReplicaCount { layer, expert: 2, count: 1 },
            ExpertReplicaCount { layer, expert: 3, count: 1 },
        ],
    });
    let set = admin
        .set_expert_replicas(authed(
            SetExpertReplicasRequest { replicas: Some(explicit) },
            ADMIN_TOKEN,
        ))
        .await
        .expect("explicit counts")
        .into_inner();
    assert_eq!(set.placement_version, 2);
    wait_version(&mut admin, 2).await;
    let second_switch_done = *done_rx.borrow();
    let mut changed = Vec::new();
    for h in handles {
        changed.push(h.await.expect("stream task").expect("stream ended with an error"));
    }
    assert!(
        second_switch_done < work.len(),
        "the changes landed after the streams ended ({first_switch_done}, {second_switch_done})"
    );
    let l = load(&mut admin).await;
    let lp = l.layers.iter().find(|x| x.layer == layer).unwrap();
    assert_eq!(&lp.replicas[..4], &[4, 4, 1, 1], "{lp:?}");
    assert_eq!(changed.len(), baseline.len());
    for (i, (a, b)) in baseline.iter().zip(&changed).enumerate() {
        assert_eq!(a, b, "stream {i} changed under the placement changes");
    }
    // Still serving afterwards.
    let mut inf = c.inference().await;
    assert_eq!(generate(&mut inf, greedy_request(&work[0], 4)).await.unwrap(), baseline[0][..4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_requests_and_bad_tokens_are_refused() {
    let c = Cluster::start(2, &skewed_model()).unwrap();
    let mut admin = c.admin().await;
    let moe = load(&mut admin).await.layers[0].layer;
    let one = |layer: u32, expert: u32, count: u32| SetExpertReplicasRequest {
        replicas: Some(Replicas::Explicit(ExplicitReplicas {
            layers: Vec::new(),
            experts: vec![ExpertReplicaCount { layer, expert, count }],
        })),
    };
    let cases = [
        (one(0, 1, 2), "layer 0"),                 // dense layer
        (one(99, 1, 2), "layer 99"),               // no such layer
        (one(moe, 16, 2), "expert 16"),            // 16 experts: 0..16
        (one(moe, 3, 3), "more than the 2 ranks"), // W = 2
        (one(moe, 3, 0), "zero replicas"),
        (SetExpertReplicasRequest { replicas: Some(Replicas::Redundant(5)) }, "slots"), // 2x2
        (SetExpertReplicasRequest { replicas: None }, "redundant N"),
    ];
    for (req, text) in cases {
        let e = admin.set_expert_replicas(authed(req, ADMIN_TOKEN)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{text}: {e:?}");
        assert!(e.message().contains(text), "{text}: {}", e.message());
    }
    assert_eq!(load(&mut admin).await.placement_version, 0, "refusals change nothing");
    // Auth: every Admin RPC, missing or wrong token.
    let e = admin.expert_load(ExpertLoadRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = admin.expert_load(authed(ExpertLoadRequest::default(), "wrong")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = admin.rebalance(authed(Default::default(), "wrong")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = admin.set_expert_replicas(one(moe, 3, 2)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = admin.cluster_status(authed(Default::default(), "")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // The CLI: one line on stderr naming the code, non-zero exit.
    let out = Command::new(fathom_bin())
        .args(["admin", "--endpoint", &c.url, "--token", "nope", "experts", "load"])
        .env_remove("FATHOM_ADMIN_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Unauthenticated"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let out = Command::new(fathom_bin())
        .args(["admin", "--endpoint", &c.url, "--token", ADMIN_TOKEN, "experts", "set"])
        .args([format!("{moe}:3=0")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("InvalidArgument"), "{err}");
    // A valid explicit change through the CLI, then status.
    let ok = c.cli(&["experts", "set", &format!("{moe}:3=2")]);
    assert_eq!(ok["placement_version"], 1, "{ok}");
    let status = c.cli(&["status"]);
    assert_eq!(status["world_size"], 2, "{status}");
}
