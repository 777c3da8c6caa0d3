//! The f32 glue kernels of the GPU model (`model_cuda::Glue`, used by `Precision::F32`) against
//! their CPU twins in `fathom_kernels::cpu` (or, where the CPU has no single op, the plain
//! loop the CPU model runs), on random non-zero inputs. Tolerance: `TOL_F32` relative to
//! `max(1, |cpu|)` per element (fp32 with a different summation order).
//!
//! Without a GPU each test prints `SKIP: ...` on the real stderr and passes; the GPU runner
//! (`scripts/gpu.sh`'s run.sh) fails on any SKIP.

use fathom_kernels::cpu::activation::silu_mul;
use fathom_kernels::cpu::attention::mla_sparse_attention;
use fathom_kernels::cpu::gemm::matmul_t;
use fathom_kernels::cpu::norm::rms_norm;
use fathom_kernels::cuda::{CudaDevice, CudaError, DeviceOptions};
use fathom_worker::model_cuda::Glue;
use std::io::Write;

const TOL_F32: f32 = 1e-4;

fn gpu(test: &str) -> Option<CudaDevice> {
    let dirs: Vec<std::path::PathBuf> = std::env::var_os("FATHOM_CUDA_LIB_DIRS")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    let skip = |why: String| {
        let _ = writeln!(std::io::stderr().lock(), "SKIP: {test}: {why}");
    };
    match CudaDevice::count(&dirs) {
        Ok(0) => {
            skip("no CUDA device: the driver reports no GPU".into());
            return None;
        }
        Err(e @ CudaError::LibraryMissing { .. }) => {
            skip(format!("no CUDA device: {e}"));
            return None;
        }
        Err(e) => panic!("{test}: counting devices failed: {e}"),
        Ok(_) => {}
    }
    let opts = DeviceOptions { ordinal: 0, lib_dirs: dirs, kernel_cache: None };
    Some(CudaDevice::open(&opts).unwrap_or_else(|e| panic!("{test}: opening GPU 0: {e}")))
}

/// Deterministic values in [-1, 1), never all zero (xorshift).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    assert!(want.iter().any(|&x| x != 0.0), "{what}: the reference is all zeros");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= TOL_F32 * w.abs().max(1.0), "{what}: element {i}: {g} vs {w}");
    }
}

#[test]
fn f32_norm_swiglu_gather_add_match_cpu() {
    let Some(dev) = gpu("f32_norm_swiglu_gather_add_match_cpu") else { return };
    let g = Glue::load(&dev, None).unwrap();
    // rmsnorm in place on the first 40 of 48-wide rows; the tail must stay.
    let (rows, stride, dim) = (5, 48, 40);
    let x = rand_vec(rows * stride, 1);
    let w: Vec<f32> = rand_vec(dim, 2).iter().map(|v| 1.0 + 0.2 * v).collect();
    let mut d = dev.upload(&x).unwrap();
    g.rmsnorm_f32_inplace(&mut d, &dev.upload(&w).unwrap(), rows, stride, dim, 1e-6).unwrap();
    let got = dev.download(&d).unwrap();
    let mut want = x.clone();
    for r in 0..rows {
        let mut o = vec![0.0; dim];
        rms_norm(&x[r * stride..r * stride + dim], &w, 1e-6, dim, &mut o);
        want[r * stride..r * stride + dim].copy_from_slice(&o);
    }
    assert_close("rmsnorm_f32_inplace", &got, &want);

    // swiglu: [n, 2·inner] → [n, inner].
    let (n, inner) = (7, 24);
    let gu: Vec<f32> = rand_vec(n * 2 * inner, 3).iter().map(|v| 4.0 * v).collect();
    let mut act = dev.zeros::<f32>(n * inner).unwrap();
    g.swiglu_f32(&dev.upload(&gu).unwrap(), &mut act, n, inner).unwrap();
    let mut want = vec![0.0; n * inner];
    for r in 0..n {
        let row = &gu[r * 2 * inner..(r + 1) * 2 * inner];
        silu_mul(&row[..inner], &row[inner..], &mut want[r * inner..(r + 1) * inner]);
    }
    assert_close("swiglu_f32", &dev.download(&act).unwrap(), &want);

    // gather with one bad id (zero row, counted), then add into a residual.
    let (vocab, hd) = (11, 16);
    let table = rand_vec(vocab * hd, 4);
    let ids = [3i32, 0, 10, 11, 5];
    let mut out = dev.zeros::<f32>(ids.len() * hd).unwrap();
    let mut bad = dev.zeros::<i32>(1).unwrap();
    let (td, idd) = (dev.upload(&table).unwrap(), dev.upload(&ids).unwrap());
    g.gather_rows_f32(&td, &idd, &mut out, &mut bad, ids.len(), hd, vocab).unwrap();
    assert_eq!(dev.download(&bad).unwrap(), vec![1], "one id is outside the vocabulary");
    let base = rand_vec(ids.len() * hd, 5);
    let mut h = dev.upload(&base).unwrap();
    g.add_f32_into(&mut h, &out, ids.len() * hd).unwrap();
    let want: Vec<f32> = (0..ids.len() * hd)
        .map(|i| {
            let id = ids[i / hd];
            let t = if (0..vocab as i32).contains(&id) {
                table[id as usize * hd + i % hd]
            } else {
                0.0
            };
            base[i] + t
        })
        .collect();
    assert_close("gather_rows_f32 + add_f32_into", &dev.download(&h).unwrap(), &want);
}

#[test]
fn f32_absorbed_attention_matches_cpu() {
    let Some(dev) = gpu("f32_absorbed_attention_matches_cpu") else { return };
    let g = Glue::load(&dev, None).unwrap();
    let (n, nh, nope, rope, v, kl) = (3, 4, 16, 8, 16, 32);
    let (lat, qk, topk, kv_rows) = (kl + rope, nope + rope, 8, 21);
    let q = rand_vec(n * nh * qk, 10);
    let kv_b: Vec<f32> = rand_vec(nh * (nope + v) * kl, 11).iter().map(|x| 0.3 * x).collect();
    let kv = rand_vec(kv_rows * lat, 12);
    // Row 0: full selection; row 1: some −1 slots; row 2: nothing selected (zeros out).
    let sel: Vec<i32> =
        [vec![0, 3, 4, 7, 9, 12, 15, 20], vec![2, -1, 5, 6, -1, 11, 18, -1], vec![-1; 8]].concat();
    let scale = 0.26;
    let qd = dev.upload(&q).unwrap();
    let kvbd = dev.upload(&kv_b).unwrap();
    let mut qa = dev.zeros::<f32>(n * nh * lat).unwrap();
    g.absorb_q_f32(&qd, &kvbd, &mut qa, n, nh, (nope, rope, v, kl)).unwrap();
    let mut ol = dev.zeros::<f32>(n * nh * kl).unwrap();
    let (kvd, seld) = (dev.upload(&kv).unwrap(), dev.upload(&sel).unwrap());
    g.mla_sparse_f32(&qa, &kvd, &seld, &mut ol, n, nh, (kl, rope, topk, kv_rows), scale).unwrap();
    let mut oh = dev.zeros::<f32>(n * nh * v).unwrap();
    g.unabsorb_o_f32(&ol, &kvbd, &mut oh, n, nh, (nope, v, kl)).unwrap();

    // CPU: absorb by loops, attend with the twin, un-absorb by loops.
    let mut want_qa = vec![0.0; n * nh * lat];
    for r in 0..n {
        for h in 0..nh {
            let qr = &q[(r * nh + h) * qk..(r * nh + h + 1) * qk];
            let o = &mut want_qa[(r * nh + h) * lat..(r * nh + h + 1) * lat];
            for c in 0..kl {
                o[c] = (0..nope).map(|t| qr[t] * kv_b[(h * (nope + v) + t) * kl + c]).sum();
            }
            o[kl..].copy_from_slice(&qr[nope..]);
        }
    }
    assert_close("absorb_q_f32", &dev.download(&qa).unwrap(), &want_qa);
    let mut want_ol = vec![0.0; n * nh * kl];
    for r in 0..n {
        let idx: Vec<u32> =
            sel[r * topk..(r + 1) * topk].iter().filter(|&&s| s >= 0).map(|&s| s as u32).collect();
        let qr = &want_qa[r * nh * lat..(r + 1) * nh * lat];
        let o = &mut want_ol[r * nh * kl..(r + 1) * nh * kl];
        mla_sparse_attention(qr, &kv, &idx, nh, kl, rope, scale, o);
    }
    let got_ol = dev.download(&ol).unwrap();
    assert!(got_ol[2 * nh * kl..].iter().all(|&x| x == 0.0), "a row with no key must be 0");
    assert_close("mla_sparse_f32", &got_ol, &want_ol);
    let mut want_oh = vec![0.0; n * nh * v];
    for r in 0..n {
        for h in 0..nh {
            for j in 0..v {
                let w = &kv_b[(h * (nope + v) + nope + j) * kl..][..kl];
                let o = &want_ol[(r * nh + h) * kl..][..kl];
                want_oh[(r * nh + h) * v + j] = o.iter().zip(w).map(|(a, b)| a * b).sum();
            }
        }
    }
    assert_close("unabsorb_o_f32", &dev.download(&oh).unwrap(), &want_oh);
}

#[test]
fn f32_routed_experts_match_cpu() {
    let Some(dev) = gpu("f32_routed_experts_match_cpu") else { return };
    let g = Glue::load(&dev, None).unwrap();
    let (n, k, dim, inner, e) = (5, 3, 32, 8, 6);
    let x = rand_vec(n * dim, 20);
    let w13: Vec<f32> = rand_vec(e * 2 * inner * dim, 21).iter().map(|v| 0.5 * v).collect();
    let w2: Vec<f32> = rand_vec(e * dim * inner, 22).iter().map(|v| 0.5 * v).collect();
    // Ids include a foreign expert (−1 and 6 ≥ E: another rank's), which contributes nothing.
    let ids = [0i32, 3, 5, 1, 1, 2, 4, -1, 0, 5, 6, 2, 3, 4, 1];
    let wts: Vec<f32> = rand_vec(n * k, 23).iter().map(|v| 0.5 + 0.4 * v).collect();
    let mut act = dev.zeros::<f32>(n * k * inner).unwrap();
    let mut out = dev.zeros::<f32>(n * dim).unwrap();
    let (xd, idd, wd) =
        (dev.upload(&x).unwrap(), dev.upload(&ids).unwrap(), dev.upload(&wts).unwrap());
    let (w13d, w2d) = (dev.upload(&w13).unwrap(), dev.upload(&w2).unwrap());
    g.moe_f32(&xd, &idd, &wd, &w13d, &w2d, &mut act, &mut out, (n, k, dim, inner, e)).unwrap();
    // CPU: the CPU model's per-expert SwiGLU MLP (matmul_t, silu_mul, matmul_t), weighted sum.
    let mut want = vec![0.0; n * dim];
    for t in 0..n {
        let xt = &x[t * dim..(t + 1) * dim];
        for j in 0..k {
            let ex = ids[t * k + j];
            if !(0..e as i32).contains(&ex) {
                continue;
            }
            let ex = ex as usize;
            let gu = matmul_t(
                xt,
                &w13[ex * 2 * inner * dim..(ex + 1) * 2 * inner * dim],
                1,
                2 * inner,
                dim,
            );
            let mut a = vec![0.0; inner];
            silu_mul(&gu[..inner], &gu[inner..], &mut a);
            let y = matmul_t(&a, &w2[ex * dim * inner..(ex + 1) * dim * inner], 1, dim, inner);
            for d in 0..dim {
                want[t * dim + d] += wts[t * k + j] * y[d];
            }
        }
    }
    assert_close("moe_f32", &dev.download(&out).unwrap(), &want);
}
