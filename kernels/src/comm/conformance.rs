//! The conformance suite every [`Collective`] implementation must pass (tikv
//! `engine_traits_tests` style): each case is a function over a [`CommFactory`], and
//! [`collective_conformance!`](crate::collective_conformance) turns the whole list into
//! `#[test]` functions for one implementation. `kernels/tests/comm_local.rs` and
//! `comm_tcp.rs` instantiate it; an NCCL test file will do the same with its own factory.
//!
//! This is a test kit: cases panic (assert) on failure, by design. Every rank runs on its own
//! thread. Inputs are drawn from a fixed hash (never zeros); expected sums are a serial loop over
//! ranks in rank order, compared bit for bit.

use super::{Collective, CollectiveExt, CommError, CommOptions, LocalComm, TcpComm, TcpRendezvous};
use half::bf16;
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

/// World sizes every case covers.
pub const WORLDS: [usize; 5] = [1, 2, 3, 4, 8];

/// Makes `world` connected communicators, index = rank.
pub trait CommFactory: Sync {
    fn create(&self, world: usize, opts: CommOptions) -> Vec<Box<dyn Collective>>;
    /// The largest world this factory can build (NCCL: one rank per GPU). Cases sweep
    /// [`WORLDS`] up to it; `ops_do_not_mix` runs at `min(4, max_world)`.
    fn max_world(&self) -> usize {
        usize::MAX
    }
}

fn worlds(f: &dyn CommFactory) -> impl Iterator<Item = usize> {
    let max = f.max_world();
    WORLDS.into_iter().filter(move |&w| w <= max)
}

/// [`LocalComm`] threads.
#[derive(Debug, Clone, Copy)]
pub struct LocalFactory;

impl CommFactory for LocalFactory {
    fn create(&self, world: usize, opts: CommOptions) -> Vec<Box<dyn Collective>> {
        LocalComm::create_with(world, opts).into_iter().map(|c| Box::new(c) as _).collect()
    }
}

/// [`TcpComm`] over real loopback sockets, one thread per rank during the rendezvous.
#[derive(Debug, Clone, Copy)]
pub struct TcpLoopbackFactory;

impl CommFactory for TcpLoopbackFactory {
    fn create(&self, world: usize, opts: CommOptions) -> Vec<Box<dyn Collective>> {
        tcp_loopback(world, opts).into_iter().map(|c| Box::new(c) as _).collect()
    }
}

/// `world` [`TcpComm`]s on 127.0.0.1 (rank 0 on an OS-chosen port), built concurrently.
pub fn tcp_loopback(world: usize, opts: CommOptions) -> Vec<TcpComm> {
    let rv = TcpRendezvous::bind("127.0.0.1:0").expect("bind loopback rendezvous");
    let addr = rv.local_addr().expect("rendezvous address").to_string();
    std::thread::scope(|s| {
        let others: Vec<_> = (1..world)
            .map(|r| {
                let addr = &addr;
                s.spawn(move || TcpComm::connect(addr, r, world, opts).expect("join mesh"))
            })
            .collect();
        let mut all = vec![rv.into_comm(world, opts).expect("host mesh")];
        all.extend(others.into_iter().map(|h| h.join().expect("rank thread")));
        all
    })
}

/// Runs `f(rank, comm)` on one thread per communicator; results by rank.
pub fn run_ranks<R: Send>(
    comms: Vec<Box<dyn Collective>>,
    f: impl Fn(usize, &mut dyn Collective) -> R + Sync,
) -> Vec<R> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, mut c)| s.spawn(move || f(r, c.as_mut())))
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}

fn opts(timeout_ms: u64) -> CommOptions {
    CommOptions { timeout: Duration::from_millis(timeout_ms), ..CommOptions::default() }
}

/// A fixed, varied value (signs and magnitudes spread so rounding order shows).
pub fn value(rank: usize, i: usize, salt: u64) -> f32 {
    let mut z = (rank as u64) << 40 ^ (i as u64) ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let unit = (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5; // [-0.5, 0.5)
    unit * 10f32.powi((z % 7) as i32 - 3)
}

/// Serial reference: rank-order f32 sum of `vals(r)` for r in 0..w.
fn serial_sum(w: usize, n: usize, vals: impl Fn(usize, usize) -> f32) -> Vec<f32> {
    (0..n).map(|i| (1..w).fold(vals(0, i), |acc, r| acc + vals(r, i))).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// All-reduce f32 equals the rank-order serial sum bit for bit, on every rank.
pub fn all_reduce_f32(f: &dyn CommFactory) {
    for w in worlds(f) {
        for n in [0, 1, 7, 1000] {
            let got = run_ranks(f.create(w, opts(10_000)), |r, c| {
                let mut buf: Vec<f32> = (0..n).map(|i| value(r, i, 1)).collect();
                c.all_reduce_sum_f32(&mut buf).expect("all_reduce");
                buf
            });
            let want = serial_sum(w, n, |r, i| value(r, i, 1));
            for (r, g) in got.iter().enumerate() {
                assert_eq!(bits(g), bits(&want), "W={w} n={n} rank {r}");
            }
        }
    }
}

/// All-reduce bf16: widened, summed in rank order in f32, rounded once; identical everywhere.
pub fn all_reduce_bf16(f: &dyn CommFactory) {
    let v = |r, i| bf16::from_f32(value(r, i, 2));
    for w in worlds(f) {
        for n in [0, 5, 333] {
            let got = run_ranks(f.create(w, opts(10_000)), |r, c| {
                let mut buf: Vec<bf16> = (0..n).map(|i| v(r, i)).collect();
                c.all_reduce_sum_bf16(&mut buf).expect("all_reduce bf16");
                buf
            });
            let want: Vec<bf16> =
                serial_sum(w, n, |r, i| v(r, i).to_f32()).into_iter().map(bf16::from_f32).collect();
            for (r, g) in got.iter().enumerate() {
                assert_eq!(g, &want, "W={w} n={n} rank {r}");
            }
        }
    }
}

/// The sum order is rank order (a reversed order gives other bits here) and is stable across
/// runs.
pub fn sums_are_deterministic(f: &dyn CommFactory) {
    let w = 4;
    let n = 64;
    // Rank 0 holds a large value, the others small ones: the order changes the rounding.
    let vals = |r: usize, i: usize| if r == 0 { 1.0e8 + i as f32 } else { 3.0 + value(r, i, 3) };
    let run = || {
        run_ranks(f.create(w, opts(10_000)), |r, c| {
            let mut buf: Vec<f32> = (0..n).map(|i| vals(r, i)).collect();
            c.all_reduce_sum_f32(&mut buf).expect("all_reduce");
            bits(&buf)
        })
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b, "two runs differ");
    assert!(a.iter().all(|x| x == &a[0]), "ranks differ");
    assert_eq!(a[0], bits(&serial_sum(w, n, vals)), "not rank order");
    let reversed: Vec<f32> =
        (0..n).map(|i| (0..w - 1).rev().fold(vals(w - 1, i), |acc, r| acc + vals(r, i))).collect();
    assert_ne!(a[0], bits(&reversed), "inputs too tame to tell the order apart");
}

/// Reduce-scatter f32 and bf16: rank j gets the rank-order sum of everyone's chunk j.
pub fn reduce_scatter(f: &dyn CommFactory) {
    for w in worlds(f) {
        for n in [0, 5] {
            let got = run_ranks(f.create(w, opts(10_000)), |r, c| {
                let send: Vec<f32> = (0..w * n).map(|i| value(r, i, 4)).collect();
                let mut recv = vec![f32::NAN; n];
                c.reduce_scatter_sum_f32(&send, &mut recv).expect("reduce_scatter");
                let send16: Vec<bf16> = send.iter().map(|&x| bf16::from_f32(x)).collect();
                let mut recv16 = vec![bf16::NAN; n];
                c.reduce_scatter_sum_bf16(&send16, &mut recv16).expect("reduce_scatter bf16");
                (recv, recv16)
            });
            for (j, (g, g16)) in got.iter().enumerate() {
                let want = serial_sum(w, n, |r, i| value(r, j * n + i, 4));
                assert_eq!(bits(g), bits(&want), "W={w} n={n} rank {j}");
                let want16: Vec<bf16> =
                    serial_sum(w, n, |r, i| bf16::from_f32(value(r, j * n + i, 4)).to_f32())
                        .into_iter()
                        .map(bf16::from_f32)
                        .collect();
                assert_eq!(g16, &want16, "bf16 W={w} n={n} rank {j}");
            }
        }
    }
}

/// All-gather of bytes (also empty) and of typed elements.
pub fn all_gather(f: &dyn CommFactory) {
    for w in worlds(f) {
        for n in [0, 3, 100] {
            let got = run_ranks(f.create(w, opts(10_000)), |r, c| {
                let send: Vec<u8> = (0..n).map(|i| (r * 31 + i) as u8).collect();
                let mut recv = vec![0xAA; w * n];
                c.all_gather(&send, &mut recv).expect("all_gather");
                let mine = [value(r, 0, 5), value(r, 1, 5)];
                let mut all = vec![0f32; 2 * w];
                c.all_gather_pod(&mine, &mut all).expect("all_gather_pod");
                (recv, all)
            });
            let want: Vec<u8> =
                (0..w).flat_map(|r| (0..n).map(move |i| (r * 31 + i) as u8)).collect();
            let want_f: Vec<f32> = (0..w).flat_map(|r| [value(r, 0, 5), value(r, 1, 5)]).collect();
            for (r, (g, gf)) in got.iter().enumerate() {
                assert_eq!(g, &want, "W={w} n={n} rank {r}");
                assert_eq!(bits(gf), bits(&want_f), "W={w} rank {r}");
            }
        }
    }
}

/// Bytes rank `src` sends rank `dst` in the all-to-all cases: uneven, often zero; rank 0 sends
/// nothing at all (a rank with zero tokens still takes part).
fn a2a_count(src: usize, dst: usize) -> usize {
    if src == 0 { 0 } else { (src * 3 + dst * 5) % 4 * 9 }
}

fn a2a_byte(src: usize, dst: usize, k: usize) -> u8 {
    (src * 64 + dst * 8 + k) as u8
}

/// Variable-count all-to-all: uneven counts, empty parts, a rank sending nothing; receivers
/// learn the counts. Also the typed wrapper and an all-empty exchange.
pub fn all_to_all_v(f: &dyn CommFactory) {
    for w in worlds(f) {
        let got = run_ranks(f.create(w, opts(10_000)), |r, c| {
            let counts: Vec<usize> = (0..w).map(|d| a2a_count(r, d)).collect();
            let send: Vec<u8> =
                (0..w).flat_map(|d| (0..a2a_count(r, d)).map(move |k| a2a_byte(r, d, k))).collect();
            let mut recv = vec![7u8; 3]; // stale contents must be replaced
            let rc = c.all_to_all_v(&send, &counts, &mut recv).expect("all_to_all_v");
            let mut empty = Vec::new();
            let zc = c.all_to_all_v(&[], &vec![0; w], &mut empty).expect("empty all_to_all_v");
            // Typed: rank r sends r+d copies of (r*100+d) to rank d.
            let tcounts: Vec<usize> = (0..w).map(|d| (r + d) % 3).collect();
            let tsend: Vec<f32> =
                (0..w).flat_map(|d| vec![(r * 100 + d) as f32; (r + d) % 3]).collect();
            let typed = c.all_to_all_v_pod(&tsend, &tcounts).expect("all_to_all_v_pod");
            (rc, recv, zc, empty, typed)
        });
        for (d, (rc, recv, zc, empty, (tv, tc))) in got.into_iter().enumerate() {
            let want_counts: Vec<usize> = (0..w).map(|s| a2a_count(s, d)).collect();
            let want: Vec<u8> =
                (0..w).flat_map(|s| (0..a2a_count(s, d)).map(move |k| a2a_byte(s, d, k))).collect();
            assert_eq!(rc, want_counts, "W={w} counts at rank {d}");
            assert_eq!(recv, want, "W={w} data at rank {d}");
            assert_eq!((zc, empty), (vec![0; w], vec![]), "W={w} empty exchange at rank {d}");
            let want_tc: Vec<usize> = (0..w).map(|s| (s + d) % 3).collect();
            let want_tv: Vec<f32> =
                (0..w).flat_map(|s| vec![(s * 100 + d) as f32; (s + d) % 3]).collect();
            assert_eq!((tc, tv), (want_tc, want_tv), "W={w} typed at rank {d}");
        }
    }
}

/// Broadcast from every root in turn, bytes and typed.
pub fn broadcast(f: &dyn CommFactory) {
    for w in worlds(f) {
        let got = run_ranks(f.create(w, opts(10_000)), |r, c| {
            (0..w)
                .map(|root| {
                    let mut buf: Vec<f32> = (0..9).map(|i| value(r, i, 6)).collect();
                    c.broadcast_pod(&mut buf, root).expect("broadcast");
                    bits(&buf)
                })
                .collect::<Vec<_>>()
        });
        for (r, per_root) in got.iter().enumerate() {
            for (root, g) in per_root.iter().enumerate() {
                let want: Vec<f32> = (0..9).map(|i| value(root, i, 6)).collect();
                assert_eq!(g, &bits(&want), "W={w} root {root} at rank {r}");
            }
        }
    }
}

/// No rank leaves a barrier before the last one entered it.
pub fn barrier(f: &dyn CommFactory) {
    for w in worlds(f) {
        let entered = Mutex::new(vec![None::<Instant>; w]);
        let left = run_ranks(f.create(w, opts(10_000)), |r, c| {
            std::thread::sleep(Duration::from_millis(15 * r as u64));
            entered.lock().expect("lock")[r] = Some(Instant::now());
            c.barrier().expect("barrier");
            Instant::now()
        });
        let entered = entered.into_inner().expect("lock");
        let last_in = entered.iter().map(|t| t.expect("entered")).max().expect("ranks");
        for (r, t) in left.iter().enumerate() {
            assert!(*t >= last_in, "W={w}: rank {r} left the barrier before the last rank entered");
        }
    }
}

/// Many ops of different kinds and sizes back to back with ranks skewed in time: each result is
/// its own op's (no message is taken by the wrong op).
pub fn ops_do_not_mix(f: &dyn CommFactory) {
    let w = 4.min(f.max_world());
    let got = run_ranks(f.create(w, opts(10_000)), |r, c| {
        let mut out = Vec::new();
        for step in 0..12usize {
            if (step + r) % 3 == 0 {
                std::thread::sleep(Duration::from_millis(3));
            }
            let n = (step * 7) % 11;
            let mut buf: Vec<f32> = (0..n).map(|i| value(r, i, 100 + step as u64)).collect();
            c.all_reduce_sum_f32(&mut buf).expect("all_reduce");
            out.push(bits(&buf));
            let counts: Vec<usize> = (0..w).map(|d| (r + d + step) % 3).collect();
            let send: Vec<u8> = counts
                .iter()
                .enumerate()
                .flat_map(|(d, &k)| vec![(step * 16 + r * 4 + d) as u8; k])
                .collect();
            let mut recv = Vec::new();
            let rc = c.all_to_all_v(&send, &counts, &mut recv).expect("a2a");
            out.push(rc.iter().map(|&x| x as u32).chain(recv.iter().map(|&b| b as u32)).collect());
        }
        out
    });
    for (d, outs) in got.iter().enumerate() {
        for step in 0..12usize {
            let n = (step * 7) % 11;
            let want = serial_sum(w, n, |r, i| value(r, i, 100 + step as u64));
            assert_eq!(outs[2 * step], bits(&want), "step {step} all_reduce at rank {d}");
            let counts: Vec<usize> = (0..w).map(|s| (s + d + step) % 3).collect();
            let data = (0..w).flat_map(|s| vec![(step * 16 + s * 4 + d) as u8 as u32; counts[s]]);
            let want: Vec<u32> = counts.iter().map(|&x| x as u32).chain(data).collect();
            assert_eq!(outs[2 * step + 1], want, "step {step} all_to_all at rank {d}");
        }
    }
}

/// Sub-communicators: contiguous and strided groups, a rank in no group, ops on children
/// interleaved with ops on the parent, a nested split, and disagreeing groups as an error.
pub fn split(f: &dyn CommFactory) {
    for w in [4usize, 8] {
        let t = 2;
        let contiguous: Vec<Vec<usize>> =
            (0..w / t).map(|g| (g * t..(g + 1) * t).collect()).collect();
        let strided: Vec<Vec<usize>> = (0..t).map(|k| (k..w).step_by(t).collect()).collect();
        let got = run_ranks(f.create(w, opts(10_000)), |r, c| {
            let mut tp = c.split(&contiguous).expect("split").expect("in a group");
            let mut dp = c.split(&strided).expect("split").expect("in a group");
            let mut a = vec![value(r, 0, 7), value(r, 1, 7)];
            tp.all_reduce_sum_f32(&mut a).expect("tp all_reduce");
            let mut whole = vec![value(r, 0, 8)];
            c.all_reduce_sum_f32(&mut whole).expect("parent all_reduce");
            let mut b = vec![value(r, 0, 9)];
            dp.all_reduce_sum_f32(&mut b).expect("dp all_reduce");
            // Nested: split the strided group into singletons.
            let singles: Vec<Vec<usize>> = (0..dp.world_size()).map(|k| vec![k]).collect();
            let mut one = dp.split(&singles).expect("nested").expect("singleton");
            let mut s = vec![value(r, 0, 10)];
            one.all_reduce_sum_f32(&mut s).expect("singleton all_reduce");
            // Only ranks 0 and w-1 form a group; the others get None.
            let ends = c.split(&[vec![w - 1, 0]]).expect("split ends");
            let ends_sum = ends.map(|mut e| {
                let mut x = vec![value(r, 0, 11)];
                e.all_reduce_sum_f32(&mut x).expect("ends all_reduce");
                (e.rank(), e.world_size(), x[0].to_bits())
            });
            (tp.rank(), tp.world_size(), a, whole[0], dp.rank(), b[0], s[0], ends_sum)
        });
        for (r, (tr, tw, a, whole, dr, b, s, ends)) in got.into_iter().enumerate() {
            let g = r / t;
            assert_eq!((tr, tw, dr), (r % t, t, r / t), "W={w} ranks at {r}");
            let want_a = serial_sum(t, 2, |k, i| value(g * t + k, i, 7));
            assert_eq!(bits(&a), bits(&want_a), "W={w} tp sum at {r}");
            assert_eq!(whole.to_bits(), serial_sum(w, 1, |k, i| value(k, i, 8))[0].to_bits());
            let want_b = serial_sum(w / t, 1, |k, i| value(k * t + r % t, i, 9))[0];
            assert_eq!(b.to_bits(), want_b.to_bits(), "W={w} dp sum at {r}");
            assert_eq!(s.to_bits(), value(r, 0, 10).to_bits(), "W={w} singleton at {r}");
            let want_ends = [value(w - 1, 0, 11), value(0, 0, 11)].into_iter().sum::<f32>();
            match ends {
                Some((er, ew, x)) => {
                    assert!(r == 0 || r == w - 1, "rank {r} should be in no group");
                    assert_eq!((er, ew), (if r == 0 { 1 } else { 0 }, 2));
                    assert_eq!(x, want_ends.to_bits(), "ends sum at {r}");
                }
                None => assert!(r != 0 && r != w - 1, "rank {r} lost its group"),
            }
        }
    }
    // Ranks that disagree on the groups all get an error.
    let errs = run_ranks(f.create(2, opts(10_000)), |r, c| {
        let groups = if r == 0 { vec![vec![0, 1]] } else { vec![vec![1, 0]] };
        c.split(&groups).map(|_| ()).expect_err("mismatched groups must fail")
    });
    for e in errs {
        assert!(matches!(e, CommError::Mismatch { op: "split", .. }), "{e}");
    }
}

/// Bad arguments are rejected before anything is sent, and the communicator stays usable.
pub fn invalid_arguments(f: &dyn CommFactory) {
    let w = 3;
    let got = run_ranks(f.create(w, opts(10_000)), |_r, c| {
        let mut errs = Vec::new();
        let mut recv = Vec::new();
        errs.push(c.all_to_all_v(&[1, 2], &[1, 1], &mut recv).unwrap_err());
        errs.push(c.all_to_all_v(&[1, 2], &[1, 0, 0], &mut recv).unwrap_err());
        errs.push(c.broadcast(&mut [0u8; 4], w).unwrap_err());
        errs.push(c.all_gather(&[1, 2], &mut [0u8; 5]).unwrap_err());
        errs.push(c.reduce_scatter_sum_f32(&[1.0; 5], &mut [0.0; 2]).unwrap_err());
        errs.push(c.split(&[vec![0, 0]]).expect_err("duplicate rank"));
        errs.push(c.split(&[vec![0, w]]).expect_err("rank out of range"));
        let mut x = vec![1.0f32];
        c.all_reduce_sum_f32(&mut x).expect("still usable");
        (errs, x[0])
    });
    for (errs, x) in got {
        for e in &errs {
            assert!(matches!(e, CommError::InvalidArgument { .. }), "{e}");
            assert!(!e.poisons());
        }
        assert_eq!(x, w as f32);
    }
}

/// Ranks that never arrive: the others fail within the deadline naming exactly them, and the
/// communicator is poisoned afterwards.
pub fn missing_rank_times_out(f: &dyn CommFactory) {
    let w = 4;
    let timeout = Duration::from_millis(400);
    let absent = [1usize, 3];
    let done = Barrier::new(w);
    let got = run_ranks(f.create(w, opts(400)), |r, c| {
        let res = if absent.contains(&r) {
            None
        } else {
            let t = Instant::now();
            let mut buf = vec![1.0f32; 10];
            let e = c.all_reduce_sum_f32(&mut buf).expect_err("must time out");
            let after = c.barrier().expect_err("poisoned");
            Some((e, t.elapsed(), after))
        };
        done.wait(); // the absent ranks stay alive (connected) until the others are done
        res
    });
    for (r, res) in got.into_iter().enumerate() {
        let Some((e, took, after)) = res else { continue };
        match &e {
            CommError::Timeout { op, missing_ranks, waited } => {
                assert_eq!(*op, "all_reduce");
                assert_eq!(missing_ranks, &absent, "rank {r}: {e}");
                assert!(*waited >= timeout, "rank {r} gave up early: {waited:?}");
            }
            other => panic!("rank {r}: expected a timeout, got {other}"),
        }
        assert!(took < timeout + Duration::from_secs(2), "rank {r} took {took:?}");
        assert_eq!(e.ranks(), absent.to_vec());
        assert!(matches!(after, CommError::Poisoned { .. }), "rank {r}: {after}");
    }
}

/// A rank that drops its communicator (dies) after a successful op: the others fail naming it,
/// well before the deadline.
pub fn dead_rank_is_named(f: &dyn CommFactory) {
    let w = 3;
    let dead = 2;
    let got = run_ranks(f.create(w, opts(20_000)), |r, c| {
        c.barrier().expect("first barrier");
        if r == dead {
            return None; // the communicator is dropped when the thread's box goes
        }
        let t = Instant::now();
        let mut buf = vec![value(r, 0, 12); 4];
        let e = c.all_reduce_sum_f32(&mut buf).expect_err("peer is dead");
        Some((e, t.elapsed()))
    });
    for (r, res) in got.into_iter().enumerate() {
        let Some((e, took)) = res else { continue };
        assert!(matches!(e, CommError::PeerLost { rank, .. } if rank == dead), "rank {r}: {e}");
        assert!(took < Duration::from_secs(5), "rank {r} waited {took:?} for a dead peer");
    }
}

/// Rank 2 dies; rank 1 fails on it and leaves too; only then does rank 0 enter the op. Rank 0
/// must still blame rank 2 (rank 1 sent its part before leaving), not the rank that left last.
pub fn dead_rank_is_named_after_others_left(f: &dyn CommFactory) {
    let mut comms = f.create(3, opts(20_000));
    let (tx, rx) = std::sync::mpsc::channel::<CommError>();
    let mut c2 = comms.pop().expect("rank 2");
    let mut c1 = comms.pop().expect("rank 1");
    let mut c0 = comms.pop().expect("rank 0");
    let e0 = std::thread::scope(|s| {
        s.spawn(move || {
            c2.barrier().expect("barrier");
            drop(c2);
        });
        s.spawn(move || {
            c1.barrier().expect("barrier");
            let e = c1.all_reduce_sum_f32(&mut [1.0; 8]).expect_err("rank 2 is dead");
            drop(c1);
            let _ = tx.send(e);
        });
        c0.barrier().expect("barrier");
        let e1 = rx.recv().expect("rank 1 reports");
        assert!(matches!(e1, CommError::PeerLost { rank: 2, .. }), "rank 1: {e1}");
        std::thread::sleep(Duration::from_millis(100)); // let rank 1's departure be seen
        c0.all_reduce_sum_f32(&mut [1.0; 8]).expect_err("ranks 1 and 2 are gone")
    });
    assert!(matches!(e0, CommError::PeerLost { rank: 2, .. }), "rank 0: {e0}");
}

/// Instantiates the whole suite as `#[test]` functions for one factory expression.
#[macro_export]
macro_rules! collective_conformance {
    ($factory:expr) => {
        $crate::collective_conformance!(@cases $factory;
            all_reduce_f32, all_reduce_bf16, sums_are_deterministic, reduce_scatter, all_gather,
            all_to_all_v, broadcast, barrier, ops_do_not_mix, split, invalid_arguments,
            missing_rank_times_out, dead_rank_is_named, dead_rank_is_named_after_others_left);
    };
    (@cases $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::comm::conformance::$case(&$factory);
            }
        )*
    };
}
