//! Named model shapes: `tiny` (CPU tests), `small` (larger, still quick on CPU), `full` (the 671B
//! shapes exactly) and `full-width:N` (N layers at full shapes, for GPU layer benchmarks).
//!
//! `tiny` is sized for the test suites: 1 dense + 3 MoE layers, 16 experts in 4 groups, 16 indexer
//! heads (spec §9 pitfall 8: fewer heads make exact-zero score ties common), `index_topk` 8 so
//! any prompt of more than 8 tokens exercises sparse selection, and head/FFN/vocab dims divisible
//! by 4 so every test layout (T up to 4, W up to 8) splits evenly.

use super::{ConfigError, ModelConfig, QuantizationConfig, RopeSettings, TokenIds};

fn yarn(factor: f64, original: usize) -> RopeSettings {
    RopeSettings {
        rope_type: "yarn".into(),
        rope_theta: None,
        factor: Some(factor),
        original_max_position_embeddings: Some(original),
        beta_fast: Some(32.0),
        beta_slow: Some(1.0),
        mscale: Some(1.0),
        mscale_all_dim: Some(1.0),
    }
}

impl ModelConfig {
    /// The 671B DeepSeek-V3.2 config (spec §1), as in DeepSeek's `config.json` (FP8).
    pub fn full() -> Self {
        ModelConfig {
            model_type: "deepseek_v32".into(),
            architectures: vec!["DeepseekV32ForCausalLM".into()],
            vocab_size: 129280,
            hidden_size: 7168,
            intermediate_size: 18432,
            moe_intermediate_size: 2048,
            num_hidden_layers: 61,
            first_k_dense_replace: 3,
            num_attention_heads: 128,
            num_key_value_heads: Some(128),
            q_lora_rank: 1536,
            kv_lora_rank: 512,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            n_routed_experts: 256,
            n_shared_experts: 1,
            num_experts_per_tok: 8,
            n_group: 8,
            topk_group: 4,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
            scoring_func: "sigmoid".into(),
            topk_method: "noaux_tc".into(),
            moe_layer_freq: 1,
            rope_theta: Some(10000.0),
            rope_scaling: Some(yarn(40.0, 4096)),
            rope_parameters: None,
            max_position_embeddings: 163840,
            index_n_heads: 64,
            index_head_dim: 128,
            index_topk: 2048,
            rms_norm_eps: 1e-6,
            quantization_config: Some(QuantizationConfig::deepseek_fp8()),
            num_nextn_predict_layers: 1,
            bos_token_id: Some(0),
            eos_token_id: Some(TokenIds::One(1)),
            tie_word_embeddings: false,
            attention_bias: false,
            hidden_act: "silu".into(),
            torch_dtype: Some("bfloat16".into()),
        }
    }

    /// `full` shapes with `layers` main layers, no MTP: min(3, layers/2) dense layers first, so
    /// `full-width:2` is one dense and one MoE layer (the shape of the HF peer benchmark).
    pub fn full_width(layers: usize) -> Self {
        ModelConfig {
            num_hidden_layers: layers,
            first_k_dense_replace: (layers / 2).min(3),
            num_nextn_predict_layers: 0,
            ..Self::full()
        }
    }

    /// CPU test model (see the module doc). Unquantized; `--dtype fp8` adds quantization_config.
    pub fn tiny() -> Self {
        ModelConfig {
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 128,
            moe_intermediate_size: 32,
            num_hidden_layers: 4,
            first_k_dense_replace: 1,
            num_attention_heads: 4,
            num_key_value_heads: Some(4),
            q_lora_rank: 32,
            kv_lora_rank: 32,
            qk_nope_head_dim: 16,
            qk_rope_head_dim: 8,
            v_head_dim: 16,
            n_routed_experts: 16,
            n_shared_experts: 1,
            num_experts_per_tok: 4,
            n_group: 4,
            topk_group: 2,
            rope_scaling: Some(yarn(8.0, 128)),
            max_position_embeddings: 1024,
            index_n_heads: 16,
            index_head_dim: 32,
            index_topk: 8,
            quantization_config: None,
            num_nextn_predict_layers: 1,
            torch_dtype: Some("float32".into()),
            ..Self::full()
        }
    }

    /// A larger CPU model: 2 dense + 4 MoE layers, 32 experts in 8 groups, still seconds per step.
    pub fn small() -> Self {
        ModelConfig {
            vocab_size: 1024,
            hidden_size: 256,
            intermediate_size: 512,
            moe_intermediate_size: 128,
            num_hidden_layers: 6,
            first_k_dense_replace: 2,
            num_attention_heads: 8,
            num_key_value_heads: Some(8),
            q_lora_rank: 128,
            kv_lora_rank: 64,
            qk_nope_head_dim: 32,
            qk_rope_head_dim: 16,
            v_head_dim: 32,
            n_routed_experts: 32,
            num_experts_per_tok: 4,
            n_group: 8,
            topk_group: 4,
            rope_scaling: Some(yarn(16.0, 256)),
            max_position_embeddings: 4096,
            index_n_heads: 16,
            index_head_dim: 64,
            index_topk: 64,
            ..Self::tiny()
        }
    }

    /// Looks a preset up by name: `tiny`, `small`, `full`, `full-width:N` (N ≥ 1).
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let cfg = match name {
            "tiny" => Self::tiny(),
            "small" => Self::small(),
            "full" => Self::full(),
            _ => match name.strip_prefix("full-width:").map(str::parse::<usize>) {
                Some(Ok(n)) if n >= 1 => Self::full_width(n),
                _ => return Err(ConfigError::UnknownPreset(name.into())),
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
