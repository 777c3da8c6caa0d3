//! Text for the coordinator: prompt text → ids and generated ids → text deltas, with the model
//! directory's `tokenizer.json`.
//!
//! Owns the engine's tokenizer handle: encode without special tokens added, whole decodes, and
//! per-sequence streaming decoders from the text layer (`crate::text::IncrementalDecoder`).

use std::path::Path;
use std::sync::Arc;

/// Errors loading or using the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("tokenizer {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("tokenizing the prompt: {0}")]
    Encode(String),
}

/// A loaded tokenizer. Cheap to clone.
#[derive(Clone)]
pub struct TextCodec {
    tok: Arc<tokenizers::Tokenizer>,
}

impl std::fmt::Debug for TextCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextCodec").field("vocab", &self.tok.get_vocab_size(true)).finish()
    }
}

impl TextCodec {
    /// Loads `dir/tokenizer.json`; `Ok(None)` when the file does not exist.
    pub fn load_dir(dir: &Path) -> Result<Option<Self>, TextError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let tok = tokenizers::Tokenizer::from_file(&path).map_err(|e| TextError::Load {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Some(Self { tok: Arc::new(tok) }))
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        let enc = self.tok.encode(text, false).map_err(|e| TextError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// A streaming decoder of one sequence's generated ids (`text::IncrementalDecoder`: never a
    /// broken UTF-8 character in a delta).
    pub fn decoder(&self, mode: crate::text::SpecialTokenMode) -> crate::text::IncrementalDecoder {
        crate::text::IncrementalDecoder::new(self.tok.clone(), mode)
    }

    /// The loaded tokenizer (the chat format reads its special tokens from it).
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tok
    }

    /// Decodes `ids` (special tokens kept as text).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tok.decode(ids, false).unwrap_or_default()
    }
}
