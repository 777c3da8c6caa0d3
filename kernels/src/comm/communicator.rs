//! [`Communicator`]: the collective algorithms shared by every host transport, written once
//! over the [`Link`] trait (send a tagged message to a world rank; receive through a
//! [`Mailbox`]). `LocalComm` and `TcpComm` are this type over their links.
//!
//! Every op is one or two *rounds*. A round takes the next sequence number (identical on every
//! member because all members call the same ops in the same order), sends each peer its part
//! (starting with the next rank, so that not every rank writes to rank 0 first), then waits for
//! the parts it expects, all under the op's deadline. Messages never cross rounds: they are
//! keyed by (communicator id, sequence number, source). After a failed round the sequence
//! numbers of the members may differ, so the communicator poisons itself.

use super::error::CommError;
use super::mailbox::Mailbox;
use super::{Collective, CommOptions};
use bytemuck::Pod;
use half::bf16;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

/// Id of the communicator over the whole world; sub-communicators derive theirs from it.
const ROOT_ID: u64 = 1;

/// Why a send did not go through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// The peer is gone (connection closed, communicator dropped); the reason says how.
    Gone(String),
    /// The peer did not take the message before the deadline (it stopped reading).
    Stalled,
}

/// A rank's transport: messages to any world rank, and its own mailbox for what arrives.
/// Shared (behind an `Arc`) by a root communicator and all its sub-communicators.
pub trait Link: Send + Sync + std::fmt::Debug + 'static {
    /// This rank in the world.
    fn world_rank(&self) -> usize;
    /// Ranks in the world.
    fn world_size(&self) -> usize;
    /// Where messages for this rank arrive.
    fn mailbox(&self) -> &Mailbox;
    /// Sends `payload` to world rank `to` (never this rank) as message `(comm, seq)`, blocking
    /// at most until `deadline`.
    fn send(
        &self,
        to: usize,
        comm: u64,
        seq: u64,
        payload: &[u8],
        deadline: Instant,
    ) -> Result<(), LinkError>;
}

/// The host implementation of [`Collective`] over a [`Link`].
#[derive(Debug)]
pub struct Communicator<L: Link> {
    link: Arc<L>,
    /// Same on every member, distinct from every other communicator on this link.
    id: u64,
    /// World rank of each member, indexed by rank in this communicator.
    members: Vec<usize>,
    rank: usize,
    /// Next round number.
    seq: u64,
    opts: CommOptions,
    /// Set by the first failure; later ops refuse to run.
    poisoned: Option<String>,
}

/// One op in progress: its name and deadline.
#[derive(Debug, Clone, Copy)]
struct Op {
    name: &'static str,
    started: Instant,
    deadline: Instant,
}

impl<L: Link> Communicator<L> {
    /// The communicator over every rank of `link`'s world.
    pub(crate) fn root(link: Arc<L>, opts: CommOptions) -> Self {
        let members = (0..link.world_size()).collect();
        let rank = link.world_rank();
        Self { link, id: ROOT_ID, members, rank, seq: 0, opts, poisoned: None }
    }

    /// This rank's position in the root communicator (the rank errors name).
    pub fn world_rank(&self) -> usize {
        self.link.world_rank()
    }

    /// World ranks of the members, by rank in this communicator.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// The deadline and connect settings.
    pub fn options(&self) -> CommOptions {
        self.opts
    }

    /// Runs one op: refuses if poisoned, poisons on any failure but a bad argument.
    fn run<T>(
        &mut self,
        name: &'static str,
        body: impl FnOnce(&mut Self, Op) -> Result<T, CommError>,
    ) -> Result<T, CommError> {
        if let Some(first) = &self.poisoned {
            return Err(CommError::Poisoned { first: first.clone() });
        }
        let started = Instant::now();
        let op = Op { name, started, deadline: started + self.opts.timeout };
        let result = body(self, op);
        if let Err(e) = &result
            && e.poisons()
        {
            self.poisoned = Some(e.to_string());
        }
        result
    }

    /// One round: sends each `(rank, part)` of `sends`, then takes one message from each rank of
    /// `recv_from` (ranks of this communicator, never this rank), returned in that order.
    fn round<'a>(
        &mut self,
        op: Op,
        sends: impl IntoIterator<Item = (usize, &'a [u8])>,
        recv_from: &[usize],
    ) -> Result<Vec<Vec<u8>>, CommError> {
        let seq = self.seq;
        self.seq += 1;
        // A peer found gone while sending does not stop the round: the others still get this
        // rank's part, and the receive below names whichever rank's part is really missing (a
        // peer that already sent its part and then left, e.g. after failing itself, is not
        // blamed). A stalled peer has used up the deadline, so that ends the round at once.
        let mut gone = None;
        for (dst, part) in sends {
            debug_assert_ne!(dst, self.rank, "a rank never messages itself");
            let to = self.members[dst];
            match self.link.send(to, self.id, seq, part, op.deadline) {
                Ok(()) => {}
                Err(LinkError::Gone(reason)) => {
                    gone.get_or_insert(CommError::PeerLost { op: op.name, rank: to, reason });
                }
                Err(LinkError::Stalled) => {
                    return Err(CommError::Timeout {
                        op: op.name,
                        missing_ranks: vec![to],
                        waited: op.started.elapsed(),
                    });
                }
            }
        }
        let srcs: Vec<usize> = recv_from.iter().map(|&r| self.members[r]).collect();
        let got =
            self.link.mailbox().take_all(op.name, self.id, seq, &srcs, op.started, op.deadline)?;
        match gone {
            Some(e) => Err(e),
            None => Ok(got),
        }
    }

    /// The other ranks, starting after this one and wrapping around.
    fn peers(&self) -> Vec<usize> {
        let w = self.members.len();
        (1..w).map(|k| (self.rank + k) % w).collect()
    }

    /// Checks that the message from comm rank `src` has `expected` bytes.
    fn expect_len(&self, op: Op, src: usize, got: usize, expected: usize) -> Result<(), CommError> {
        if got == expected {
            return Ok(());
        }
        Err(CommError::SizeMismatch { op: op.name, rank: self.members[src], expected, got })
    }

    /// Reduce-scatter core: rank `j` receives every rank's `data[ranges[j]]` and returns their
    /// rank-order sum (f32 accumulation).
    fn reduce_own_chunk<T: Summand>(
        &mut self,
        op: Op,
        data: &[T],
        ranges: &[Range<usize>],
    ) -> Result<Vec<T>, CommError> {
        let peers = self.peers();
        let sends: Vec<(usize, &[u8])> =
            peers.iter().map(|&j| (j, bytemuck::cast_slice(&data[ranges[j].clone()]))).collect();
        let got = self.round(op, sends, &peers)?;
        let own = ranges[self.rank].clone();
        let want = own.len() * size_of::<T>();
        // Parts in rank order; `None` marks this rank's own slice.
        let mut parts: Vec<Option<&[u8]>> = vec![None; self.members.len()];
        for (&src, msg) in peers.iter().zip(&got) {
            self.expect_len(op, src, msg.len(), want)?;
            parts[src] = Some(msg);
        }
        let mut acc = vec![0f32; own.len()];
        for (j, part) in parts.iter().enumerate() {
            let first = j == 0;
            let mut add = |i: usize, x: T| {
                let x = x.widen();
                acc[i] = if first { x } else { acc[i] + x };
            };
            match part {
                None => data[own.clone()].iter().enumerate().for_each(|(i, &x)| add(i, x)),
                Some(bytes) => for_each_elem::<T>(bytes, &mut add),
            }
        }
        Ok(acc.into_iter().map(T::narrow).collect())
    }

    fn all_reduce<T: Summand>(
        &mut self,
        name: &'static str,
        buf: &mut [T],
    ) -> Result<(), CommError> {
        self.run(name, |c, op| {
            let ranges = balanced_chunks(buf.len(), c.members.len());
            let mine = c.reduce_own_chunk(op, buf, &ranges)?;
            buf[ranges[c.rank].clone()].copy_from_slice(&mine);
            let peers = c.peers();
            let mine_bytes: &[u8] = bytemuck::cast_slice(&mine);
            let got = c.round(op, peers.iter().map(|&j| (j, mine_bytes)), &peers)?;
            for (&src, msg) in peers.iter().zip(&got) {
                let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut buf[ranges[src].clone()]);
                c.expect_len(op, src, msg.len(), dst.len())?;
                dst.copy_from_slice(msg);
            }
            Ok(())
        })
    }

    fn reduce_scatter<T: Summand>(
        &mut self,
        name: &'static str,
        send: &[T],
        recv: &mut [T],
    ) -> Result<(), CommError> {
        let w = self.members.len();
        if send.len() != w * recv.len() {
            return Err(CommError::InvalidArgument {
                op: name,
                what: format!(
                    "send has {} elements, expected world_size {w} x recv {}",
                    send.len(),
                    recv.len()
                ),
            });
        }
        self.run(name, |c, op| {
            let n = recv.len();
            let ranges: Vec<Range<usize>> = (0..w).map(|j| j * n..(j + 1) * n).collect();
            let mine = c.reduce_own_chunk(op, send, &ranges)?;
            recv.copy_from_slice(&mine);
            Ok(())
        })
    }
}

impl<L: Link> Collective for Communicator<L> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.all_reduce("all_reduce", buf)
    }

    fn all_reduce_sum_bf16(&mut self, buf: &mut [bf16]) -> Result<(), CommError> {
        self.all_reduce("all_reduce", buf)
    }

    fn reduce_scatter_sum_f32(&mut self, send: &[f32], recv: &mut [f32]) -> Result<(), CommError> {
        self.reduce_scatter("reduce_scatter", send, recv)
    }

    fn reduce_scatter_sum_bf16(
        &mut self,
        send: &[bf16],
        recv: &mut [bf16],
    ) -> Result<(), CommError> {
        self.reduce_scatter("reduce_scatter", send, recv)
    }

    fn all_gather(&mut self, send: &[u8], recv: &mut [u8]) -> Result<(), CommError> {
        let (w, n) = (self.members.len(), send.len());
        if recv.len() != w * n {
            return Err(CommError::InvalidArgument {
                op: "all_gather",
                what: format!("recv has {} bytes, expected world_size {w} x send {n}", recv.len()),
            });
        }
        self.run("all_gather", |c, op| {
            let peers = c.peers();
            let got = c.round(op, peers.iter().map(|&j| (j, send)), &peers)?;
            recv[c.rank * n..(c.rank + 1) * n].copy_from_slice(send);
            for (&src, msg) in peers.iter().zip(&got) {
                c.expect_len(op, src, msg.len(), n)?;
                recv[src * n..(src + 1) * n].copy_from_slice(msg);
            }
            Ok(())
        })
    }

    fn all_to_all_v(
        &mut self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut Vec<u8>,
    ) -> Result<Vec<usize>, CommError> {
        let w = self.members.len();
        let total: Option<usize> = send_counts.iter().try_fold(0usize, |a, &c| a.checked_add(c));
        if send_counts.len() != w || total != Some(send.len()) {
            return Err(CommError::InvalidArgument {
                op: "all_to_all_v",
                what: format!(
                    "{} send counts summing to {total:?} for {w} ranks and {} bytes",
                    send_counts.len(),
                    send.len()
                ),
            });
        }
        self.run("all_to_all_v", |c, op| {
            let mut offsets = Vec::with_capacity(w + 1);
            offsets.push(0);
            for &n in send_counts {
                offsets.push(offsets.last().copied().unwrap_or(0) + n);
            }
            let part = |j: usize| &send[offsets[j]..offsets[j + 1]];
            let peers = c.peers();
            let got = c.round(op, peers.iter().map(|&j| (j, part(j))), &peers)?;
            let mut parts: Vec<&[u8]> = vec![part(c.rank); w];
            for (&src, msg) in peers.iter().zip(&got) {
                parts[src] = msg;
            }
            recv.clear();
            recv.reserve(parts.iter().map(|p| p.len()).sum());
            parts.iter().for_each(|p| recv.extend_from_slice(p));
            Ok(parts.iter().map(|p| p.len()).collect())
        })
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), CommError> {
        let w = self.members.len();
        if root >= w {
            return Err(CommError::InvalidArgument {
                op: "broadcast",
                what: format!("root {root} is not a rank of a communicator of {w}"),
            });
        }
        self.run("broadcast", |c, op| {
            if c.rank == root {
                let peers = c.peers();
                let data: &[u8] = buf;
                c.round(op, peers.into_iter().map(|j| (j, data)), &[])?;
            } else {
                let got = c.round(op, [], &[root])?;
                c.expect_len(op, root, got[0].len(), buf.len())?;
                buf.copy_from_slice(&got[0]);
            }
            Ok(())
        })
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        self.run("barrier", |c, op| {
            let peers = c.peers();
            c.round(op, peers.iter().map(|&j| (j, &[][..])), &peers).map(drop)
        })
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
        self.run("split", |c, op| {
            let digest = groups_digest(groups).to_le_bytes();
            let split_seq = c.seq;
            let peers = c.peers();
            let got = c.round(op, peers.iter().map(|&j| (j, &digest[..])), &peers)?;
            let mut differ: Vec<usize> = peers
                .iter()
                .zip(&got)
                .filter(|(_, d)| d.as_slice() != digest)
                .map(|(&j, _)| c.members[j])
                .collect();
            if !differ.is_empty() {
                differ.sort_unstable();
                return Err(CommError::Mismatch {
                    op: "split",
                    what: format!(
                        "ranks {differ:?} passed other groups than rank {}",
                        c.members[c.rank]
                    ),
                });
            }
            let Some((gi, group)) = groups.iter().enumerate().find(|(_, g)| g.contains(&c.rank))
            else {
                return Ok(None);
            };
            let child = Communicator {
                link: Arc::clone(&c.link),
                id: mix(mix(c.id, split_seq), gi as u64 + 1),
                members: group.iter().map(|&r| c.members[r]).collect(),
                rank: group.iter().position(|&r| r == c.rank).unwrap_or(0),
                seq: 0,
                opts: c.opts,
                poisoned: None,
            };
            Ok(Some(Box::new(child) as Box<dyn Collective>))
        })
    }
}

/// Element types the sums support: widened to f32, accumulated, narrowed once (shared by every
/// collective that sums on the host).
pub(super) trait Summand: Pod + Send {
    fn widen(self) -> f32;
    fn narrow(x: f32) -> Self;
}

impl Summand for f32 {
    fn widen(self) -> f32 {
        self
    }
    fn narrow(x: f32) -> Self {
        x
    }
}

impl Summand for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Calls `f(i, element)` for each element of a received byte buffer (which may be unaligned).
fn for_each_elem<T: Pod>(bytes: &[u8], mut f: impl FnMut(usize, T)) {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(elems) => elems.iter().enumerate().for_each(|(i, &x)| f(i, x)),
        Err(_) => bytes
            .chunks_exact(size_of::<T>())
            .enumerate()
            .for_each(|(i, c)| f(i, bytemuck::pod_read_unaligned(c))),
    }
}

/// `n` elements in `w` contiguous chunks; the first `n % w` chunks are one longer.
fn balanced_chunks(n: usize, w: usize) -> Vec<Range<usize>> {
    let (base, extra) = (n / w, n % w);
    let mut start = 0;
    (0..w)
        .map(|j| {
            let len = base + usize::from(j < extra);
            start += len;
            start - len..start
        })
        .collect()
}

/// splitmix64 finaliser over a pair: derives sub-communicator ids deterministically.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_add(0x9e37_79b9_7f4a_7c15).rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A digest of a group list, to check that all ranks passed the same one.
fn groups_digest(groups: &[Vec<usize>]) -> u64 {
    groups.iter().fold(mix(0, groups.len() as u64), |h, g| {
        g.iter().fold(mix(h, g.len() as u64), |h, &r| mix(h, r as u64))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_chunks_cover_in_order() {
        assert_eq!(balanced_chunks(7, 3), vec![0..3, 3..5, 5..7]);
        assert_eq!(balanced_chunks(2, 4), vec![0..1, 1..2, 2..2, 2..2]);
        assert_eq!(balanced_chunks(0, 1), vec![0..0]);
    }

    #[test]
    fn digest_tells_partitions_apart() {
        let a = groups_digest(&[vec![0, 1], vec![2, 3]]);
        assert_ne!(a, groups_digest(&[vec![0, 2], vec![1, 3]]));
        assert_ne!(a, groups_digest(&[vec![0, 1, 2, 3]]));
        assert_ne!(a, groups_digest(&[vec![1, 0], vec![2, 3]]));
        assert_eq!(a, groups_digest(&[vec![0, 1], vec![2, 3]]));
    }
}
