//! Checkpoints written by HF transformers' `save_pretrained` (F32, one `model.safetensors`, no
//! index, per-expert names, a transformers-v5 config with `rope_parameters`) load through the
//! real mmap `CheckpointReader`, and the model built from them equals the model built from the
//! same tensors read with the `safetensors` crate directly. Fixtures: `tests/fixtures/golden`
//! (generator `scripts/golden/gen_golden.py`).

use fathom_kernels::Tensor;
use fathom_worker::model::{ForwardOptions, LogitsMode, Model, SeqInput, ShardSpec};
use fathom_worker::weights::reader::CheckpointReader;
use fathom_worker::weights::{MemorySource, TensorSource};
use std::path::PathBuf;

fn golden_dirs() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("golden fixtures missing at {}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("model.safetensors").exists())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 3, "expected >= 3 golden cases in {}", root.display());
    dirs
}

/// Every tensor of the file, read with the safetensors crate (F32 only, as HF saved them).
fn direct_source(dir: &std::path::Path) -> MemorySource {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut src = MemorySource::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        src.insert(name, Tensor::new(view.shape().to_vec(), data));
    }
    src
}

fn direct_source_len(dir: &std::path::Path) -> usize {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    safetensors::SafeTensors::deserialize(&bytes).unwrap().len()
}

#[test]
fn save_pretrained_checkpoints_open_and_equal_a_direct_read() {
    for dir in golden_dirs() {
        let reader =
            CheckpointReader::open(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let cfg = reader.config().clone();
        assert!(
            cfg.rope_parameters.is_some(),
            "{}: expected a transformers-v5 config",
            dir.display()
        );
        assert!(!reader.has_mtp(), "save_pretrained writes no MTP layer");
        let direct = direct_source(&dir);
        // Same tensors, bit for bit.
        let mut compared = 0;
        for spec in reader.specs() {
            if !reader.contains(&spec.name) {
                continue;
            }
            compared += 1;
            let a = reader.load(&spec.name).unwrap();
            let b = direct.load(&spec.name).unwrap();
            assert_eq!(a, b, "{}: {}", dir.display(), spec.name);
        }
        assert_eq!(compared, direct_source_len(&dir), "{}: every stored tensor", dir.display());
        // And the same model output.
        let shard = ShardSpec { load_mtp: false, ..ShardSpec::full(&cfg) };
        let m1 = Model::load(&reader, cfg.clone(), shard.clone()).unwrap();
        let m2 = Model::load(&direct, cfg.clone(), shard).unwrap();
        let tokens: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % cfg.vocab_size as u32).collect();
        let opts = ForwardOptions { logits: LogitsMode::All, ..Default::default() };
        let run = |m: &Model| {
            let mut cache = m.new_cache(16, 1).unwrap();
            let seq = SeqInput { tokens: &tokens, start_pos: 0, block_table: &[0] };
            m.forward(&[seq], &mut cache, &opts).unwrap().logits
        };
        assert_eq!(run(&m1), run(&m2), "{}", dir.display());
    }
}
