//! Expert-parallel MoE of one GPU rank: route on the device, dispatch each token to the ranks
//! that own its experts, compute the received (token, expert) pairs with this rank's experts on
//! the device, send the outputs back and combine them on the routing rank.
//!
//! Owns: [`EpW`] (router, shared expert, this rank's routed experts stacked in slot order) and
//! [`ep_forward`]. Does not own: the wire format and its checks — the GPU rank speaks exactly the
//! CPU rank's protocol (`parallel::moe::{pack_dispatch, unpack_dispatch, returned_rows,
//! gather_slices}`), so GPU and CPU ranks could even share a world.
//!
//! First version, staged through the host: the routing (`[n, top_k]` ids and weights) and the
//! rows of this rank's token slice are downloaded, the two all-to-alls are
//! `Collective::all_to_all_v` on host buffers, and the expert outputs are uploaded again. With
//! T > 1 each rank of the group routes its slice (`slice_rows`) and the group all-gathers the
//! combined slices, as on the CPU.
//!
//! Numerics: an owner computes each received (token, expert) pair *unweighted* with the one-GPU
//! expert kernels (`moe_f32` / `moe_experts_bf16` with `top_k = 1`, weight 1, over its local
//! experts), so under `Precision::F32` every expert output has the one-GPU bits. The routing rank
//! then sums `weight · output` in fp32 **in routing order** with a fused multiply-add per term —
//! the one-GPU rule (`moe_down_f32`: `acc += w · y` over j in routing order, compiled with
//! `--fmad=true`), kept as closely as `parallel::moe` keeps the CPU one-rank rule (ascending
//! expert order). Then, as on one GPU: `h += routed`, `h += shared(x)` (the shared expert runs
//! replicated over all rows on every rank of the group). Under `Precision::Bf16` the expert
//! outputs are rounded to bf16 before the combine (one extra rounding against one GPU).
//!
//! Invariant: every rank calls [`ep_forward`] once per MoE layer per step, also with `n = 0`
//! (it then serves the other ranks' tokens): exactly two world all-to-alls per call.

use fathom_common::plan::ParallelPlan;
use fathom_kernels::comm::{Collective, CollectiveExt};
use fathom_kernels::cuda::cudarc::driver::CudaSlice;
use fathom_kernels::cuda::{MoeScratch, MoeShape, moe_experts_bf16};
use half::bf16;

use super::seams::{FfnInput, RoutingRecorder};
use super::weights::{Mat, MlpW};
use super::{CudaModel, CudaModelError, Precision};
use crate::model::ModelError;
use crate::model::experts::Assignment;
use crate::parallel::moe::{
    Dispatch, Received, gather_slices, pack_dispatch, returned_rows, slice_rows, unpack_dispatch,
};

/// One MoE layer on one rank.
#[derive(Debug)]
pub(crate) struct EpW {
    pub gate: CudaSlice<f32>, // [E, hidden]
    pub bias: CudaSlice<f32>, // [E]
    /// Logical ids of the routed experts held, in slot order (the stacking order of w13/w2).
    pub experts: Vec<u32>,
    /// `[E]`: index of each logical expert in `experts`, −1 when not held here.
    pub local_of: Vec<i32>,
    pub w13: Option<Mat>, // [held, 2·inner, hidden]; None when no expert is held
    pub w2: Option<Mat>,  // [held, hidden, inner]
    pub inner: usize,
    pub shared: Option<MlpW>,
}

/// The communicators and plan of one sharded step.
pub(crate) struct EpComms<'a> {
    pub world: &'a mut dyn Collective,
    pub group: &'a mut dyn Collective,
    pub plan: &'a ParallelPlan,
}

/// [`route_slice`]'s assignments, slice rows and all rows' router choices.
type RoutedSlice = (Vec<Assignment>, Vec<f32>, Vec<i32>);

/// This rank's routing of its token slice: token-major assignments (token = index in the slice,
/// routing order within a token), the slice's input rows `[m, hidden]` as f32, and the router's
/// choices for all `n` rows `[n, top_k]` (host).
fn route_slice(
    m: &CudaModel,
    w: &EpW,
    x: FfnInput,
    n: usize,
    rows: std::ops::Range<usize>,
) -> Result<RoutedSlice, CudaModelError> {
    let (dev, hd) = (&m.dev, m.cfg.hidden_size);
    let (e, k) = (m.router.n_experts, m.router.top_k);
    let mut logits = dev.zeros::<f32>(n * e)?; // [n, E] f32, as the one-GPU router
    m.blas.gemm_f32(x.xf, &w.gate, &mut logits, n, e, hd, 1.0)?;
    let mut ids = dev.zeros::<i32>(n * k)?; // [n, top_k]
    let mut wts = dev.zeros::<f32>(n * k)?;
    dev.ops().router_select(&logits, &w.bias, &mut ids, &mut wts, n, &m.router)?;
    let (ids, wts) = (dev.download(&ids)?, dev.download(&wts)?);
    let mut assign = Vec::with_capacity(rows.len() * k);
    for t in rows.clone() {
        for j in t * k..(t + 1) * k {
            let expert =
                u32::try_from(ids[j]).ok().filter(|&x| (x as usize) < e).ok_or_else(|| {
                    ModelError::Shard(format!("router chose expert {} of {e} for row {t}", ids[j]))
                })?;
            assign.push(Assignment { token: (t - rows.start) as u32, expert, weight: wts[j] });
        }
    }
    let xs = match m.precision {
        Precision::F32 => dev.download(x.xf)?[rows.start * hd..rows.end * hd].to_vec(),
        Precision::Bf16 => {
            dev.download(x.xb)?[rows.start * hd..rows.end * hd].iter().map(|v| v.to_f32()).collect()
        }
    };
    Ok((assign, xs, ids))
}

/// The unweighted outputs `[A, hidden]` (f32 on the host) of every received assignment, computed
/// with this rank's experts on the device.
fn compute_received(
    m: &CudaModel,
    w: &EpW,
    rx: &Received,
    layer: usize,
) -> Result<Vec<f32>, CudaModelError> {
    let (dev, hd, inner) = (&m.dev, m.cfg.hidden_size, w.inner);
    let a = rx.assign.len();
    if a == 0 {
        return Ok(Vec::new());
    }
    let mut xa = Vec::with_capacity(a * hd); // [A, hidden]: each pair's input row
    let mut local = Vec::with_capacity(a); // [A, 1]: local expert index
    for p in &rx.assign {
        let li = w.local_of.get(p.expert as usize).copied().unwrap_or(-1);
        if li < 0 {
            return Err(ModelError::ExpertNotLoaded { layer, expert: p.expert }.into());
        }
        local.push(li);
        let t = p.token as usize;
        xa.extend_from_slice(&rx.x[t * hd..(t + 1) * hd]);
    }
    let held = w.experts.len();
    let (Some(w13), Some(w2)) = (&w.w13, &w.w2) else {
        return Err(ModelError::ExpertNotLoaded { layer, expert: rx.assign[0].expert }.into());
    };
    let ids = dev.upload(&local)?;
    let ones = dev.upload(&vec![1.0f32; a])?;
    match m.precision {
        Precision::F32 => {
            let xa = dev.upload(&xa)?;
            let mut act = dev.zeros::<f32>(a * inner)?; // [A, 1, inner]
            let mut out = dev.zeros::<f32>(a * hd)?; // [A, hidden]
            let shape = (a, 1, hd, inner, held);
            m.glue.moe_f32(&xa, &ids, &ones, w13.f32()?, w2.f32()?, &mut act, &mut out, shape)?;
            Ok(dev.download(&out)?)
        }
        Precision::Bf16 => {
            let xb: Vec<bf16> = xa.iter().map(|&v| bf16::from_f32(v)).collect();
            let xa = dev.upload(&xb)?;
            let shape = MoeShape { tokens: a, top_k: 1, n_experts: held, dim: hd, inter: inner };
            let mut scratch = MoeScratch::new(dev, a, &shape)?;
            scratch.grouped = m.grouped_experts;
            let mut out = dev.zeros::<bf16>(a * hd)?; // [A, hidden]
            let (w13, w2) = (w13.bf16()?, w2.bf16()?);
            moe_experts_bf16(
                dev,
                &m.blas,
                &xa,
                &ids,
                &ones,
                w13,
                w2,
                &mut out,
                &mut scratch,
                &shape,
            )?;
            Ok(dev.download(&out)?.iter().map(|v| v.to_f32()).collect())
        }
    }
}

/// The routed output `[m, hidden]` of a slice of `m` tokens: per token, `Σ weight · y` over its
/// assignments in routing order (the order of `assign`, token-major), one fused multiply-add per
/// term from 0 — the one-GPU rule of `moe_down_f32`. `y` of assignment `i` is row `row_of[i]` of
/// `ret`.
pub(crate) fn combine_routing_order(
    assign: &[Assignment],
    row_of: &[usize],
    ret: &[f32],
    m: usize,
    hd: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; m * hd]; // [m, hidden]
    for (a, &r) in assign.iter().zip(row_of) {
        let o = &mut out[a.token as usize * hd..(a.token as usize + 1) * hd];
        let y = &ret[r * hd..(r + 1) * hd];
        o.iter_mut().zip(y).for_each(|(o, &v)| *o = a.weight.mul_add(v, *o));
    }
    out
}

/// `h += routed(x) + shared(x)` over the world (see the module doc). `io` is `None` when this
/// rank's group has no tokens this step (`n = 0`): the call then only serves other ranks.
pub(crate) fn ep_forward(
    m: &CudaModel,
    layer: usize,
    w: &EpW,
    io: Option<(FfnInput, &mut CudaSlice<f32>)>,
    n: usize,
    comms: &mut EpComms,
    routing: Option<&mut RoutingRecorder>,
) -> Result<(), CudaModelError> {
    let hd = m.cfg.hidden_size;
    let (t, k) = (comms.group.world_size(), comms.group.rank());
    let mine = slice_rows(n, t, k);
    let (assign, xs) = match &io {
        Some((x, _)) if n > 0 => {
            let (assign, xs, ids) = route_slice(m, w, *x, n, mine.clone())?;
            if let Some(r) = routing {
                r.push_host_ids(&ids, n, m.router.top_k);
            }
            (assign, xs)
        }
        _ => (Vec::new(), Vec::new()),
    };
    let world_size = comms.world.world_size();
    let Dispatch { words, counts, sent } =
        pack_dispatch(&xs, &assign, hd, layer, comms.plan, world_size)?;
    let (recv, recv_counts) = comms
        .world
        .all_to_all_v_pod::<u32>(&words, &counts)
        .map_err(crate::parallel::ParallelError::from)?;
    let rx = unpack_dispatch(&recv, &recv_counts, hd, m.router.top_k, layer)?;
    let y = compute_received(m, w, &rx, layer)?; // [A, hidden]
    let back: Vec<usize> = rx.per_src.iter().map(|a| a * hd).collect();
    let (ret, ret_counts) = comms
        .world
        .all_to_all_v_pod::<f32>(&y, &back)
        .map_err(crate::parallel::ParallelError::from)?;
    let row_of = returned_rows(&sent, &ret_counts, assign.len(), hd, layer)?;

    let out = combine_routing_order(&assign, &row_of, &ret, mine.len(), hd); // [m, hidden]
    let Some((x, h)) = io else { return Ok(()) };
    if n == 0 {
        return Ok(());
    }
    let routed = if t == 1 { out } else { gather_slices(out, n, hd, comms.group)? }; // [n, hidden]
    let dev = &m.dev;
    match m.precision {
        Precision::F32 => {
            m.glue.add_f32_into(h, &dev.upload(&routed)?, n * hd)?;
            if let Some(s) = &w.shared {
                let f = m.mlp_f32(s, x.xf, n)?;
                m.glue.add_f32_into(h, &f, n * hd)?;
            }
        }
        Precision::Bf16 => {
            let rb: Vec<bf16> = routed.iter().map(|&v| bf16::from_f32(v)).collect();
            m.glue.add_into(h, &dev.upload(&rb)?, n * hd)?;
            if let Some(s) = &w.shared {
                let f = m.mlp(s, x.xb, n)?;
                m.glue.add_into(h, &f, n * hd)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_is_fma_in_routing_order() {
        // Values where the two orders of the fused sum round differently.
        let (a, b) = (f32::from_bits(0xbfcf_f1a3), f32::from_bits(0xbff1_7c71));
        let (wa, wb) = (f32::from_bits(0x3f55_f4b4), f32::from_bits(0x3edd_93a5));
        // Token 0 routed to experts 9 then 2 (outputs came back as rows 1, 0); token 1 to one.
        let assign = [
            Assignment { token: 0, expert: 9, weight: wa },
            Assignment { token: 0, expert: 2, weight: wb },
            Assignment { token: 1, expert: 5, weight: 0.5 },
        ];
        let ret = [b, 1.0, a, 2.0, -3.0, 0.25]; // [3 rows, hidden 2]
        let out = combine_routing_order(&assign, &[1, 0, 2], &ret, 2, 2);
        let routing = wb.mul_add(b, wa.mul_add(a, 0.0));
        assert_eq!(out, vec![routing, wb.mul_add(1.0, wa * 2.0), -1.5, 0.125]);
        // The order is part of the rule: ascending expert order rounds differently here.
        let ascending = wa.mul_add(a, wb.mul_add(b, 0.0));
        assert_ne!(ascending.to_bits(), routing.to_bits());
    }
}
