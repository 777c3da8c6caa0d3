//! Shared by the `parallel_*` tests: golden fixtures as `MemorySource`s, the one-rank reference
//! generation (plain `Model`, one sequence at a time), and the relative row error.

#![allow(dead_code)]

use fathom_common::ModelConfig;
use fathom_kernels::Tensor;
use fathom_worker::kv::{BlockAllocator, blocks_for};
use fathom_worker::model::{ForwardOptions, LogitsMode, Model, SeqInput, ShardSpec};
use fathom_worker::parallel::GenerateOutput;
use fathom_worker::weights::MemorySource;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

pub struct GoldenCase {
    pub name: String,
    pub cfg: ModelConfig,
    pub src: MemorySource,
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden")
}

/// Every tensor of a safetensors file as f32 (F32, BF16, F16).
pub fn read_source(path: &Path) -> MemorySource {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut src = MemorySource::new();
    for (name, v) in st.tensors() {
        let d = v.data();
        let data: Vec<f32> = match v.dtype() {
            Dtype::F32 => {
                d.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
            }
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => {
                d.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            other => panic!("{name}: unsupported dtype {other:?} in a golden model"),
        };
        src.insert(name, Tensor::new(v.shape().to_vec(), data));
    }
    src
}

/// All golden cases (fails loudly if the fixtures are missing: they are committed on main).
pub fn golden_cases() -> Vec<GoldenCase> {
    let root = fixtures();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("golden fixtures at {}: {e}", root.display()))
        .map(|d| d.unwrap().path())
        .filter(|p| p.join("model.safetensors").exists())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no golden case under {}", root.display());
    dirs.into_iter()
        .map(|dir| GoldenCase {
            name: dir.file_name().unwrap().to_string_lossy().into(),
            cfg: ModelConfig::from_file(&dir.join("config.json")).unwrap(),
            src: read_source(&dir.join("model.safetensors")),
        })
        .collect()
}

/// One golden case by name.
pub fn golden_case(name: &str) -> GoldenCase {
    golden_cases().into_iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no case {name}"))
}

/// Greedy generation of one sequence with the one-rank model (prefill, then one token a step).
pub fn reference_generate(
    cfg: &ModelConfig,
    src: &MemorySource,
    prompt: &[u32],
    new_tokens: usize,
) -> GenerateOutput {
    let model = Model::load(src, cfg.clone(), ShardSpec::full(cfg)).unwrap();
    let bs = 4;
    let nb = blocks_for(prompt.len() + new_tokens, bs);
    let mut cache = model.new_cache(bs, nb).unwrap();
    let table = BlockAllocator::new(nb).alloc(nb).unwrap();
    let opts = ForwardOptions { logits: LogitsMode::LastPerSeq, ..Default::default() };
    let mut out = GenerateOutput {
        generated: vec![Vec::new()],
        logits: vec![Vec::new()],
        stopped: vec![false],
        routed_experts: vec![Vec::new()],
        step_s: Vec::new(),
        ..Default::default()
    };
    let (mut tokens, mut pos) = (prompt.to_vec(), 0);
    for _ in 0..new_tokens {
        let seq = SeqInput { tokens: &tokens, start_pos: pos, block_table: &table };
        let f = model.forward(&[seq], &mut cache, &opts).unwrap();
        let tok = argmax(&f.logits);
        out.generated[0].push(tok);
        out.logits[0].push(f.logits);
        pos += tokens.len();
        tokens = vec![tok];
    }
    out
}

/// Index of the largest value (lowest index on ties), as the greedy sampler.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Largest per-row `max|a−b| / max|b|` over rows of width `w`.
pub fn rel_row_err(a: &[f32], b: &[f32], w: usize) -> f32 {
    assert_eq!(a.len(), b.len());
    a.chunks(w)
        .zip(b.chunks(w))
        .map(|(x, y)| {
            let d = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
            d / y.iter().map(|q| q.abs()).fold(0.0, f32::max).max(1e-30)
        })
        .fold(0.0, f32::max)
}
