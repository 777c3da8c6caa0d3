//! `fathom bench comm`: TcpComm all-reduce and all-to-all bandwidth over loopback.
//!
//! Every rank is a thread of this process owning its own `TcpComm` (real sockets, the same
//! code path as separate processes). For each world size, op and message size: two warm-up ops
//! (the second timed), an iteration count sized to about `--seconds-per-point` and agreed through a broadcast, then
//! a timed loop; the reported time is the slowest rank's mean per op. Bandwidths follow
//! nccl-tests: `algbw = bytes / time`; `busbw` scales it by `2(W-1)/W` (all-reduce) or
//! `(W-1)/W` (all-to-all), the share that crosses links. For all-to-all, `bytes` is what each
//! rank sends in total, split evenly over all ranks (its own part included).

use anyhow::{Context, Result};
use fathom_kernels::comm::{Collective, CollectiveExt, CommOptions, TcpComm, TcpRendezvous};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

/// Loopback TcpComm bandwidth.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// World sizes (ranks as threads, each with its own TCP mesh endpoint).
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    worlds: Vec<usize>,
    /// Message sizes in bytes (per rank).
    #[arg(long, value_delimiter = ',', default_value = "65536,1048576,16777216")]
    sizes: Vec<usize>,
    /// Target measuring time per (op, W, size) point.
    #[arg(long, default_value_t = 0.4)]
    seconds_per_point: f64,
    /// Where to write the JSON record.
    #[arg(long, default_value = "bench-comm.json")]
    out: PathBuf,
}

/// The measured collectives.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
enum BenchOp {
    AllReduce,
    AllToAll,
}

impl BenchOp {
    fn name(self) -> &'static str {
        match self {
            BenchOp::AllReduce => "all_reduce",
            BenchOp::AllToAll => "all_to_all",
        }
    }

    /// nccl-tests' bus-bandwidth factor for `w` ranks.
    fn bus_factor(self, w: usize) -> f64 {
        let w = w as f64;
        match self {
            BenchOp::AllReduce => 2.0 * (w - 1.0) / w,
            BenchOp::AllToAll => (w - 1.0) / w,
        }
    }
}

#[derive(Debug, Serialize)]
struct Point {
    op: BenchOp,
    world: usize,
    bytes: usize,
    iters: u64,
    seconds_per_op: f64,
    algbw_gbps: f64,
    busbw_gbps: f64,
}

#[derive(Debug, Serialize)]
struct Record {
    bench: &'static str,
    backend: &'static str,
    unix_time: u64,
    nproc: usize,
    cpu: String,
    build: &'static str,
    points: Vec<Point>,
}

/// Runs the benchmark, prints the table, writes the record.
pub fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(
        args.sizes.iter().all(|&s| s >= 4 && s % 4 == 0),
        "sizes must be multiples of 4 bytes"
    );
    anyhow::ensure!(args.worlds.iter().all(|&w| w >= 1), "world sizes must be >= 1");
    let mut points = Vec::new();
    println!(
        "{:<12} {:>2} {:>10} {:>6} {:>12} {:>11} {:>11}",
        "op", "W", "bytes", "iters", "time/op", "algbw GB/s", "busbw GB/s"
    );
    for &w in &args.worlds {
        let mut comms = loopback(w)?;
        for op in [BenchOp::AllReduce, BenchOp::AllToAll] {
            for &bytes in &args.sizes {
                let p = measure(&mut comms, op, bytes, args.seconds_per_point)?;
                println!(
                    "{:<12} {:>2} {:>10} {:>6} {:>9.1} µs {:>11.3} {:>11.3}",
                    p.op.name(),
                    p.world,
                    p.bytes,
                    p.iters,
                    p.seconds_per_op * 1e6,
                    p.algbw_gbps,
                    p.busbw_gbps
                );
                points.push(p);
            }
        }
    }
    let record = Record {
        bench: "comm",
        backend: "tcp-loopback",
        unix_time: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs(),
        nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        cpu: cpu_model(),
        build: if cfg!(debug_assertions) { "debug" } else { "release" },
        points,
    };
    std::fs::write(&args.out, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!("record written to {}", args.out.display());
    Ok(())
}

/// `w` TcpComms over 127.0.0.1, built concurrently (rank 0 hosts the rendezvous).
fn loopback(w: usize) -> Result<Vec<TcpComm>> {
    let opts = CommOptions::default();
    let rv = TcpRendezvous::bind("127.0.0.1:0")?;
    let addr = rv.local_addr()?.to_string();
    std::thread::scope(|s| -> Result<Vec<TcpComm>> {
        let joins: Vec<_> = (1..w)
            .map(|r| {
                let a = &addr;
                s.spawn(move || TcpComm::connect(a, r, w, opts))
            })
            .collect();
        let mut all = vec![rv.into_comm(w, opts)?];
        for j in joins {
            all.push(j.join().map_err(|_| anyhow::anyhow!("rank thread panicked"))??);
        }
        Ok(all)
    })
}

fn measure(comms: &mut [TcpComm], op: BenchOp, bytes: usize, seconds: f64) -> Result<Point> {
    let w = comms.len();
    let per_rank: Vec<Result<(u64, f64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter_mut()
            .map(|c| {
                s.spawn(move || -> Result<(u64, f64)> {
                    let mut f = vec![1.0f32; bytes / 4];
                    let counts = vec![bytes / w; w];
                    let send = vec![7u8; bytes / w * w];
                    let mut recv = Vec::new();
                    let mut once = |c: &mut TcpComm| -> Result<()> {
                        match op {
                            BenchOp::AllReduce => c.all_reduce_sum_f32(&mut f)?,
                            BenchOp::AllToAll => {
                                c.all_to_all_v(&send, &counts, &mut recv)?;
                            }
                        }
                        Ok(())
                    };
                    c.barrier()?;
                    once(c)?; // first touch of the buffers and socket windows, untimed
                    let t = Instant::now();
                    once(c)?;
                    let warm = t.elapsed().as_secs_f64().max(1e-6);
                    let mut iters = [((seconds / warm) as u64).clamp(5, 2000)];
                    c.broadcast_pod(&mut iters, 0)?;
                    c.barrier()?;
                    let t = Instant::now();
                    for _ in 0..iters[0] {
                        once(c)?;
                    }
                    Ok((iters[0], t.elapsed().as_secs_f64() / iters[0] as f64))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("rank panicked"))))
            .collect()
    });
    let mut iters = 0;
    let mut worst = 0f64;
    for r in per_rank {
        let (i, t) = r.with_context(|| format!("{} W={w} {bytes} B", op.name()))?;
        iters = i;
        worst = worst.max(t);
    }
    let algbw = bytes as f64 / worst / 1e9;
    let factor = op.bus_factor(w);
    Ok(Point {
        op,
        world: w,
        bytes,
        iters,
        seconds_per_op: worst,
        algbw_gbps: algbw,
        busbw_gbps: algbw * factor,
    })
}

/// The CPU model from /proc/cpuinfo ("unknown" elsewhere).
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
