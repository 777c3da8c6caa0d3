//! GPU parity of the device's own kernels against the CPU references, and the one-line errors
//! of opening a device. GPU tests print `SKIP:` where there is no GPU (see cuda_common).

mod cuda_common;

use cuda_common::{Rng, gpu, reference, rel_err, to_f32};
use fathom_kernels::cuda::{ActScaleLayout, CudaDevice, CudaError, DeviceOptions};
use half::bf16;

#[test]
fn opening_a_missing_device_is_a_one_line_error() {
    let dirs = cuda_common::lib_dirs();
    let opts = DeviceOptions { ordinal: 4096, lib_dirs: dirs, kernel_cache: None };
    let err = CudaDevice::open(&opts).expect_err("there is no device 4096");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "multi-line error: {msg}");
    match err {
        CudaError::LibraryMissing { lib, .. } => assert_eq!(lib, "cuda", "{msg}"),
        CudaError::NoDevice { ordinal, .. } => assert_eq!(ordinal, 4096),
        other => panic!("unexpected error: {other}"),
    }
}

#[test]
fn a_missing_library_directory_is_named() {
    let opts = DeviceOptions {
        ordinal: 0,
        lib_dirs: vec!["/nonexistent/fathom-cuda-libs".into()],
        kernel_cache: None,
    };
    let msg = CudaDevice::open(&opts).expect_err("bad directory").to_string();
    assert!(msg.contains("/nonexistent/fathom-cuda-libs"), "{msg}");
}

#[test]
fn rmsnorm_matches_the_cpu_reference() {
    let Some((dev, _cache)) = gpu("rmsnorm_matches_the_cpu_reference") else { return };
    let mut rng = Rng::new(11);
    for &(rows, dim) in
        &[(1usize, 7168usize), (37, 1536), (64, 512), (3, 100), (2, 16384), (2, 40000)]
    {
        let x = rng.bf16_vec(rows * dim, 3.0);
        let w: Vec<f32> = (0..dim).map(|_| rng.uniform(0.5, 1.5)).collect();
        let xd = dev.upload(&x).unwrap();
        let wd = dev.upload(&w).unwrap();
        let mut yd = dev.upload(&vec![bf16::NAN; rows * dim]).unwrap(); // poisoned
        dev.ops().rmsnorm_bf16(&xd, &wd, &mut yd, rows, dim, 1e-6).unwrap();
        let y = to_f32(&dev.download(&yd).unwrap());
        let want = reference::rmsnorm(&to_f32(&x), &w, rows, dim, 1e-6);
        let err = rel_err(&y, &want);
        // bf16 output: ≤ 2^-9 relative per element.
        assert!(err < 4e-3, "rmsnorm rows={rows} dim={dim}: rel err {err}");
    }
}

#[test]
fn act_quant_matches_the_cpu_reference_bit_for_bit() {
    let Some((dev, _cache)) = gpu("act_quant_matches_the_cpu_reference_bit_for_bit") else {
        return;
    };
    let mut rng = Rng::new(12);
    for &(rows, k) in &[(1usize, 7168usize), (33, 1536), (5, 128)] {
        let mut x = rng.bf16_vec(rows * k, 2.0);
        // Vary the magnitude per group, make one group tiny (amax clamp) and one exactly a
        // power of two times 448 (the ceil edge).
        for (g, chunk) in x.chunks_mut(128).enumerate() {
            let f = 2f32.powi((g % 13) as i32 - 6);
            chunk.iter_mut().for_each(|v| *v = bf16::from_f32(v.to_f32() * f));
        }
        x[..128].iter_mut().for_each(|v| *v = bf16::from_f32(v.to_f32() * 1e-6));
        if x.len() >= 256 {
            x[128] = bf16::from_f32(448.0);
        }
        let xf = to_f32(&x);
        let (want_q, want_s) = reference::act_quant(&xf, rows, k);
        let xd = dev.upload(&x).unwrap();
        let groups = k / 128;
        for (layout, pitch) in
            [(ActScaleLayout::RowMajor, rows), (ActScaleLayout::TokenContiguous, rows + 3)]
        {
            let mut qd = dev.upload(&vec![0x7fu8; pitch * k]).unwrap(); // NaN-poisoned
            let mut sd = dev.upload(&vec![f32::NAN; pitch * groups]).unwrap();
            dev.ops().act_quant_fp8(&xd, &mut qd, &mut sd, rows, pitch, k, layout).unwrap();
            let q = dev.download(&qd).unwrap();
            let s = dev.download(&sd).unwrap();
            for r in 0..rows {
                for g in 0..groups {
                    let got = match layout {
                        ActScaleLayout::RowMajor => s[r * groups + g],
                        ActScaleLayout::TokenContiguous => s[g * pitch + r],
                    };
                    assert_eq!(got, want_s[r * groups + g], "scale row {r} group {g} ({layout:?})");
                }
            }
            // Pad rows are left alone.
            assert!(q[rows * k..].iter().all(|&b| b == 0x7f), "pad rows of q were written");
            let written = s.iter().filter(|v| !v.is_nan()).count();
            assert_eq!(written, rows * groups, "exactly rows × k/128 scales are written");
            let q = &q[..rows * k];
            let bad = q.iter().zip(&want_q).filter(|(a, b)| a != b).count();
            assert_eq!(bad, 0, "{bad} of {} e4m3 codes differ (rows={rows} k={k})", q.len());
        }
    }
}

#[test]
fn dequant_matches_the_cpu_reference() {
    let Some((dev, _cache)) = gpu("dequant_matches_the_cpu_reference") else { return };
    let mut rng = Rng::new(13);
    // 576 rows: a partial last block of 64 (wkv_a); 200 columns: partial last column block.
    for &(n, k) in &[(576usize, 7168usize), (300, 200)] {
        let w = rng.e4m3_vec(n * k);
        let s: Vec<f32> = (0..n.div_ceil(128) * k.div_ceil(128))
            .map(|_| 2f32.powi((rng.next_u64() % 9) as i32 - 4) * rng.uniform(0.5, 1.0))
            .collect();
        let wd = dev.upload(&w).unwrap();
        let sd = dev.upload(&s).unwrap();
        let mut od = dev.upload(&vec![bf16::NAN; n * k]).unwrap();
        dev.ops().dequant_fp8_block(&wd, &sd, &mut od, n, k).unwrap();
        let got = to_f32(&dev.download(&od).unwrap());
        let want = reference::dequant(&w, &s, n, k);
        let err = rel_err(&got, &want);
        assert!(err < 4e-3, "dequant n={n} k={k}: rel err {err}");
    }
}

#[test]
fn ops_reject_wrong_shapes() {
    let Some((dev, _cache)) = gpu("ops_reject_wrong_shapes") else { return };
    let x = dev.zeros::<bf16>(100).unwrap();
    let mut q = dev.zeros::<u8>(100).unwrap();
    let mut s = dev.zeros::<f32>(1).unwrap();
    let e = dev.ops().act_quant_fp8(&x, &mut q, &mut s, 1, 1, 100, ActScaleLayout::RowMajor);
    assert!(matches!(e, Err(CudaError::Shape { .. })), "{e:?}");
    let w = dev.zeros::<f32>(3).unwrap();
    let mut y = dev.zeros::<bf16>(100).unwrap();
    let e = dev.ops().rmsnorm_bf16(&x, &w, &mut y, 1, 100, 1e-6);
    assert!(e.unwrap_err().to_string().contains("w has 3 elements, expected 100"));
}
