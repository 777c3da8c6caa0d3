//! `fathom generate --world-size W --tp T --comm tcp|local` end to end on the golden fixtures:
//! W real processes over `TcpComm` (this binary's hidden `fathom rank`), greedy ids equal to
//! HF's (`golden.json`) and to the one-rank run, top logits within 1e-5 relative of the
//! one-rank run; a child rank that dies or stalls makes the command fail, naming the rank,
//! within the collective deadline.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden").join(name)
}

fn fathom(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fathom")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn golden(dir: &Path) -> (String, serde_json::Value) {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let csv = g["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",");
    (csv, g["greedy_ids"].clone())
}

/// Runs generate with `extra` flags; returns the parsed JSON.
fn generate(dir: &Path, prompt: &str, n: usize, extra: &[&str]) -> serde_json::Value {
    let n = n.to_string();
    let mut args = vec![
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        prompt,
        "--max-new-tokens",
        &n,
        "--ignore-eos",
        "--json",
        "--logits-topk",
        "5",
    ];
    args.extend_from_slice(extra);
    let (rc, out, err) = fathom(&args);
    assert_eq!(rc, 0, "{} {extra:?}: {err}", dir.display());
    serde_json::from_str(&out).unwrap()
}

fn top(v: &serde_json::Value) -> Vec<Vec<(u64, f64)>> {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
                .collect()
        })
        .collect()
}

#[test]
fn tcp_processes_match_one_rank_and_hf() {
    for name in ["dense2", "sparse_long"] {
        let dir = case(name);
        let (prompt, greedy) = golden(&dir);
        let n = greedy.as_array().unwrap().len().min(8);
        let one = generate(&dir, &prompt, n, &["--return-routed-experts"]);
        assert_eq!(
            one["routed_experts"].as_array().unwrap().len(),
            prompt.split(',').count() + n - 1,
            "{name}: one routing entry per position fed"
        );
        let want: Vec<_> = greedy.as_array().unwrap()[..n].to_vec();
        assert_eq!(one["generated_ids"].as_array().unwrap(), &want, "{name}: one rank vs HF");
        for (w, t, comm) in [
            ("2", "2", "tcp"),
            ("2", "1", "tcp"),
            ("4", "2", "tcp"),
            ("4", "4", "tcp"),
            ("4", "1", "local"),
        ] {
            let got = generate(
                &dir,
                &prompt,
                n,
                &["--world-size", w, "--tp", t, "--comm", comm, "--return-routed-experts"],
            );
            assert_eq!(
                got["generated_ids"], one["generated_ids"],
                "{name}: W={w} T={t} {comm}: greedy ids"
            );
            assert_eq!(
                got["routed_experts"], one["routed_experts"],
                "{name}: W={w} T={t} {comm}: routed experts"
            );
            for (step, (a, b)) in top(&got).iter().zip(top(&one)).enumerate() {
                let scale = b.iter().map(|p| p.1.abs()).fold(0.0, f64::max);
                for (x, y) in a.iter().zip(&b) {
                    assert_eq!(x.0, y.0, "{name}: W={w} T={t} {comm}: step {step} top ids");
                    assert!(
                        (x.1 - y.1).abs() <= 1e-5 * scale,
                        "{name}: W={w} T={t} {comm}: step {step}: logit {} vs {}",
                        x.1,
                        y.1
                    );
                }
            }
        }
    }
}

fn expect_failure_naming(fault: &str, rank: &str, deadline_s: u64) {
    let dir = case("dense2");
    let (prompt, _) = golden(&dir);
    let timeout = deadline_s.to_string();
    let started = Instant::now();
    let (rc, _, err) = fathom(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &prompt,
        "--max-new-tokens",
        "4",
        "--world-size",
        "4",
        "--tp",
        "2",
        "--comm",
        "tcp",
        "--comm-timeout-s",
        &timeout,
        "--fault",
        fault,
    ]);
    let took = started.elapsed();
    assert_ne!(rc, 0, "fault {fault}: the command succeeded");
    assert!(
        err.contains(&format!("rank {rank}")) || err.contains(&format!("[{rank}]")),
        "fault {fault}: error does not name rank {rank}: {err}"
    );
    // Loading and joining take a few seconds on a loaded machine; the failure itself must come
    // within the collective deadline.
    assert!(
        took < Duration::from_secs(deadline_s + 20),
        "fault {fault}: took {took:?} (deadline {deadline_s} s)"
    );
}

#[test]
fn dead_rank_process_is_named() {
    expect_failure_naming("2:exit", "2", 10);
}

#[test]
fn stalled_rank_process_is_named_within_the_deadline() {
    expect_failure_naming("3:sleep:60", "3", 2);
}
