//! `comm::NcclComm`'s deadline on two GPUs, in its own process (an aborted NCCL communicator may
//! leave its stream unusable for later tests): rank 1 never enters the op; rank 0 fails within
//! the deadline with `Timeout` naming rank 1, after which it is poisoned. Rank 1 aborts its side
//! (as a dead process would) a second after rank 0's deadline. This test hung on the H200 pair
//! until `NcclComm::init` connected the peers eagerly: NCCL's lazy connection blocks the first
//! collective's *host* call until the peer arrives, past any deadline.
//! SKIP without two GPUs.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fathom_kernels::comm::{Collective, CommError, CommOptions, NcclComm};
use fathom_kernels::cuda::{CudaDevice, DeviceOptions, NcclUniqueId};

#[test]
fn a_rank_that_never_arrives_times_out_and_poisons() {
    const TEST: &str = "a_rank_that_never_arrives_times_out_and_poisons";
    let n = CudaDevice::count(&Vec::<std::path::PathBuf>::new()).unwrap_or(0);
    if n < 2 {
        let why =
            if n == 0 { "no CUDA device".to_string() } else { format!("needs 2 GPUs, found {n}") };
        let _ = writeln!(std::io::stderr().lock(), "SKIP: {TEST}: {why}");
        return;
    }
    let timeout = Duration::from_millis(800);
    let opts = CommOptions { timeout, ..CommOptions::default() };
    let id = NcclUniqueId::new().expect("unique id");
    let got = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2usize)
            .map(|r| {
                s.spawn(move || {
                    let cache = std::env::temp_dir().join("fathom-kernels-comm-nccl");
                    let o =
                        DeviceOptions { ordinal: r, lib_dirs: vec![], kernel_cache: Some(cache) };
                    let dev = Arc::new(CudaDevice::open(&o).expect("open GPU"));
                    let mut c = NcclComm::init(dev, &id, r, 2, opts).expect("init rank");
                    let res = if r == 0 {
                        let t = Instant::now();
                        let e =
                            c.all_reduce_sum_f32(&mut [1.0; 64]).expect_err("rank 1 never comes");
                        let after = c.barrier().expect_err("poisoned");
                        Some((e, t.elapsed(), after))
                    } else {
                        std::thread::sleep(timeout + Duration::from_secs(1));
                        None
                    };
                    eprintln!("rank {r}: aborting");
                    c.abort();
                    eprintln!("rank {r}: aborted");
                    res
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("rank thread")).collect::<Vec<_>>()
    });
    let (e, took, after) = got.into_iter().next().flatten().expect("rank 0 result");
    match &e {
        CommError::Timeout { op, missing_ranks, waited } => {
            assert_eq!(*op, "all_reduce");
            assert_eq!(missing_ranks, &[1]);
            assert!(*waited >= timeout, "gave up early: {waited:?}");
        }
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(took < timeout + Duration::from_secs(5), "took {took:?}");
    assert!(matches!(after, CommError::Poisoned { .. }), "{after}");
}
