//! NCCL on real GPUs: all-reduce, all-to-all and all-gather between two H200s (one thread per
//! rank, the unique id passed between them as bytes, as the control plane will), and a one-rank
//! communicator on any GPU machine. SKIP where there is no GPU; the two-rank test says
//! "needs 2 GPUs" where there is one.

mod cuda_common;

use std::sync::mpsc;

use cuda_common::{Rng, skip};
use fathom_kernels::cuda::{CudaDevice, DeviceOptions, NcclComm, NcclUniqueId};

fn open(ordinal: usize) -> CudaDevice {
    let opts = DeviceOptions { ordinal, lib_dirs: cuda_common::lib_dirs(), kernel_cache: None };
    CudaDevice::open(&opts).unwrap_or_else(|e| panic!("opening GPU {ordinal}: {e}"))
}

fn gpu_count(test: &str) -> Option<usize> {
    match CudaDevice::count(&cuda_common::lib_dirs()) {
        Ok(0) | Err(_) => {
            skip(test, "no GPU (or no CUDA driver) on this machine");
            None
        }
        Ok(n) => Some(n),
    }
}

/// Rank r's send data: world × count values, distinct per rank and chunk, never zero.
fn rank_data(rank: usize, len: usize) -> Vec<f32> {
    let mut rng = Rng::new(1000 + rank as u64);
    (0..len).map(|_| rng.uniform(0.5, 1.5) * (rank + 1) as f32).collect()
}

#[test]
fn two_rank_all_reduce_all_to_all_all_gather() {
    const TEST: &str = "two_rank_all_reduce_all_to_all_all_gather";
    let Some(n) = gpu_count(TEST) else { return };
    if n < 2 {
        skip(TEST, &format!("needs 2 GPUs, found {n}"));
        return;
    }
    let world = 2usize;
    let count = 1 << 20; // per peer, f32: 4 MiB
    let len = world * count;
    let (id_tx, id_rx) = mpsc::channel::<Vec<u8>>();
    let mut id_tx = Some(id_tx);
    let mut id_rx = Some(id_rx);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let tx = if rank == 0 { id_tx.take() } else { None };
            let rx = if rank == 1 { id_rx.take() } else { None };
            std::thread::spawn(move || {
                let dev = open(rank);
                let id = if rank == 0 {
                    let id = NcclUniqueId::new().expect("unique id");
                    tx.unwrap().send(id.to_bytes().to_vec()).unwrap();
                    id
                } else {
                    NcclUniqueId::from_bytes(&rx.unwrap().recv().unwrap()).unwrap()
                };
                let comm = NcclComm::init_rank(&dev, &id, rank, world).expect("init rank");
                let send = dev.upload(&rank_data(rank, len)).unwrap();
                let mut sum = dev.upload(&vec![f32::NAN; len]).unwrap();
                comm.all_reduce_sum(&send, &mut sum).unwrap();
                let mut a2a = dev.upload(&vec![f32::NAN; len]).unwrap();
                comm.all_to_all(&send, &mut a2a).unwrap();
                let mut gathered = dev.upload(&vec![f32::NAN; len * world]).unwrap();
                comm.all_gather(&send, &mut gathered).unwrap();
                (
                    dev.download(&sum).unwrap(),
                    dev.download(&a2a).unwrap(),
                    dev.download(&gathered).unwrap(),
                )
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("rank thread")).collect();
    let data: Vec<Vec<f32>> = (0..world).map(|r| rank_data(r, len)).collect();
    for (rank, (sum, a2a, gathered)) in results.iter().enumerate() {
        for i in 0..len {
            let want = data[0][i] + data[1][i];
            assert!(
                (sum[i] - want).abs() <= 1e-6 * want.abs(),
                "rank {rank} all-reduce [{i}]: {} vs {want}",
                sum[i]
            );
        }
        for src in 0..world {
            // Chunk `src` of my receive buffer is chunk `rank` of src's send buffer.
            assert_eq!(
                &a2a[src * count..(src + 1) * count],
                &data[src][rank * count..(rank + 1) * count],
                "rank {rank} all-to-all chunk from {src}"
            );
            assert_eq!(
                &gathered[src * len..(src + 1) * len],
                &data[src][..],
                "rank {rank} all-gather from {src}"
            );
        }
    }
}

#[test]
fn one_rank_communicator_is_the_identity() {
    const TEST: &str = "one_rank_communicator_is_the_identity";
    if gpu_count(TEST).is_none() {
        return;
    }
    let dev = open(0);
    let id = NcclUniqueId::new().expect("unique id");
    let comm = NcclComm::init_rank(&dev, &id, 0, 1).expect("init rank");
    assert_eq!((comm.rank(), comm.world()), (0, 1));
    assert!(!comm.raw().is_null());
    let data = rank_data(0, 4096);
    let send = dev.upload(&data).unwrap();
    let mut out = dev.upload(&vec![f32::NAN; data.len()]).unwrap();
    comm.all_reduce_sum(&send, &mut out).unwrap();
    assert_eq!(dev.download(&out).unwrap(), data);
    let mut bad = dev.zeros::<f32>(7).unwrap();
    assert!(comm.all_reduce_sum(&send, &mut bad).is_err());
}
