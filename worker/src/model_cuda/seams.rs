//! The seams of a decoder block where a sharded rank differs from the one-GPU model: the two
//! residual additions that follow a tensor-parallel partial sum (after `o_proj`, after the dense
//! FFN) and the expert-parallel MoE block. `layer.rs` and `layer_f32.rs` call these hooks and
//! nothing else changes between W = 1 and W > 1.
//!
//! Owns: the [`Seams`] trait and [`OneGpu`], the W = 1 implementation (plain device adds; a
//! one-GPU model never holds an expert-parallel layer). The sharded implementation lives in
//! `rank.rs` (group all-reduce) and `rank_moe.rs` (EP dispatch/combine over the world).

use fathom_kernels::cuda::cudarc::driver::CudaSlice;
use half::bf16;

use super::rank_moe::EpW;
use super::{CudaModel, CudaModelError};
use crate::model::ModelError;

/// The normed FFN input of the step's rows: `[n, hidden]` in bf16 and f32 (both written by the
/// norm; the bf16 forward reads `xb`, the f32 forward `xf`).
#[derive(Clone, Copy)]
pub(crate) struct FfnInput<'a> {
    pub xb: &'a CudaSlice<bf16>,
    pub xf: &'a CudaSlice<f32>,
}

/// Hooks of one decoder block (see the module doc). `h` is the f32 residual stream `[n, hidden]`.
pub(crate) trait Seams {
    /// `h += Σ_group part` for a bf16 partial sum `part` `[n, hidden]`.
    fn add_reduced_bf16(
        &mut self,
        m: &CudaModel,
        h: &mut CudaSlice<f32>,
        part: &CudaSlice<bf16>,
        n: usize,
    ) -> Result<(), CudaModelError>;

    /// `h += Σ_group part` for an f32 partial sum `part` `[n, hidden]`.
    fn add_reduced_f32(
        &mut self,
        m: &CudaModel,
        h: &mut CudaSlice<f32>,
        part: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaModelError>;

    /// Where the layer's routing is recorded this step (`None`: not asked).
    fn recorder(&mut self) -> Option<&mut RoutingRecorder>;

    /// `h += routed(x) + shared(x)` for an expert-parallel MoE layer `li` with weights `w`.
    #[allow(clippy::too_many_arguments)]
    fn expert_parallel(
        &mut self,
        m: &CudaModel,
        li: usize,
        w: &EpW,
        x: FfnInput,
        h: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaModelError>;
}

/// The routed experts of a step's rows, recorded per MoE layer when the step asks for them
/// (`ForwardOptions::record_routing`, RL rollouts): `rows[t][moe layer]` = the expert ids of row
/// t ascending, the CPU model's `ForwardOutput::routed_experts` format. Recording downloads the
/// ids (one sync per MoE layer) only for steps that asked.
#[derive(Debug, Default)]
pub(crate) struct RoutingRecorder {
    pub rows: Vec<Vec<Vec<u32>>>,
}

impl RoutingRecorder {
    pub(crate) fn new(n: usize) -> Self {
        Self { rows: vec![Vec::new(); n] }
    }

    /// Appends one MoE layer's router choices `ids [n, top_k]` (device).
    pub(crate) fn push_device_ids(
        &mut self,
        m: &CudaModel,
        ids: &CudaSlice<i32>,
        n: usize,
    ) -> Result<(), CudaModelError> {
        self.push_host_ids(&m.dev.download(ids)?, n, m.router.top_k);
        Ok(())
    }

    /// Appends one MoE layer's router choices `ids [n, top_k]` already on the host (the sharded
    /// MoE downloads them for its dispatch).
    pub(crate) fn push_host_ids(&mut self, ids: &[i32], n: usize, k: usize) {
        for (t, row) in self.rows.iter_mut().enumerate().take(n) {
            let mut e: Vec<u32> = ids[t * k..(t + 1) * k].iter().map(|&x| x as u32).collect();
            e.sort_unstable();
            row.push(e);
        }
    }
}

/// W = 1: every partial sum is already the whole sum. Records routing when asked.
#[derive(Default)]
pub(crate) struct OneGpu {
    pub routing: Option<RoutingRecorder>,
}

impl Seams for OneGpu {
    fn recorder(&mut self) -> Option<&mut RoutingRecorder> {
        self.routing.as_mut()
    }

    fn add_reduced_bf16(
        &mut self,
        m: &CudaModel,
        h: &mut CudaSlice<f32>,
        part: &CudaSlice<bf16>,
        n: usize,
    ) -> Result<(), CudaModelError> {
        Ok(m.glue.add_into(h, part, n * m.cfg.hidden_size)?)
    }

    fn add_reduced_f32(
        &mut self,
        m: &CudaModel,
        h: &mut CudaSlice<f32>,
        part: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaModelError> {
        Ok(m.glue.add_f32_into(h, part, n * m.cfg.hidden_size)?)
    }

    fn expert_parallel(
        &mut self,
        _m: &CudaModel,
        li: usize,
        _w: &EpW,
        _x: FfnInput,
        _h: &mut CudaSlice<f32>,
        _n: usize,
    ) -> Result<(), CudaModelError> {
        Err(ModelError::Shard(format!(
            "layer {li} holds expert-parallel weights but runs without a world communicator"
        ))
        .into())
    }
}
