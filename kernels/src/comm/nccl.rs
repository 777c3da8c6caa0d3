//! [`NcclComm`]: the [`Collective`] trait over NCCL, one rank per GPU (wraps the raw
//! [`cuda::NcclComm`](crate::cuda::NcclComm), which takes device buffers).
//!
//! Owns: the host-slice ops of the trait on top of NCCL (copy in, NCCL on the device's stream,
//! wait with a deadline, copy out), the bootstrap of the NCCL unique id through another
//! communicator ([`NcclComm::bootstrap`]: rank 0 creates it and broadcasts its 128 bytes over
//! the control plane's TCP mesh), `split` through `ncclCommSplit`, and the deadline (a stream
//! that has not finished by [`CommOptions::timeout`] → `ncclCommAbort`, [`CommError::Timeout`],
//! communicator poisoned). Does not own: the device-side path the model uses in decode
//! (stream-ordered NCCL calls on device buffers, `cuda::NcclComm`), device selection.
//!
//! Invariants (the trait's):
//! - **Deterministic rank-order sums.** NCCL's own reductions sum in ring/tree order, not rank
//!   order; so the sums here are an NCCL all-gather of every rank's input followed by a serial
//!   f32 sum in rank order on the host, computed identically on every rank: bit-identical to
//!   the host communicators and to a serial loop. (W× the bytes of a ring all-reduce: this is
//!   the control/test path; the model's bandwidth path calls `cuda::NcclComm::all_reduce_sum`.)
//! - **Variable all-to-all** = an all-gather of the `W × W` byte-count matrix, then one
//!   `ncclAlltoAll` of parts padded to the largest count (EP-DISPATCH.md design A's fixed
//!   capacity, here sized per call on the host).
//! - **Deadline.** Every op waits for its stream with [`CommOptions::timeout`]; on expiry the
//!   communicator is aborted (in-flight NCCL kernels end) and the error names every other member
//!   as missing: NCCL does not tell which peer failed to arrive. Arguments are validated before
//!   anything is sent (those errors leave it usable). NCCL cannot see a dead peer before the
//!   deadline, so a lost peer reads as a timeout.
//! - Ranks in errors are world ranks (positions in the root communicator), also after `split`.

use std::sync::Arc;
use std::time::Instant;

use bytemuck::Pod;
use half::bf16;

use super::communicator::Summand;
use super::{Collective, CommError, CommOptions};
use crate::cuda::nccl::NcclElem;
use crate::cuda::{self, CudaDevice, CudaError, NcclUniqueId};

/// One rank of an NCCL communicator behind the [`Collective`] trait.
#[derive(Debug)]
pub struct NcclComm {
    dev: Arc<CudaDevice>,
    raw: cuda::NcclComm,
    /// World rank of each position.
    members: Vec<usize>,
    opts: CommOptions,
    poisoned: Option<String>,
}

fn nccl_failed(op: &'static str, e: CudaError) -> CommError {
    CommError::Rendezvous { what: format!("{op}: NCCL/CUDA failed: {e}") }
}

fn digest(groups: &[Vec<usize>]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for g in groups {
        for &r in g.iter().chain(std::iter::once(&usize::MAX)) {
            for b in (r as u64).to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    h
}

impl NcclComm {
    /// Joins NCCL communicator `id` as `rank` of `world` on `dev` (blocks until all joined).
    pub fn init(
        dev: Arc<CudaDevice>,
        id: &NcclUniqueId,
        rank: usize,
        world: usize,
        opts: CommOptions,
    ) -> Result<Self, CommError> {
        let raw = cuda::NcclComm::init_rank(&dev, id, rank, world)
            .map_err(|e| nccl_failed("ncclCommInitRank", e))?;
        let mut c = Self { dev, raw, members: (0..world).collect(), opts, poisoned: None };
        c.connect()?;
        Ok(c)
    }

    /// NCCL connects peers lazily, inside the *host* call of the first collective of each
    /// kind, which then blocks until the peer arrives — past any deadline. So every kind used
    /// here (all-gather, all-to-all) runs once right after init, while all ranks are present
    /// (init itself waited for them); later ops only enqueue, and the deadline applies.
    fn connect(&mut self) -> Result<(), CommError> {
        let w = self.members.len();
        self.gather("connect", &[0u8])?;
        let mut recv = Vec::new();
        self.all_to_all_v(&vec![0u8; w], &vec![1; w], &mut recv)?;
        Ok(())
    }

    /// Builds the NCCL communicator over the same ranks as `control` (e.g. the [`TcpComm`] the
    /// coordinator's rendezvous gave the workers): rank 0 creates the unique id and broadcasts
    /// its 128 bytes through `control`, then every rank joins with its `control` rank.
    ///
    /// [`TcpComm`]: super::TcpComm
    pub fn bootstrap(
        dev: Arc<CudaDevice>,
        control: &mut dyn Collective,
        opts: CommOptions,
    ) -> Result<Self, CommError> {
        let mut bytes = [0u8; NcclUniqueId::LEN];
        if control.rank() == 0 {
            let id = NcclUniqueId::new().map_err(|e| nccl_failed("ncclGetUniqueId", e))?;
            bytes = id.to_bytes();
        }
        control.broadcast(&mut bytes, 0)?;
        let id = NcclUniqueId::from_bytes(&bytes).map_err(|e| nccl_failed("unique id", e))?;
        Self::init(dev, &id, control.rank(), control.world_size(), opts)
    }

    /// Aborts the communicator (`ncclCommAbort`: no teardown handshake with the peers, for a
    /// rank that gives up on them); every later op fails.
    pub fn abort(&mut self) {
        self.raw.abort();
        if self.poisoned.is_none() {
            self.poisoned = Some("communicator aborted".into());
        }
    }

    /// The device-buffer communicator, for stream-ordered collectives in the model's path.
    pub fn raw(&self) -> &cuda::NcclComm {
        &self.raw
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    fn check_live(&self) -> Result<(), CommError> {
        match &self.poisoned {
            Some(first) => Err(CommError::Poisoned { first: first.clone() }),
            None => Ok(()),
        }
    }

    fn poison(&mut self, e: CommError) -> CommError {
        if e.poisons() && self.poisoned.is_none() {
            self.poisoned = Some(e.to_string());
        }
        e
    }

    /// Waits for the stream within the deadline that started at `t0`; aborts on expiry.
    fn wait(&mut self, op: &'static str, t0: Instant) -> Result<(), CommError> {
        match self.raw.wait_until(t0 + self.opts.timeout) {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.raw.abort();
                let me = self.raw.rank();
                let missing_ranks =
                    self.members.iter().enumerate().filter(|&(i, _)| i != me).map(|(_, &r)| r);
                Err(CommError::Timeout {
                    op,
                    missing_ranks: missing_ranks.collect(),
                    waited: t0.elapsed(),
                })
            }
            Err(e) => Err(nccl_failed(op, e)),
        }
    }

    /// NCCL all-gather of `send` (n elements per rank) into `[W · n]` on the host.
    fn gather<T: Pod + NcclElem + Default + Clone + cudarc::driver::ValidAsZeroBits>(
        &mut self,
        op: &'static str,
        send: &[T],
    ) -> Result<Vec<T>, CommError> {
        self.check_live()?;
        let w = self.members.len();
        if send.is_empty() {
            return Ok(Vec::new());
        }
        let t0 = Instant::now();
        let res = (|| -> Result<Vec<T>, CommError> {
            let e = |err| nccl_failed(op, err);
            self.dev.context().bind_to_thread().map_err(|x| e(CudaError::driver("bind")(x)))?;
            let s = self.dev.upload(send).map_err(e)?;
            let mut r = self.dev.zeros::<T>(w * send.len()).map_err(e)?;
            self.raw.all_gather(&s, &mut r).map_err(e)?;
            self.wait(op, t0)?;
            self.dev.download(&r).map_err(e)
        })();
        res.map_err(|err| self.poison(err))
    }

    fn sum_rank_order<T: DeviceSummand>(
        &mut self,
        op: &'static str,
        buf: &mut [T],
    ) -> Result<(), CommError> {
        let n = buf.len();
        let all = self.gather(op, buf)?;
        for (i, b) in buf.iter_mut().enumerate() {
            let acc =
                (1..self.members.len()).fold(all[i].widen(), |a, r| a + all[r * n + i].widen());
            *b = T::narrow(acc);
        }
        Ok(())
    }

    fn reduce_scatter_impl<T: DeviceSummand>(
        &mut self,
        send: &[T],
        recv: &mut [T],
    ) -> Result<(), CommError> {
        const OP: &str = "reduce_scatter";
        let (w, n) = (self.members.len(), recv.len());
        if send.len() != w * n {
            return Err(CommError::InvalidArgument {
                op: OP,
                what: format!(
                    "send has {} elements, expected world_size {w} x recv {n}",
                    send.len()
                ),
            });
        }
        let all = self.gather(OP, send)?; // [W, W·n]
        let me = self.raw.rank();
        for (i, out) in recv.iter_mut().enumerate() {
            let at = |r: usize| all[r * w * n + me * n + i].widen();
            *out = T::narrow((1..w).fold(at(0), |a, r| a + at(r)));
        }
        Ok(())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // A poisoned communicator may have peers that are gone or out of step: destroying it
        // would finalize (a handshake with them) and can block, so it is aborted instead.
        if self.poisoned.is_some() {
            self.raw.abort();
        }
    }
}

/// Element types the sums support on the device: the host collectives' [`Summand`] (widened to
/// f32, accumulated, narrowed once) that NCCL can also move.
trait DeviceSummand: Summand + NcclElem + Default + Clone + cudarc::driver::ValidAsZeroBits {}

impl<T: Summand + NcclElem + Default + Clone + cudarc::driver::ValidAsZeroBits> DeviceSummand
    for T
{
}

impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.raw.rank()
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.sum_rank_order("all_reduce", buf)
    }

    fn all_reduce_sum_bf16(&mut self, buf: &mut [bf16]) -> Result<(), CommError> {
        self.sum_rank_order("all_reduce", buf)
    }

    fn reduce_scatter_sum_f32(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        self.reduce_scatter_impl(send, recv)
    }

    fn reduce_scatter_sum_bf16(
        &mut self,
        send: &[bf16],
        recv: &mut [bf16],
    ) -> Result<(), CommError> {
        self.reduce_scatter_impl(send, recv)
    }

    fn all_gather(&mut self, send: &[u8], recv: &mut [u8]) -> Result<(), CommError> {
        let (w, n) = (self.members.len(), send.len());
        if recv.len() != w * n {
            return Err(CommError::InvalidArgument {
                op: "all_gather",
                what: format!("recv has {} bytes, expected world_size {w} x send {n}", recv.len()),
            });
        }
        let all = self.gather("all_gather", send)?;
        recv.copy_from_slice(&all);
        Ok(())
    }

    fn all_to_all_v(
        &mut self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut Vec<u8>,
    ) -> Result<Vec<usize>, CommError> {
        const OP: &str = "all_to_all_v";
        let w = self.members.len();
        let total: Option<usize> = send_counts.iter().try_fold(0usize, |a, &c| a.checked_add(c));
        if send_counts.len() != w || total != Some(send.len()) {
            return Err(CommError::InvalidArgument {
                op: OP,
                what: format!(
                    "{} send counts summing to {total:?} for {w} ranks and {} bytes",
                    send_counts.len(),
                    send.len()
                ),
            });
        }
        // Count matrix: row s = rank s's send counts.
        let mine: Vec<u64> = send_counts.iter().map(|&c| c as u64).collect();
        let counts = self.gather(OP, &mine)?;
        let me = self.raw.rank();
        let cap = counts.iter().copied().max().unwrap_or(0) as usize;
        let recv_counts: Vec<usize> = (0..w).map(|s| counts[s * w + me] as usize).collect();
        recv.clear();
        if cap == 0 {
            return Ok(recv_counts);
        }
        self.check_live()?;
        let mut padded = vec![0u8; w * cap];
        let mut off = 0;
        for (d, &c) in send_counts.iter().enumerate() {
            padded[d * cap..d * cap + c].copy_from_slice(&send[off..off + c]);
            off += c;
        }
        let t0 = Instant::now();
        let got = (|| -> Result<Vec<u8>, CommError> {
            let e = |err| nccl_failed(OP, err);
            self.dev.context().bind_to_thread().map_err(|x| e(CudaError::driver("bind")(x)))?;
            let s = self.dev.upload(&padded).map_err(e)?;
            let mut r = self.dev.zeros::<u8>(w * cap).map_err(e)?;
            self.raw.all_to_all(&s, &mut r).map_err(e)?;
            self.wait(OP, t0)?;
            self.dev.download(&r).map_err(e)
        })()
        .map_err(|err| self.poison(err))?;
        for (s, &c) in recv_counts.iter().enumerate() {
            recv.extend_from_slice(&got[s * cap..s * cap + c]);
        }
        Ok(recv_counts)
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        let w = self.members.len();
        if root >= w {
            return Err(CommError::InvalidArgument {
                op: "broadcast",
                what: format!("root {root} is not a rank of a communicator of {w}"),
            });
        }
        let n = buf.len();
        let all = self.gather("broadcast", buf)?;
        if n > 0 {
            buf.copy_from_slice(&all[root * n..(root + 1) * n]);
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.gather("barrier", &[1u8]).map(drop)
    }

    fn split(&mut self, groups: &[Vec<usize>]) -> Result<Option<Box<dyn Collective>>, CommError> {
        let w = self.members.len();
        let mut seen = vec![false; w];
        for g in groups {
            if g.is_empty() {
                return Err(CommError::InvalidArgument { op: "split", what: "empty group".into() });
            }
            for &r in g {
                if r >= w || std::mem::replace(&mut seen[r], true) {
                    return Err(CommError::InvalidArgument {
                        op: "split",
                        what: format!("rank {r} is out of range 0..{w} or in two groups"),
                    });
                }
            }
        }
        let digests = self.gather("split", &[digest(groups)])?;
        let me = self.raw.rank();
        let mut differ: Vec<usize> =
            (0..w).filter(|&j| digests[j] != digests[me]).map(|j| self.members[j]).collect();
        if !differ.is_empty() {
            differ.sort_unstable();
            let e = CommError::Mismatch {
                op: "split",
                what: format!(
                    "ranks {differ:?} passed other groups than rank {}",
                    self.members[me]
                ),
            };
            return Err(self.poison(e));
        }
        let place = groups
            .iter()
            .enumerate()
            .find_map(|(gi, g)| g.iter().position(|&r| r == me).map(|pos| (gi, pos)));
        let child = self
            .raw
            .split(place.map(|(gi, _)| gi), place.map_or(0, |(_, pos)| pos))
            .map_err(|e| nccl_failed("split", e))
            .map_err(|e| self.poison(e))?;
        let (Some(raw), Some((gi, _))) = (child, place) else { return Ok(None) };
        let members = groups[gi].iter().map(|&r| self.members[r]).collect();
        let mut child =
            NcclComm { dev: self.dev.clone(), raw, members, opts: self.opts, poisoned: None };
        child.connect()?;
        Ok(Some(Box::new(child)))
    }
}
