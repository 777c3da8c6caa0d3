//! `TcpComm` across real processes: the `comm-probe` binary of this crate, one process per rank,
//! over loopback. Results are checked against the same serial references as the conformance
//! suite; failure cases check that a dead or stalled process is named by the survivors.

use fathom_kernels::comm::conformance::value;
use half::bf16;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PROBE: &str = env!("CARGO_BIN_EXE_comm-probe");

/// Starts rank 0 on an OS-chosen loopback port, then ranks 1..W; `scenario(rank)` and the
/// per-op timeout are passed through. Returns the children (rank order) and rank 0's stdout.
fn spawn_world(
    w: usize,
    timeout_ms: u64,
    scenario: impl Fn(usize) -> &'static str,
) -> (Vec<Child>, BufReader<std::process::ChildStdout>) {
    let probe = |rank: usize, addr: &str| {
        let mut cmd = Command::new(PROBE);
        cmd.args(["--rendezvous", addr, "--rank", &rank.to_string(), "--world", &w.to_string()])
            .args(["--scenario", scenario(rank), "--timeout-ms", &timeout_ms.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        cmd.spawn().expect("spawn comm-probe")
    };
    let mut root = probe(0, "127.0.0.1:0");
    let mut out0 = BufReader::new(root.stdout.take().expect("stdout"));
    let mut first = String::new();
    out0.read_line(&mut first).expect("rank 0 prints its address");
    let addr = first.trim().strip_prefix("rendezvous ").expect("rendezvous line").to_string();
    let mut kids = vec![root];
    kids.extend((1..w).map(|r| probe(r, &addr)));
    (kids, out0)
}

/// The JSON line a rank printed (waits for it to exit unless `kill` is set).
fn result_of(child: &mut Child, out: Option<&mut BufReader<std::process::ChildStdout>>) -> Value {
    let mut text = String::new();
    match out {
        Some(o) => o.read_to_string(&mut text),
        None => child.stdout.as_mut().expect("stdout").read_to_string(&mut text),
    }
    .expect("read rank output");
    let _ = child.wait();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("bad rank output {text:?}: {e}"))
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("number")).collect()
}

#[test]
fn processes_compute_the_same_sums_as_the_serial_reference() {
    for w in [2usize, 4] {
        let (mut kids, mut out0) = spawn_world(w, 10_000, |_| "sums");
        let mut results = Vec::new();
        for (r, k) in kids.iter_mut().enumerate() {
            results.push(result_of(k, if r == 0 { Some(&mut out0) } else { None }));
        }
        let want_f: Vec<u64> = (0..1000)
            .map(|i| (1..w).fold(value(0, i, 1), |a, r| a + value(r, i, 1)).to_bits() as u64)
            .collect();
        let b = |r, i| bf16::from_f32(value(r, i, 2)).to_f32();
        let want_h: Vec<u64> = (0..77)
            .map(|i| bf16::from_f32((1..w).fold(b(0, i), |a, r| a + b(r, i))).to_bits() as u64)
            .collect();
        for (d, res) in results.iter().enumerate() {
            assert!(res.get("error").is_none(), "W={w} rank {d}: {res}");
            assert_eq!(res["rank"].as_u64(), Some(d as u64));
            assert_eq!(u64s(&res["all_reduce_f32"]), want_f, "W={w} rank {d}");
            assert_eq!(u64s(&res["all_reduce_bf16"]), want_h, "W={w} rank {d}");
            let counts: Vec<u64> = (0..w).map(|s| ((s * 3 + d * 5) % 4) as u64).collect();
            let data: Vec<u64> = (0..w)
                .flat_map(|s| (0..(s * 3 + d * 5) % 4).map(move |k| (s * 1000 + d * 10 + k) as u64))
                .collect();
            assert_eq!(u64s(&res["a2a_counts"]), counts, "W={w} rank {d}");
            assert_eq!(u64s(&res["a2a"]), data, "W={w} rank {d}");
            let g = d / 2 * 2;
            let want_g = (value(g, 0, 3) + value(g + 1, 0, 3)).to_bits() as u64;
            assert_eq!(u64s(&res["group_sum"]), vec![want_g], "W={w} rank {d}");
        }
    }
}

#[test]
fn a_process_that_dies_is_named_by_the_others() {
    let (mut kids, mut out0) = spawn_world(3, 20_000, |r| if r == 2 { "die" } else { "survive" });
    let t = Instant::now();
    let r0 = result_of(&mut kids[0], Some(&mut out0));
    let r1 = result_of(&mut kids[1], None);
    assert!(t.elapsed() < Duration::from_secs(10), "survivors waited {:?}", t.elapsed());
    let status = kids[2].wait().expect("wait");
    assert_eq!(status.code(), Some(3), "the dying rank exits as scripted");
    for res in [r0, r1] {
        assert_eq!(res["kind"], "PeerLost", "{res}");
        assert_eq!(u64s(&res["ranks"]), vec![2], "{res}");
    }
}

#[test]
fn a_process_that_stalls_is_named_within_the_deadline() {
    let (mut kids, mut out0) = spawn_world(3, 1500, |r| if r == 1 { "stall" } else { "survive" });
    let t = Instant::now();
    let r0 = result_of(&mut kids[0], Some(&mut out0));
    let r2 = result_of(&mut kids[2], None);
    let took = t.elapsed();
    kids[1].kill().expect("kill the stalled rank");
    let _ = kids[1].wait();
    assert!(took < Duration::from_secs(8), "survivors took {took:?}");
    for res in [r0, r2] {
        assert_eq!(res["kind"], "Timeout", "{res}");
        assert_eq!(u64s(&res["ranks"]), vec![1], "{res}");
    }
}
