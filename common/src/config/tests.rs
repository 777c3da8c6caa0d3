use super::*;

#[test]
fn full_config_derived_values() {
    let c = ModelConfig::full();
    c.validate().unwrap();
    assert_eq!(c.qk_head_dim(), 192);
    let s = c.softmax_scale().unwrap();
    assert!((s - 0.13523378).abs() < 1e-8, "softmax scale {s}");
    assert_eq!(c.rope_attention_factor().unwrap(), 1.0);
    let f = c.rope_frequencies().unwrap();
    assert_eq!(f.len(), 32);
    // i <= 10 keeps the base frequency, i >= 23 is divided by 40 (spec §2.2).
    let base = |i: usize| 10000f64.powf(-(2.0 * i as f64) / 64.0);
    assert_eq!(f[10], base(10));
    assert!((f[23] - base(23) / 40.0).abs() < 1e-18);
    assert!((f[16] - 0.0055).abs() < 1e-4, "f'16 = {}", f[16]);
    assert_eq!(c.num_moe_layers(), 58);
}

#[test]
fn presets_validate() {
    for name in ["tiny", "small", "full", "full-width:2", "full-width:1"] {
        ModelConfig::preset(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(ModelConfig::preset("huge").is_err());
    assert!(ModelConfig::preset("full-width:0").is_err());
}

const DEEPSEEK_FORM: &str = include_str!("../../../tests/fixtures/configs/deepseek-v32-671b.json");
const HF_V5_FORM: &str =
    include_str!("../../../tests/fixtures/configs/deepseek-v32-671b-hf-v5.json");

fn assert_spec_values(c: &ModelConfig) {
    assert_eq!(c.vocab_size, 129280);
    assert_eq!(c.hidden_size, 7168);
    assert_eq!(c.num_hidden_layers, 61);
    assert_eq!(c.first_k_dense_replace, 3);
    assert_eq!(c.intermediate_size, 18432);
    assert_eq!(c.moe_intermediate_size, 2048);
    assert_eq!(c.num_attention_heads, 128);
    assert_eq!((c.q_lora_rank, c.kv_lora_rank), (1536, 512));
    assert_eq!((c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim), (128, 64, 128));
    assert_eq!(c.qk_head_dim(), 192);
    assert_eq!((c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok), (256, 1, 8));
    assert_eq!((c.n_group, c.topk_group), (8, 4));
    assert_eq!(c.routed_scaling_factor, 2.5);
    assert!(c.norm_topk_prob);
    assert_eq!(c.scoring_func, "sigmoid");
    assert_eq!(c.topk_method, "noaux_tc");
    assert_eq!(c.max_position_embeddings, 163840);
    assert_eq!((c.index_n_heads, c.index_head_dim, c.index_topk), (64, 128, 2048));
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!(c.num_nextn_predict_layers, 1);
    assert_eq!((c.bos_token_id, c.eos_ids()), (Some(0), vec![1]));
    assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
    let q = c.quantization_config.as_ref().expect("fp8");
    assert_eq!(q, &QuantizationConfig::deepseek_fp8());
    let rope = c.rope().unwrap();
    assert_eq!(rope.theta, 10000.0);
    let y = rope.yarn.expect("yarn");
    assert_eq!(
        (y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow),
        (40.0, 4096, 32.0, 1.0)
    );
    assert_eq!((y.mscale, y.mscale_all_dim), (1.0, 1.0));
    assert!((c.softmax_scale().unwrap() - 0.13523378).abs() < 1e-8);
}

#[test]
fn deepseek_form_parses_to_spec_values() {
    let c = ModelConfig::from_json_str(DEEPSEEK_FORM).unwrap();
    assert!(c.rope_scaling.is_some() && c.rope_parameters.is_none());
    assert_spec_values(&c);
    // The preset is the same model.
    let full = ModelConfig::full();
    assert_eq!(c.rope().unwrap(), full.rope().unwrap());
    assert_eq!(c.rope_frequencies().unwrap(), full.rope_frequencies().unwrap());
}

#[test]
fn hf_v5_form_parses_to_spec_values() {
    let c = ModelConfig::from_json_str(HF_V5_FORM).unwrap();
    assert!(c.rope_parameters.is_some() && c.rope_scaling.is_none() && c.rope_theta.is_none());
    assert_spec_values(&c);
    let d = ModelConfig::from_json_str(DEEPSEEK_FORM).unwrap();
    assert_eq!(c.rope_frequencies().unwrap(), d.rope_frequencies().unwrap());
}

#[test]
fn from_file_names_the_file_on_malformed_json() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(&p, "{\"vocab_size\": 12,").unwrap();
    let e = ModelConfig::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("malformed"), "{e}");
    let e = ModelConfig::from_file(&dir.path().join("absent.json")).unwrap_err().to_string();
    assert!(e.contains("absent.json"), "{e}");
}

/// Applies `edit` to the tiny preset and expects `validate` to name `key`.
fn rejects(key: &str, edit: impl FnOnce(&mut ModelConfig)) {
    let mut c = ModelConfig::tiny();
    edit(&mut c);
    let e = c.validate().expect_err(key);
    let text = e.to_string();
    assert!(text.contains(key), "expected an error naming {key}, got: {text}");
    // And the same through the JSON path.
    let e = ModelConfig::from_json_str(&c.to_json_pretty()).expect_err(key).to_string();
    assert!(e.contains(key), "json path: {e}");
}

#[test]
fn validation_errors_name_their_key() {
    rejects("hidden_size", |c| c.hidden_size = 0);
    rejects("num_attention_heads", |c| c.num_attention_heads = 0);
    rejects("qk_rope_head_dim", |c| c.qk_rope_head_dim = 7);
    rejects("index_head_dim", |c| c.index_head_dim = 4);
    rejects("first_k_dense_replace", |c| c.first_k_dense_replace = 9);
    rejects("moe_layer_freq", |c| c.moe_layer_freq = 2);
    rejects("n_routed_experts", |c| c.n_routed_experts = 0);
    // n_group not dividing the experts.
    rejects("n_group", |c| c.n_group = 3);
    rejects("n_group", |c| c.n_group = 0);
    // Groups of one expert: the top-2 group score is undefined.
    rejects("n_group", |c| c.n_group = 16);
    rejects("topk_group", |c| c.topk_group = 5);
    rejects("topk_group", |c| c.topk_group = 0);
    // 2 kept groups of 4 experts hold 8: 9 per token is unreachable.
    rejects("num_experts_per_tok", |c| c.num_experts_per_tok = 9);
    rejects("num_experts_per_tok", |c| c.num_experts_per_tok = 0);
    rejects("routed_scaling_factor", |c| c.routed_scaling_factor = 0.0);
    rejects("scoring_func", |c| c.scoring_func = "softmax".into());
    rejects("topk_method", |c| c.topk_method = "greedy".into());
    rejects("hidden_act", |c| c.hidden_act = "gelu".into());
    rejects("tie_word_embeddings", |c| c.tie_word_embeddings = true);
    rejects("attention_bias", |c| c.attention_bias = true);
    rejects("rms_norm_eps", |c| c.rms_norm_eps = 0.0);
    rejects("bos_token_id", |c| c.bos_token_id = Some(512));
    rejects("eos_token_id", |c| c.eos_token_id = Some(TokenIds::Many(vec![1, 600])));
    rejects("quantization_config.quant_method", |c| {
        c.quantization_config = Some(QuantizationConfig {
            quant_method: "gptq".into(),
            ..QuantizationConfig::deepseek_fp8()
        })
    });
    rejects("quantization_config.fmt", |c| {
        c.quantization_config =
            Some(QuantizationConfig { fmt: "e5m2".into(), ..QuantizationConfig::deepseek_fp8() })
    });
    rejects("quantization_config.weight_block_size", |c| {
        c.quantization_config = Some(QuantizationConfig {
            weight_block_size: [0, 128],
            ..QuantizationConfig::deepseek_fp8()
        })
    });
    rejects("rope_scaling.factor", |c| c.rope_scaling.as_mut().unwrap().factor = Some(0.5));
    rejects("rope_scaling.original_max_position_embeddings", |c| {
        c.rope_scaling.as_mut().unwrap().original_max_position_embeddings = Some(4096)
    });
    rejects("rope_theta", |c| c.rope_theta = Some(0.5));
}

#[test]
fn null_q_lora_rank_is_rejected_with_reason() {
    let text = DEEPSEEK_FORM.replace("\"q_lora_rank\": 1536", "\"q_lora_rank\": null");
    let e = ModelConfig::from_json_str(&text).unwrap_err().to_string();
    assert!(e.contains("q_lora_rank"), "{e}");
}
