//! `comm-probe`: one rank of a `TcpComm` world in its own process, for the multi-process tests
//! (`kernels/tests/comm_processes.rs`). Not a user tool.
//!
//! `comm-probe --rendezvous ADDR --rank R --world W [--scenario S] [--timeout-ms N]`
//! Rank 0 binds ADDR (port 0 allowed) and first prints `rendezvous <actual address>`. Then each
//! rank prints one JSON line with its results or its error. Scenarios:
//! - `sums`: all-reduce f32 and bf16, all-to-all-v with uneven counts, an all-reduce inside
//!   groups of 2 (when W is even); prints the result bits.
//! - `die`: a barrier, then the process exits with status 3 (its sockets close).
//! - `stall`: a barrier, then sleeps 30 s without taking part (killed by the test).
//! - `survive`: a barrier, then an all-reduce that is expected to fail; prints the error.

use fathom_kernels::comm::conformance::value;
use fathom_kernels::comm::{
    Collective, CollectiveExt, CommError, CommOptions, TcpComm, TcpRendezvous,
};
use half::bf16;
use std::io::Write;
use std::time::Duration;

#[derive(Debug)]
struct Args {
    rendezvous: String,
    rank: usize,
    world: usize,
    scenario: String,
    timeout_ms: u64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        rendezvous: String::new(),
        rank: 0,
        world: 0,
        scenario: "sums".into(),
        timeout_ms: 10_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--rendezvous" => a.rendezvous = v,
            "--rank" => a.rank = num(&v)? as usize,
            "--world" => a.world = num(&v)? as usize,
            "--scenario" => a.scenario = v,
            "--timeout-ms" => a.timeout_ms = num(&v)?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.rendezvous.is_empty() || a.world == 0 {
        return Err("--rendezvous and --world are required".into());
    }
    Ok(a)
}

fn sums(c: &mut TcpComm, w: usize, r: usize) -> Result<serde_json::Value, CommError> {
    let mut f: Vec<f32> = (0..1000).map(|i| value(r, i, 1)).collect();
    c.all_reduce_sum_f32(&mut f)?;
    let mut h: Vec<bf16> = (0..77).map(|i| bf16::from_f32(value(r, i, 2))).collect();
    c.all_reduce_sum_bf16(&mut h)?;
    let counts: Vec<usize> = (0..w).map(|d| (r * 3 + d * 5) % 4).collect();
    let send: Vec<u32> =
        (0..w).flat_map(|d| (0..counts[d]).map(move |k| (r * 1000 + d * 10 + k) as u32)).collect();
    let (a2a, a2a_counts) = c.all_to_all_v_pod(&send, &counts)?;
    let mut group = Vec::new();
    if w % 2 == 0 {
        let groups: Vec<Vec<usize>> = (0..w / 2).map(|g| vec![2 * g, 2 * g + 1]).collect();
        if let Some(mut g) = c.split(&groups)? {
            let mut x = vec![value(r, 0, 3)];
            g.all_reduce_sum_f32(&mut x)?;
            group = x.iter().map(|v| v.to_bits()).collect();
        }
    }
    Ok(serde_json::json!({
        "rank": r,
        "all_reduce_f32": f.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "all_reduce_bf16": h.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "a2a": a2a,
        "a2a_counts": a2a_counts,
        "group_sum": group,
    }))
}

fn run(a: &Args) -> Result<serde_json::Value, CommError> {
    let opts = CommOptions {
        timeout: Duration::from_millis(a.timeout_ms),
        connect_timeout: Duration::from_secs(20),
    };
    let mut c = if a.rank == 0 {
        let rv = TcpRendezvous::bind(a.rendezvous.as_str())?;
        println!("rendezvous {}", rv.local_addr()?);
        let _ = std::io::stdout().flush();
        rv.into_comm(a.world, opts)?
    } else {
        TcpComm::connect(&a.rendezvous, a.rank, a.world, opts)?
    };
    match a.scenario.as_str() {
        "sums" => sums(&mut c, a.world, a.rank),
        "die" => {
            c.barrier()?;
            std::process::exit(3);
        }
        "stall" => {
            c.barrier()?;
            std::thread::sleep(Duration::from_secs(30));
            Ok(serde_json::json!({ "rank": a.rank, "stalled": true }))
        }
        "survive" => {
            c.barrier()?;
            let mut x = vec![1.0f32; 16];
            c.all_reduce_sum_f32(&mut x)?;
            Ok(serde_json::json!({ "rank": a.rank, "unexpected_success": true }))
        }
        other => {
            Err(CommError::InvalidArgument { op: "comm-probe", what: format!("scenario {other}") })
        }
    }
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("comm-probe: {e}");
            std::process::exit(2);
        }
    };
    let line = match run(&args) {
        Ok(v) => v,
        Err(e) => serde_json::json!({
            "rank": args.rank,
            "error": e.to_string(),
            "kind": format!("{e:?}").split([' ', '{', '(']).next().unwrap_or(""),
            "ranks": e.ranks(),
        }),
    };
    println!("{line}");
}
