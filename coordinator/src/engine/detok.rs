//! Text for the coordinator: prompt text → ids and generated ids → text deltas, with the model
//! directory's `tokenizer.json`.
//!
//! Owns only what the engine needs (encode without special tokens added; an incremental decoder
//! that never emits a broken UTF-8 character: a delta is held back while the decoded text ends
//! in U+FFFD). The richer text layer (`text/`: chat template, stop strings) plugs in here later.

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

    /// Decodes `ids` (special tokens kept as text).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tok.decode(ids, false).unwrap_or_default()
    }
}

/// Incremental decoder of one sequence's generated ids. Decodes only a short window per push
/// (the ids since the last emitted boundary), so a token costs O(window), not O(sequence).
#[derive(Debug, Default)]
pub struct Detok {
    ids: Vec<u32>,
    /// Start of the window re-decoded for context (merges across token boundaries).
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
}

impl Detok {
    /// Adds the last ids of the sequence and returns all text not yet emitted, incomplete
    /// characters included (rendered as U+FFFD, as a whole-sequence decode would).
    pub fn finish(&mut self, codec: &TextCodec, new: &[u32]) -> String {
        self.ids.extend_from_slice(new);
        let prev = codec.decode(&self.ids[self.prefix..self.read]);
        let text = codec.decode(&self.ids[self.prefix..]);
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        text.get(prev.len()..).unwrap_or_default().to_string()
    }

    /// Adds `new` ids and returns the new complete text (possibly empty).
    pub fn push(&mut self, codec: &TextCodec, new: &[u32]) -> String {
        self.ids.extend_from_slice(new);
        let prev = codec.decode(&self.ids[self.prefix..self.read]);
        let text = codec.decode(&self.ids[self.prefix..]);
        if text.len() <= prev.len() || text.ends_with('\u{FFFD}') {
            return String::new();
        }
        let Some(delta) = text.get(prev.len()..).map(str::to_string) else {
            return String::new();
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        delta
    }
}
