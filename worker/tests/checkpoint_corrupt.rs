//! Corrupt checkpoints: each is a clear error from `CheckpointReader::open` naming the tensor
//! and/or file at fault, never a panic and never a half-opened reader.

use fathom_common::ModelConfig;
use fathom_worker::weights::st_write::{PlannedTensor, StWriter};
use fathom_worker::weights::{CheckpointReader, SynthDtype, SynthOptions, synth_checkpoint};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

const NORM: &str = "model.layers.1.input_layernorm.weight";
const EXPERT: &str = "model.layers.2.mlp.experts.5.up_proj.weight";

fn synth(dtype: SynthDtype) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions {
        dtype,
        seed: 3,
        shard_bytes: 128 << 10,
        tokenizer: false,
        ..Default::default()
    };
    synth_checkpoint(&ModelConfig::tiny(), &opts, dir.path()).unwrap();
    dir
}

fn index(dir: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap()
}

fn file_of(dir: &Path, name: &str) -> String {
    index(dir)["weight_map"][name].as_str().unwrap().to_string()
}

/// Rewrites the shard holding `name` through `edit` (None drops the tensor) and fixes the index
/// so only the edit differs.
fn rewrite(
    dir: &Path,
    name: &str,
    edit: impl Fn(&str, PlannedTensor, Vec<u8>) -> Option<(PlannedTensor, Vec<u8>)>,
) {
    let file = file_of(dir, name);
    let buf = std::fs::read(dir.join(&file)).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let mut items = Vec::new();
    for key in SafeTensors::read_metadata(&buf).unwrap().1.offset_keys() {
        let v = st.tensor(&key).unwrap();
        let t = PlannedTensor { name: key.clone(), dtype: v.dtype(), shape: v.shape().to_vec() };
        if let Some(x) = edit(&key, t, v.data().to_vec()) {
            items.push(x);
        }
    }
    let mut idx = index(dir);
    let map = idx["weight_map"].as_object_mut().unwrap();
    map.retain(|_, f| f.as_str() != Some(&file));
    for (t, _) in &items {
        map.insert(t.name.clone(), file.clone().into());
    }
    std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).unwrap();
    let plan: Vec<PlannedTensor> = items.iter().map(|(t, _)| t.clone()).collect();
    let mut w = StWriter::create(&dir.join(&file), plan).unwrap();
    for (t, bytes) in &items {
        w.write(&t.name, bytes).unwrap();
    }
    w.finish().unwrap();
}

fn open_err(dir: &Path) -> String {
    let e = CheckpointReader::open(dir).expect_err("corrupt checkpoint opened");
    let text = e.to_string();
    assert!(!text.contains('\n'), "one line: {text}");
    text
}

#[test]
fn intact_checkpoints_open() {
    CheckpointReader::open(synth(SynthDtype::F32).path()).unwrap();
    CheckpointReader::open(synth(SynthDtype::Fp8).path()).unwrap();
}

#[test]
fn truncated_shard() {
    let dir = synth(SynthDtype::Bf16);
    let file = file_of(dir.path(), EXPERT);
    let p = dir.path().join(&file);
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 100).unwrap();
    let e = open_err(dir.path());
    assert!(e.contains(&file) && e.contains("truncated"), "{e}");
    // Truncated inside the header too.
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(5).unwrap();
    assert!(open_err(dir.path()).contains(&file));
}

#[test]
fn missing_tensor() {
    let dir = synth(SynthDtype::F32);
    rewrite(dir.path(), EXPERT, |n, t, b| (n != EXPERT).then_some((t, b)));
    let e = open_err(dir.path());
    assert!(e.contains(EXPERT) && e.contains("missing") && e.contains("index.json"), "{e}");
}

#[test]
fn wrong_shape() {
    let dir = synth(SynthDtype::F32);
    rewrite(dir.path(), EXPERT, |n, mut t, b| {
        if n == EXPERT {
            t.shape = vec![64, 32];
        }
        Some((t, b))
    });
    let e = open_err(dir.path());
    assert!(
        e.contains(EXPERT) && e.contains(&file_of(dir.path(), EXPERT)) && e.contains("[64, 32]"),
        "{e}"
    );
}

#[test]
fn wrong_dtype() {
    let dir = synth(SynthDtype::F32);
    rewrite(dir.path(), NORM, |n, mut t, b| {
        if n == NORM {
            t.dtype = Dtype::I32;
        }
        Some((t, b))
    });
    let e = open_err(dir.path());
    assert!(e.contains(NORM) && e.contains("I32"), "{e}");

    // F8 on a tensor DeepSeek never quantizes.
    let dir = synth(SynthDtype::F32);
    rewrite(dir.path(), NORM, |n, mut t, b| {
        if n == NORM {
            t.dtype = Dtype::F8_E4M3;
            return Some((t, b[..b.len() / 4].to_vec()));
        }
        Some((t, b))
    });
    let e = open_err(dir.path());
    assert!(e.contains(NORM) && e.contains("never quantized"), "{e}");
}

#[test]
fn fp8_weight_without_scale_and_scale_of_wrong_shape() {
    let dir = synth(SynthDtype::Fp8);
    let scale = format!("{EXPERT}_scale_inv");
    rewrite(dir.path(), EXPERT, |n, t, b| (n != scale).then_some((t, b)));
    let e = open_err(dir.path());
    assert!(e.contains(EXPERT) && e.contains("without"), "{e}");

    let dir = synth(SynthDtype::Fp8);
    rewrite(dir.path(), EXPERT, |n, mut t, b| {
        if n == scale {
            t.shape = vec![1];
        }
        Some((t, b))
    });
    let e = open_err(dir.path());
    assert!(e.contains(&scale) && e.contains("[1, 1]"), "{e}");
}

#[test]
fn nan_in_a_scale() {
    let dir = synth(SynthDtype::Fp8);
    let scale = format!("{EXPERT}_scale_inv");
    rewrite(dir.path(), EXPERT, |n, t, b| {
        if n == scale {
            return Some((t, f32::NAN.to_le_bytes().to_vec()));
        }
        Some((t, b))
    });
    let e = open_err(dir.path());
    assert!(
        e.contains(&scale) && e.contains(&file_of(dir.path(), EXPERT)) && e.contains("NaN"),
        "{e}"
    );
}

#[test]
fn index_naming_a_missing_file() {
    let dir = synth(SynthDtype::F32);
    let file = file_of(dir.path(), EXPERT);
    std::fs::remove_file(dir.path().join(&file)).unwrap();
    let e = open_err(dir.path());
    assert!(e.contains(&file) && e.contains("missing file"), "{e}");
}

#[test]
fn index_disagreeing_with_files() {
    let dir = synth(SynthDtype::F32);
    let mut idx = index(dir.path());
    let other = file_of(dir.path(), "lm_head.weight");
    assert_ne!(other, file_of(dir.path(), EXPERT));
    idx["weight_map"][EXPERT] = other.clone().into();
    std::fs::write(dir.path().join("model.safetensors.index.json"), idx.to_string()).unwrap();
    let e = open_err(dir.path());
    assert!(e.contains(EXPERT), "{e}");
}

#[test]
fn malformed_json() {
    let dir = synth(SynthDtype::F32);
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{\"weight_map\": {").unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("model.safetensors.index.json") && e.contains("malformed"), "{e}");

    let dir = synth(SynthDtype::F32);
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("config.json"), "{e}");

    // Valid JSON, invalid config.
    let dir = synth(SynthDtype::F32);
    let p = dir.path().join("config.json");
    let text = std::fs::read_to_string(&p).unwrap().replace("\"n_group\": 4", "\"n_group\": 3");
    std::fs::write(&p, text).unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("config.json") && e.contains("n_group"), "{e}");
}

#[test]
fn unexpected_tensor_and_empty_directory() {
    let dir = synth(SynthDtype::F32);
    // Add an extra tensor to a shard.
    let file = file_of(dir.path(), NORM);
    let extra = "model.layers.9.extra.weight";
    let buf = std::fs::read(dir.path().join(&file)).unwrap();
    let st = SafeTensors::deserialize(&buf).unwrap();
    let keys = SafeTensors::read_metadata(&buf).unwrap().1.offset_keys();
    let mut plan: Vec<PlannedTensor> = keys
        .iter()
        .map(|k| {
            let v = st.tensor(k).unwrap();
            PlannedTensor { name: k.clone(), dtype: v.dtype(), shape: v.shape().to_vec() }
        })
        .collect();
    plan.push(PlannedTensor { name: extra.into(), dtype: Dtype::F32, shape: vec![2] });
    let datas: Vec<Vec<u8>> = keys.iter().map(|k| st.tensor(k).unwrap().data().to_vec()).collect();
    let mut w = StWriter::create(&dir.path().join(&file), plan).unwrap();
    for (k, d) in keys.iter().zip(&datas) {
        w.write(k, d).unwrap();
    }
    w.write(extra, &[0; 8]).unwrap();
    w.finish().unwrap();
    let mut idx = index(dir.path());
    idx["weight_map"][extra] = file.clone().into();
    std::fs::write(dir.path().join("model.safetensors.index.json"), idx.to_string()).unwrap();
    let e = open_err(dir.path());
    assert!(e.contains(extra) && e.contains(&file), "{e}");

    let empty = tempfile::tempdir().unwrap();
    assert!(open_err(empty.path()).contains("config.json"));
    std::fs::copy(dir.path().join("config.json"), empty.path().join("config.json")).unwrap();
    assert!(open_err(empty.path()).contains("no model.safetensors"));
}

#[test]
fn mtp_layer_all_or_nothing() {
    // Without any layer-4 (MTP) tensor the checkpoint opens, as HF save_pretrained writes it.
    let dir = synth(SynthDtype::F32);
    let files: Vec<String> = {
        let mut f: Vec<String> = index(dir.path())["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().into())
            .collect();
        f.sort();
        f.dedup();
        f
    };
    rewrite(dir.path(), "model.layers.4.eh_proj.weight", |n, t, b| {
        (n != "model.layers.4.eh_proj.weight").then_some((t, b))
    });
    let e = open_err(dir.path());
    assert!(e.contains("model.layers.4.eh_proj.weight") && e.contains("MTP"), "{e}");
    for f in files {
        let first = index(dir.path())["weight_map"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(_, v)| v.as_str() == Some(&f))
            .map(|(k, _)| k.clone());
        if let Some(any) = first {
            rewrite(dir.path(), &any, |n, t, b| {
                (!n.starts_with("model.layers.4.")).then_some((t, b))
            });
        }
    }
    let r = CheckpointReader::open(dir.path()).unwrap();
    assert!(!r.has_mtp());
    assert!(r.specs().iter().all(|s| !s.name.starts_with("model.layers.4.")));
}
