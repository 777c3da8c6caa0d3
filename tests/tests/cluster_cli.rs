//! `fathom generate --endpoint` against a running cluster prints exactly what the in-process
//! `fathom generate --model` prints (same JSON: prompt ids, generated ids, text, finish reason,
//! top logits), for token-id and text prompts.

mod cluster_support;

use cluster_support::{Cluster, Opts, fathom_bin};
use std::process::Command;

fn run_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(fathom_bin()).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn generate_endpoint_equals_generate_model() {
    let c = Cluster::start(Opts::default()).expect("cluster");
    let model = c.model.display().to_string();
    let url = c.url();
    let cases: [&[&str]; 2] = [
        &[
            "--prompt-ids",
            "5,17,42,7",
            "--max-new-tokens",
            "9",
            "--ignore-eos",
            "--logits-topk",
            "3",
        ],
        &["--prompt", "hello fathom", "--max-new-tokens", "6", "--ignore-eos"],
    ];
    for case in cases {
        let mut local = vec!["generate", "--json", "--model", &model];
        local.extend_from_slice(case);
        let mut remote = vec!["generate", "--json", "--endpoint", &url];
        remote.extend_from_slice(case);
        let (want, got) = (run_json(&local), run_json(&remote));
        for field in ["prompt_ids", "generated_ids", "text", "finish_reason"] {
            assert_eq!(got[field], want[field], "{case:?}: field {field}");
        }
        if case.contains(&"--logits-topk") {
            let (g, w) = (got["steps"].as_array().unwrap(), want["steps"].as_array().unwrap());
            assert_eq!(g.len(), w.len());
            for (a, b) in g.iter().zip(w) {
                let ids = |v: &serde_json::Value| -> Vec<u64> {
                    v["top"].as_array().unwrap().iter().map(|p| p[0].as_u64().unwrap()).collect()
                };
                assert_eq!(ids(a), ids(b), "top-logit ids");
                for (x, y) in a["top"].as_array().unwrap().iter().zip(b["top"].as_array().unwrap())
                {
                    let (x, y) = (x[1].as_f64().unwrap(), y[1].as_f64().unwrap());
                    assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "logit {x} vs {y}");
                }
            }
        }
    }
}
