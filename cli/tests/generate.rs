//! `fathom generate` end to end on the golden fixtures (`<workspace>/tests/fixtures/golden`):
//! greedy ids equal HF's, the JSON fields of CLI.md, stop handling, and one-line errors with a
//! non-zero exit for bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden")
}

fn fathom(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fathom")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn csv(v: &serde_json::Value) -> String {
    v.as_array().unwrap().iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

#[test]
fn greedy_json_matches_hf_on_every_golden_case() {
    let Ok(dirs) = std::fs::read_dir(fixtures()) else {
        eprintln!("SKIP: no golden fixtures at {}", fixtures().display());
        return;
    };
    let mut n = 0;
    for dir in dirs.map(|d| d.unwrap().path()).filter(|p| p.join("golden.json").exists()) {
        let g: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let greedy = g["greedy_ids"].as_array().unwrap().len().to_string();
        let (rc, out, err) = fathom(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &csv(&g["prompt_ids"]),
            "--max-new-tokens",
            &greedy,
            "--ignore-eos",
            "--json",
            "--logits-topk",
            "3",
        ]);
        assert_eq!(rc, 0, "{}: {err}", dir.display());
        let o: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(o["generated_ids"], g["greedy_ids"], "{}", dir.display());
        assert_eq!(o["prompt_ids"], g["prompt_ids"]);
        assert_eq!(o["finish_reason"], "length");
        assert_eq!(o["text"], "");
        let steps = o["steps"].as_array().unwrap();
        assert_eq!(steps.len(), g["greedy_ids"].as_array().unwrap().len());
        for (s, id) in steps.iter().zip(g["greedy_ids"].as_array().unwrap()) {
            let top = s["top"].as_array().unwrap();
            assert_eq!(top.len(), 3);
            assert_eq!(&top[0][0], id, "the top logit is the greedy choice");
            assert!(top[0][1].as_f64().unwrap() >= top[1][1].as_f64().unwrap());
        }
        // Stopping at the first generated id as a stop id gives exactly one token, "stop".
        let first = g["greedy_ids"][0].to_string();
        let (rc, out, _) = fathom(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &csv(&g["prompt_ids"]),
            "--max-new-tokens",
            "5",
            "--stop-ids",
            &first,
            "--json",
        ]);
        assert_eq!(rc, 0);
        let o: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(o["generated_ids"].as_array().unwrap().len(), 1);
        assert_eq!(o["finish_reason"], "stop");
        assert!(o.get("steps").is_none());
        n += 1;
    }
    assert!(n > 0, "no golden case found");
}

#[test]
fn bad_input_is_one_line_and_non_zero() {
    let dir = fixtures().join("sparse_long");
    if !dir.exists() {
        eprintln!("SKIP: no golden fixture at {}", dir.display());
        return;
    }
    let m = dir.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--prompt-ids", "1,2,999"], "not below vocab_size"),
        (&["--prompt-ids", ","], "prompt is empty"),
        (&["--prompt-ids", "1,x"], "is not a token id"),
        (&["--prompt-ids", "1", "--temperature", "-1"], "--temperature"),
        (&["--prompt-ids", "1", "--top-p", "1.5"], "--top-p"),
        (&["--prompt-ids", "1", "--stop-ids", "4096"], "--stop-ids"),
        (&["--prompt", "hello"], "tokenizer.json"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["generate", "--model", m, "--max-new-tokens", "3"];
        args.extend_from_slice(extra);
        let (rc, out, err) = fathom(&args);
        assert_eq!(rc, 1, "{extra:?}: {err}");
        assert!(out.is_empty());
        assert_eq!(err.trim_end().lines().count(), 1, "{extra:?}: {err}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{extra:?}: {err}");
    }
    let (rc, _, err) =
        fathom(&["generate", "--model", m, "--prompt-ids", "1,2", "--max-new-tokens", "300"]);
    assert_eq!(rc, 1);
    assert!(err.contains("max_position_embeddings 256"), "{err}");
}
