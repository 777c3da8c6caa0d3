//! [`ModelConfig`]: a typed mirror of a Hugging Face DeepSeek-V3.2 `config.json`.
//!
//! Reads DeepSeek's own file (`rope_scaling` + `rope_theta`) and files saved by transformers v5
//! (`rope_parameters`, `dtype`, `head_dim`, ...). Unknown keys are ignored. [`ModelConfig::validate`]
//! rejects configurations the runtime cannot serve, naming the key at fault; the derived values
//! (qk head dim, YaRN frequencies, softmax scale) follow `spec/deepseek-v32.md` §1–§2 and HF.
//!
//! Invariant: every `ModelConfig` handed out by [`ModelConfig::from_json_str`],
//! [`ModelConfig::from_file`] or [`ModelConfig::preset`] has passed `validate`.

use serde::{Deserialize, Deserializer, Serialize};
use std::path::Path;

/// Why a config could not be read or accepted. Each variant names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("malformed config.json{}: {source}", path.as_deref().map(|p| format!(" ({p})")).unwrap_or_default())]
    Json { path: Option<String>, source: serde_json::Error },
    #[error("invalid config: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("unsupported config: {key} = {value}: {reason}")]
    Unsupported { key: &'static str, value: String, reason: &'static str },
    #[error("unknown preset {0:?}; expected tiny, small, full or full-width:N")]
    UnknownPreset(String),
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

/// `quantization_config` of an FP8 checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    /// "fp8" is the only method served.
    pub quant_method: String,
    /// Element format; "e4m3" (the default when absent).
    #[serde(default = "default_fmt")]
    pub fmt: String,
    /// Block [rows, cols] of `weight_scale_inv`; DeepSeek uses [128, 128].
    #[serde(default = "default_block")]
    pub weight_block_size: [usize; 2],
    /// "dynamic" (per-token activation scales computed at run time).
    #[serde(default = "default_activation_scheme")]
    pub activation_scheme: String,
    /// "ue8m0" when scales are powers of two (V3.1 and later); absent for plain V3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_fmt: Option<String>,
}

fn default_fmt() -> String {
    "e4m3".into()
}
fn default_block() -> [usize; 2] {
    [128, 128]
}
fn default_activation_scheme() -> String {
    "dynamic".into()
}

impl QuantizationConfig {
    /// DeepSeek-V3.2's own setting: e4m3, 128×128 blocks, dynamic activations, ue8m0 scales.
    pub fn deepseek_fp8() -> Self {
        Self {
            quant_method: "fp8".into(),
            fmt: "e4m3".into(),
            weight_block_size: [128, 128],
            activation_scheme: "dynamic".into(),
            scale_fmt: Some("ue8m0".into()),
        }
    }
}

/// The rope settings of either form, as written in the file (`rope_scaling` of DeepSeek's file or
/// `rope_parameters` of transformers v5; `type` and `rope_type` are both accepted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeSettings {
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Present in `rope_parameters` (transformers v5) only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_fast: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_slow: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale_all_dim: Option<f64>,
}

/// The resolved rope: base plus optional YaRN, whichever form the file used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub yarn: Option<Yarn>,
}

/// Resolved YaRN parameters (spec §2.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

/// `eos_token_id` may be one id or a list of ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Typed mirror of an HF DeepSeek-V3.2 `config.json` (spec §1). Field names are the file's keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Inner dim of the dense FFN layers.
    pub intermediate_size: usize,
    /// Inner dim of one routed (and each shared) expert.
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Layers `0..first_k_dense_replace` use the dense FFN, the rest MoE.
    pub first_k_dense_replace: usize,
    pub num_attention_heads: usize,
    /// Unused by MLA; kept for round trips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Required by V3.2 (V2-Lite style `null` is not served).
    #[serde(deserialize_with = "de_required_rank")]
    pub q_lora_rank: usize,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_routed_experts: usize,
    #[serde(default = "one")]
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f64,
    #[serde(default = "yes")]
    pub norm_topk_prob: bool,
    #[serde(default = "default_scoring")]
    pub scoring_func: String,
    #[serde(default = "default_topk_method")]
    pub topk_method: String,
    #[serde(default = "one")]
    pub moe_layer_freq: usize,
    /// DeepSeek's file form; absent in transformers v5 files (then inside `rope_parameters`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeSettings>,
    /// transformers v5 form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeSettings>,
    pub max_position_embeddings: usize,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<QuantizationConfig>,
    #[serde(default)]
    pub num_nextn_predict_layers: usize,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// `torch_dtype` (DeepSeek's file) or `dtype` (transformers v5).
    #[serde(default, alias = "dtype", skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
}

fn default_model_type() -> String {
    "deepseek_v32".into()
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_scoring() -> String {
    "sigmoid".into()
}
fn default_topk_method() -> String {
    "noaux_tc".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

fn de_required_rank<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    Option::<usize>::deserialize(d)?.ok_or_else(|| {
        serde::de::Error::custom("q_lora_rank is null; DeepSeek-V3.2 requires a q LoRA rank")
    })
}

/// HF's `yarn_get_mscale`: 1 for no scaling, else 0.1·m·ln(scale) + 1.
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * mscale * scale.ln() + 1.0 }
}

impl ModelConfig {
    /// Parses and validates a `config.json` text.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let cfg: ModelConfig = serde_json::from_str(text)
            .map_err(|source| ConfigError::Json { path: None, source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Io { path: path.display().to_string(), source })?;
        let cfg: ModelConfig = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: Some(path.display().to_string()),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Serializes in DeepSeek's own form (pretty JSON).
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("ModelConfig serializes")
    }

    /// q/k head dim (nope + rope): 192 for the 671B model.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Experts in one router group.
    pub fn experts_per_group(&self) -> usize {
        self.n_routed_experts / self.n_group
    }

    /// Whether layer `i` (0-based, MTP layers included) uses MoE.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_k_dense_replace && layer % self.moe_layer_freq.max(1) == 0
    }

    /// Number of MoE layers among the main `num_hidden_layers`.
    pub fn num_moe_layers(&self) -> usize {
        (0..self.num_hidden_layers).filter(|&l| self.is_moe_layer(l)).count()
    }

    /// The EOS ids (possibly several); empty when the file names none.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }

    /// Whether large linear weights are stored as FP8 blocks.
    pub fn is_fp8(&self) -> bool {
        self.quantization_config.is_some()
    }

    /// The rope settings, from whichever form the file used (`rope_parameters` wins).
    pub fn rope(&self) -> Result<Rope, ConfigError> {
        let settings = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let theta = settings.and_then(|s| s.rope_theta).or(self.rope_theta).unwrap_or(10000.0);
        if !(theta.is_finite() && theta > 1.0) {
            return Err(invalid("rope_theta", format!("{theta} must be a finite number > 1")));
        }
        let Some(s) = settings else { return Ok(Rope { theta, yarn: None }) };
        match s.rope_type.as_str() {
            "default" => Ok(Rope { theta, yarn: None }),
            "yarn" => {
                let factor = s.factor.ok_or_else(|| invalid("rope_scaling.factor", "missing"))?;
                if !(factor.is_finite() && factor >= 1.0) {
                    return Err(invalid("rope_scaling.factor", format!("{factor} must be >= 1")));
                }
                let yarn = Yarn {
                    factor,
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(self.max_position_embeddings),
                    beta_fast: s.beta_fast.unwrap_or(32.0),
                    beta_slow: s.beta_slow.unwrap_or(1.0),
                    mscale: s.mscale.unwrap_or(1.0),
                    mscale_all_dim: s.mscale_all_dim.unwrap_or(0.0),
                };
                if yarn.original_max_position_embeddings == 0 {
                    return Err(invalid("rope_scaling.original_max_position_embeddings", "is 0"));
                }
                if !(yarn.beta_fast > yarn.beta_slow && yarn.beta_slow > 0.0) {
                    return Err(invalid(
                        "rope_scaling.beta_fast",
                        format!(
                            "need beta_fast ({}) > beta_slow ({}) > 0",
                            yarn.beta_fast, yarn.beta_slow
                        ),
                    ));
                }
                Ok(Rope { theta, yarn: Some(yarn) })
            }
            other => Err(ConfigError::Unsupported {
                key: "rope_scaling.type",
                value: other.into(),
                reason: "only \"yarn\" and \"default\" are served",
            }),
        }
    }

    /// Per-pair rope frequencies f'_i for a rope slice of `qk_rope_head_dim` dims (spec §2.2):
    /// `qk_rope_head_dim / 2` values, YaRN-blended when YaRN is on. Shared by MLA and indexer.
    pub fn rope_frequencies(&self) -> Result<Vec<f64>, ConfigError> {
        let rope = self.rope()?;
        let dim = self.qk_rope_head_dim;
        let half = dim / 2;
        let base: Vec<f64> =
            (0..half).map(|i| rope.theta.powf(-((2 * i) as f64) / dim as f64)).collect();
        let Some(y) = rope.yarn else { return Ok(base) };
        // d(r) = dim·ln(orig/(2π r)) / (2 ln θ); low = floor(d(beta_fast)), high = ceil(d(beta_slow)).
        let corr = |r: f64| {
            dim as f64
                * (y.original_max_position_embeddings as f64 / (2.0 * std::f64::consts::PI * r))
                    .ln()
                / (2.0 * rope.theta.ln())
        };
        let low = corr(y.beta_fast).floor().max(0.0);
        let mut high = corr(y.beta_slow).ceil().min(dim as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        Ok(base
            .iter()
            .enumerate()
            .map(|(i, &f)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let smooth = 1.0 - ramp;
                f / y.factor * (1.0 - smooth) + f * smooth
            })
            .collect())
    }

    /// HF's YaRN `attention_factor` that multiplies cos/sin: mscale(f, mscale) / mscale(f,
    /// mscale_all_dim) when both are set, else mscale(f, 1), and 1 without YaRN. It is exactly
    /// 1 for DeepSeek-V3.2 (mscale = mscale_all_dim = 1).
    pub fn rope_attention_factor(&self) -> Result<f64, ConfigError> {
        Ok(match self.rope()?.yarn {
            None => 1.0,
            Some(y) if y.mscale != 0.0 && y.mscale_all_dim != 0.0 => {
                yarn_get_mscale(y.factor, y.mscale) / yarn_get_mscale(y.factor, y.mscale_all_dim)
            }
            Some(y) => yarn_get_mscale(y.factor, 1.0),
        })
    }

    /// MLA softmax scale: qk_head_dim^-0.5 · mscale(factor, mscale_all_dim)² (HF; spec §2.1).
    /// 0.13523378 for the 671B config.
    pub fn softmax_scale(&self) -> Result<f64, ConfigError> {
        let mut s = (self.qk_head_dim() as f64).powf(-0.5);
        if let Some(y) = self.rope()?.yarn
            && y.mscale_all_dim != 0.0
        {
            let m = yarn_get_mscale(y.factor, y.mscale_all_dim);
            s *= m * m;
        }
        Ok(s)
    }

    /// Checks every rule the runtime relies on; the error names the key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive: [(&'static str, usize); 15] = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("q_lora_rank", self.q_lora_rank),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("index_n_heads", self.index_n_heads),
            ("index_head_dim", self.index_head_dim),
            ("index_topk", self.index_topk),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(invalid(key, "must be > 0"));
            }
        }
        if self.qk_rope_head_dim % 2 != 0 {
            return Err(invalid(
                "qk_rope_head_dim",
                format!("{} must be even", self.qk_rope_head_dim),
            ));
        }
        if self.index_head_dim < self.qk_rope_head_dim {
            return Err(invalid(
                "index_head_dim",
                format!(
                    "{} is smaller than qk_rope_head_dim {} (the indexer's rope part)",
                    self.index_head_dim, self.qk_rope_head_dim
                ),
            ));
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return Err(invalid(
                "first_k_dense_replace",
                format!(
                    "{} exceeds num_hidden_layers {}",
                    self.first_k_dense_replace, self.num_hidden_layers
                ),
            ));
        }
        if self.moe_layer_freq != 1 {
            return Err(ConfigError::Unsupported {
                key: "moe_layer_freq",
                value: self.moe_layer_freq.to_string(),
                reason: "DeepSeek-V3.2 uses MoE in every layer after the dense ones (1)",
            });
        }
        if self.first_k_dense_replace < self.num_hidden_layers || self.num_nextn_predict_layers > 0
        {
            self.validate_moe()?;
        }
        if self.scoring_func != "sigmoid" {
            return Err(ConfigError::Unsupported {
                key: "scoring_func",
                value: self.scoring_func.clone(),
                reason: "only the sigmoid router of DeepSeek-V3.2 is served",
            });
        }
        if self.topk_method != "noaux_tc" {
            return Err(ConfigError::Unsupported {
                key: "topk_method",
                value: self.topk_method.clone(),
                reason: "only bias-corrected group-limited routing (noaux_tc) is served",
            });
        }
        if self.hidden_act != "silu" {
            return Err(ConfigError::Unsupported {
                key: "hidden_act",
                value: self.hidden_act.clone(),
                reason: "only SiLU (SwiGLU FFNs) is served",
            });
        }
        if self.tie_word_embeddings {
            return Err(ConfigError::Unsupported {
                key: "tie_word_embeddings",
                value: "true".into(),
                reason: "DeepSeek-V3.2 keeps separate embedding and head",
            });
        }
        if self.attention_bias {
            return Err(ConfigError::Unsupported {
                key: "attention_bias",
                value: "true".into(),
                reason: "DeepSeek-V3.2 attention has no biases",
            });
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(invalid("rms_norm_eps", format!("{} must be > 0", self.rms_norm_eps)));
        }
        for (key, id) in [("bos_token_id", self.bos_token_id)] {
            if let Some(id) = id
                && id as usize >= self.vocab_size
            {
                return Err(invalid(
                    key,
                    format!("{id} is not below vocab_size {}", self.vocab_size),
                ));
            }
        }
        for id in self.eos_ids() {
            if id as usize >= self.vocab_size {
                return Err(invalid(
                    "eos_token_id",
                    format!("{id} is not below vocab_size {}", self.vocab_size),
                ));
            }
        }
        if let Some(q) = &self.quantization_config {
            if q.quant_method != "fp8" {
                return Err(ConfigError::Unsupported {
                    key: "quantization_config.quant_method",
                    value: q.quant_method.clone(),
                    reason: "only fp8 block quantization is served",
                });
            }
            if q.fmt != "e4m3" {
                return Err(ConfigError::Unsupported {
                    key: "quantization_config.fmt",
                    value: q.fmt.clone(),
                    reason: "only e4m3 is served",
                });
            }
            if q.weight_block_size[0] == 0 || q.weight_block_size[1] == 0 {
                return Err(invalid("quantization_config.weight_block_size", "blocks must be > 0"));
            }
            if let Some(f) = &q.scale_fmt
                && f != "ue8m0"
            {
                return Err(ConfigError::Unsupported {
                    key: "quantization_config.scale_fmt",
                    value: f.clone(),
                    reason: "only ue8m0 (or absent) is served",
                });
            }
        }
        if self.rope_parameters.is_none()
            && self.rope_scaling.is_none()
            && self.rope_theta.is_none()
        {
            return Err(invalid("rope_theta", "no rope_theta, rope_scaling or rope_parameters"));
        }
        self.rope()?;
        if let Some(y) = self.rope()?.yarn
            && y.original_max_position_embeddings > self.max_position_embeddings
        {
            return Err(invalid(
                "rope_scaling.original_max_position_embeddings",
                format!(
                    "{} exceeds max_position_embeddings {}",
                    y.original_max_position_embeddings, self.max_position_embeddings
                ),
            ));
        }
        Ok(())
    }

    fn validate_moe(&self) -> Result<(), ConfigError> {
        if self.n_routed_experts == 0 {
            return Err(invalid("n_routed_experts", "must be > 0 when the model has MoE layers"));
        }
        if self.n_group == 0 || self.n_routed_experts % self.n_group != 0 {
            return Err(invalid(
                "n_group",
                format!(
                    "{} does not divide n_routed_experts {}",
                    self.n_group, self.n_routed_experts
                ),
            ));
        }
        if self.experts_per_group() < 2 {
            return Err(invalid(
                "n_group",
                format!(
                    "{} groups of {} experts: group scores sum the top-2 experts, so each group needs >= 2",
                    self.n_group,
                    self.experts_per_group()
                ),
            ));
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            return Err(invalid(
                "topk_group",
                format!("{} must be in 1..={} (n_group)", self.topk_group, self.n_group),
            ));
        }
        let reachable = self.topk_group * self.experts_per_group();
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > reachable {
            return Err(invalid(
                "num_experts_per_tok",
                format!(
                    "{} must be in 1..={reachable}: the {} kept groups hold {reachable} experts",
                    self.num_experts_per_tok, self.topk_group
                ),
            ));
        }
        if !(self.routed_scaling_factor.is_finite() && self.routed_scaling_factor > 0.0) {
            return Err(invalid(
                "routed_scaling_factor",
                format!("{} must be > 0", self.routed_scaling_factor),
            ));
        }
        Ok(())
    }
}

pub mod presets;

#[cfg(test)]
mod tests;
