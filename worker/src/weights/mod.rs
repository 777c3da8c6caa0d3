//! Weights: reading HF DeepSeek-V3.2 checkpoints and handing tensors to the model.
//!
//! The model never sees files: it asks a [`TensorSource`] for tensors by their HF name and gets
//! f32 host tensors (FP8 blocks dequantized with `weight_scale_inv`, BF16/F16 widened). Asking
//! for a slice along one dimension is how a rank loads only its shard (its heads, its experts'
//! rows); a reader backed by mmap touches only the bytes of that slice where the dtype allows.

use fathom_kernels::Tensor;
use std::collections::HashMap;

/// Why a tensor could not be provided. Every variant names the tensor (and file when known).
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("tensor {name} is missing from the checkpoint")]
    Missing { name: String },
    #[error("tensor {name}: {reason}")]
    Invalid { name: String, reason: String },
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
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
