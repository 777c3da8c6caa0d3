//! `fathom checkpoint` through the real binary: synth → inspect, the 671B dry count, and the CLI
//! error contract (one line on stderr, non-zero exit).

use std::process::{Command, Output};

fn fathom(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fathom")).args(args).output().expect("run fathom")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn synth_then_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = fathom(&[
        "checkpoint",
        "synth",
        "--preset",
        "tiny",
        "--dtype",
        "fp8",
        "--seed",
        "4",
        "--out",
        d,
        "--shard-mb",
        "1",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&fathom(&["checkpoint", "inspect", d, "--json"]));
    let dry = json(&fathom(&[
        "checkpoint",
        "inspect",
        "--preset",
        "tiny",
        "--dry",
        "--dtype",
        "fp8",
        "--json",
    ]));
    assert_eq!(v["params"], dry["params"]);
    assert_eq!(v["total_bytes"], dry["total_bytes"]);
    assert!(v["dtypes"]["F8_E4M3"]["tensors"].as_u64().unwrap() > 100);
    assert_eq!(v["has_mtp"], true);
    let text = fathom(&["checkpoint", "inspect", d]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("(valid, fp8)"));
}

#[test]
fn dry_full_counts_match_spec() {
    let v = json(&fathom(&["checkpoint", "inspect", "--preset", "full", "--dry", "--json"]));
    assert_eq!(v["params"]["main"], 671_877_944_064u64);
    assert_eq!(v["params"]["mtp_unique"], 11_624_027_648u64);
}

#[test]
fn errors_are_one_line_on_stderr_with_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    std::fs::write(dir.path().join("config.json"), "{oops").unwrap();
    let cases: [&[&str]; 6] = [
        &["checkpoint", "inspect", d],
        &["checkpoint", "inspect", "/nonexistent/dir"],
        &["checkpoint", "inspect", "--preset", "huge", "--dry"],
        &["checkpoint", "inspect", "--preset", "tiny"],
        &["checkpoint", "synth", "--preset", "tiny", "--dtype", "f16", "--out", d],
        &["checkpoint", "synth", "--preset", "full-width:0", "--out", d],
    ];
    for args in cases {
        let out = fathom(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("fathom: "), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let out = fathom(&["checkpoint", "inspect", d]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
}
