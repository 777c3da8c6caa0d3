//! `fathom-gpu-bench`: times the CUDA backend's GEMMs and kernels on one GPU at DeepSeek-V3.2's
//! shapes, against the measured peaks of the same run and the HBM floor (bytes / 4.0 TB/s).
//!
//! Method (docs/perf/gpu-gemm.md): random data (device hash fill, never zeros), weights rotated
//! over enough copies to exceed the 50 MB L2 several times, warm-up, then each measurement is
//! `inner` calls captured in a CUDA graph and replayed `reps` times between CUDA events; the
//! median replay divided by `inner` is reported (eager launches are timed too, for reference).
//!
//! Usage: fathom-gpu-bench [--lib-dir DIR]... [--cache-dir DIR] [--out-dir DIR] [--quick] [--ops]
//!
//! `--ops` times the model ops instead (module `gpu_bench/ops.rs`, table `ops.md`).

#[path = "gpu_bench/ops.rs"]
mod ops;

use std::error::Error;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use fathom_kernels::cuda::cudarc::driver::{CudaSlice, CudaStream, sys};
use fathom_kernels::cuda::nccl::NcclElem;
use fathom_kernels::cuda::{
    ActScaleLayout, BlasGemm, CudaDevice, DeviceOptions, Fp8Gemm, LtBf16Gemm, NcclComm,
    NcclUniqueId,
};
use half::bf16;

type Res<T> = Result<T, Box<dyn Error>>;

const HBM_FLOOR_BPS: f64 = 4.0e12;
const ROTATE_BYTES: usize = 400 << 20; // 8× the L2

struct Args {
    lib_dirs: Vec<PathBuf>,
    cache_dir: Option<PathBuf>,
    out_dir: Option<PathBuf>,
    quick: bool,
    ops: bool,
}

fn parse_args() -> Res<Args> {
    let mut a = Args { lib_dirs: vec![], cache_dir: None, out_dir: None, quick: false, ops: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--lib-dir" => a.lib_dirs.push(value("--lib-dir")?.into()),
            "--cache-dir" => a.cache_dir = Some(value("--cache-dir")?.into()),
            "--out-dir" => a.out_dir = Some(value("--out-dir")?.into()),
            "--quick" => a.quick = true,
            "--ops" => a.ops = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(a)
}

/// Median and minimum of per-call times in µs.
#[derive(Debug, Clone, Copy)]
struct Timing {
    graph_us: f64,
    graph_min_us: f64,
    eager_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Times `op(i)` (i = call index, for rotating buffers): eager and graph-captured.
fn time_op(
    dev: &CudaDevice,
    inner: usize,
    reps: usize,
    mut op: impl FnMut(usize) -> Res<()>,
) -> Res<Timing> {
    let stream: &Arc<CudaStream> = dev.stream();
    let ctx = dev.context();
    let ev = || ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
    let (start, stop) = (ev()?, ev()?);
    // Warm-up (plans, module load, clocks).
    for i in 0..inner.max(3) {
        op(i)?;
    }
    dev.synchronize()?;
    let mut eager = Vec::with_capacity(reps);
    for _ in 0..reps {
        start.record(stream)?;
        for i in 0..inner {
            op(i)?;
        }
        stop.record(stream)?;
        stop.synchronize()?;
        eager.push(f64::from(start.elapsed_ms(&stop)?) * 1e3 / inner as f64);
    }
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let mut captured = Ok(());
    for i in 0..inner {
        if let Err(e) = op(i) {
            captured = Err(e);
            break;
        }
    }
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0))?;
    captured?;
    let graph = graph.ok_or("stream capture produced no graph")?;
    graph.launch()?;
    dev.synchronize()?;
    let mut replay = Vec::with_capacity(reps);
    for _ in 0..reps {
        start.record(stream)?;
        graph.launch()?;
        stop.record(stream)?;
        stop.synchronize()?;
        replay.push(f64::from(start.elapsed_ms(&stop)?) * 1e3 / inner as f64);
    }
    let graph_min_us = replay.iter().cloned().fold(f64::INFINITY, f64::min);
    Ok(Timing { graph_us: median(replay), graph_min_us, eager_us: median(eager) })
}

fn copies_for(bytes: usize) -> usize {
    ROTATE_BYTES.div_ceil(bytes.max(1)).clamp(2, 64)
}

struct Row {
    kind: String,
    m: usize,
    n: usize,
    k: usize,
    bytes: f64,
    flops: f64,
    t: Timing,
}

impl Row {
    fn markdown(&self, peak_tflops: f64) -> String {
        let floor_us = self.bytes / HBM_FLOOR_BPS * 1e6;
        let tflops = self.flops / (self.t.graph_us * 1e-6) / 1e12;
        let gbps = self.bytes / (self.t.graph_us * 1e-6) / 1e9;
        format!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0} | {:.1} | {:.0}% |",
            self.kind,
            self.m,
            self.n,
            self.k,
            self.t.graph_us,
            self.t.eager_us,
            floor_us,
            self.t.graph_us / floor_us,
            gbps,
            tflops,
            100.0 * tflops / peak_tflops
        )
    }

    fn json(&self) -> String {
        format!(
            "{{\"kind\":\"{}\",\"m\":{},\"n\":{},\"k\":{},\"bytes\":{},\"flops\":{},\"graph_us\":{:.3},\"graph_min_us\":{:.3},\"eager_us\":{:.3}}}",
            self.kind,
            self.m,
            self.n,
            self.k,
            self.bytes,
            self.flops,
            self.t.graph_us,
            self.t.graph_min_us,
            self.t.eager_us
        )
    }
}

struct Bench<'a> {
    dev: &'a CudaDevice,
    blas: BlasGemm,
    lt: LtBf16Gemm,
    fp8: Fp8Gemm,
    reps: usize,
}

impl Bench<'_> {
    fn bf16(&self, m: usize, n: usize, k: usize, seed: u32, use_lt: bool) -> Res<Row> {
        let dev = self.dev;
        let copies = copies_for(n * k * 2);
        let mut ws = Vec::with_capacity(copies);
        for c in 0..copies {
            let mut w = dev.zeros::<bf16>(n * k)?;
            dev.ops().fill_uniform_bf16(&mut w, seed + c as u32, 0.05)?;
            ws.push(w);
        }
        let mut x = dev.zeros::<bf16>(m * k)?;
        dev.ops().fill_uniform_bf16(&mut x, seed ^ 0xabc, 1.0)?;
        let mut y = dev.zeros::<bf16>(m * n)?;
        let inner = copies.max(if m >= 1024 { 8 } else { 32 });
        let t = time_op(dev, inner, self.reps, |i| {
            if use_lt {
                Ok(self.lt.gemm_bf16(&x, &ws[i % copies], &mut y, m, n, k)?)
            } else {
                Ok(self.blas.gemm_bf16(&x, &ws[i % copies], &mut y, m, n, k)?)
            }
        })?;
        let bytes = 2.0 * (m * k + n * k + m * n) as f64;
        let kind = if use_lt { "bf16 cuBLASLt" } else { "bf16 cuBLAS" }.to_string();
        Ok(Row { kind, m, n, k, bytes, flops: 2.0 * (m * n * k) as f64, t })
    }

    fn fp8(&self, m: usize, n: usize, k: usize, seed: u32) -> Res<Row> {
        let dev = self.dev;
        let kb = k / 128;
        let copies = copies_for(n * k);
        let mut ws = Vec::with_capacity(copies);
        for c in 0..copies {
            let mut w = dev.zeros::<u8>(n * k)?;
            dev.ops().fill_uniform_e4m3(&mut w, seed + c as u32, 400.0)?;
            let mut s = dev.zeros::<f32>(n.div_ceil(128) * Fp8Gemm::weight_scale_pitch(k))?;
            dev.ops().fill_uniform_f32(&mut s, seed + 1000 + c as u32, 1e-4, 1e-3)?;
            ws.push((w, s));
        }
        let mut xb = dev.zeros::<bf16>(m * k)?;
        dev.ops().fill_uniform_bf16(&mut xb, seed ^ 0xdef, 1.0)?;
        let p = self.fp8.padded_rows(m, n, k)?;
        let mut xq = dev.zeros::<u8>(p * k)?;
        let mut xs = dev.zeros::<f32>(p * kb)?;
        dev.ops().act_quant_fp8(&xb, &mut xq, &mut xs, m, p, k, Fp8Gemm::ACT_SCALE_LAYOUT)?;
        let mut y = dev.zeros::<bf16>(p * n)?;
        let inner = copies.max(if m >= 1024 { 8 } else { 32 });
        let t = time_op(dev, inner, self.reps, |i| {
            let (w, s) = &ws[i % copies];
            Ok(self.fp8.gemm(&xq, &xs, w, s, &mut y, m, n, k)?)
        })?;
        let bytes = (m * k + n * k + 2 * m * n + 4 * m * kb + 4 * n.div_ceil(128) * kb) as f64;
        let kind = if p == m {
            "fp8 cuBLASLt".to_string()
        } else {
            format!("fp8 cuBLASLt (run as m={p})")
        };
        Ok(Row { kind, m, n, k, bytes, flops: 2.0 * (m * n * k) as f64, t })
    }
}

/// (memcpy, 16-byte copy kernel) bandwidth in B/s, counting bytes read plus written.
fn copy_bandwidth(dev: &CudaDevice, reps: usize) -> Res<(f64, f64)> {
    let n = 1usize << 30;
    let src = {
        let mut s = dev.zeros::<u8>(n)?;
        dev.ops().fill_uniform_e4m3(&mut s, 7, 1.0)?;
        s
    };
    let mut dst: CudaSlice<u8> = dev.zeros::<u8>(n)?;
    let stream = dev.stream().clone();
    let t = time_op(dev, 4, reps, |_| Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    let k = time_op(dev, 4, reps, |_| Ok(dev.ops().copy_16b(&src, &mut dst)?))?;
    let bw = |t: Timing| 2.0 * n as f64 / (t.graph_us.min(t.eager_us) * 1e-6);
    Ok((bw(t), bw(k)))
}

/// Eager timing of one collective on every rank (same sequence everywhere): median µs per call.
fn time_collective<T: NcclElem + fathom_kernels::cuda::cudarc::driver::ValidAsZeroBits>(
    dev: &CudaDevice,
    comm: &NcclComm,
    send_len: usize,
    recv_len: usize,
    reps: usize,
    op: impl Fn(&NcclComm, &CudaSlice<T>, &mut CudaSlice<T>) -> Res<()>,
) -> Res<f64> {
    let send = dev.zeros::<T>(send_len)?;
    let mut recv = dev.zeros::<T>(recv_len)?;
    let ctx = dev.context();
    let start = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
    let stop = ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..3 {
        op(comm, &send, &mut recv)?;
    }
    dev.synchronize()?;
    let mut v = Vec::new();
    for _ in 0..reps {
        start.record(dev.stream())?;
        for _ in 0..5 {
            op(comm, &send, &mut recv)?;
        }
        stop.record(dev.stream())?;
        stop.synchronize()?;
        v.push(f64::from(start.elapsed_ms(&stop)?) * 1e3 / 5.0);
    }
    Ok(median(v))
}

/// NCCL between GPUs 0 and 1 through `NcclComm` (one thread per rank): all-reduce bus
/// bandwidth and all-to-all at the EP dispatch sizes of EP-DISPATCH.md.
fn nccl_bench(lib_dirs: &[PathBuf], reps: usize) -> Res<String> {
    let world = 2usize;
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let run =
        |rank: usize,
         tx: Option<std::sync::mpsc::Sender<Vec<u8>>>,
         rx: Option<std::sync::mpsc::Receiver<Vec<u8>>>|
         -> Res<String> {
            let opts =
                DeviceOptions { ordinal: rank, lib_dirs: lib_dirs.to_vec(), kernel_cache: None };
            let dev = CudaDevice::open(&opts)?;
            let id = match (tx, rx) {
                (Some(tx), _) => {
                    let id = NcclUniqueId::new()?;
                    tx.send(id.to_bytes().to_vec())?;
                    id
                }
                (None, Some(rx)) => NcclUniqueId::from_bytes(&rx.recv()?)?,
                _ => return Err("rank without id channel".into()),
            };
            let comm = NcclComm::init_rank(&dev, &id, rank, world)?;
            let mut out =
                String::from("| collective | bytes | µs | bandwidth |\n|---|---|---|---|");
            let n = 128usize << 20; // 256 MiB of bf16
            let t = time_collective::<bf16>(&dev, &comm, n, n, reps, |c, s, r| {
                Ok(c.all_reduce_sum(s, r)?)
            })?;
            let bytes = (2 * n) as f64;
            let bus = 2.0 * (world as f64 - 1.0) / world as f64 * bytes / (t * 1e-6) / 1e9;
            write!(out, "\n| all-reduce bf16 | 256 MiB | {t:.0} | bus {bus:.0} GB/s |")?;
            for per_peer in [4096usize, 950_272, 30_408_704] {
                let len = per_peer * world;
                let t = time_collective::<u8>(&dev, &comm, len, len, reps, |c, s, r| {
                    Ok(c.all_to_all(s, r)?)
                })?;
                let bw = per_peer as f64 / (t * 1e-6) / 1e9;
                write!(
                    out,
                    "\n| all-to-all u8 | {per_peer} per peer | {t:.1} | {bw:.0} GB/s per peer |"
                )?;
            }
            dev.synchronize()?;
            Ok(out)
        };
    let results: Vec<Res<String>> = std::thread::scope(|scope| {
        let r1 = scope.spawn(|| run(1, None, Some(rx)).map_err(|e| e.to_string()));
        let r0 = run(0, Some(tx), None).map_err(|e| e.to_string());
        vec![
            r0.map_err(Into::into),
            r1.join()
                .map_err(|_| "rank 1 panicked".to_string())
                .and_then(|r| r)
                .map_err(Into::into),
        ]
    });
    let mut it = results.into_iter();
    let r0 = it.next().ok_or("no rank 0")??;
    it.next().ok_or("no rank 1")??;
    Ok(r0)
}

fn main() -> Res<()> {
    let args = parse_args()?;
    let opts = DeviceOptions {
        ordinal: 0,
        lib_dirs: args.lib_dirs.clone(),
        kernel_cache: args.cache_dir.clone(),
    };
    let t0 = std::time::Instant::now();
    let dev = CudaDevice::open(&opts)?;
    let info = dev.info().clone();
    let mut md = String::new();
    writeln!(
        md,
        "device: {} (cc {}.{}, {}, {} SMs, {:.1} GiB); opened with kernels compiled in {:.0} ms",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.arch,
        info.multiprocessors,
        info.total_memory as f64 / (1u64 << 30) as f64,
        t0.elapsed().as_secs_f64() * 1e3
    )?;
    if args.ops {
        let table = ops::ops_bench(&dev, if args.quick { 5 } else { 15 })?;
        if let Some(dir) = &args.out_dir {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join("ops.md"), format!("{md}\n{table}"))?;
        }
        return Ok(());
    }
    let bench = Bench {
        dev: &dev,
        blas: BlasGemm::new(&dev)?,
        lt: LtBf16Gemm::new(&dev)?,
        fp8: Fp8Gemm::new(&dev)?,
        reps: if args.quick { 5 } else { 15 },
    };
    let mut json = Vec::new();

    let copy = copy_bandwidth(&dev, bench.reps)?;
    writeln!(
        md,
        "device copy, 1 GiB, read+write: memcpy {:.2} TB/s, 16-byte copy kernel {:.2} TB/s",
        copy.0 / 1e12,
        copy.1 / 1e12
    )?;
    let p = 8192;
    let tf = |r: &Row| r.flops / (r.t.graph_us * 1e-6) / 1e12;
    let mut peak = |kind: &str, row: Res<Row>| -> f64 {
        match row {
            Ok(r) => {
                json.push(r.json());
                tf(&r)
            }
            Err(e) => {
                println!("peak {kind} FAILED: {e}");
                f64::NAN
            }
        }
    };
    let pb_blas = peak("bf16", bench.bf16(p, p, p, 1, false));
    let pb_lt = peak("bf16 lt", bench.bf16(p, p, p, 1, true));
    let pb = pb_blas.max(pb_lt);
    let pf = peak("fp8", bench.fp8(p, p, p, 2));
    writeln!(
        md,
        "peak bf16 8192³: cuBLAS {pb_blas:.0}, cuBLASLt {pb_lt:.0} TFLOP/s; peak fp8 block-scaled cuBLASLt 8192³: {pf:.0} TFLOP/s"
    )?;
    println!("{md}");

    let header = "| GEMM | M | N | K | graph µs | eager µs | HBM floor µs | × floor | GB/s | TFLOP/s | % of peak |\n|---|---|---|---|---|---|---|---|---|---|---|";
    let shapes: &[(usize, usize)] = if args.quick {
        &[(2112, 7168), (7168, 2048)]
    } else {
        &[(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
    };
    let ms: &[usize] = if args.quick { &[1, 4096] } else { &[1, 64, 128, 4096] };
    let mut table = String::from(header);
    let mut seed = 100;
    for &(n, k) in shapes {
        for &m in ms {
            for kind in ["bf16", "bf16lt", "fp8"] {
                seed += 97;
                let row = match kind {
                    "bf16" => bench.bf16(m, n, k, seed, false),
                    "bf16lt" => bench.bf16(m, n, k, seed, true),
                    _ => bench.fp8(m, n, k, seed),
                };
                match row {
                    Ok(r) => {
                        let peak = if kind == "fp8" { pf } else { pb };
                        let line = r.markdown(peak);
                        println!("{line}");
                        table.push('\n');
                        table.push_str(&line);
                        json.push(r.json());
                    }
                    Err(e) => {
                        let line = format!("| {kind} | {m} | {n} | {k} | FAILED: {e} |");
                        println!("{line}");
                        table.push('\n');
                        table.push_str(&line);
                    }
                }
            }
        }
    }

    // Own kernels at prefill size: bytes moved vs the floor.
    let mut own = String::from("| kernel | shape | µs | GB/s | × floor |\n|---|---|---|---|---|");
    {
        let (t, d) = (4096usize, 7168usize);
        let mut x = dev.zeros::<bf16>(t * d)?;
        dev.ops().fill_uniform_bf16(&mut x, 5, 2.0)?;
        let mut w = dev.zeros::<f32>(d)?;
        dev.ops().fill_uniform_f32(&mut w, 6, 0.5, 1.5)?;
        let mut y = dev.zeros::<bf16>(t * d)?;
        let r = time_op(&dev, 16, bench.reps, |_| {
            Ok(dev.ops().rmsnorm_bf16(&x, &w, &mut y, t, d, 1e-6)?)
        })?;
        let bytes = (4 * t * d) as f64;
        writeln!(
            own,
            "\n| rmsnorm_bf16 | {t}×{d} | {:.1} | {:.0} | {:.2} |",
            r.graph_us,
            bytes / r.graph_us / 1e3,
            r.graph_us / (bytes / HBM_FLOOR_BPS * 1e6)
        )?;
        let mut q = dev.zeros::<u8>(t * d)?;
        let mut s = dev.zeros::<f32>(t * d / 128)?;
        let r = time_op(&dev, 16, bench.reps, |_| {
            Ok(dev.ops().act_quant_fp8(
                &x,
                &mut q,
                &mut s,
                t,
                t,
                d,
                ActScaleLayout::TokenContiguous,
            )?)
        })?;
        let bytes = (3 * t * d + 4 * t * d / 128) as f64;
        writeln!(
            own,
            "| act_quant_fp8 | {t}×{d} | {:.1} | {:.0} | {:.2} |",
            r.graph_us,
            bytes / r.graph_us / 1e3,
            r.graph_us / (bytes / HBM_FLOOR_BPS * 1e6)
        )?;
        let (n, k) = (7168usize, 16384usize);
        let mut wq = dev.zeros::<u8>(n * k)?;
        dev.ops().fill_uniform_e4m3(&mut wq, 8, 300.0)?;
        let mut ws = dev.zeros::<f32>((n / 128) * (k / 128))?;
        dev.ops().fill_uniform_f32(&mut ws, 9, 1e-4, 1e-3)?;
        let mut out = dev.zeros::<bf16>(n * k)?;
        let r = time_op(&dev, 4, bench.reps, |_| {
            Ok(dev.ops().dequant_fp8_block(&wq, &ws, &mut out, n, k)?)
        })?;
        let bytes = (3 * n * k) as f64;
        writeln!(
            own,
            "| dequant_fp8_block | {n}×{k} | {:.1} | {:.0} | {:.2} |",
            r.graph_us,
            bytes / r.graph_us / 1e3,
            r.graph_us / (bytes / HBM_FLOOR_BPS * 1e6)
        )?;
    }
    println!("{own}");

    let gpus = CudaDevice::count(&args.lib_dirs)?;
    let nccl = if gpus >= 2 {
        match nccl_bench(&args.lib_dirs, bench.reps) {
            Ok(t) => t,
            Err(e) => format!("NCCL bench FAILED: {e}"),
        }
    } else {
        format!("NCCL bench: needs 2 GPUs, found {gpus}")
    };
    println!("{nccl}");

    let report = format!("{md}\n{table}\n\n{own}\n\n{nccl}\n");
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("gemm.md"), &report)?;
        std::fs::write(dir.join("gemm.jsonl"), json.join("\n") + "\n")?;
    }
    Ok(())
}
