//! Token embedding and LM head (both `[vocab, hidden]`, separate tensors in DeepSeek-V3.2).
//!
//! Today both hold the whole vocabulary. The parallel layout splits them by vocabulary rows
//! inside a TP group (embedding: masked lookup + all-reduce; head: local logits + gather/top-k),
//! which is why both keep their `vocab_start`.

use super::{ModelError, load};
use crate::weights::TensorSource;
use fathom_kernels::cpu::gemm::matmul_t;

/// `model.embed_tokens.weight` (or an MTP copy).
#[derive(Debug, Clone)]
pub struct Embedding {
    /// `[vocab, hidden]`
    weight: Vec<f32>,
    vocab: usize,
    hidden: usize,
}

impl Embedding {
    pub fn load(
        src: &dyn TensorSource,
        name: &str,
        vocab: usize,
        hidden: usize,
    ) -> Result<Self, ModelError> {
        Ok(Self { weight: load::exact(src, name, &[vocab, hidden])?, vocab, hidden })
    }

    /// `[tokens.len(), hidden]`. Ids were validated against the vocabulary by the caller.
    pub fn lookup(&self, tokens: &[u32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(tokens.len() * self.hidden);
        for &t in tokens {
            debug_assert!((t as usize) < self.vocab);
            out.extend_from_slice(
                &self.weight[t as usize * self.hidden..(t as usize + 1) * self.hidden],
            );
        }
        out
    }
}

/// `lm_head.weight` (or `shared_head.head.weight` of an MTP layer).
#[derive(Debug, Clone)]
pub struct LmHead {
    /// `[vocab, hidden]`
    weight: Vec<f32>,
    vocab: usize,
    hidden: usize,
}

impl LmHead {
    pub fn load(
        src: &dyn TensorSource,
        name: &str,
        vocab: usize,
        hidden: usize,
    ) -> Result<Self, ModelError> {
        Ok(Self { weight: load::exact(src, name, &[vocab, hidden])?, vocab, hidden })
    }

    /// `x` `[rows, hidden]` (already final-normed) → logits `[rows, vocab]`.
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        matmul_t(x, &self.weight, x.len() / self.hidden, self.vocab, self.hidden)
    }
}
