//! GPU parity of top-k, indexer scoring, sparse MLA decode and the routed experts against their
//! CPU twins (`fathom_kernels::cpu`), random non-zero inputs, poisoned outputs. Top-k must match
//! exactly (ties included); fp32 scores ≤ 1e-4; bf16 outputs ‖a − b‖/‖b‖ ≤ 1e-2 (2e-2 for the
//! experts: three bf16 roundings in a row). Measured errors are printed as `err` lines.

mod cuda_common;

use cuda_common::{Rng, gpu, rel_err, to_f32};
use fathom_kernels::cpu;
use fathom_kernels::cuda::{BlasGemm, MlaDecodeShape, MoeScratch, MoeShape, moe_experts_bf16};
use half::bf16;

fn topk_ref(scores: &[f32], len: usize, k: usize) -> Vec<i32> {
    let mut v: Vec<i32> =
        cpu::topk::topk_indices(&scores[..len], k).iter().map(|&i| i as i32).collect();
    v.resize(k, -1);
    v
}

#[test]
fn topk_matches_cpu_exactly_with_many_ties() {
    let Some((dev, _c)) = gpu("topk_matches_cpu_exactly_with_many_ties") else { return };
    let mut rng = Rng::new(7);
    let k = 2048;
    let stride = 163_840;
    // (len, kind): 0 random, 1 few distinct values incl. ±0.0 (ReLU-like), 2 all equal,
    // 3 random with NaN/inf sprinkled.
    let rows: &[(usize, u32)] = &[
        (0, 0),
        (5, 0),
        (2048, 0),
        (2049, 1),
        (4096, 0),
        (32_768, 1),
        (163_840, 0),
        (163_840, 1),
        (100_000, 2),
        (50_000, 3),
        (9_295, 1),
    ];
    let mut scores = vec![0f32; rows.len() * stride];
    for (r, &(len, kind)) in rows.iter().enumerate() {
        let row = &mut scores[r * stride..(r + 1) * stride];
        for (i, v) in row.iter_mut().enumerate() {
            *v = match kind {
                0 => rng.uniform(-5.0, 5.0),
                1 => {
                    let x = (rng.uniform(-3.0, 3.0)).round() * 0.5;
                    if x == 0.0 && i % 2 == 1 {
                        -0.0
                    } else {
                        x.max(0.0) - if i % 7 == 0 { 1.0 } else { 0.0 }
                    }
                }
                2 => 0.25,
                _ => match i % 997 {
                    0 => f32::NAN,
                    1 => f32::INFINITY,
                    2 => f32::NEG_INFINITY,
                    _ => rng.uniform(-1.0, 1.0),
                },
            };
        }
        // Past len: large values that must never be selected.
        row[len..].iter_mut().for_each(|v| *v = 1e30);
    }
    let lens: Vec<i32> = rows.iter().map(|r| r.0 as i32).collect();
    let sd = dev.upload(&scores).unwrap();
    let ld = dev.upload(&lens).unwrap();
    let mut od = dev.upload(&vec![-7i32; rows.len() * k]).unwrap();
    dev.ops().topk_rows_f32(&sd, &ld, &mut od, rows.len(), stride, k).unwrap();
    let got = dev.download(&od).unwrap();
    for (r, &(len, kind)) in rows.iter().enumerate() {
        let want = topk_ref(&scores[r * stride..(r + 1) * stride], len, k);
        let g = &got[r * k..(r + 1) * k];
        let diff = g.iter().zip(&want).position(|(a, b)| a != b);
        assert!(
            diff.is_none(),
            "row {r} (len {len}, kind {kind}): first mismatch at {diff:?}: got {:?} want {:?}",
            diff.map(|i| g[i]),
            diff.map(|i| want[i])
        );
    }
    eprintln!("err topk: exact on {} rows (ties, ±0.0, NaN, ±inf, len 0..163840)", rows.len());
    assert!(dev.ops().topk_rows_f32(&sd, &ld, &mut od, rows.len(), stride, k + 1).is_err());
}

#[test]
fn indexer_scores_match_cpu() {
    let Some((dev, _c)) = gpu("indexer_scores_match_cpu") else { return };
    let mut rng = Rng::new(8);
    for &(heads, dim) in &[(64usize, 128usize), (16, 64), (13, 32)] {
        let (batch, max_ctx) = (3usize, 1003usize);
        let lens = [1003i32, 517, 0];
        let q = rng.bf16_vec(batch * heads * dim, 1.0);
        let w: Vec<f32> = (0..batch * heads).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let keys = rng.bf16_vec(batch * max_ctx * dim, 1.0);
        let (qd, wd, kd, ld) = (
            dev.upload(&q).unwrap(),
            dev.upload(&w).unwrap(),
            dev.upload(&keys).unwrap(),
            dev.upload(&lens).unwrap(),
        );
        for simt in [false, true] {
            let mut od = dev.upload(&vec![f32::NAN; batch * max_ctx]).unwrap();
            let ops = dev.ops();
            if simt {
                ops.indexer_scores_bf16_simt(
                    &qd, &wd, &kd, &ld, &mut od, batch, heads, dim, max_ctx,
                )
                .unwrap();
            } else {
                ops.indexer_scores_bf16(&qd, &wd, &kd, &ld, &mut od, batch, heads, dim, max_ctx)
                    .unwrap();
            }
            let got = dev.download(&od).unwrap();
            let (qf, kf) = (to_f32(&q), to_f32(&keys));
            let mut emax = 0f32;
            for b in 0..batch {
                let len = lens[b] as usize;
                let mut want = vec![0f32; len];
                cpu::indexer::indexer_scores(
                    &qf[b * heads * dim..(b + 1) * heads * dim],
                    &w[b * heads..(b + 1) * heads],
                    &kf[b * max_ctx * dim..(b * max_ctx + len) * dim],
                    heads,
                    dim,
                    &mut want,
                );
                let g = &got[b * max_ctx..(b + 1) * max_ctx];
                for s in 0..len {
                    emax = emax.max((g[s] - want[s]).abs() / want[s].abs().max(1.0));
                }
                assert!(g[len..].iter().all(|&v| v == f32::NEG_INFINITY), "past len must be -inf");
            }
            let kind = if simt { "simt" } else { "mma" };
            eprintln!("err indexer_scores_bf16 ({kind}) heads={heads} dim={dim}: max {emax:.2e}");
            assert!(emax <= 1e-4, "indexer {kind} heads={heads} dim={dim}: max err {emax}");
        }
    }
}

#[test]
fn sparse_mla_decode_matches_cpu_with_invalid_slots() {
    let Some((dev, _c)) = gpu("sparse_mla_decode_matches_cpu_with_invalid_slots") else { return };
    let mut rng = Rng::new(9);
    let s = MlaDecodeShape { batch: 3, heads: 32, kv_lora: 512, rope: 64, topk: 300, n_rows: 4000 };
    let width = s.kv_lora + s.rope;
    let q = rng.bf16_vec(s.batch * s.heads * width, 1.0);
    let kv = rng.bf16_vec(s.n_rows * width, 1.0);
    let mut idx: Vec<i32> =
        (0..s.batch * s.topk).map(|_| (rng.next_u64() % s.n_rows as u64) as i32).collect();
    for j in (0..s.topk).step_by(7) {
        idx[j] = -1; // invalid slots in row 0
    }
    idx[s.topk + 3] = s.n_rows as i32 + 5; // out of range: invalid
    idx[2 * s.topk..].iter_mut().for_each(|v| *v = -1); // row 2: no valid key
    let scale = 0.1352 / (width as f32).sqrt() * 8.0;
    let (qf, kvf) = (to_f32(&q), to_f32(&kv));
    let mut want = vec![0f32; s.batch * s.heads * s.kv_lora];
    for b in 0..s.batch {
        let valid: Vec<u32> = idx[b * s.topk..(b + 1) * s.topk]
            .iter()
            .filter(|&&i| i >= 0 && (i as usize) < s.n_rows)
            .map(|&i| i as u32)
            .collect();
        cpu::attention::mla_sparse_attention(
            &qf[b * s.heads * width..(b + 1) * s.heads * width],
            &kvf,
            &valid,
            s.heads,
            s.kv_lora,
            s.rope,
            scale,
            &mut want[b * s.heads * s.kv_lora..(b + 1) * s.heads * s.kv_lora],
        );
    }
    let (qd, kvd, id) =
        (dev.upload(&q).unwrap(), dev.upload(&kv).unwrap(), dev.upload(&idx).unwrap());
    for (simt, splits) in
        [(false, 1usize), (false, 4), (false, s.default_splits(132)), (true, 1), (true, 4)]
    {
        let (wo, wml) = s.workspace_len(splits);
        let mut ws_o = dev.upload(&vec![f32::NAN; wo.max(1)]).unwrap();
        let mut ws_ml = dev.upload(&vec![f32::NAN; wml.max(1)]).unwrap();
        let mut od = dev.upload(&vec![bf16::NAN; s.batch * s.heads * s.kv_lora]).unwrap();
        let r = if simt {
            dev.ops().mla_sparse_decode_bf16_simt(
                &qd, &kvd, &id, &mut od, &mut ws_o, &mut ws_ml, &s, scale, splits,
            )
        } else {
            dev.ops().mla_sparse_decode_bf16(
                &qd, &kvd, &id, &mut od, &mut ws_o, &mut ws_ml, &s, scale, splits,
            )
        };
        r.unwrap();
        let got = to_f32(&dev.download(&od).unwrap());
        let n2 = 2 * s.heads * s.kv_lora;
        let e = rel_err(&got[..n2], &want[..n2]);
        eprintln!("err mla_sparse_decode_bf16 simt={simt} splits={splits}: rel {e:.2e}");
        assert!(e < 1e-2, "splits {splits}: rel err {e}");
        assert!(
            got[n2..].iter().all(|&v| v == 0.0),
            "a row without valid keys must be zeros (splits {splits})"
        );
    }
    let bad = MlaDecodeShape { heads: 24, ..s };
    let mut od = dev.upload(&[bf16::ZERO; 1]).unwrap();
    let (mut a, mut b2) = (dev.upload(&[0f32]).unwrap(), dev.upload(&[0f32]).unwrap());
    assert!(
        dev.ops()
            .mla_sparse_decode_bf16(&qd, &kvd, &id, &mut od, &mut a, &mut b2, &bad, scale, 1)
            .is_err()
    );
}

#[test]
fn routed_experts_match_cpu() {
    let Some((dev, _c)) = gpu("routed_experts_match_cpu") else { return };
    let mut rng = Rng::new(10);
    let s = MoeShape { tokens: 19, top_k: 4, n_experts: 16, dim: 256, inter: 64 };
    let x = rng.bf16_vec(s.tokens * s.dim, 1.0);
    let w13 = rng.bf16_vec(s.n_experts * 2 * s.inter * s.dim, 0.1);
    let w2 = rng.bf16_vec(s.n_experts * s.dim * s.inter, 0.1);
    let mut ids: Vec<i32> = Vec::new();
    for _ in 0..s.tokens {
        let mut chosen: Vec<i32> = Vec::new();
        while chosen.len() < s.top_k {
            let e = (rng.next_u64() % s.n_experts as u64) as i32;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        ids.extend(chosen);
    }
    ids[5] = -1; // a pair routed elsewhere (another EP rank)
    let w: Vec<f32> = (0..s.tokens * s.top_k).map(|_| rng.uniform(0.1, 1.0)).collect();
    // CPU twin, per pair, on the bf16 values.
    let (xf, w13f, w2f) = (to_f32(&x), to_f32(&w13), to_f32(&w2));
    let (d, i) = (s.dim, s.inter);
    let mut want = vec![0f32; s.tokens * d];
    for t in 0..s.tokens {
        for k in 0..s.top_k {
            let e = ids[t * s.top_k + k];
            if e < 0 {
                continue;
            }
            let e = e as usize;
            let gu = cpu::gemm::matmul_t(
                &xf[t * d..(t + 1) * d],
                &w13f[e * 2 * i * d..(e + 1) * 2 * i * d],
                1,
                2 * i,
                d,
            );
            let mut act = vec![0f32; i];
            cpu::activation::silu_mul(&gu[..i], &gu[i..], &mut act);
            let y = cpu::gemm::matmul_t(&act, &w2f[e * d * i..(e + 1) * d * i], 1, d, i);
            for c in 0..d {
                want[t * d + c] += w[t * s.top_k + k] * y[c];
            }
        }
    }
    let blas = BlasGemm::new(&dev).unwrap();
    let mut scratch = MoeScratch::new(&dev, s.tokens * s.top_k, &s).unwrap();
    let (xd, idd, wd) =
        (dev.upload(&x).unwrap(), dev.upload(&ids).unwrap(), dev.upload(&w).unwrap());
    let (w13d, w2d) = (dev.upload(&w13).unwrap(), dev.upload(&w2).unwrap());
    let mut od = dev.upload(&vec![bf16::NAN; s.tokens * d]).unwrap();
    for grouped in [true, false] {
        scratch.grouped = grouped;
        od = dev.upload(&vec![bf16::NAN; s.tokens * d]).unwrap();
        moe_experts_bf16(&dev, &blas, &xd, &idd, &wd, &w13d, &w2d, &mut od, &mut scratch, &s)
            .unwrap();
        let got = to_f32(&dev.download(&od).unwrap());
        let e = rel_err(&got, &want);
        eprintln!("err moe_experts_bf16 (grouped GEMM: {grouped}): rel {e:.2e}");
        assert!(e < 2e-2, "experts (grouped {grouped}) rel err {e}");
    }
    // Plan invariants: counts sum to the valid pairs; each expert's rows are in pair order.
    let counts = dev.download(&scratch.counts).unwrap();
    assert_eq!(counts.iter().sum::<i32>() as usize, s.tokens * s.top_k - 1);
    let pair_row = dev.download(&scratch.pair_row).unwrap();
    assert_eq!(pair_row[5], -1);
    let big = MoeShape { tokens: s.tokens + 1, ..s };
    assert!(
        moe_experts_bf16(&dev, &blas, &xd, &idd, &wd, &w13d, &w2d, &mut od, &mut scratch, &big)
            .is_err()
    );
}

/// The indexer's FP8 path: Hadamard rotation + ue8m0 e4m3 quantisation bit-exact against the
/// CPU twin (also when scattered into cache rows, skipping rows outside the cache), and the e4m3
/// MMA scores over a shared cache within 1e-4 of the CPU twin's fp32 sums.
#[test]
fn indexer_fp8_path_matches_cpu() {
    let Some((dev, _c)) = gpu("indexer_fp8_path_matches_cpu") else { return };
    let mut rng = Rng::new(41);
    for &(heads, dim) in &[(64usize, 128usize), (16, 16), (13, 32), (16, 64)] {
        let (slots, max_ctx) = (3usize, 600usize);
        let n_rows = slots * max_ctx;
        let bases = [600i32, 600, 0, 1200, -1, 1201];
        let lens = [250i32, 251, 600, 1, 10, 10];
        let batch = bases.len();
        let mut uni = |n: usize, s: f32| (0..n).map(|_| rng.uniform(-s, s)).collect::<Vec<f32>>();
        let q = uni(batch * heads * dim, 2.0);
        let w = uni(batch * heads, 1.0);
        let keys = uni(n_rows * dim, 3.0);
        let ops = dev.ops();
        // q: plain form.
        let qd = dev.upload(&q).unwrap();
        let mut q8 = dev.upload(&vec![0u8; batch * heads * dim]).unwrap();
        let mut sq = dev.upload(&vec![f32::NAN; batch * heads]).unwrap();
        ops.indexer_rotate_quant_fp8(
            &qd,
            None,
            &mut q8,
            &mut sq,
            batch * heads,
            dim,
            batch * heads,
        )
        .unwrap();
        let (want_q8, want_sq) = cpu::indexer_fp8::rotate_quant_fp8(&q, dim);
        assert_eq!(dev.download(&q8).unwrap(), want_q8, "q codes heads={heads} dim={dim}");
        assert_eq!(dev.download(&sq).unwrap(), want_sq, "q scales heads={heads} dim={dim}");
        // keys: scattered in reverse row order through dst, plus two rows that must be skipped.
        let n_src = n_rows + 2;
        let mut src = keys.clone();
        src.extend(uni(2 * dim, 1.0));
        let mut dst: Vec<i32> = (0..n_rows as i32).rev().collect();
        dst.extend([-1, n_rows as i32]);
        let mut reordered = vec![0f32; n_rows * dim];
        for (v, &r) in dst.iter().enumerate().take(n_rows) {
            reordered[r as usize * dim..(r as usize + 1) * dim]
                .copy_from_slice(&src[v * dim..(v + 1) * dim]);
        }
        let (sd, dd) = (dev.upload(&src).unwrap(), dev.upload(&dst).unwrap());
        let mut k8 = dev.upload(&vec![0u8; n_rows * dim]).unwrap();
        let mut sk = dev.upload(&vec![f32::NAN; n_rows]).unwrap();
        ops.indexer_rotate_quant_fp8(&sd, Some(&dd), &mut k8, &mut sk, n_src, dim, n_rows).unwrap();
        let (want_k8, want_sk) = cpu::indexer_fp8::rotate_quant_fp8(&reordered, dim);
        let (got_k8, got_sk) = (dev.download(&k8).unwrap(), dev.download(&sk).unwrap());
        assert_eq!(got_k8, want_k8, "key codes heads={heads} dim={dim}");
        assert_eq!(got_sk, want_sk, "key scales heads={heads} dim={dim}");
        // Scores.
        let (wd, bd, ld) =
            (dev.upload(&w).unwrap(), dev.upload(&bases).unwrap(), dev.upload(&lens).unwrap());
        let mut od = dev.upload(&vec![f32::NAN; batch * max_ctx]).unwrap();
        let shape = (batch, heads, dim, max_ctx);
        ops.indexer_scores_fp8_rows(&q8, &sq, &wd, &k8, &sk, n_rows, &bd, &ld, &mut od, shape)
            .unwrap();
        let got = dev.download(&od).unwrap();
        let mut emax = 0f32;
        for b in 0..batch {
            let g = &got[b * max_ctx..(b + 1) * max_ctx];
            let base = bases[b];
            let len =
                if base < 0 || base as usize + max_ctx > n_rows { 0 } else { lens[b] as usize };
            let mut want = vec![0f32; len];
            if len > 0 {
                let r0 = base as usize;
                cpu::indexer_fp8::indexer_scores_fp8(
                    &want_q8[b * heads * dim..(b + 1) * heads * dim],
                    &want_sq[b * heads..(b + 1) * heads],
                    &w[b * heads..(b + 1) * heads],
                    &want_k8[r0 * dim..(r0 + len) * dim],
                    &want_sk[r0..r0 + len],
                    heads,
                    dim,
                    &mut want,
                );
            }
            for s in 0..len {
                emax = emax.max((g[s] - want[s]).abs() / want[s].abs().max(1.0));
            }
            assert!(g[len..].iter().all(|&v| v == f32::NEG_INFINITY), "row {b}: past len not -inf");
        }
        eprintln!("err indexer_scores_fp8_rows heads={heads} dim={dim}: max {emax:.2e}");
        assert!(emax <= 1e-4, "indexer fp8 heads={heads} dim={dim}: max err {emax}");
    }
}
