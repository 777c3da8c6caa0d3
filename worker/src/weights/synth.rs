//! Synthetic DeepSeek-V3.2 checkpoints in the exact HF format: `config.json` (DeepSeek's form,
//! `rope_scaling` + `rope_theta`; FP8 adds `quantization_config`), `model.safetensors.index.json`
//! and `model-0000i-of-0000n.safetensors` shards, and a byte-level `tokenizer.json`.
//!
//! Determinism: element `i` of tensor `name` is a pure function of `(seed, name, i)`
//! (counter-based SplitMix64, [`super::rng`]), so the f32, bf16 and fp8 checkpoints of one seed
//! hold the same underlying values (bf16 rounds them, fp8 block-quantizes them), chunks are
//! generated in parallel with rayon, and the output does not depend on thread count or order.
//! Tensors are streamed chunk by chunk (≤ ~64 MB of f32 in flight), never whole models.
//!
//! Initialisation rule (keeps activations O(1) through every layer of a pre-norm stack):
//! - every matrix `W [out, in]` read from an O(1) vector: `U(-a, a)` with `a = sqrt(3/in)`, i.e.
//!   std `1/sqrt(in)`, so `W·x` has rms ≈ rms(x) (q/kv/indexer projections, FFN gate/up, LM
//!   heads, `weights_proj`, MTP `eh_proj`);
//! - projections writing into the residual stream (`o_proj`, every `down_proj`) additionally
//!   scaled by `1/sqrt(2·num_hidden_layers)`, so the residual stream's variance grows by at most
//!   ≈ 1 over the whole stack instead of by 1 per sub-layer;
//! - embeddings `U(-√3, √3)` (rms 1, the scale norms expect);
//! - norm weights (RMSNorm and the indexer LayerNorm) `1 + U(-0.1, 0.1)`, LayerNorm bias
//!   `U(-0.1, 0.1)`: close to the identity, but not exactly 1/0 so a model that ignored them
//!   would be caught by tests;
//! - router `gate.weight` small, half-gain `U(-a/2, a/2)` (logits rms ≈ 0.5, sigmoid far from
//!   saturation); `e_score_correction_bias` `U(-0.02, 0.02)`, plus `router_skew` on the first
//!   `router_skew_experts` experts (load-imbalance tests).
//!
//! Storage: f32 writes everything F32; bf16 writes BF16 except the fp32 tensors of DeepSeek's
//! checkpoint (`e_score_correction_bias`, `indexer.k_norm.*`); fp8 writes the `quantized` tensors of
//! [`fathom_common::tensors`] as F8_E4M3 + F32 `weight_scale_inv` (ue8m0, see [`super::fp8`]) and
//! the rest as in bf16.

use super::WeightsError;
use super::fp8;
use super::rng::Stream;
use super::st_write::{PlannedTensor, StWriter};
use super::tokenizer;
use fathom_common::ModelConfig;
use fathom_common::config::QuantizationConfig;
use fathom_common::tensors::{Role, TensorSpec, checkpoint_tensors, fp8_block, scale_shape};
use rayon::prelude::*;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

/// Element format of a synthetic checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthDtype {
    F32,
    Bf16,
    Fp8,
}

impl std::str::FromStr for SynthDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "fp8" => Ok(Self::Fp8),
            _ => Err(format!("unknown dtype {s:?}; expected f32, bf16 or fp8")),
        }
    }
}

/// Everything `synth` can vary; add fields here (with defaults) rather than parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    pub dtype: SynthDtype,
    pub seed: u64,
    /// Largest shard in bytes (a weight and its scale are never split across shards).
    pub shard_bytes: u64,
    /// Added to `e_score_correction_bias` of the first `router_skew_experts` experts.
    pub router_skew: f32,
    /// How many experts (from 0) get `router_skew`; `None` means `num_experts_per_tok`.
    pub router_skew_experts: Option<usize>,
    /// Write `tokenizer.json` beside the weights.
    pub tokenizer: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            dtype: SynthDtype::F32,
            seed: 0,
            shard_bytes: 4 << 30,
            router_skew: 0.0,
            router_skew_experts: None,
            tokenizer: true,
        }
    }
}

/// What `synth_checkpoint` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthReport {
    pub files: Vec<String>,
    pub tensors: usize,
    pub bytes: u64,
}

/// The config written for `cfg` at `dtype`: DeepSeek's rope form, `quantization_config` for fp8
/// only, `torch_dtype` naming the element type.
pub fn synth_config(cfg: &ModelConfig, dtype: SynthDtype) -> ModelConfig {
    let mut c = cfg.clone();
    if let Some(mut p) = c.rope_parameters.take() {
        c.rope_theta = p.rope_theta.take().or(c.rope_theta);
        c.rope_scaling = Some(p);
    }
    c.quantization_config = match dtype {
        SynthDtype::Fp8 => {
            Some(cfg.quantization_config.clone().unwrap_or_else(QuantizationConfig::deepseek_fp8))
        }
        _ => None,
    };
    c.torch_dtype = Some(if dtype == SynthDtype::F32 { "float32" } else { "bfloat16" }.into());
    c
}

fn keeps_fp32(spec: &TensorSpec) -> bool {
    matches!(spec.role, Role::RouterBias | Role::LayerNormWeight | Role::LayerNormBias)
}

/// The stored tensors of `spec` at `dtype`: the weight, and for FP8 its scale right after.
pub fn stored_tensors(
    spec: &TensorSpec,
    dtype: SynthDtype,
    block: [usize; 2],
) -> Vec<PlannedTensor> {
    let plain = |dtype| PlannedTensor { name: spec.name.clone(), dtype, shape: spec.shape.clone() };
    match dtype {
        SynthDtype::F32 => vec![plain(Dtype::F32)],
        _ if keeps_fp32(spec) => vec![plain(Dtype::F32)],
        SynthDtype::Fp8 if spec.quantized => vec![
            plain(Dtype::F8_E4M3),
            PlannedTensor {
                name: spec.scale_name(),
                dtype: Dtype::F32,
                shape: scale_shape(&spec.shape, block).to_vec(),
            },
        ],
        _ => vec![plain(Dtype::BF16)],
    }
}

/// `(center, half_width)` of the uniform distribution of `spec` (see the module doc).
pub fn init_range(cfg: &ModelConfig, spec: &TensorSpec) -> (f32, f32) {
    let fan_in = *spec.shape.last().unwrap_or(&1) as f32;
    let unit = (3.0 / fan_in).sqrt();
    match spec.role {
        Role::Embedding => (0.0, 3f32.sqrt()),
        Role::Linear | Role::IndexerWeights | Role::LmHead | Role::MtpProj => (0.0, unit),
        Role::OutputLinear => (0.0, unit / (2.0 * cfg.num_hidden_layers as f32).sqrt()),
        Role::RouterGate => (0.0, 0.5 * unit),
        Role::RouterBias => (0.0, 0.02),
        Role::Norm | Role::LayerNormWeight => (1.0, 0.1),
        Role::LayerNormBias => (0.0, 0.1),
    }
}

/// Elements `[start, start + len)` (row-major) of the f32 originals of `spec`.
pub fn synth_values(
    cfg: &ModelConfig,
    opts: &SynthOptions,
    spec: &TensorSpec,
    start: usize,
    len: usize,
) -> Vec<f32> {
    let stream = Stream::new(opts.seed, &spec.name);
    let (center, half) = init_range(cfg, spec);
    let skewed = if spec.role == Role::RouterBias && opts.router_skew != 0.0 {
        opts.router_skew_experts.unwrap_or(cfg.num_experts_per_tok)
    } else {
        0
    };
    (start..start + len)
        .map(|i| {
            let v = center + half * stream.uniform_at(i as u64);
            if i < skewed { v + opts.router_skew } else { v }
        })
        .collect()
}

/// Assigns tensor groups (a weight and its scale) to shards of at most `shard_bytes` (a group
/// larger than that gets a shard of its own).
fn plan_shards(groups: Vec<Vec<PlannedTensor>>, shard_bytes: u64) -> Vec<Vec<PlannedTensor>> {
    let mut shards: Vec<Vec<PlannedTensor>> = vec![Vec::new()];
    let mut size = 0u64;
    for g in groups {
        let n: u64 = g.iter().map(PlannedTensor::nbytes).sum();
        if size > 0 && size + n > shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().expect("one shard").extend(g);
    }
    shards
}

/// Removes files of an earlier checkpoint in `out` that a new one would leave stale.
fn remove_stale(out: &Path) -> Result<(), WeightsError> {
    let io = |source| WeightsError::Io { file: out.display().to_string(), source };
    for entry in std::fs::read_dir(out).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("model")
            && (name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json"))
        {
            std::fs::remove_file(entry.path()).map_err(|source| WeightsError::Io {
                file: entry.path().display().to_string(),
                source,
            })?;
        }
    }
    Ok(())
}

fn encode_plain(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        other => unreachable!("synth never plans plain {other:?}"),
    }
}

/// Streams one spec's stored tensors into `w`.
fn write_spec(
    w: &mut StWriter,
    cfg: &ModelConfig,
    opts: &SynthOptions,
    spec: &TensorSpec,
    stored: &[PlannedTensor],
    block: [usize; 2],
) -> Result<(), WeightsError> {
    let cols = if spec.shape.len() == 2 { spec.shape[1] } else { spec.numel() };
    let rows = spec.numel() / cols.max(1);
    let fp8 = stored[0].dtype == Dtype::F8_E4M3;
    // FP8 chunks are whole row blocks; others ~1M elements.
    let chunk_rows = if fp8 { block[0] } else { ((1 << 20) / cols.max(1)).max(1) };
    let n_chunks = rows.div_ceil(chunk_rows);
    let window = ((16 << 20) / (chunk_rows * cols).max(1)).max(1);
    let mut scales = Vec::new();
    for w0 in (0..n_chunks).step_by(window) {
        let encoded: Vec<(Vec<u8>, Vec<f32>)> = (w0..(w0 + window).min(n_chunks))
            .into_par_iter()
            .map(|c| {
                let r0 = c * chunk_rows;
                let r = chunk_rows.min(rows - r0);
                let vals = synth_values(cfg, opts, spec, r0 * cols, r * cols); // [r, cols]
                if fp8 {
                    fp8::quantize_blocks(&vals, r, cols, block)
                } else {
                    (encode_plain(&vals, stored[0].dtype), Vec::new())
                }
            })
            .collect();
        for (bytes, s) in encoded {
            w.write(&spec.name, &bytes)?;
            scales.extend(s);
        }
    }
    if fp8 {
        let bytes: Vec<u8> = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write(&stored[1].name, &bytes)?;
    }
    Ok(())
}

/// Writes the synthetic checkpoint of `cfg` into `out` (created if needed).
pub fn synth_checkpoint(
    cfg: &ModelConfig,
    opts: &SynthOptions,
    out: &Path,
) -> Result<SynthReport, WeightsError> {
    let written_cfg = synth_config(cfg, opts.dtype);
    written_cfg.validate().map_err(|source| WeightsError::Config {
        file: out.join("config.json").display().to_string(),
        source,
    })?;
    std::fs::create_dir_all(out)
        .map_err(|source| WeightsError::Io { file: out.display().to_string(), source })?;
    remove_stale(out)?;
    let _ = std::fs::remove_file(out.join("config.json"));
    let block = fp8_block(&written_cfg);
    let specs = checkpoint_tensors(&written_cfg);
    let by_name: BTreeMap<&str, &TensorSpec> = specs.iter().map(|s| (s.name.as_str(), s)).collect();
    let groups: Vec<Vec<PlannedTensor>> =
        specs.iter().map(|s| stored_tensors(s, opts.dtype, block)).collect();
    let shards = plan_shards(groups, opts.shard_bytes.max(1));
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut files = Vec::new();
    let mut total = 0u64;
    let mut tensors = 0;
    for (i, plan) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let mut w = StWriter::create(&out.join(&file), plan.clone())?;
        for t in &plan {
            weight_map.insert(t.name.clone(), file.clone().into());
            total += t.nbytes();
            tensors += 1;
        }
        // Weights in plan order; a scale is written together with its weight.
        for t in plan.iter().filter(|t| by_name.contains_key(t.name.as_str())) {
            let spec = by_name[t.name.as_str()];
            write_spec(
                &mut w,
                &written_cfg,
                opts,
                spec,
                &stored_tensors(spec, opts.dtype, block),
                block,
            )?;
        }
        w.finish()?;
        tracing::info!(file, "wrote shard");
        files.push(file);
    }
    let index =
        serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let write = |name: &str, text: String| {
        let p = out.join(name);
        std::fs::write(&p, text)
            .map_err(|source| WeightsError::Io { file: p.display().to_string(), source })
    };
    write("model.safetensors.index.json", serde_json::to_string_pretty(&index).expect("json"))?;
    if opts.tokenizer {
        let json = tokenizer::synth_tokenizer_json(written_cfg.vocab_size).map_err(|reason| {
            WeightsError::File { file: out.join("tokenizer.json").display().to_string(), reason }
        })?;
        write("tokenizer.json", json)?;
    }
    // config.json last: a directory without it is visibly incomplete.
    write("config.json", written_cfg.to_json_pretty())?;
    Ok(SynthReport { files, tensors, bytes: total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_do_not_depend_on_chunking_and_dtype() {
        let cfg = ModelConfig::tiny();
        let spec = &checkpoint_tensors(&cfg)[5];
        let opts = SynthOptions { seed: 7, ..Default::default() };
        let whole = synth_values(&cfg, &opts, spec, 0, spec.numel());
        let part = synth_values(&cfg, &opts, spec, 100, 50);
        assert_eq!(&whole[100..150], &part[..]);
        let fp8 = SynthOptions { dtype: SynthDtype::Fp8, ..opts.clone() };
        assert_eq!(whole, synth_values(&cfg, &fp8, spec, 0, spec.numel()));
        let other = SynthOptions { seed: 8, ..opts };
        assert_ne!(whole, synth_values(&cfg, &other, spec, 0, spec.numel()));
    }

    #[test]
    fn shards_respect_the_limit_and_keep_scales_with_weights() {
        let cfg = synth_config(&ModelConfig::tiny(), SynthDtype::Fp8);
        let groups: Vec<_> = checkpoint_tensors(&cfg)
            .iter()
            .map(|s| stored_tensors(s, SynthDtype::Fp8, [128, 128]))
            .collect();
        let shards = plan_shards(groups, 64 << 10);
        assert!(shards.len() > 3);
        for s in &shards {
            let size: u64 = s.iter().map(PlannedTensor::nbytes).sum();
            assert!(size <= 64 << 10 || s.len() <= 2, "{size}");
            for (i, t) in s.iter().enumerate() {
                if let Some(w) = t.name.strip_suffix("_scale_inv") {
                    assert_eq!(s[i - 1].name, w);
                }
            }
        }
    }
}
