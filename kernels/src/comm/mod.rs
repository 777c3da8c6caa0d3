//! Collectives between ranks: the [`Collective`] trait and its host implementations,
//! [`LocalComm`] (threads of one process) and [`TcpComm`] (processes anywhere, over TCP).
//!
//! Owns: the op set the parallel model needs (all-reduce, all-gather, reduce-scatter,
//! variable-count all-to-all for MoE dispatch/combine, broadcast, barrier, sub-groups), their
//! deadlines and error reporting, and a conformance suite ([`conformance`]) every implementation
//! runs (NCCL joins behind the same trait). Does not own: which ranks form groups (that is
//! `fathom_common::plan::ParallelPlan`), what the bytes mean (callers pack tokens), devices.
//!
//! Invariants every implementation keeps:
//! - **Every member calls every op, in the same order, with compatible arguments** (a rank with
//!   nothing to send still calls `all_to_all_v` with zero counts). Ops are blocking and take
//!   `&mut self`: one op at a time per communicator, so no implementation needs `Sync`.
//! - **No hang**: each op completes, or fails within the communicator's deadline
//!   ([`CommOptions::timeout`]) naming the ranks that did not arrive ([`CommError::Timeout`]), or
//!   earlier when a peer is known dead ([`CommError::PeerLost`]). After a failure the
//!   communicator is poisoned.
//! - **Deterministic sums**: element `i` of a sum is `x_0[i] + x_1[i] + … + x_{n-1}[i]` added
//!   left to right in rank order, accumulated in f32 (bf16 inputs are widened, summed, and
//!   rounded once), computed once and copied to every rank — so results are bit-identical on all
//!   ranks and from run to run, and equal a serial loop over ranks.
//! - **Tagged rounds**: messages carry (communicator id, round number); a late message of one op
//!   can never be taken for another op or another communicator.
//!
//! Algorithms (host implementations, [`Communicator`]): direct exchanges over a full mesh.
//! All-reduce = reduce-scatter (rank `j` sums chunk `j` in rank order) + all-gather, so each rank
//! sends `2·(W-1)/W·N` elements — the bandwidth of a ring, in 2 rounds instead of `2(W-1)`.
//! All-to-all-v sends one message per peer; its length tells the receiver the count, so there
//! is no separate count exchange. Byte order is little-endian on every host.
//!
//! NCCL (later, behind the same trait): `split` maps to `ncclCommSplit` (colour = group index,
//! key = position), the sums to `ncclAllReduce`/`ncclReduceScatter` (NCCL's sum order is not
//! rank order, so bit-identity across ranks holds but equality with the serial loop does not),
//! `all_to_all_v` to a count exchange then `ncclSend`/`ncclRecv` pairs or `ncclAlltoAll` with
//! fixed capacity (EP-DISPATCH.md designs B and A). An NCCL communicator is used by one thread
//! at a time (`&mut self`), so it needs `Send` (with a SAFETY argument), never `Sync`.
//! Device buffers: the methods here take host slices. For GPU memory the byte and typed
//! methods would take a buffer enum (`Host(&mut [u8])` / `Device(&mut CudaView…)`) plus the
//! stream to order the op on, and `all_to_all_v` would return counts on the device (design A)
//! instead of a host `Vec`; the error and deadline model stays (a watchdog polls
//! `ncclCommGetAsyncError` and aborts the communicator at the deadline).

mod communicator;
pub mod conformance;
mod error;
mod local;
mod mailbox;
mod nccl;
mod tcp;

pub use communicator::{Communicator, Link, LinkError};
pub use error::CommError;
pub use local::{LocalComm, LocalLink};
pub use mailbox::{Mailbox, Tag};
pub use nccl::NcclComm;
pub use tcp::{TcpComm, TcpLink, TcpRendezvous};

use bytemuck::Pod;
use half::bf16;
use std::time::Duration;

/// Settings of one communicator (inherited by its sub-communicators).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommOptions {
    /// Each op must complete within this time, or fails naming the ranks that did not arrive.
    pub timeout: Duration,
    /// How long building a TCP mesh may take (waiting for every rank to join).
    pub connect_timeout: Duration,
}

impl Default for CommOptions {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(30), connect_timeout: Duration::from_secs(60) }
    }
}

/// A communicator: `world_size()` ranks that call the same ops in the same order.
///
/// Object-safe (`Box<dyn Collective>`), host slices only. Ranks are positions in *this*
/// communicator (0..world_size); errors name world ranks (see [`CommError`]).
pub trait Collective: Send + std::fmt::Debug {
    /// This rank's position, `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;

    /// Sums `buf` element-wise over all ranks, in rank order; every rank receives the sum.
    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<(), CommError>;
    /// Same for bf16: widened to f32, summed in rank order, rounded to bf16 once.
    fn all_reduce_sum_bf16(&mut self, buf: &mut [bf16]) -> Result<(), CommError>;
    /// `send.len() == world_size() * recv.len()`: rank `j` receives the rank-order sum of
    /// everyone's `send[j*n..(j+1)*n]`.
    fn reduce_scatter_sum_f32(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError>;
    /// Same for bf16 (f32 accumulation, one rounding).
    fn reduce_scatter_sum_bf16(
        &mut self,
        send: &[bf16],
        recv: &mut [bf16],
    ) -> Result<(), CommError>;
    /// `recv.len() == world_size() * send.len()`: `recv[j*n..(j+1)*n]` is rank `j`'s `send`.
    fn all_gather(&mut self, send: &[u8], recv: &mut [u8]) -> Result<(), CommError>;
    /// Variable-count all-to-all: `send` is the concatenation of the parts for ranks
    /// `0..world_size()`, part `j` being `send_counts[j]` bytes (zero is fine). On return `recv`
    /// holds the parts received from ranks `0..world_size()` concatenated, and the result is
    /// their byte counts. Every rank calls it, also with nothing to send.
    fn all_to_all_v(
        &mut self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut Vec<u8>,
    ) -> Result<Vec<usize>, CommError>;
    /// Copies `root`'s `buf` into every rank's `buf` (all the same length).
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError>;
    /// Returns once every rank has entered it.
    fn barrier(&mut self) -> Result<(), CommError>;
    /// Collective over this communicator: every rank passes the same list of disjoint groups
    /// (ranks of this communicator); each rank gets a communicator over its group (its rank
    /// there = its position in the group list), or `None` if it is in no group. Mirrors
    /// `ncclCommSplit`. The ranks check that they passed identical groups.
    fn split(&mut self, groups: &[Vec<usize>]) -> Result<Option<Box<dyn Collective>>, CommError>;
}

/// Typed conveniences over the byte ops (counts in elements of `T`).
pub trait CollectiveExt: Collective {
    /// [`Collective::all_gather`] of plain-old-data elements.
    fn all_gather_pod<T: Pod>(&mut self, send: &[T], recv: &mut [T]) -> Result<(), CommError> {
        self.all_gather(bytemuck::cast_slice(send), bytemuck::cast_slice_mut(recv))
    }

    /// [`Collective::broadcast`] of plain-old-data elements.
    fn broadcast_pod<T: Pod>(&mut self, buf: &mut [T], root: usize) -> Result<(), CommError> {
        self.broadcast(bytemuck::cast_slice_mut(buf), root)
    }

    /// [`Collective::all_to_all_v`] with element counts; returns (received elements, counts).
    fn all_to_all_v_pod<T: Pod>(
        &mut self,
        send: &[T],
        send_counts: &[usize],
    ) -> Result<(Vec<T>, Vec<usize>), CommError> {
        let size = size_of::<T>();
        let byte_counts: Vec<usize> = send_counts.iter().map(|c| c * size).collect();
        let mut bytes = Vec::new();
        let counts = self.all_to_all_v(bytemuck::cast_slice(send), &byte_counts, &mut bytes)?;
        let mut elems = Vec::with_capacity(counts.len());
        for (src, &c) in counts.iter().enumerate() {
            if size > 0 && c % size != 0 {
                return Err(CommError::Mismatch {
                    op: "all_to_all_v",
                    what: format!("rank {src} sent {c} bytes, not a multiple of {size}"),
                });
            }
            elems.push(c.checked_div(size).unwrap_or(0));
        }
        Ok((bytemuck::pod_collect_to_vec(&bytes), elems))
    }
}

impl<C: Collective + ?Sized> CollectiveExt for C {}
