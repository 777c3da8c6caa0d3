//! `fathom-gpu-bench --ops`: times every model op of `fathom_kernels::cuda` (ops_model,
//! ops_select, ops_attn, ops_moe) at DeepSeek-V3.2 671B decode shapes, each beside its floor
//! max(bytes / 4.0 TB/s, FLOPs / 750 TFLOP/s bf16 MMA). Bytes count each input read once and each
//! output written once. Inputs are device hash fills (never zeros). Graph-captured timing (median
//! replay / inner) except the routed experts, whose first version syncs the host (eager).

use std::fmt::Write as _;

use fathom_kernels::cpu::router::RouterParams;
use fathom_kernels::cuda::cudarc::driver::CudaSlice;
use fathom_kernels::cuda::{
    BlasGemm, CudaDevice, MlaDecodeShape, MoeScratch, MoeShape, RopeLayout, RopeShape,
    moe_experts_bf16,
};
use half::bf16;

use super::{HBM_FLOOR_BPS, Res, time_op};

const MMA_PEAK: f64 = 750e12;

struct Out {
    md: String,
    reps: usize,
}

impl Out {
    fn row(&mut self, op: &str, shape: &str, us: f64, bytes: f64, flops: f64) {
        let floor = (bytes / HBM_FLOOR_BPS).max(flops / MMA_PEAK) * 1e6;
        let line = format!(
            "| {op} | {shape} | {us:.1} | {floor:.2} | {:.1} | {:.0} | {:.1} |",
            us / floor,
            bytes / us / 1e3,
            flops / us / 1e6
        );
        println!("{line}");
        let _ = writeln!(self.md, "{line}");
    }
}

fn fill_bf16(dev: &CudaDevice, n: usize, seed: u32, scale: f32) -> Res<CudaSlice<bf16>> {
    let mut b = dev.zeros::<bf16>(n)?;
    dev.ops().fill_uniform_bf16(&mut b, seed, scale)?;
    Ok(b)
}

fn fill_f32(dev: &CudaDevice, n: usize, seed: u32, lo: f32, hi: f32) -> Res<CudaSlice<f32>> {
    let mut b = dev.zeros::<f32>(n)?;
    dev.ops().fill_uniform_f32(&mut b, seed, lo, hi)?;
    Ok(b)
}

/// SplitMix64 for host-side index lists.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn time_eager(dev: &CudaDevice, reps: usize, mut op: impl FnMut() -> Res<()>) -> Res<f64> {
    for _ in 0..3 {
        op()?;
    }
    dev.synchronize()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = std::time::Instant::now();
        op()?;
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(v[v.len() / 2])
}

/// Runs every op bench; returns the markdown table.
pub fn ops_bench(dev: &CudaDevice, reps: usize) -> Res<String> {
    let mut o = Out { md: String::new(), reps };
    let header =
        "| op | shape | µs | floor µs | × floor | GB/s | TFLOP/s |\n|---|---|---|---|---|---|---|";
    println!("{header}");
    o.md.push_str(header);
    o.md.push('\n');
    let ops = dev.ops();
    let bs = [1usize, 64, 256];
    let t = |op: &mut dyn FnMut(usize) -> Res<()>, inner: usize, reps: usize| -> Res<f64> {
        Ok(time_op(dev, inner, reps, op)?.graph_us)
    };

    // Embedding gather, dim 7168 of a 129,280-row bf16 table.
    let (vocab, dim) = (129_280usize, 7168usize);
    let table = fill_bf16(dev, vocab * dim, 1, 1.0)?;
    for &b in &bs {
        let ids: Vec<i32> = (0..b).map(|i| (mix(i as u64) % vocab as u64) as i32).collect();
        let idd = dev.upload(&ids)?;
        let mut out = dev.zeros::<bf16>(b * dim)?;
        let mut bad = dev.zeros::<i32>(1)?;
        let us = t(
            &mut |_| Ok(ops.embedding_gather_bf16(&table, &idd, &mut out, &mut bad, b, dim, vocab)?),
            32,
            o.reps,
        )?;
        o.row("embedding_gather_bf16", &format!("B={b}, 7168"), us, (2 * b * dim * 2) as f64, 0.0);
    }
    drop(table);

    // LayerNorm (indexer k, dim 128), RoPE (MLA q_pe 128 heads; indexer q 64 heads), SwiGLU
    // (shared expert, 2048), router (256 experts), argmax (129,280).
    let freqs = fill_f32(dev, 32, 2, 1e-4, 1.0)?;
    for &b in &bs {
        let x = fill_bf16(dev, b * 128, 3, 2.0)?;
        let (w, bias) = (fill_f32(dev, 128, 4, 0.5, 1.5)?, fill_f32(dev, 128, 5, -0.5, 0.5)?);
        let mut y = dev.zeros::<bf16>(b * 128)?;
        let us =
            t(&mut |_| Ok(ops.layernorm_bf16(&x, &w, &bias, &mut y, b, 128, 1e-6)?), 32, o.reps)?;
        o.row("layernorm_bf16", &format!("B={b}, 128"), us, (2 * b * 128 * 2) as f64, 0.0);

        let pos: Vec<i32> = (0..b).map(|i| (mix(i as u64 + 7) % 163_840) as i32).collect();
        let pd = dev.upload(&pos)?;
        let mut q = fill_bf16(dev, b * 128 * 192, 6, 1.0)?;
        let s = RopeShape { tokens: b, heads: 128, head_dim: 192, offset: 128 };
        let us = t(
            &mut |_| Ok(ops.rope_bf16(&mut q, &pd, &freqs, s, 1.0, RopeLayout::Interleaved)?),
            32,
            o.reps,
        )?;
        o.row(
            "rope_bf16 interleaved (MLA q_pe)",
            &format!("B={b}, 128×64 of 192"),
            us,
            (2 * b * 128 * 64 * 2) as f64,
            0.0,
        );
        let mut qi = fill_bf16(dev, b * 64 * 128, 7, 1.0)?;
        let s = RopeShape { tokens: b, heads: 64, head_dim: 128, offset: 0 };
        let us = t(
            &mut |_| Ok(ops.rope_bf16(&mut qi, &pd, &freqs, s, 1.0, RopeLayout::HalfSplit)?),
            32,
            o.reps,
        )?;
        o.row(
            "rope_bf16 half-split (indexer q)",
            &format!("B={b}, 64×64 of 128"),
            us,
            (2 * b * 64 * 64 * 2) as f64,
            0.0,
        );

        let gu = fill_bf16(dev, b * 2 * 2048, 8, 4.0)?;
        let mut act = dev.zeros::<bf16>(b * 2048)?;
        let us = t(&mut |_| Ok(ops.swiglu_fused_bf16(&gu, &mut act, b, 2048)?), 32, o.reps)?;
        o.row("swiglu_fused_bf16", &format!("B={b}, 2048"), us, (b * 3 * 2048 * 2) as f64, 0.0);

        let p = RouterParams {
            n_experts: 256,
            n_group: 8,
            topk_group: 4,
            top_k: 8,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
        };
        let logits = fill_f32(dev, b * 256, 9, -4.0, 4.0)?;
        let rb = fill_f32(dev, 256, 10, -0.1, 0.1)?;
        let mut ids = dev.zeros::<i32>(b * 8)?;
        let mut wts = dev.zeros::<f32>(b * 8)?;
        let us = t(
            &mut |_| Ok(ops.router_select(&logits, &rb, &mut ids, &mut wts, b, &p)?),
            32,
            o.reps,
        )?;
        o.row("router_select", &format!("B={b}, 256→8"), us, (b * 256 * 4 + b * 64) as f64, 0.0);

        let lg = fill_f32(dev, b * 129_280, 11, -10.0, 10.0)?;
        let mut am = dev.zeros::<i32>(b)?;
        let us = t(&mut |_| Ok(ops.argmax_f32(&lg, &mut am, b, 129_280)?), 16, o.reps)?;
        o.row("argmax_f32 (greedy)", &format!("B={b}, 129280"), us, (b * 129_280 * 4) as f64, 0.0);
    }

    // Indexer scoring and top-k 2048 at contexts 4K / 32K / 128K (bf16 keys, 256 B per key).
    for &l in &[4096usize, 32_768, 131_072] {
        for &b in &bs {
            if l == 131_072 && b == 256 {
                continue; // 8.6 GB of bf16 keys; the CUDA-core version would take > 10 ms a call
            }
            let q = fill_bf16(dev, b * 64 * 128, 12, 1.0)?;
            let w = fill_f32(dev, b * 64, 13, -1.0, 1.0)?;
            let keys = fill_bf16(dev, b * l * 128, 14, 1.0)?;
            let lens = dev.upload(&vec![l as i32; b])?;
            let mut sc = dev.zeros::<f32>(b * l)?;
            let inner = if b * l > 1 << 22 { 1 } else { 4 };
            let us = t(
                &mut |_| Ok(ops.indexer_scores_bf16(&q, &w, &keys, &lens, &mut sc, b, 64, 128, l)?),
                inner,
                o.reps,
            )?;
            let bytes = (b * l * (128 * 2 + 4)) as f64;
            o.row(
                "indexer_scores_bf16",
                &format!("B={b}, L={l}"),
                us,
                bytes,
                (b * l * 64 * 128 * 2) as f64,
            );
            let mut idx = dev.zeros::<i32>(b * 2048)?;
            let us = t(
                &mut |_| Ok(ops.topk_rows_f32(&sc, &lens, &mut idx, b, l, 2048)?),
                inner,
                o.reps,
            )?;
            o.row(
                "topk_rows_f32 k=2048",
                &format!("B={b}, L={l}"),
                us,
                (b * l * 4 + b * 2048 * 4) as f64,
                0.0,
            );
        }
    }

    // Sparse MLA decode, topk 2048 of contexts 4K and 32K, 128 heads, bf16 latent.
    for &b in &bs {
        for &l in &[4096usize, 32_768] {
            let s = MlaDecodeShape {
                batch: b,
                heads: 128,
                kv_lora: 512,
                rope: 64,
                topk: 2048,
                n_rows: b * l,
            };
            let q = fill_bf16(dev, b * 128 * 576, 15, 1.0)?;
            let kv = fill_bf16(dev, b * l * 576, 16, 1.0)?;
            let idx: Vec<i32> = (0..b * 2048)
                .map(|i| {
                    ((i / 2048) * l) as i32 + (mix(i as u64 * 31 + l as u64) % l as u64) as i32
                })
                .collect();
            let id = dev.upload(&idx)?;
            let splits = s.default_splits(132);
            let (wo, wml) = s.workspace_len(splits);
            let mut ws_o = dev.zeros::<f32>(wo.max(1))?;
            let mut ws_ml = dev.zeros::<f32>(wml.max(1))?;
            let mut out = dev.zeros::<bf16>(b * 128 * 512)?;
            let us = t(
                &mut |_| {
                    Ok(ops.mla_sparse_decode_bf16(
                        &q,
                        &kv,
                        &id,
                        &mut out,
                        &mut ws_o,
                        &mut ws_ml,
                        &s,
                        0.1352 / 24.0,
                        splits,
                    )?)
                },
                1,
                o.reps,
            )?;
            let bytes = (b * (2048 * 1152 + 128 * 576 * 2 + 128 * 512 * 2)) as f64;
            let flops = (b * 2 * 128 * 2048 * (576 + 512)) as f64;
            o.row(
                "mla_sparse_decode_bf16 topk 2048",
                &format!("B={b}, L={l}, splits={splits}"),
                us,
                bytes,
                flops,
            );
        }
    }

    // Routed experts (bf16, per-expert cuBLAS, one host sync): 32 experts of 7168→2048→7168,
    // top-8 uniform. Floor: distinct experts' weights once.
    let blas = BlasGemm::new(dev)?;
    let ms = MoeShape { tokens: 256, top_k: 8, n_experts: 32, dim: 7168, inter: 2048 };
    let w13 = fill_bf16(dev, 32 * 2 * 2048 * 7168, 17, 0.05)?;
    let w2 = fill_bf16(dev, 32 * 7168 * 2048, 18, 0.05)?;
    let mut scratch = MoeScratch::new(dev, 256 * 8, &ms)?;
    for &b in &bs {
        let s = MoeShape { tokens: b, ..ms };
        let mut ids = Vec::with_capacity(b * 8);
        for t in 0..b {
            let mut c: Vec<i32> = Vec::new();
            let mut z = t as u64 * 977;
            while c.len() < 8 {
                z += 1;
                let e = (mix(z) % 32) as i32;
                if !c.contains(&e) {
                    c.push(e);
                }
            }
            ids.extend(c);
        }
        let mut distinct = ids.clone();
        distinct.sort();
        distinct.dedup();
        let x = fill_bf16(dev, b * 7168, 19, 1.0)?;
        let (idd, wd) = (dev.upload(&ids)?, fill_f32(dev, b * 8, 20, 0.1, 1.0)?);
        let mut out = dev.zeros::<bf16>(b * 7168)?;
        let us = time_eager(dev, o.reps, || {
            Ok(moe_experts_bf16(dev, &blas, &x, &idd, &wd, &w13, &w2, &mut out, &mut scratch, &s)?)
        })?;
        let bytes = (distinct.len() * 3 * 2048 * 7168 * 2 + b * 7168 * 4) as f64;
        let flops = (b * 8 * 3 * 2 * 2048 * 7168) as f64;
        o.row(
            "moe_experts_bf16 (eager, 1 sync)",
            &format!("B={b}, {} of 32 experts", distinct.len()),
            us,
            bytes,
            flops,
        );
    }
    Ok(o.md)
}
