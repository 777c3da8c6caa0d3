//! Golden tests against HF transformers (fixtures from `scripts/golden/gen_golden.py`, read from
//! `<workspace>/tests/fixtures/golden/<case>/`).
//!
//! Metric for logits and hidden states: per row, `max|ours − hf| / max|hf| ≤ 1e-4`.
//! Checked per case: teacher-forced logits (all rows), per-layer hidden states when recorded,
//! the cached path (prefill the prompt, then one token at a time) against HF's full logits,
//! chunked prefill (chunks of 5) against one-shot, greedy ids identical for every generated step,
//! and the routed experts of every position in every MoE layer.

use fathom_common::ModelConfig;
use fathom_kernels::Tensor;
use fathom_worker::kv::BlockAllocator;
use fathom_worker::model::{ForwardOptions, LogitsMode, Model, SeqInput, ShardSpec};
use fathom_worker::weights::MemorySource;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden")
}

/// Every tensor of a safetensors file as f32 (F32, BF16, F16, I32, I64 accepted).
fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let d = v.data();
            let data: Vec<f32> = match v.dtype() {
                Dtype::F32 => {
                    d.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
                }
                Dtype::I32 => d
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f32)
                    .collect(),
                Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
                    .collect(),
                Dtype::BF16 => d
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::F16 => d
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                other => panic!("{name}: unsupported dtype {other:?} in a golden fixture"),
            };
            (name, Tensor::new(v.shape().to_vec(), data))
        })
        .collect()
}

struct Case {
    name: String,
    model: Model,
    expected: HashMap<String, Tensor>,
    golden: serde_json::Value,
}

fn cases() -> Vec<Case> {
    let root = fixtures();
    let Ok(dirs) = std::fs::read_dir(&root) else {
        eprintln!(
            "SKIP: no golden fixtures at {} (the golden branch provides them)",
            root.display()
        );
        return Vec::new();
    };
    let mut names: Vec<PathBuf> =
        dirs.map(|d| d.unwrap().path()).filter(|p| p.join("golden.json").exists()).collect();
    names.sort();
    assert!(!names.is_empty(), "golden fixture directory {} holds no case", root.display());
    names
        .into_iter()
        .map(|dir| {
            let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
            let mut src = MemorySource::new();
            for (k, v) in read_tensors(&dir.join("model.safetensors")) {
                src.insert(k, v);
            }
            let shard = ShardSpec::full(&cfg);
            let model = Model::load(&src, cfg, shard).unwrap();
            let golden: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                    .unwrap();
            Case {
                name: dir.file_name().unwrap().to_string_lossy().into(),
                model,
                expected: read_tensors(&dir.join("expected.safetensors")),
                golden,
            }
        })
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Largest per-row `max|a−b| / max|b|` over rows of width `w`.
fn rel_row_err(a: &[f32], b: &[f32], w: usize) -> f32 {
    assert_eq!(a.len(), b.len());
    a.chunks(w)
        .zip(b.chunks(w))
        .map(|(x, y)| {
            let d = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
            d / y.iter().map(|q| q.abs()).fold(0.0, f32::max).max(1e-30)
        })
        .fold(0.0, f32::max)
}

/// Runs `chunks` of `tokens` in order through one sequence, returning logits of every token.
fn run_chunks(model: &Model, tokens: &[u32], chunks: &[usize]) -> Vec<f32> {
    let mut cache = model.new_cache(4, 64).unwrap();
    let mut alloc = BlockAllocator::new(64);
    let mut table = Vec::new();
    let mut logits = Vec::new();
    let mut pos = 0;
    for &c in chunks {
        alloc.grow(&mut table, pos + c, 4).unwrap();
        let seq = SeqInput { tokens: &tokens[pos..pos + c], start_pos: pos, block_table: &table };
        let out = model
            .forward(
                &[seq],
                &mut cache,
                &ForwardOptions { logits: LogitsMode::All, ..Default::default() },
            )
            .unwrap();
        logits.extend(out.logits);
        pos += c;
    }
    assert_eq!(pos, tokens.len());
    logits
}

#[test]
fn golden_cases_match_hf() {
    for case in cases() {
        let m = &case.model;
        let v = m.config().vocab_size;
        let prompt = ids(&case.golden["prompt_ids"]);
        let greedy = ids(&case.golden["greedy_ids"]);
        let mut tf: Vec<u32> = prompt.clone();
        tf.extend_from_slice(&greedy[..greedy.len() - 1]);
        let want = case.expected["logits"].data();
        assert_eq!(want.len(), tf.len() * v, "{}: logits shape", case.name);

        // Teacher-forced, one shot, with hidden states and routing recorded.
        let mut cache = m.new_cache(4, 64).unwrap();
        let table: Vec<u32> = (0..64).collect();
        let seq = SeqInput { tokens: &tf, start_pos: 0, block_table: &table };
        let opts =
            ForwardOptions { logits: LogitsMode::All, record_hidden: true, record_routing: true };
        let out = m.forward(&[seq], &mut cache, &opts).unwrap();
        let err = rel_row_err(&out.logits, want, v);
        eprintln!("{}: teacher-forced logits rel err {err:.2e}", case.name);
        assert!(err <= TOL, "{}: teacher-forced logits rel err {err}", case.name);

        if let Some(hs) = case.expected.get("hidden_states_all") {
            let h = m.config().hidden_size;
            for (l, ours) in out.layer_hidden.iter().enumerate() {
                let theirs = &hs.data()[l * tf.len() * h..(l + 1) * tf.len() * h];
                let e = rel_row_err(ours, theirs, h);
                assert!(e <= TOL, "{}: hidden state {l} rel err {e}", case.name);
            }
        }

        for layer in case.golden["routing"].as_array().unwrap() {
            let li = layer["layer"].as_u64().unwrap() as usize;
            let moe_idx = li - m.config().first_k_dense_replace;
            for (t, want_ids) in layer["topk"].as_array().unwrap().iter().enumerate() {
                assert_eq!(
                    out.routed_experts[t][moe_idx],
                    ids(want_ids),
                    "{}: routing layer {li} position {t}",
                    case.name
                );
            }
        }

        // Cached: the prompt in one chunk, then one token at a time.
        let mut chunks = vec![prompt.len()];
        chunks.extend(std::iter::repeat_n(1, tf.len() - prompt.len()));
        let cached = run_chunks(m, &tf, &chunks);
        let err = rel_row_err(&cached, want, v);
        assert!(err <= TOL, "{}: cached logits rel err {err}", case.name);

        // Chunked (5 at a time) equals one-shot.
        let mut chunks = vec![5; tf.len() / 5];
        if tf.len() % 5 != 0 {
            chunks.push(tf.len() % 5);
        }
        let chunked = run_chunks(m, &tf, &chunks);
        let err = rel_row_err(&chunked, &out.logits, v);
        assert!(err <= 1e-5, "{}: chunked vs one-shot rel err {err}", case.name);

        // Greedy generation.
        let mut cache = m.new_cache(4, 64).unwrap();
        let mut tokens = prompt.clone();
        let mut generated = Vec::new();
        let mut pos = 0;
        while generated.len() < greedy.len() {
            let seq = SeqInput { tokens: &tokens[pos..], start_pos: pos, block_table: &table };
            let o = m.forward(&[seq], &mut cache, &ForwardOptions::default()).unwrap();
            pos = tokens.len();
            let next = o
                .logits
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                .0 as u32;
            generated.push(next);
            tokens.push(next);
        }
        assert_eq!(generated, greedy, "{}: greedy ids", case.name);
    }
}
