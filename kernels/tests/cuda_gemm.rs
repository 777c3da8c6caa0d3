//! GPU parity of the GEMMs: bf16 through cuBLAS and FP8 block-scaled through cuBLASLt, against
//! f64 CPU products of the same (exactly representable) inputs. The FP8 test also tries every
//! scale layout and reports which ones cuBLASLt reads, so a wrong assumption names the fix.

mod cuda_common;

use cuda_common::{Rng, gpu, reference, rel_err, to_f32};
use fathom_kernels::cuda::{
    ActScaleLayout, BlasGemm, CudaDevice, Fp8Gemm, StridedGemm, WeightScaleLayout,
};
use half::bf16;

#[test]
fn bf16_gemm_matches_the_cpu_reference() {
    let Some((dev, _cache)) = gpu("bf16_gemm_matches_the_cpu_reference") else { return };
    let blas = BlasGemm::new(&dev).unwrap();
    let mut rng = Rng::new(21);
    for &(m, n, k) in &[(1usize, 2112usize, 7168usize), (64, 576, 1536), (7, 100, 300)] {
        let x = rng.bf16_vec(m * k, 1.0);
        let w = rng.bf16_vec(n * k, 0.05);
        let xd = dev.upload(&x).unwrap();
        let wd = dev.upload(&w).unwrap();
        let mut yd = dev.upload(&vec![bf16::NAN; m * n]).unwrap();
        blas.gemm_bf16(&xd, &wd, &mut yd, m, n, k).unwrap();
        let y = to_f32(&dev.download(&yd).unwrap());
        let want = reference::matmul_nt(&to_f32(&x), &to_f32(&w), m, n, k);
        let err = rel_err(&y, &want);
        assert!(err < 1e-2, "bf16 gemm m={m} n={n} k={k}: rel err {err}");
    }
}

/// fp32 GEMM (cuBLAS SGEMM, no TF32): 1e-5 relative against the f64 product.
#[test]
fn f32_gemm_matches_the_cpu_reference() {
    let Some((dev, _cache)) = gpu("f32_gemm_matches_the_cpu_reference") else { return };
    let blas = BlasGemm::new(&dev).unwrap();
    let mut rng = Rng::new(22);
    for &(m, n, k) in &[(1usize, 1536usize, 7168usize), (64, 256, 7168), (5, 33, 300)] {
        let x: Vec<f32> = (0..m * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.uniform(-0.05, 0.05)).collect();
        let (xd, wd) = (dev.upload(&x).unwrap(), dev.upload(&w).unwrap());
        let mut yd = dev.upload(&vec![f32::NAN; m * n]).unwrap();
        blas.gemm_f32(&xd, &wd, &mut yd, m, n, k, 0.5).unwrap();
        let y = dev.download(&yd).unwrap();
        let want: Vec<f32> =
            reference::matmul_nt(&x, &w, m, n, k).iter().map(|v| 0.5 * v).collect();
        let err = rel_err(&y, &want);
        eprintln!("gemm_f32 m={m} n={n} k={k}: rel err {err:.2e}");
        assert!(err < 1e-5, "f32 gemm m={m} n={n} k={k}: rel err {err} (TF32 would be ~1e-3)");
    }
    let (xd, wd) = (dev.upload(&[1f32; 6]).unwrap(), dev.upload(&[1f32; 6]).unwrap());
    let mut yd = dev.upload(&[0f32; 3]).unwrap();
    assert!(blas.gemm_f32(&xd, &wd, &mut yd, 2, 2, 3, 1.0).is_err(), "short y must be refused");
}

/// The MLA absorption's form: per head h, `qa[r, h, 0..kl] = q[r, h, 0..nope] · W_UK_h`, strided
/// views into interleaved buffers; and the bounds check refuses a batch that would overrun.
#[test]
fn strided_batched_bf16_gemm_matches_the_cpu_reference() {
    let Some((dev, _cache)) = gpu("strided_batched_bf16_gemm_matches_the_cpu_reference") else {
        return;
    };
    let blas = BlasGemm::new(&dev).unwrap();
    let mut rng = Rng::new(23);
    let (n, nh, nh_pad, nope, rope, v, kl) =
        (5usize, 3usize, 4usize, 16usize, 8usize, 16usize, 32usize);
    let (qk, lat) = (nope + rope, kl + rope);
    let q = rng.bf16_vec(n * nh * qk, 1.0);
    let kv_b = rng.bf16_vec(nh * (nope + v) * kl, 0.2);
    let (qd, kd) = (dev.upload(&q).unwrap(), dev.upload(&kv_b).unwrap());
    let mut qa = dev.upload(&vec![bf16::from_f32(-7.0); n * nh_pad * lat]).unwrap();
    let s = StridedGemm {
        trans_a: false,
        trans_b: false,
        m: kl,
        n,
        k: nope,
        lda: kl,
        ldb: nh * qk,
        ldc: nh_pad * lat,
        stride_a: (nope + v) * kl,
        stride_b: qk,
        stride_c: lat,
        batch: nh,
    };
    blas.gemm_bf16_strided_batched(&s, &kd, &qd, &mut qa).unwrap();
    let got = to_f32(&dev.download(&qa).unwrap());
    let (qf, kf) = (to_f32(&q), to_f32(&kv_b));
    let (mut num, mut den) = (0f64, 0f64);
    for r in 0..n {
        for h in 0..nh_pad {
            for c in 0..lat {
                let g = got[(r * nh_pad + h) * lat + c];
                if h >= nh || c >= kl {
                    assert_eq!(
                        g, -7.0,
                        "r {r} h {h} c {c}: outside the GEMM's columns was written"
                    );
                    continue;
                }
                let want: f64 = (0..nope)
                    .map(|t| {
                        f64::from(qf[(r * nh + h) * qk + t])
                            * f64::from(kf[(h * (nope + v) + t) * kl + c])
                    })
                    .sum();
                num += (f64::from(g) - want).powi(2);
                den += want.powi(2);
            }
        }
    }
    let err = (num / den).sqrt();
    eprintln!("strided batched bf16 (absorb form): rel err {err:.2e}");
    assert!(err < 1e-2, "strided batched bf16: rel err {err}");
    // Unabsorb form (op T on A) over a view that starts inside the buffer: refuse one head more
    // than the view holds.
    let ol = dev.upload(&rng.bf16_vec(n * nh_pad * kl, 1.0)).unwrap();
    let mut oh = dev.upload(&vec![bf16::ZERO; n * nh * v]).unwrap();
    let mut u = StridedGemm {
        trans_a: true,
        trans_b: false,
        m: v,
        n,
        k: kl,
        lda: kl,
        ldb: nh_pad * kl,
        ldc: nh * v,
        stride_a: (nope + v) * kl,
        stride_b: kl,
        stride_c: v,
        batch: nh,
    };
    blas.gemm_bf16_strided_batched(&u, &kd.slice(nope * kl..), &ol, &mut oh).unwrap();
    u.batch = nh + 1;
    assert!(blas.gemm_bf16_strided_batched(&u, &kd.slice(nope * kl..), &ol, &mut oh).is_err());
}

/// Scales for the weight blocks: powers of two times a factor, spread over 2^-4..2^4 so that a
/// wrong layout gives an O(1) error.
fn weight_scales(rng: &mut Rng, n: usize, k: usize) -> Vec<f32> {
    (0..n.div_ceil(128) * (k / 128))
        .map(|_| 2f32.powi((rng.next_u64() % 9) as i32 - 4) * rng.uniform(0.5, 1.0))
        .collect()
}

/// Activation scales `s` ([m, kb] row-major) laid out for a GEMM run with `p >= m` rows; pad
/// entries are zero.
fn act_scales_in(layout: ActScaleLayout, s: &[f32], m: usize, p: usize, kb: usize) -> Vec<f32> {
    let mut out = vec![0f32; p * kb];
    for r in 0..m {
        for g in 0..kb {
            let i = match layout {
                ActScaleLayout::RowMajor => r * kb + g,
                ActScaleLayout::TokenContiguous => g * p + r,
            };
            out[i] = s[r * kb + g];
        }
    }
    out
}

/// Weight scales `s` ([nb, kb] row-major, the checkpoint's order) laid out for the GEMM: rows
/// padded to [`Fp8Gemm::weight_scale_pitch`], transposed for the probe.
fn weight_scales_in(layout: WeightScaleLayout, s: &[f32], nb: usize, kb: usize) -> Vec<f32> {
    let pitch = Fp8Gemm::weight_scale_pitch(kb * 128);
    let mut out = vec![0f32; nb * pitch];
    for i in 0..nb {
        for j in 0..kb {
            let at = match layout {
                WeightScaleLayout::RowMajor => i * pitch + j,
                WeightScaleLayout::Transposed => j * nb + i,
            };
            out[at] = s[i * kb + j];
        }
    }
    out
}

struct Fp8Case {
    m: usize,
    n: usize,
    k: usize,
    xq: Vec<u8>,
    xs: Vec<f32>, // [m, k/128] row-major
    wq: Vec<u8>,
    ws: Vec<f32>, // [n/128, k/128] row-major
    want: Vec<f32>,
}

fn fp8_case(rng: &mut Rng, m: usize, n: usize, k: usize) -> Fp8Case {
    let mut x = to_f32(&rng.bf16_vec(m * k, 1.0));
    // A random power-of-two magnitude per 128-group, so every scale layout is distinguishable.
    for chunk in x.chunks_mut(128) {
        let f = 2f32.powi((rng.next_u64() % 9) as i32 - 4);
        chunk.iter_mut().for_each(|v| *v *= f);
    }
    let (xq, xs) = reference::act_quant(&x, m, k);
    let wq = rng.e4m3_vec(n * k);
    let ws = weight_scales(rng, n, k);
    let kb = k / 128;
    let xdq: Vec<f32> =
        (0..m * k).map(|i| reference::e4m3(xq[i]) * xs[(i / k) * kb + (i % k) / 128]).collect();
    let wdq = reference::dequant(&wq, &ws, n, k);
    let want = reference::matmul_nt(&xdq, &wdq, m, n, k);
    Fp8Case { m, n, k, xq, xs, wq, ws, want }
}

fn run_fp8(
    dev: &CudaDevice,
    gemm: &Fp8Gemm,
    c: &Fp8Case,
    al: ActScaleLayout,
    wl: WeightScaleLayout,
) -> f64 {
    let kb = c.k / 128;
    let p = gemm.padded_rows(c.m, c.n, c.k).unwrap();
    let mut xq_host = c.xq.clone();
    xq_host.resize(p * c.k, 0);
    let xq = dev.upload(&xq_host).unwrap();
    let xs = dev.upload(&act_scales_in(al, &c.xs, c.m, p, kb)).unwrap();
    let wq = dev.upload(&c.wq).unwrap();
    let ws = dev.upload(&weight_scales_in(wl, &c.ws, c.n.div_ceil(128), kb)).unwrap();
    let mut y = dev.upload(&vec![bf16::NAN; p * c.n]).unwrap();
    gemm.gemm(&xq, &xs, &wq, &ws, &mut y, c.m, c.n, c.k).unwrap();
    let y = to_f32(&dev.download(&y).unwrap());
    rel_err(&y[..c.m * c.n], &c.want)
}

#[test]
fn fp8_block_scaled_gemm_matches_the_cpu_reference() {
    let Some((dev, _cache)) = gpu("fp8_block_scaled_gemm_matches_the_cpu_reference") else {
        return;
    };
    let gemm = Fp8Gemm::new(&dev).unwrap();
    let mut rng = Rng::new(22);
    // 2112 and 576 are not multiples of 128: partial weight-scale blocks.
    let cases = [(64usize, 2112usize, 1024usize), (1, 576, 7168), (130, 256, 384)];
    let mut report = Vec::new();
    let mut default_ok = true;
    for &(m, n, k) in &cases {
        let c = fp8_case(&mut rng, m, n, k);
        for al in [ActScaleLayout::TokenContiguous, ActScaleLayout::RowMajor] {
            for wl in [WeightScaleLayout::RowMajor, WeightScaleLayout::Transposed] {
                let err = run_fp8(&dev, &gemm, &c, al, wl);
                let is_default =
                    (al, wl) == (Fp8Gemm::ACT_SCALE_LAYOUT, Fp8Gemm::WEIGHT_SCALE_LAYOUT);
                report
                    .push(format!("m={m} n={n} k={k} act={al:?} weight={wl:?}: rel err {err:.3e}"));
                // e4m3 inputs are exact; the error is accumulation plus the bf16 output.
                if is_default && err >= 1e-2 {
                    default_ok = false;
                }
            }
        }
    }
    assert!(
        default_ok,
        "the documented scale layouts do not match cuBLASLt:\n{}",
        report.join("\n")
    );
}

#[test]
fn fp8_gemm_is_right_over_a_sweep_of_shapes() {
    let Some((dev, _cache)) = gpu("fp8_gemm_is_right_over_a_sweep_of_shapes") else { return };
    let gemm = Fp8Gemm::new(&dev).unwrap();
    let mut rng = Rng::new(23);
    let (al, wl) = (Fp8Gemm::ACT_SCALE_LAYOUT, Fp8Gemm::WEIGHT_SCALE_LAYOUT);
    let mut bad = Vec::new();
    for &(m, n, k) in &[
        (64usize, 256usize, 384usize),
        (128, 256, 384),
        (132, 256, 384),
        (136, 256, 384),
        (144, 256, 384),
        (256, 256, 384),
        (130, 256, 1024),
        (130, 2112, 1024),
        (200, 576, 512),
        (3, 256, 384),
        (17, 2112, 512),
        (40, 384, 640),
    ] {
        let c = fp8_case(&mut rng, m, n, k);
        let err = run_fp8(&dev, &gemm, &c, al, wl);
        let p = gemm.padded_rows(m, n, k).unwrap();
        eprintln!("sweep m={m} (run as {p}) n={n} k={k}: rel err {err:.3e}");
        if err >= 1e-2 {
            bad.push(format!("m={m} n={n} k={k}: {err:.3e}"));
        }
    }
    assert!(bad.is_empty(), "FP8 GEMM wrong at {bad:?}");
}

#[test]
fn fp8_gemm_pads_rows_only_as_far_as_needed() {
    let Some((dev, _cache)) = gpu("fp8_gemm_pads_rows_only_as_far_as_needed") else { return };
    let gemm = Fp8Gemm::new(&dev).unwrap();
    for m in [1usize, 2, 3, 5, 16, 64, 100, 4096] {
        let p = gemm.padded_rows(m, 2112, 7168).unwrap();
        eprintln!("fp8 cuBLASLt m={m} runs as {p} rows");
        assert!(p >= m && p % 4 == 0 && p <= m.next_multiple_of(128), "m={m} padded to {p}");
        assert_eq!(gemm.padded_rows(m, 2112, 7168).unwrap(), p, "padding is cached, stable");
    }
}

#[test]
fn fp8_gemm_rejects_unaligned_shapes() {
    let Some((dev, _cache)) = gpu("fp8_gemm_rejects_unaligned_shapes") else { return };
    let gemm = Fp8Gemm::new(&dev).unwrap();
    let q = dev.zeros::<u8>(100 * 100).unwrap();
    let s = dev.zeros::<f32>(1).unwrap();
    let mut y = dev.zeros::<bf16>(100 * 100).unwrap();
    let e = gemm.gemm(&q, &s, &q, &s, &mut y, 100, 100, 100).unwrap_err();
    assert!(e.to_string().contains("k % 128 == 0"), "{e}");
}
