//! Expert-parallel MoE of one layer on one rank (ARCHITECTURE §2, EP-DISPATCH design B on the
//! host): the group's tokens are split into T contiguous slices; this rank routes its slice,
//! sends each token once to every rank that owns one of its experts (the replica chosen by
//! [`ParallelPlan::replica_for`], see [`replica_key`]), the owners run grouped
//! expert GEMMs and send the unweighted outputs back, and the routing rank sums
//! `weight · output` in fp32 in ascending expert order, adds the shared expert of its slice, and
//! the group all-gathers the slices.
//!
//! Wire format (little-endian `u32` words, one all-to-all-v each way, over all W ranks):
//! - dispatch, per destination, a sequence of records `[token, k, expert_1..expert_k,
//!   x[hidden] as f32 bits]` — `token` is the index in the sender's slice, the experts are those
//!   of this token that the destination serves, in routing order;
//! - combine, per source, `[Σ k, hidden]` f32: the expert outputs in the order the records and
//!   their experts arrived.
//!
//! Every rank calls both all-to-alls for every MoE layer, also with an empty slice.
//!
//! Load counters (issue 9): each forward also returns [`MoeCounts`] — tokens of this rank's
//! slice routed to each logical expert and the assignments this rank's experts computed —
//! counted once per step from the lists the layer builds anyway (no per-token work added).

use super::ParallelError;
use super::table::ExpertTable;
use crate::model::experts::Assignment;
use crate::model::ffn::SwiGlu;
use crate::model::gate::Router;
use crate::model::{Phase, StepCtx};
use crate::weights::TensorSource;
use fathom_common::ModelConfig;
use fathom_common::ids::{ExpertId, Rank};
use fathom_common::plan::ParallelPlan;
use fathom_kernels::comm::{Collective, CollectiveExt};

/// Routed experts of one layer held by this rank, plus the replicated router and shared expert.
#[derive(Debug)]
pub(super) struct EpMoe {
    router: Router,
    experts: ExpertTable,
    shared: Option<SwiGlu>,
    hidden: usize,
    top_k: usize,
    n_experts: usize,
}

/// The dispatch payload of one rank: `words` for the all-to-all, the word count per
/// destination, and per destination the records sent (`(token, assignment indices)`).
pub(crate) struct Dispatch {
    pub words: Vec<u32>,
    pub counts: Vec<usize>,
    pub sent: Vec<Vec<(u32, Vec<usize>)>>,
}

/// What arrived: expert inputs `[records, hidden]`, one assignment per (record, expert) with
/// weight 1 (the sender weights), and the assignment count per source rank.
#[derive(Debug)]
pub(crate) struct Received {
    pub x: Vec<f32>,
    pub assign: Vec<Assignment>,
    pub per_src: Vec<usize>,
}

/// One layer's expert load in one step, as this rank saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct MoeCounts {
    /// `[n_routed_experts]`: tokens of this rank's slice routed to each logical expert.
    pub routed: Vec<u32>,
    /// (token, expert) assignments this rank's expert slots computed (for any routing rank).
    pub computed: u64,
}

/// Output of [`EpMoe::forward`]: `[n, hidden]`, when recorded each token's experts, and the
/// layer's load counters.
type MoeOut = (Vec<f32>, Option<Vec<Vec<u32>>>, MoeCounts);

/// The key [`ParallelPlan::replica_for`] picks a replica with (`key mod replicas`) for the
/// `pair`-th expert of token `token` of a slice whose first token sits at position `first_pos`:
/// `first_pos + token + pair`. Consecutive tokens of a slice alternate replicas (as before); the
/// pair index spreads the experts of one token, and the position rotates the choice from step to
/// step, so a decode batch of one token (token 0 every step) also spreads over the replicas
/// instead of always using replica 0. Deterministic from the step's inputs; every replica holds
/// the same weights and the routing rank sums the outputs in ascending expert order, so the
/// choice never changes an output bit.
pub(super) fn replica_key(first_pos: usize, token: usize, pair: usize) -> usize {
    first_pos.wrapping_add(token).wrapping_add(pair)
}

/// The rows of slice `k` of `n` tokens split over `t` ranks (ceil-sized, so the all-gather can
/// use equal padded parts of `n.div_ceil(t)` rows).
pub(crate) fn slice_rows(n: usize, t: usize, k: usize) -> std::ops::Range<usize> {
    let per = n.div_ceil(t);
    (k * per).min(n)..((k + 1) * per).min(n)
}

impl EpMoe {
    /// Loads the router and shared expert (whole) and the experts the plan places on `rank` in
    /// `layer`.
    pub(super) fn load(
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        plan: &ParallelPlan,
        rank: usize,
        layer: usize,
    ) -> Result<Self, ParallelError> {
        let p = format!("model.layers.{layer}.mlp");
        let h = cfg.hidden_size;
        let ids: Vec<u32> =
            plan.experts_on(layer, Rank(rank as u32)).into_iter().map(|(_, e)| e.0).collect();
        let shared = if cfg.n_shared_experts > 0 {
            Some(SwiGlu::load(
                src,
                &format!("{p}.shared_experts"),
                h,
                cfg.moe_intermediate_size * cfg.n_shared_experts,
            )?)
        } else {
            None
        };
        Ok(Self {
            router: Router::load(src, cfg, &format!("{p}.gate"))?,
            experts: ExpertTable::load(src, cfg, layer, &ids)?,
            shared,
            hidden: h,
            top_k: cfg.num_experts_per_tok,
            n_experts: cfg.n_routed_experts,
        })
    }

    /// This layer under a new plan (elastic epochs): keeps the router, the shared expert and
    /// every expert `plan` still places on `rank`, loads the experts it gains, frees the others
    /// (returned, ascending).
    pub(super) fn reload(
        mut self,
        src: &dyn TensorSource,
        cfg: &ModelConfig,
        plan: &ParallelPlan,
        rank: usize,
        layer: usize,
    ) -> Result<(Self, Vec<u32>), ParallelError> {
        let want: std::collections::BTreeSet<u32> =
            plan.experts_on(layer, Rank(rank as u32)).into_iter().map(|(_, e)| e.0).collect();
        let have = self.experts.ids();
        for &e in want.difference(&have) {
            self.experts.insert(e, super::table::load_expert(src, cfg, layer, e)?);
        }
        let dropped = have.difference(&want).copied().collect();
        self.experts.retain(&want);
        Ok((self, dropped))
    }

    /// `x` `[n, hidden]` (the group's tokens, identical on the group's ranks) → `[n, hidden]`
    /// routed + shared output on every rank of the group.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        &self,
        x: &[f32],
        layer: usize,
        ctx: &StepCtx,
        world: &mut dyn Collective,
        group: &mut dyn Collective,
        plan: &ParallelPlan,
        record: bool,
    ) -> Result<MoeOut, ParallelError> {
        let h = self.hidden;
        let n = x.len() / h;
        let (t, k) = (group.world_size(), group.rank());
        let mine = slice_rows(n, t, k);
        let xs = &x[mine.start * h..mine.end * h]; // [m, hidden]
        let m = mine.len();
        // Phases of the step's trace (debug builds of a trace pay only a callsite check).
        ctx.mark(Some(layer), Phase::Dispatch);
        let dispatch = tracing::trace_span!("dispatch", layer).entered();
        let assignments = if m > 0 { self.router.route(xs) } else { Vec::new() };

        let first_pos = ctx.positions.get(mine.start).copied().unwrap_or(0);
        let Dispatch { words, counts, sent } =
            self.pack_dispatch(xs, &assignments, layer, first_pos, plan, world)?;
        let (recv, recv_counts) = world.all_to_all_v_pod::<u32>(&words, &counts)?;
        let rx = self.unpack_dispatch(&recv, &recv_counts, layer)?;
        drop(dispatch);
        ctx.mark(Some(layer), Phase::Experts);
        let experts =
            tracing::trace_span!("experts", layer, assignments = rx.assign.len()).entered();
        let y = self.experts.compute_each(&rx.x, &rx.assign, layer)?; // [A, hidden]
        drop(experts);
        let mut counts =
            MoeCounts { routed: vec![0; self.router_experts()], computed: rx.assign.len() as u64 };
        for a in &assignments {
            if let Some(c) = counts.routed.get_mut(a.expert as usize) {
                *c += 1;
            }
        }
        ctx.mark(Some(layer), Phase::Combine);
        let _combine = tracing::trace_span!("combine", layer).entered();
        let back_counts: Vec<usize> = rx.per_src.iter().map(|a| a * h).collect();
        let (ret, ret_counts) = world.all_to_all_v_pod::<f32>(&y, &back_counts)?;

        // Row of `ret` holding the output of each assignment.
        let row_of = returned_rows(&sent, &ret_counts, assignments.len(), h, layer)?;

        // fp32 weighted sum per token, ascending expert order (as the one-rank model).
        let mut out = vec![0.0f32; m * h]; // [m, hidden]
        let mut by_token: Vec<Vec<usize>> = vec![Vec::new(); m];
        for (i, a) in assignments.iter().enumerate() {
            by_token[a.token as usize].push(i);
        }
        for (tok, list) in by_token.iter_mut().enumerate() {
            list.sort_by_key(|&i| assignments[i].expert);
            let o = &mut out[tok * h..(tok + 1) * h];
            for &i in list.iter() {
                let y = &ret[row_of[i] * h..(row_of[i] + 1) * h];
                let w = assignments[i].weight;
                o.iter_mut().zip(y).for_each(|(o, v)| *o += w * v);
            }
        }
        if let (Some(shared), true) = (&self.shared, m > 0) {
            out.iter_mut().zip(shared.forward(xs)).for_each(|(o, s)| *o += s);
        }
        if n == 0 {
            return Ok((Vec::new(), record.then(Vec::new), counts));
        }

        let per = n.div_ceil(t);
        let full = gather_slices(out, n, h, group)?; // [n, hidden]
        let routing = if record {
            let kk = self.top_k;
            let mut ids = vec![u32::MAX; per * kk]; // [per, top_k], padded with MAX
            for (tok, list) in by_token.iter().enumerate() {
                let mut e: Vec<u32> = list.iter().map(|&i| assignments[i].expert).collect();
                e.sort_unstable();
                ids[tok * kk..tok * kk + e.len()].copy_from_slice(&e);
            }
            let mut all_ids = vec![0u32; t * per * kk];
            group.all_gather_pod(&ids, &mut all_ids)?;
            let mut per_token = Vec::with_capacity(n);
            for j in 0..t {
                for r in 0..slice_rows(n, t, j).len() {
                    let row = &all_ids[(j * per + r) * kk..(j * per + r + 1) * kk];
                    per_token.push(row.iter().copied().filter(|&e| e != u32::MAX).collect());
                }
            }
            Some(per_token)
        } else {
            None
        };
        Ok((full, routing, counts))
    }

    /// Logical routed experts of the model (the router's width).
    fn router_experts(&self) -> usize {
        self.n_experts
    }

    /// The experts this rank holds (for live placement changes).
    pub(super) fn table(&self) -> &ExpertTable {
        &self.experts
    }

    pub(super) fn table_mut(&mut self) -> &mut ExpertTable {
        &mut self.experts
    }

    /// Packs the dispatch records of this rank's slice ([`pack_dispatch`]).
    fn pack_dispatch(
        &self,
        xs: &[f32],
        assignments: &[Assignment],
        layer: usize,
        first_pos: usize,
        plan: &ParallelPlan,
        world: &dyn Collective,
    ) -> Result<Dispatch, ParallelError> {
        pack_dispatch_at(xs, assignments, self.hidden, layer, first_pos, plan, world.world_size())
    }

    /// Parses the received records ([`unpack_dispatch`]).
    fn unpack_dispatch(
        &self,
        recv: &[u32],
        counts: &[usize],
        layer: usize,
    ) -> Result<Received, ParallelError> {
        unpack_dispatch(recv, counts, self.hidden, self.top_k, layer)
    }
}

/// [`pack_dispatch_at`] for a slice whose first token is at position 0 (replicas still
/// alternate over the tokens and over each token's experts, but do not rotate from step to
/// step). The GPU rank model's entry; the CPU rank passes the slice's position.
pub(crate) fn pack_dispatch(
    xs: &[f32],
    assignments: &[Assignment],
    h: usize,
    layer: usize,
    plan: &ParallelPlan,
    w: usize,
) -> Result<Dispatch, ParallelError> {
    pack_dispatch_at(xs, assignments, h, layer, 0, plan, w)
}

/// Packs the dispatch records of one rank's slice `xs` `[m, hidden]` for `assignments`
/// (token-major, as the router emits them) over a world of `world_size` ranks: one record per
/// (token, destination), the replica picked by [`ParallelPlan::replica_for`] with
/// [`replica_key`] (`first_pos`: the position of the slice's first token). Shared by the CPU
/// and GPU rank models (the same wire format).
pub(crate) fn pack_dispatch_at(
    xs: &[f32],
    assignments: &[Assignment],
    h: usize,
    layer: usize,
    first_pos: usize,
    plan: &ParallelPlan,
    w: usize,
) -> Result<Dispatch, ParallelError> {
    let mut sent: Vec<Vec<(u32, Vec<usize>)>> = vec![Vec::new(); w];
    // Index of each assignment among its token's (the router emits a token's experts
    // contiguously).
    let mut pair = 0usize;
    for (i, a) in assignments.iter().enumerate() {
        pair = if i > 0 && assignments[i - 1].token == a.token { pair + 1 } else { 0 };
        let key = replica_key(first_pos, a.token as usize, pair);
        let slot = plan.replica_for(layer, ExpertId(a.expert), key)?;
        let d = slot.rank.0 as usize;
        if d >= w {
            return Err(ParallelError::Layout {
                what: "replica rank below world_size",
                expected: w,
                got: d,
            });
        }
        match sent[d].last_mut() {
            Some((tok, idx)) if *tok == a.token => idx.push(i),
            _ => sent[d].push((a.token, vec![i])),
        }
    }
    let mut words = Vec::new();
    let mut counts = vec![0usize; w];
    for (d, records) in sent.iter().enumerate() {
        let start = words.len();
        for (tok, idx) in records {
            words.push(*tok);
            words.push(idx.len() as u32);
            words.extend(idx.iter().map(|&i| assignments[i].expert));
            let t = *tok as usize;
            words.extend(xs[t * h..(t + 1) * h].iter().map(|v| v.to_bits()));
        }
        counts[d] = words.len() - start;
    }
    Ok(Dispatch { words, counts, sent })
}

/// Parses received dispatch records (`counts` words per source rank), checking every length:
/// the expert inputs `[records, hidden]` and one weight-1 assignment per (record, expert).
pub(crate) fn unpack_dispatch(
    recv: &[u32],
    counts: &[usize],
    h: usize,
    top_k: usize,
    layer: usize,
) -> Result<Received, ParallelError> {
    let mut x = Vec::new();
    let mut assign = Vec::new();
    let mut per_src = vec![0usize; counts.len()];
    let mut pos = 0;
    for (src, &c) in counts.iter().enumerate() {
        let end = pos + c;
        let bad = |what: String| ParallelError::Protocol { layer, rank: src, what };
        while pos < end {
            if pos + 2 > end {
                return Err(bad(format!("truncated record header at word {pos}")));
            }
            let k = recv[pos + 1] as usize;
            if k == 0 || k > top_k || pos + 2 + k + h > end {
                return Err(bad(format!("record at word {pos} has {k} experts or is truncated")));
            }
            let record = (x.len() / h) as u32;
            for &e in &recv[pos + 2..pos + 2 + k] {
                assign.push(Assignment { token: record, expert: e, weight: 1.0 });
            }
            x.extend(recv[pos + 2 + k..pos + 2 + k + h].iter().map(|&b| f32::from_bits(b)));
            per_src[src] += k;
            pos += 2 + k + h;
        }
    }
    Ok(Received { x, assign, per_src })
}

/// For each of `n_assign` assignments, the row of the combine's returned buffer holding its
/// expert output (`sent` as packed, `ret_counts` f32 counts per source), checking that every
/// rank returned exactly the rows it was sent.
pub(crate) fn returned_rows(
    sent: &[Vec<(u32, Vec<usize>)>],
    ret_counts: &[usize],
    n_assign: usize,
    h: usize,
    layer: usize,
) -> Result<Vec<usize>, ParallelError> {
    let mut row_of = vec![usize::MAX; n_assign];
    let mut base = 0;
    for (d, records) in sent.iter().enumerate() {
        let expected: usize = records.iter().map(|(_, idx)| idx.len()).sum();
        if ret_counts.get(d).copied() != Some(expected * h) {
            return Err(ParallelError::Protocol {
                layer,
                rank: d,
                what: format!(
                    "combine returned {:?} values, expected {expected} rows of {h}",
                    ret_counts.get(d)
                ),
            });
        }
        for i in records.iter().flat_map(|(_, idx)| idx) {
            row_of[*i] = base;
            base += 1;
        }
    }
    Ok(row_of)
}

/// All-gathers the group's token slices (`out` = this rank's `[m, hidden]` of
/// [`slice_rows`]) into the full `[n, hidden]` on every rank of `group` (padded equal parts).
pub(crate) fn gather_slices(
    mut out: Vec<f32>,
    n: usize,
    h: usize,
    group: &mut dyn Collective,
) -> Result<Vec<f32>, ParallelError> {
    let t = group.world_size();
    let per = n.div_ceil(t);
    out.resize(per * h, 0.0);
    let mut all = vec![0.0f32; t * per * h]; // [t, per, hidden]
    group.all_gather_pod(&out, &mut all)?;
    let mut full = Vec::with_capacity(n * h); // [n, hidden]
    for j in 0..t {
        let rows = slice_rows(n, t, j).len();
        full.extend_from_slice(&all[j * per * h..(j * per + rows) * h]);
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::random_source;
    use fathom_common::ids::Epoch;
    use fathom_common::plan::PlanSpec;

    fn moe() -> (EpMoe, usize) {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let src = random_source(&cfg, 3);
        let plan = ParallelPlan::build(&PlanSpec::new(Epoch(0), 2, 1), &cfg).unwrap();
        let layer = (0..cfg.num_hidden_layers).find(|&l| cfg.is_moe_layer(l)).unwrap();
        (EpMoe::load(&src, &cfg, &plan, 0, layer).unwrap(), cfg.hidden_size)
    }

    #[test]
    fn malformed_dispatch_names_the_sender() {
        let (m, h) = moe();
        // From rank 1: a record claiming 2 experts but carrying only half a row.
        let mut words = vec![0u32, 2, 0, 1];
        words.extend(std::iter::repeat_n(0u32, h / 2));
        let err = m.unpack_dispatch(&words, &[0, words.len()], 7).unwrap_err();
        assert!(
            matches!(err, ParallelError::Protocol { layer: 7, rank: 1, .. }),
            "unexpected: {err}"
        );
        // Zero experts, and more experts than top_k, are refused too.
        let zero = vec![0u32, 0];
        assert!(m.unpack_dispatch(&zero, &[2, 0], 7).is_err());
        let many = vec![0u32, (m.top_k + 1) as u32];
        assert!(m.unpack_dispatch(&many, &[2, 0], 7).is_err());
    }

    #[test]
    fn well_formed_dispatch_round_trips() {
        let (m, h) = moe();
        let mut words = vec![3u32, 1, 0];
        words.extend((0..h).map(|i| (i as f32).to_bits()));
        let rx = m.unpack_dispatch(&words, &[0, words.len()], 1).unwrap();
        assert_eq!(rx.per_src, vec![0, 1]);
        assert_eq!(rx.assign, vec![Assignment { token: 0, expert: 0, weight: 1.0 }]);
        assert_eq!(rx.x, (0..h).map(|i| i as f32).collect::<Vec<_>>());
    }

    #[test]
    fn slices_cover_the_tokens_once() {
        for n in 0..10 {
            for t in 1..5 {
                let rows: Vec<usize> = (0..t).flat_map(|k| slice_rows(n, t, k)).collect();
                assert_eq!(rows, (0..n).collect::<Vec<_>>(), "n={n} t={t}");
            }
        }
    }

    #[test]
    fn returned_rows_follow_the_records_and_check_counts() {
        // Assignments 0, 1 went to rank 1 (one record), 2 to rank 0.
        let sent = vec![vec![(1u32, vec![2])], vec![(0u32, vec![0, 1])]];
        let h = 3;
        assert_eq!(returned_rows(&sent, &[h, 2 * h], 3, h, 4).unwrap(), vec![1, 2, 0]);
        let err = returned_rows(&sent, &[h, h], 3, h, 4).unwrap_err();
        assert!(matches!(err, ParallelError::Protocol { layer: 4, rank: 1, .. }), "{err}");
    }

    #[test]
    fn gather_slices_rebuilds_the_rows_in_order() {
        use fathom_kernels::comm::LocalComm;
        let h = 2;
        for t in [1usize, 2, 3] {
            for n in [1usize, 4, 5] {
                let full: Vec<f32> = (0..n * h).map(|i| i as f32).collect();
                let got: Vec<Vec<f32>> = std::thread::scope(|s| {
                    let hs: Vec<_> = LocalComm::create(t)
                        .into_iter()
                        .enumerate()
                        .map(|(k, mut c)| {
                            let part = full
                                [slice_rows(n, t, k).start * h..slice_rows(n, t, k).end * h]
                                .to_vec();
                            s.spawn(move || gather_slices(part, n, h, &mut c).unwrap())
                        })
                        .collect();
                    hs.into_iter().map(|j| j.join().unwrap()).collect()
                });
                for g in got {
                    assert_eq!(g, full, "n={n} t={t}");
                }
            }
        }
    }

    #[test]
    fn dispatch_round_trips_over_two_destinations() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let plan = ParallelPlan::build(&PlanSpec::new(Epoch(0), 2, 1), &cfg).unwrap();
        let layer = (0..cfg.num_hidden_layers).find(|&l| cfg.is_moe_layer(l)).unwrap();
        let h = cfg.hidden_size;
        let xs: Vec<f32> = (0..2 * h).map(|i| i as f32 * 0.5).collect(); // [2 tokens, hidden]
        // Token 0 → experts 0 (rank 0) and 15 (rank 1); token 1 → expert 14 (rank 1).
        let assign = [(0, 0), (0, 15), (1, 14)].map(|(token, expert)| Assignment {
            token,
            expert,
            weight: 0.5,
        });
        let d = pack_dispatch(&xs, &assign, h, layer, &plan, 2).unwrap();
        assert_eq!(d.sent, vec![vec![(0, vec![0])], vec![(0, vec![1]), (1, vec![2])]]);
        let at1 = &d.words[d.counts[0]..];
        let rx =
            unpack_dispatch(at1, &[0, d.counts[1]], h, cfg.num_experts_per_tok, layer).unwrap();
        assert_eq!(rx.per_src, vec![0, 2]);
        assert_eq!(rx.x, xs);
        assert_eq!(
            rx.assign.iter().map(|a| (a.token, a.expert)).collect::<Vec<_>>(),
            [(0, 15), (1, 14)]
        );
        // A plan placing an expert on a rank outside the world is refused, not indexed.
        assert!(pack_dispatch(&xs, &assign, h, layer, &plan, 1).is_err());
    }
}
