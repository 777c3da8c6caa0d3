//! `fathom generate --model` with sampling: seeded, reproducible, and the same on every layout
//! (the sampler's random stream is keyed by (seed, token index) only); `--return-logprobs`
//! fields; text prompts through the checkpoint's `tokenizer.json`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden").join(case)
}

fn fathom_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_fathom")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fathom {args:?} failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("fathom {args:?}: stdout is not JSON ({e}): {stderr}"))
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

#[test]
fn seeded_sampling_is_reproducible_and_layout_independent() {
    let dir = fixture("sparse_long");
    let dir = dir.to_str().unwrap();
    let base = [
        "generate",
        "--model",
        dir,
        "--prompt-ids",
        "0,5,17,33,2,9,70,11,4,60",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--temperature",
        "1",
        "--top-k",
        "5",
        "--top-p",
        "0.9",
        "--seed",
        "7",
        "--json",
        "--return-logprobs",
    ];
    let run = |extra: &[&str]| fathom_json(&[&base[..], extra].concat());
    let one = run(&[]);
    let sampled = ids(&one["generated_ids"]);
    assert_eq!(sampled.len(), 12);
    let masks = one["sampling_masks"].as_array().unwrap();
    let logprobs = one["logprobs"].as_array().unwrap();
    assert_eq!((masks.len(), logprobs.len()), (12, 12));
    for (i, (m, lp)) in masks.iter().zip(logprobs).enumerate() {
        let m = ids(m);
        assert!(!m.is_empty() && m.len() <= 5, "step {i}: mask {m:?} (top-k 5)");
        assert!(m.windows(2).all(|w| w[0] < w[1]), "step {i}: mask not sorted: {m:?}");
        assert!(m.contains(&sampled[i]), "step {i}: token {} outside its mask {m:?}", sampled[i]);
        let lp = lp.as_f64().unwrap();
        assert!(lp <= 0.0 && lp.is_finite(), "step {i}: logprob {lp}");
    }
    // Same request again, then other layouts: the same tokens and masks; logprobs equal up to
    // the summation-order differences of sharded logits (<= 1e-5 relative on the logits).
    for extra in [
        &[][..],
        &["--world-size", "2", "--tp", "2"],
        &["--world-size", "4", "--tp", "2"],
        &["--world-size", "2", "--tp", "1", "--comm", "tcp"],
    ] {
        let other = run(extra);
        assert_eq!(ids(&other["generated_ids"]), sampled, "{extra:?}");
        assert_eq!(other["sampling_masks"], one["sampling_masks"], "{extra:?}");
        for (a, b) in other["logprobs"].as_array().unwrap().iter().zip(logprobs) {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!((a - b).abs() <= 1e-4, "{extra:?}: logprob {a} vs {b}");
        }
    }
}

#[test]
fn text_prompt_uses_the_checkpoints_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let dir = dir.to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fathom"))
        .args(["checkpoint", "synth", "--preset", "tiny", "--seed", "3", "--out", dir])
        .output()
        .unwrap();
    assert!(out.status.success(), "synth: {}", String::from_utf8_lossy(&out.stderr));
    let common = ["--max-new-tokens", "4", "--ignore-eos", "--json"];
    let text = fathom_json(
        &[&["generate", "--model", dir, "--prompt", "Hello, 世界"][..], &common].concat(),
    );
    let prompt = ids(&text["prompt_ids"]);
    // Byte-level tokens: at least one per UTF-8 byte group, none beyond the vocabulary.
    assert!(!prompt.is_empty() && prompt.iter().all(|&i| i < 512), "{prompt:?}");
    assert_eq!(ids(&text["generated_ids"]).len(), 4);
    assert!(text["text"].is_string());
    let csv = prompt.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let by_ids =
        fathom_json(&[&["generate", "--model", dir, "--prompt-ids", &csv][..], &common].concat());
    assert_eq!(by_ids["generated_ids"], text["generated_ids"]);
    assert_eq!(by_ids["text"], text["text"]);
}
