//! Checkpoint summaries for `fathom checkpoint inspect`: parameter counts (main model and MTP
//! separately, spec §1), stored bytes and tensor counts per dtype, and a per-layer table, either
//! from an opened (hence validated) checkpoint or from shapes alone (`--dry`, stored as `synth`
//! would store them).
//!
//! Owns no I/O beyond what [`CheckpointReader`] already did; printing is the CLI's.

use super::reader::CheckpointReader;
use super::synth::{SynthDtype, stored_tensors, synth_config};
use fathom_common::ModelConfig;
use fathom_common::tensors::{
    ParamCounts, TensorSpec, checkpoint_tensors, fp8_block, param_counts,
};
use serde::Serialize;
use std::collections::BTreeMap;

/// Tensors, elements and bytes of one stored dtype.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DtypeTotals {
    pub tensors: usize,
    pub elements: u64,
    pub bytes: u64,
}

/// One decoder layer (or the non-layer tensors, `layer: None`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerSummary {
    pub layer: Option<usize>,
    /// "dense", "moe", "mtp" or "other" (embedding, final norm, head).
    pub kind: &'static str,
    pub params: u64,
    pub bytes: u64,
    pub tensors: usize,
}

/// What `inspect` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointSummary {
    /// The directory, or `preset NAME` for a dry run.
    pub source: String,
    pub dry: bool,
    pub params: ParamCounts,
    pub has_mtp: bool,
    pub fp8: bool,
    pub files: usize,
    pub total_bytes: u64,
    pub dtypes: BTreeMap<String, DtypeTotals>,
    pub layers: Vec<LayerSummary>,
}

fn layer_kind(cfg: &ModelConfig, layer: Option<usize>) -> &'static str {
    match layer {
        None => "other",
        Some(l) if l >= cfg.num_hidden_layers => "mtp",
        Some(l) if cfg.is_moe_layer(l) => "moe",
        Some(_) => "dense",
    }
}

/// Builds a summary from `(spec, [(dtype, elements, bytes)])` rows.
fn summarize<'a>(
    cfg: &ModelConfig,
    source: String,
    dry: bool,
    has_mtp: bool,
    files: usize,
    rows: impl Iterator<Item = (&'a TensorSpec, Vec<(String, u64, u64)>)>,
) -> CheckpointSummary {
    let mut params = param_counts(cfg);
    if !has_mtp {
        params.mtp_stored = 0;
        params.mtp_unique = 0;
    }
    let mut dtypes: BTreeMap<String, DtypeTotals> = BTreeMap::new();
    let mut layers: BTreeMap<Option<usize>, LayerSummary> = BTreeMap::new();
    let mut total = 0;
    for (spec, stored) in rows {
        let l = layers.entry(spec.layer).or_insert_with(|| LayerSummary {
            layer: spec.layer,
            kind: layer_kind(cfg, spec.layer),
            params: 0,
            bytes: 0,
            tensors: 0,
        });
        l.params += spec.numel() as u64;
        for (dtype, elements, bytes) in stored {
            let d = dtypes.entry(dtype).or_default();
            d.tensors += 1;
            d.elements += elements;
            d.bytes += bytes;
            l.bytes += bytes;
            l.tensors += 1;
            total += bytes;
        }
    }
    // Non-layer tensors last.
    let mut layers: Vec<LayerSummary> = layers.into_values().collect();
    layers.rotate_left(1);
    CheckpointSummary {
        source,
        dry,
        params,
        has_mtp,
        fp8: cfg.is_fp8(),
        files,
        total_bytes: total,
        dtypes,
        layers,
    }
}

/// Summary of an opened checkpoint (bytes are the stored data bytes, headers excluded).
pub fn summarize_checkpoint(r: &CheckpointReader) -> CheckpointSummary {
    let rows = r.specs().iter().map(|spec| {
        let mut v = Vec::new();
        for name in [spec.name.clone(), spec.scale_name()] {
            if let Some(t) = r.stored(&name) {
                v.push((t.dtype.to_string(), t.numel() as u64, t.len as u64));
            }
        }
        (spec, v)
    });
    summarize(r.config(), r.dir().display().to_string(), false, r.has_mtp(), r.files().len(), rows)
}

/// Summary from shapes alone: `cfg` stored at `dtype` as `synth` writes it.
pub fn summarize_dry(cfg: &ModelConfig, source: String, dtype: SynthDtype) -> CheckpointSummary {
    let cfg = synth_config(cfg, dtype);
    let block = fp8_block(&cfg);
    let specs = checkpoint_tensors(&cfg);
    let rows = specs.iter().map(|spec| {
        let v = stored_tensors(spec, dtype, block)
            .into_iter()
            .map(|t| (t.dtype.to_string(), t.shape.iter().product::<usize>() as u64, t.nbytes()))
            .collect();
        (spec, v)
    });
    summarize(&cfg, source, true, cfg.num_nextn_predict_layers > 0, 0, rows)
}
