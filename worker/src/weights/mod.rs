//! Weights: reading HF DeepSeek-V3.2 checkpoints and handing tensors to the model.
//!
//! The model never sees files: it asks a [`TensorSource`] for tensors by their HF name and gets
//! f32 host tensors (FP8 blocks dequantized with `weight_scale_inv`, BF16/F16 widened). Asking
//! for a slice along one dimension is how a rank loads only its shard (its heads, its experts'
//! rows); a reader backed by mmap touches only the bytes of that slice where the dtype allows.
//!
//! Submodules: [`reader`] (HF safetensors checkpoints, mmap, validation against the tensor list
//! of `fathom_common::tensors`), [`synth`] (deterministic synthetic checkpoints in the same
//! format), [`tokenizer`] (the byte-level test tokenizer written beside them), [`inspect`]
//! (parameter/byte summaries), [`fp8`] (e4m3 + ue8m0 block scales), [`rng`] and [`st_write`]
//! (streaming safetensors writer).

use fathom_kernels::Tensor;
use std::collections::HashMap;

pub mod fp8;
pub mod inspect;
pub mod reader;
pub mod rng;
pub mod st_write;
pub mod synth;
pub mod tokenizer;

pub use reader::CheckpointReader;
pub use synth::{SynthDtype, SynthOptions, synth_checkpoint};

/// Why a tensor could not be provided. Every variant names the tensor (and file when known).
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("tensor {name} is missing from the checkpoint")]
    Missing { name: String },
    #[error("tensor {name}: {reason}")]
    Invalid { name: String, reason: String },
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("tensor {name} in {file}: {reason}")]
    Tensor { name: String, file: String, reason: String },
    #[error("{file}: {source}")]
    Io { file: String, source: std::io::Error },
    #[error("{file}: {source}")]
    Config { file: String, source: fathom_common::ConfigError },
}

/// A source of named f32 tensors.
pub trait TensorSource: Send + Sync {
    /// The whole tensor `name`, as f32.
    fn load(&self, name: &str) -> Result<Tensor, WeightsError>;

    /// The slice `[start, end)` of dimension `dim` of tensor `name` (other dims whole), as f32.
    fn load_slice(
        &self,
        name: &str,
        dim: usize,
        start: usize,
        end: usize,
    ) -> Result<Tensor, WeightsError>;

    /// Whether the checkpoint has tensor `name`.
    fn contains(&self, name: &str) -> bool;
}

/// Tensors held in memory: for tests and for weights built in code.
#[derive(Debug, Default, Clone)]
pub struct MemorySource {
    tensors: HashMap<String, Tensor>,
}

impl MemorySource {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }
}

/// Copies `[start, end)` of dimension `dim` out of `t`.
pub fn slice_dim(t: &Tensor, dim: usize, start: usize, end: usize) -> Tensor {
    let shape = t.shape();
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let n = shape[dim];
    let mut data = Vec::with_capacity(outer * (end - start) * inner);
    for o in 0..outer {
        let base = o * n * inner;
        data.extend_from_slice(&t.data()[base + start * inner..base + end * inner]);
    }
    let mut new_shape = shape.to_vec();
    new_shape[dim] = end - start;
    Tensor::new(new_shape, data)
}

impl TensorSource for MemorySource {
    fn load(&self, name: &str) -> Result<Tensor, WeightsError> {
        self.tensors.get(name).cloned().ok_or_else(|| WeightsError::Missing { name: name.into() })
    }

    fn load_slice(
        &self,
        name: &str,
        dim: usize,
        start: usize,
        end: usize,
    ) -> Result<Tensor, WeightsError> {
        let t = self.load(name)?;
        if dim >= t.shape().len() || start > end || end > t.shape()[dim] {
            return Err(WeightsError::Invalid {
                name: name.into(),
                reason: format!(
                    "slice [{start}, {end}) of dim {dim} is outside shape {:?}",
                    t.shape()
                ),
            });
        }
        Ok(slice_dim(&t, dim, start, end))
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
