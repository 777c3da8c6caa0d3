//! GPU parity of the elementwise model ops and the router against their CPU twins
//! (`fathom_kernels::cpu`), on random non-zero inputs, outputs poisoned before each launch.
//! Tolerances: fp32 ops ≤ 1e-4 (|a − b| ≤ 1e-4·max(1, |b|)), bf16 outputs ‖a − b‖/‖b‖ ≤ 1e-2.
//! Each test prints its measured error (`err` lines in the GPU runner's log).

mod cuda_common;

use cuda_common::{Rng, gpu, rel_err, to_f32};
use fathom_kernels::cpu;
use fathom_kernels::cpu::router::RouterParams;
use fathom_kernels::cuda::{RopeLayout, RopeShape};
use half::bf16;

const F32_TOL: f32 = 1e-4;
const BF16_TOL: f64 = 1e-2;

/// max |a − b| / max(1, |b|); NaN anywhere is infinite.
fn max_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_finite() && y.is_finite() {
                (x - y).abs() / y.abs().max(1.0)
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, f32::max)
}

#[test]
fn embedding_gather_matches_cpu_and_counts_bad_ids() {
    let Some((dev, _c)) = gpu("embedding_gather_matches_cpu_and_counts_bad_ids") else { return };
    let mut rng = Rng::new(1);
    for &(vocab, dim) in &[(1000usize, 7168usize), (50, 100)] {
        let table = rng.bf16_vec(vocab * dim, 1.0);
        let mut ids: Vec<i32> = (0..37).map(|_| (rng.next_u64() % vocab as u64) as i32).collect();
        ids[5] = vocab as i32; // out of range
        ids[9] = -3;
        let td = dev.upload(&table).unwrap();
        let idd = dev.upload(&ids).unwrap();
        let mut od = dev.upload(&vec![bf16::NAN; ids.len() * dim]).unwrap();
        let mut bad = dev.upload(&[0i32]).unwrap();
        dev.ops()
            .embedding_gather_bf16(&td, &idd, &mut od, &mut bad, ids.len(), dim, vocab)
            .unwrap();
        let o = dev.download(&od).unwrap();
        assert_eq!(dev.download(&bad).unwrap()[0], 2, "bad ids counted");
        for (i, &id) in ids.iter().enumerate() {
            let row = &o[i * dim..(i + 1) * dim];
            if id < 0 || id as usize >= vocab {
                assert!(row.iter().all(|v| v.to_f32() == 0.0), "bad id row {i} not zero");
            } else {
                assert_eq!(row, &table[id as usize * dim..(id as usize + 1) * dim], "row {i}");
            }
        }
        let err = dev.ops().embedding_gather_bf16(
            &td,
            &idd,
            &mut od,
            &mut bad,
            ids.len(),
            dim + 1,
            vocab,
        );
        assert!(err.is_err(), "wrong dim must be a shape error");
    }
}

#[test]
fn layernorm_matches_cpu() {
    let Some((dev, _c)) = gpu("layernorm_matches_cpu") else { return };
    let mut rng = Rng::new(2);
    for &(rows, dim) in &[(7usize, 128usize), (3, 7168), (2, 100)] {
        let x = rng.bf16_vec(rows * dim, 3.0);
        // A per-row offset makes the mean matter.
        let x: Vec<bf16> = x
            .iter()
            .enumerate()
            .map(|(i, v)| bf16::from_f32(v.to_f32() + (i / dim) as f32))
            .collect();
        let w: Vec<f32> = (0..dim).map(|_| rng.uniform(0.5, 1.5)).collect();
        let b: Vec<f32> = (0..dim).map(|_| rng.uniform(-0.5, 0.5)).collect();
        let (xd, wd, bd) =
            (dev.upload(&x).unwrap(), dev.upload(&w).unwrap(), dev.upload(&b).unwrap());
        let mut yd = dev.upload(&vec![bf16::NAN; rows * dim]).unwrap();
        dev.ops().layernorm_bf16(&xd, &wd, &bd, &mut yd, rows, dim, 1e-6).unwrap();
        let y = to_f32(&dev.download(&yd).unwrap());
        let mut want = vec![0.0; rows * dim];
        cpu::norm::layer_norm(&to_f32(&x), &w, &b, 1e-6, dim, &mut want);
        let err = rel_err(&y, &want);
        eprintln!("err layernorm_bf16 rows={rows} dim={dim}: rel {err:.2e}");
        assert!(err < BF16_TOL, "layernorm rows={rows} dim={dim}: rel err {err}");
    }
}

/// YaRN-like frequencies: theta^(−2i/d), the low ones divided by 40.
fn freqs(half: usize) -> Vec<f32> {
    (0..half)
        .map(|i| {
            let f = 10000f32.powf(-((2 * i) as f32) / (2 * half) as f32);
            if i > half / 2 { f / 40.0 } else { f }
        })
        .collect()
}

#[test]
fn rope_matches_cpu_in_both_layouts_at_long_positions() {
    let Some((dev, _c)) = gpu("rope_matches_cpu_in_both_layouts_at_long_positions") else { return };
    let mut rng = Rng::new(3);
    let positions: Vec<usize> = vec![0, 1, 4095, 32767, 131071, 163839, 77777];
    let pos_i: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
    // (heads, head_dim, offset, layout): MLA q_pe (128 heads × 192, rope at 128), k_pe
    // (1 × 64), indexer q/k (64 × 128, rope at 0, half-split).
    let cases = [
        (128usize, 192usize, 128usize, RopeLayout::Interleaved),
        (1, 64, 0, RopeLayout::Interleaved),
        (64, 128, 0, RopeLayout::HalfSplit),
    ];
    let f = freqs(32);
    let (cos, sin) = cpu::rope::rope_cos_sin(&f, 1.0, &positions);
    for (heads, head_dim, offset, layout) in cases {
        let t = positions.len();
        let x: Vec<f32> = (0..t * heads * head_dim).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let mut want = x.clone();
        match layout {
            RopeLayout::Interleaved => {
                cpu::rope::rope_interleaved(&mut want, t, heads, head_dim, offset, &cos, &sin)
            }
            RopeLayout::HalfSplit => {
                cpu::rope::rope_half_split(&mut want, t, heads, head_dim, offset, &cos, &sin)
            }
        }
        let shape = RopeShape { tokens: t, heads, head_dim, offset };
        let (pd, fd) = (dev.upload(&pos_i).unwrap(), dev.upload(&f).unwrap());
        let mut xd = dev.upload(&x).unwrap();
        dev.ops().rope_f32(&mut xd, &pd, &fd, shape, 1.0, layout).unwrap();
        let got = dev.download(&xd).unwrap();
        let e = max_err(&got, &want);
        eprintln!("err rope_f32 {layout:?} heads={heads} dim={head_dim}: max {e:.2e}");
        assert!(e <= F32_TOL, "rope_f32 {layout:?}: max err {e}");
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut wantb = to_f32(&xb);
        match layout {
            RopeLayout::Interleaved => {
                cpu::rope::rope_interleaved(&mut wantb, t, heads, head_dim, offset, &cos, &sin)
            }
            RopeLayout::HalfSplit => {
                cpu::rope::rope_half_split(&mut wantb, t, heads, head_dim, offset, &cos, &sin)
            }
        }
        let mut xbd = dev.upload(&xb).unwrap();
        dev.ops().rope_bf16(&mut xbd, &pd, &fd, shape, 1.0, layout).unwrap();
        let e = rel_err(&to_f32(&dev.download(&xbd).unwrap()), &wantb);
        eprintln!("err rope_bf16 {layout:?} heads={heads}: rel {e:.2e}");
        assert!(e < BF16_TOL);
        let bad = RopeShape { offset: head_dim - 1, ..shape };
        assert!(dev.ops().rope_f32(&mut xd, &pd, &fd, bad, 1.0, layout).is_err());
    }
}

#[test]
fn silu_mul_matches_cpu() {
    let Some((dev, _c)) = gpu("silu_mul_matches_cpu") else { return };
    let mut rng = Rng::new(4);
    let n = 3 * 2048 + 5;
    let g: Vec<f32> = (0..n).map(|_| rng.uniform(-8.0, 8.0)).collect();
    let u: Vec<f32> = (0..n).map(|_| rng.uniform(-2.0, 2.0)).collect();
    let mut want = vec![0.0; n];
    cpu::activation::silu_mul(&g, &u, &mut want);
    let (gd, ud) = (dev.upload(&g).unwrap(), dev.upload(&u).unwrap());
    let mut od = dev.upload(&vec![f32::NAN; n]).unwrap();
    dev.ops().silu_mul_f32(&gd, &ud, &mut od, n).unwrap();
    let e = max_err(&dev.download(&od).unwrap(), &want);
    eprintln!("err silu_mul_f32: max {e:.2e}");
    assert!(e <= F32_TOL);
    // bf16, separate and fused [rows, 2·cols].
    let (rows, cols) = (3usize, 2048usize);
    let gb: Vec<bf16> = g[..rows * cols].iter().map(|&v| bf16::from_f32(v)).collect();
    let ub: Vec<bf16> = u[..rows * cols].iter().map(|&v| bf16::from_f32(v)).collect();
    let mut wantb = vec![0.0; rows * cols];
    cpu::activation::silu_mul(&to_f32(&gb), &to_f32(&ub), &mut wantb);
    let (gbd, ubd) = (dev.upload(&gb).unwrap(), dev.upload(&ub).unwrap());
    let mut obd = dev.upload(&vec![bf16::NAN; rows * cols]).unwrap();
    dev.ops().silu_mul_bf16(&gbd, &ubd, &mut obd, rows * cols).unwrap();
    let e = rel_err(&to_f32(&dev.download(&obd).unwrap()), &wantb);
    eprintln!("err silu_mul_bf16: rel {e:.2e}");
    assert!(e < BF16_TOL);
    let mut gu = Vec::with_capacity(rows * 2 * cols);
    for r in 0..rows {
        gu.extend_from_slice(&gb[r * cols..(r + 1) * cols]);
        gu.extend_from_slice(&ub[r * cols..(r + 1) * cols]);
    }
    let gud = dev.upload(&gu).unwrap();
    let mut obd = dev.upload(&vec![bf16::NAN; rows * cols]).unwrap();
    dev.ops().swiglu_fused_bf16(&gud, &mut obd, rows, cols).unwrap();
    let e = rel_err(&to_f32(&dev.download(&obd).unwrap()), &wantb);
    eprintln!("err swiglu_fused_bf16: rel {e:.2e}");
    assert!(e < BF16_TOL);
    assert!(dev.ops().silu_mul_f32(&gd, &ud, &mut od, n - 1).is_err());
}

/// Lowest index of the largest value; NaN last; −0.0 == +0.0.
fn argmax_ref(row: &[f32]) -> i32 {
    let mut best: Option<usize> = None;
    for (i, &v) in row.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|b| v > row[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as i32
}

#[test]
fn argmax_picks_lowest_id_on_ties() {
    let Some((dev, _c)) = gpu("argmax_picks_lowest_id_on_ties") else { return };
    let mut rng = Rng::new(5);
    let vocab = 129_280;
    let rows = 6;
    let mut l: Vec<f32> = (0..rows * vocab).map(|_| rng.uniform(-10.0, 10.0)).collect();
    l[vocab + 70_000] = 50.0; // row 1: tie between 500 and 70000
    l[vocab + 500] = 50.0;
    for v in &mut l[2 * vocab..3 * vocab] {
        *v = (*v).round(); // row 2: many ties at the max 10
    }
    l[3 * vocab + 9] = -0.0; // row 3: all ≤ 0, max tie −0.0 (9) vs +0.0 (20)
    for v in &mut l[3 * vocab..4 * vocab] {
        *v = -v.abs() - 1.0;
    }
    l[3 * vocab + 9] = -0.0;
    l[3 * vocab + 20] = 0.0;
    l[4 * vocab + 3] = f32::NAN; // row 4: NaN ignored
    l[4 * vocab + 4] = 100.0;
    let want: Vec<i32> = l.chunks(vocab).map(argmax_ref).collect();
    assert_eq!(want[1], 500);
    assert_eq!(want[3], 9);
    let ld = dev.upload(&l).unwrap();
    let mut od = dev.upload(&vec![-7i32; rows]).unwrap();
    dev.ops().argmax_f32(&ld, &mut od, rows, vocab).unwrap();
    assert_eq!(dev.download(&od).unwrap(), want);
    assert!(dev.ops().argmax_f32(&ld, &mut od, rows + 1, vocab).is_err());
}

#[test]
fn router_matches_cpu_including_ties() {
    let Some((dev, _c)) = gpu("router_matches_cpu_including_ties") else { return };
    let mut rng = Rng::new(6);
    let full = RouterParams {
        n_experts: 256,
        n_group: 8,
        topk_group: 4,
        top_k: 8,
        routed_scaling_factor: 2.5,
        norm_topk_prob: true,
    };
    let tiny = RouterParams { n_experts: 16, n_group: 4, topk_group: 2, top_k: 4, ..full };
    let small = RouterParams {
        n_experts: 32,
        n_group: 8,
        topk_group: 4,
        top_k: 4,
        norm_topk_prob: false,
        ..full
    };
    for p in [full, tiny, small] {
        for quantized in [false, true] {
            let tokens = 67;
            let e = p.n_experts;
            let mut logits: Vec<f32> = (0..tokens * e).map(|_| rng.uniform(-4.0, 4.0)).collect();
            let mut bias: Vec<f32> = (0..e).map(|_| rng.uniform(-0.1, 0.1)).collect();
            if quantized {
                logits.iter_mut().for_each(|v| *v = v.round()); // many exact ties
                bias.iter_mut().for_each(|v| *v = 0.0);
            }
            let (ld, bd) = (dev.upload(&logits).unwrap(), dev.upload(&bias).unwrap());
            let mut idd = dev.upload(&vec![-1i32; tokens * p.top_k]).unwrap();
            let mut wd = dev.upload(&vec![f32::NAN; tokens * p.top_k]).unwrap();
            dev.ops().router_select(&ld, &bd, &mut idd, &mut wd, tokens, &p).unwrap();
            let (ids, w) = (dev.download(&idd).unwrap(), dev.download(&wd).unwrap());
            let mut emax = 0f32;
            for t in 0..tokens {
                let want = cpu::router::route_token(&logits[t * e..(t + 1) * e], &bias, &p);
                let got_ids: Vec<i32> = ids[t * p.top_k..(t + 1) * p.top_k].to_vec();
                let want_ids: Vec<i32> = want.iter().map(|x| x.0 as i32).collect();
                assert_eq!(got_ids, want_ids, "token {t} experts (E={e}, quantized={quantized})");
                let ww: Vec<f32> = want.iter().map(|x| x.1).collect();
                emax = emax.max(max_err(&w[t * p.top_k..(t + 1) * p.top_k], &ww));
            }
            eprintln!("err router E={e} quantized={quantized}: weights max {emax:.2e}");
            assert!(emax <= F32_TOL);
        }
    }
    let bad = RouterParams { top_k: 33, ..full };
    let (ld, bd) =
        (dev.upload(&vec![0.5f32; 256]).unwrap(), dev.upload(&vec![0.0f32; 256]).unwrap());
    let mut idd = dev.upload(&[0i32; 33]).unwrap();
    let mut wd = dev.upload(&[0f32; 33]).unwrap();
    assert!(dev.ops().router_select(&ld, &bd, &mut idd, &mut wd, 1, &bad).is_err());
}
