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
