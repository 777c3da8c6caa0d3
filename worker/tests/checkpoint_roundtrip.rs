//! Synth → read round trips on real safetensors files: f32 exact, bf16 exact to bf16 rounding,
//! fp8 within e4m3 error of the f32 originals of the same seed; slices; byte counters; the
//! single-file layout `save_pretrained` writes; partial FP8 edge blocks; value ranges of the
//! initialisation rule; determinism; the tokenizer written beside the weights.

use fathom_common::ModelConfig;
use fathom_common::config::QuantizationConfig;
use fathom_common::tensors::{Role, TensorSpec, checkpoint_tensors};
use fathom_worker::weights::synth::{init_range, synth_values};
use fathom_worker::weights::{
    CheckpointReader, SynthDtype, SynthOptions, TensorSource, synth_checkpoint,
};
use std::path::Path;

fn synth(cfg: &ModelConfig, dtype: SynthDtype, seed: u64, dir: &Path) -> SynthOptions {
    let opts = SynthOptions { dtype, seed, shard_bytes: 256 << 10, ..Default::default() };
    synth_checkpoint(cfg, &opts, dir).unwrap();
    opts
}

fn originals(cfg: &ModelConfig, opts: &SynthOptions, spec: &TensorSpec) -> Vec<f32> {
    synth_values(cfg, opts, spec, 0, spec.numel())
}

#[test]
fn f32_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::tiny();
    let opts = synth(&cfg, SynthDtype::F32, 11, dir.path());
    let r = CheckpointReader::open(dir.path()).unwrap();
    assert!(r.files().len() > 1, "expected several shards");
    assert!(r.has_mtp());
    assert_eq!(r.config(), &fathom_worker::weights::synth::synth_config(&cfg, SynthDtype::F32));
    for spec in checkpoint_tensors(&cfg) {
        let t = r.load(&spec.name).unwrap();
        assert_eq!(t.shape(), &spec.shape[..], "{}", spec.name);
        assert_eq!(t.data(), &originals(&cfg, &opts, &spec)[..], "{}", spec.name);
    }
}

#[test]
fn bf16_round_trip_is_bf16_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::tiny();
    let opts = synth(&cfg, SynthDtype::Bf16, 12, dir.path());
    let r = CheckpointReader::open(dir.path()).unwrap();
    for spec in checkpoint_tensors(&cfg) {
        let stored = r.stored(&spec.name).unwrap();
        let fp32 =
            matches!(spec.role, Role::RouterBias | Role::LayerNormWeight | Role::LayerNormBias);
        assert_eq!(stored.dtype.to_string(), if fp32 { "F32" } else { "BF16" }, "{}", spec.name);
        let want: Vec<f32> = originals(&cfg, &opts, &spec)
            .into_iter()
            .map(|v| if fp32 { v } else { half::bf16::from_f32(v).to_f32() })
            .collect();
        assert_eq!(r.load(&spec.name).unwrap().data(), &want[..], "{}", spec.name);
    }
}

/// Checks FP8 tensors of `r` against the f32 checkpoint of the same seed in `f32_dir`.
fn check_fp8_against_f32(cfg: &ModelConfig, r: &CheckpointReader, f32_dir: &Path) -> usize {
    let f = CheckpointReader::open(f32_dir).unwrap();
    let block = r.config().quantization_config.as_ref().unwrap().weight_block_size;
    let mut quantized = 0;
    for spec in checkpoint_tensors(cfg) {
        let orig = f.load(&spec.name).unwrap();
        let got = r.load(&spec.name).unwrap();
        assert_eq!(got.shape(), orig.shape());
        if !spec.quantized {
            let fp32 =
                matches!(spec.role, Role::RouterBias | Role::LayerNormWeight | Role::LayerNormBias);
            for (a, b) in orig.data().iter().zip(got.data()) {
                let want = if fp32 { *a } else { half::bf16::from_f32(*a).to_f32() };
                assert_eq!(*b, want, "{}", spec.name);
            }
            continue;
        }
        quantized += 1;
        assert_eq!(r.stored(&spec.name).unwrap().dtype.to_string(), "F8_E4M3");
        let scales = r.load(&spec.scale_name()).unwrap();
        let sc = scales.shape()[1];
        let cols = spec.shape[1];
        // Every scale is a power of two and its block's amax/scale is in (224, 448].
        let mut amax = vec![0f32; scales.len()];
        for (i, v) in orig.data().iter().enumerate() {
            let k = (i / cols / block[0]) * sc + (i % cols) / block[1];
            amax[k] = amax[k].max(v.abs());
        }
        for (k, s) in scales.data().iter().enumerate() {
            assert_eq!(
                s.to_bits() & 0x7f_ffff,
                0,
                "{}: scale {s} is not a power of two",
                spec.name
            );
            let ratio = amax[k].max(1e-4) / s;
            assert!(ratio > 224.0 && ratio <= 448.0, "{}: block {k} amax/scale {ratio}", spec.name);
        }
        for (i, (a, b)) in orig.data().iter().zip(got.data()).enumerate() {
            let s = scales.data()[(i / cols / block[0]) * sc + (i % cols) / block[1]];
            // e4m3: 3 mantissa bits (relative half-step 2^-4), subnormal step 2^-9 of the scale.
            let tol = a.abs() / 16.0 + s / 1024.0;
            assert!((a - b).abs() <= tol, "{}[{i}]: {a} vs {b} (scale {s})", spec.name);
        }
    }
    quantized
}

#[test]
fn fp8_round_trip_is_within_e4m3_error_of_the_f32_originals() {
    let (d8, d32) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = ModelConfig::tiny();
    synth(&cfg, SynthDtype::Fp8, 13, d8.path());
    synth(&cfg, SynthDtype::F32, 13, d32.path());
    let r = CheckpointReader::open(d8.path()).unwrap();
    assert!(r.config().is_fp8());
    let n = check_fp8_against_f32(&cfg, &r, d32.path());
    assert!(n > 100, "{n} quantized tensors");
}

#[test]
fn fp8_partial_edge_blocks() {
    // 32×32 blocks on tiny: kv_a_proj_with_mqa is [40, 64] → scale [2, 2], last row block of 8.
    let mut cfg = ModelConfig::tiny();
    cfg.quantization_config = Some(QuantizationConfig {
        weight_block_size: [32, 32],
        ..QuantizationConfig::deepseek_fp8()
    });
    let (d8, d32) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    synth(&cfg, SynthDtype::Fp8, 14, d8.path());
    synth(&cfg, SynthDtype::F32, 14, d32.path());
    let r = CheckpointReader::open(d8.path()).unwrap();
    let kv = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight";
    assert_eq!(r.stored(kv).unwrap().shape, [40, 64]);
    assert_eq!(r.stored(&format!("{kv}_scale_inv")).unwrap().shape, [2, 2]);
    // q_b_proj [96, 32] → [3, 1]; o_proj [64, 64] → [2, 2]; dense down_proj [64, 128] → [2, 4].
    assert_eq!(
        r.stored("model.layers.0.self_attn.q_b_proj.weight_scale_inv").unwrap().shape,
        [3, 1]
    );
    assert_eq!(r.stored("model.layers.0.mlp.down_proj.weight_scale_inv").unwrap().shape, [2, 4]);
    check_fp8_against_f32(&cfg, &r, d32.path());
    // Slices across the partial block agree with the whole tensor.
    let whole = r.load(kv).unwrap();
    let rows = r.load_slice(kv, 0, 30, 40).unwrap();
    assert_eq!(rows.data(), &whole.data()[30 * 64..]);
    let cols = r.load_slice(kv, 1, 20, 50).unwrap();
    for row in 0..40 {
        assert_eq!(
            &cols.data()[row * 30..(row + 1) * 30],
            &whole.data()[row * 64 + 20..row * 64 + 50]
        );
    }
}

#[test]
fn full_width_fp8_plans_the_spec_scale_shapes() {
    use fathom_worker::weights::synth::stored_tensors;
    let cfg = ModelConfig::preset("full-width:1").unwrap();
    let spec = checkpoint_tensors(&cfg)
        .into_iter()
        .find(|t| t.name == "model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
        .unwrap();
    let stored = stored_tensors(&spec, SynthDtype::Fp8, [128, 128]);
    assert_eq!(stored[1].name, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv");
    assert_eq!(stored[1].shape, [5, 56]);
}

#[test]
fn slices_read_only_their_bytes_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::tiny();
    synth(&cfg, SynthDtype::F32, 15, dir.path());
    let r = CheckpointReader::open(dir.path()).unwrap();
    assert_eq!(r.bytes_read(), 0);
    let name = "model.layers.1.mlp.experts.3.gate_proj.weight"; // [32, 64]
    let whole = r.load(name).unwrap();
    assert_eq!(r.bytes_read(), 32 * 64 * 4);
    r.reset_counters();
    let rows = r.load_slice(name, 0, 8, 16).unwrap();
    assert_eq!(rows.shape(), [8, 64]);
    assert_eq!(rows.data(), &whole.data()[8 * 64..16 * 64]);
    assert_eq!(r.bytes_read(), 8 * 64 * 4);
    let cols = r.load_slice(name, 1, 16, 48).unwrap();
    assert_eq!(cols.shape(), [32, 32]);
    assert_eq!(cols.data()[32 * 5 + 7], whole.data()[64 * 5 + 16 + 7]);
    assert_eq!(r.bytes_read(), (8 * 64 + 32 * 32) * 4);
    let per = r.bytes_read_by_tensor();
    assert_eq!(per.len(), 1);
    assert_eq!(per[name], (8 * 64 + 32 * 32) * 4);
    assert!(r.load_slice(name, 1, 10, 65).is_err());
    assert!(r.load_slice(name, 2, 0, 1).is_err());
    assert!(r.load("model.layers.1.mlp.experts.99.gate_proj.weight").is_err());

    // FP8: bytes of the slice plus the scale blocks it touches.
    let d8 = tempfile::tempdir().unwrap();
    synth(&cfg, SynthDtype::Fp8, 15, d8.path());
    let r8 = CheckpointReader::open(d8.path()).unwrap();
    assert!(r8.validation_bytes() > 0);
    r8.load_slice(name, 0, 0, 4).unwrap();
    assert_eq!(r8.bytes_read(), 4 * 64 + 4);
    let raw = r8.raw_rows(name, 2, 4).unwrap();
    assert_eq!(raw.len(), 2 * 64);
    let deq = r8.load_slice(name, 0, 2, 4).unwrap();
    let scale = r8.load(&format!("{name}_scale_inv")).unwrap().data()[0];
    for (b, v) in raw.iter().zip(deq.data()) {
        assert_eq!(fathom_worker::weights::fp8::E4M3_TO_F32[*b as usize] * scale, *v);
    }
    assert!(r8.raw_rows(name, 3, 40).is_err());
}

#[test]
fn single_model_safetensors_layout_opens() {
    // `save_pretrained` of a small model: one model.safetensors, no index.
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::tiny();
    let opts = SynthOptions { shard_bytes: u64::MAX, ..Default::default() };
    synth_checkpoint(&cfg, &opts, dir.path()).unwrap();
    let p = dir.path();
    std::fs::rename(p.join("model-00001-of-00001.safetensors"), p.join("model.safetensors"))
        .unwrap();
    std::fs::remove_file(p.join("model.safetensors.index.json")).unwrap();
    let r = CheckpointReader::open(p).unwrap();
    assert_eq!(r.files(), ["model.safetensors"]);
    let spec = &checkpoint_tensors(&cfg)[3];
    assert_eq!(r.load(&spec.name).unwrap().data(), &originals(&cfg, &opts, spec)[..]);
}

#[test]
fn transformers_v5_config_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::tiny();
    synth(&cfg, SynthDtype::F32, 16, dir.path());
    // Rewrite config.json the way transformers 5 saves it.
    let p = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    let mut rope = o.remove("rope_scaling").unwrap();
    rope["rope_theta"] = o.remove("rope_theta").unwrap();
    rope["rope_type"] = rope.as_object_mut().unwrap().remove("rope_type").unwrap();
    o.insert("rope_parameters".into(), rope);
    let dtype = o.remove("torch_dtype").unwrap();
    o.insert("dtype".into(), dtype);
    o.insert("head_dim".into(), 8.into());
    o.insert("qk_head_dim".into(), 24.into());
    o.insert("layer_types".into(), serde_json::Value::Null);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    let r = CheckpointReader::open(dir.path()).unwrap();
    assert_eq!(r.config().rope().unwrap(), cfg.rope().unwrap());
    assert_eq!(r.config().torch_dtype.as_deref(), Some("float32"));
}

#[test]
fn init_rule_value_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::small();
    let opts = synth(&cfg, SynthDtype::F32, 17, dir.path());
    let r = CheckpointReader::open(dir.path()).unwrap();
    for spec in checkpoint_tensors(&cfg) {
        let t = r.load(&spec.name).unwrap();
        let (c, h) = init_range(&cfg, &spec);
        assert!(t.data().iter().all(|v| (v - c).abs() <= h), "{} outside {c} ± {h}", spec.name);
        if t.len() >= 1000 {
            let rms =
                (t.data().iter().map(|v| (v - c) * (v - c)).sum::<f32>() / t.len() as f32).sqrt();
            let want = h / 3f32.sqrt();
            assert!((rms / want - 1.0).abs() < 0.1, "{}: rms {rms} vs {want}", spec.name);
        }
        match spec.role {
            Role::Norm | Role::LayerNormWeight => {
                let mean = t.data().iter().sum::<f32>() / t.len() as f32;
                assert!((mean - 1.0).abs() < 0.05, "{}: mean {mean}", spec.name);
            }
            // Unit gain: a matrix applied to an rms-1 vector gives an rms-1 vector.
            Role::Linear | Role::IndexerWeights | Role::LmHead | Role::MtpProj => {
                let (out, inp) = (spec.shape[0], spec.shape[1]);
                let x: Vec<f32> =
                    (0..inp).map(|i| if (i * 7919) % 3 == 0 { 1.0 } else { -1.0 }).collect();
                let y: Vec<f32> = (0..out)
                    .map(|o| {
                        t.data()[o * inp..(o + 1) * inp].iter().zip(&x).map(|(w, x)| w * x).sum()
                    })
                    .collect();
                let rms = (y.iter().map(|v| v * v).sum::<f32>() / out as f32).sqrt();
                if out >= 64 {
                    assert!((0.75..1.33).contains(&rms), "{}: gain {rms}", spec.name);
                }
            }
            Role::RouterBias => assert!(t.data().iter().all(|v| v.abs() <= 0.02)),
            _ => {}
        }
    }
    // Router skew favours the first experts.
    let skewed = SynthOptions { router_skew: 1.0, router_skew_experts: Some(3), ..opts };
    let spec = checkpoint_tensors(&cfg)
        .into_iter()
        .find(|t| t.name == "model.layers.2.mlp.gate.e_score_correction_bias")
        .unwrap();
    let b = originals(&cfg, &skewed, &spec);
    assert!(b[..3].iter().all(|v| *v > 0.97) && b[3..].iter().all(|v| v.abs() <= 0.02), "{b:?}");
}

#[test]
fn synth_is_deterministic_and_writes_a_loadable_tokenizer() {
    let (a, b, c) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = ModelConfig::tiny();
    synth(&cfg, SynthDtype::Fp8, 5, a.path());
    synth(&cfg, SynthDtype::Fp8, 5, b.path());
    synth(&cfg, SynthDtype::Fp8, 6, c.path());
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    let files = CheckpointReader::open(a.path())
        .unwrap()
        .files()
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    for f in files.iter().map(String::as_str).chain(["config.json", "model.safetensors.index.json"])
    {
        assert_eq!(read(a.path(), f), read(b.path(), f), "{f}");
    }
    assert_ne!(read(a.path(), &files[0]), read(c.path(), &files[0]));
    // Re-synthesizing into a used directory replaces the old shards.
    let opts = SynthOptions { shard_bytes: u64::MAX, ..Default::default() };
    synth_checkpoint(&cfg, &opts, a.path()).unwrap();
    CheckpointReader::open(a.path()).unwrap();
    let tok = tokenizers::Tokenizer::from_file(a.path().join("tokenizer.json")).unwrap();
    let ids = tok.encode("<｜User｜>héllo", false).unwrap().get_ids().to_vec();
    assert_eq!(ids[0], 258);
    assert_eq!(tok.decode(&ids[1..], false).unwrap(), "héllo");
    assert!(ids.iter().all(|&i| (i as usize) < cfg.vocab_size));
}
