//! Incremental detokenisation: token ids in, one at a time; text deltas out.
//!
//! Byte-level BPE tokens can end in the middle of a UTF-8 character; decoding such a prefix gives
//! U+FFFD where the incomplete bytes are. [`IncrementalDecoder`] never emits that: it decodes a
//! short window of recent tokens twice — up to the last emitted position, and up to the newest
//! token — and emits the difference only when the longer decode does not end in U+FFFD. Otherwise
//! it holds the tokens back until a later token completes the character (or [`finish`] flushes
//! them, when the sequence really ends mid-character).
//!
//! Invariants: every emitted delta is the suffix of a decode that does not end in an incomplete
//! character; the concatenation of all deltas plus [`finish`] equals `tokenizer.decode(all ids)`
//! for decoders that decode a window independently of what precedes it (byte-level BPE: DeepSeek's
//! tokenizer; also Metaspace, since each window starts at an already-emitted token). A decoder
//! whose window output is not an extension of its shorter window is reported as
//! [`TextError::UnstableDecode`] rather than emitting wrong text. Unknown ids are an error, not
//! silently dropped (the `tokenizers` crate itself would drop them).
//!
//! [`finish`]: IncrementalDecoder::finish

use std::sync::Arc;

use tokenizers::Tokenizer;

use super::TextError;

/// What decoding does with added tokens flagged `special` (e.g. `<｜end▁of▁sentence｜>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpecialTokenMode {
    /// Special tokens produce no text (OpenAI-style output).
    #[default]
    Skip,
    /// Special tokens appear as their content string.
    Keep,
}

/// Streams text deltas for one sequence of generated token ids.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the decode window: a position where the text so far ends on a full character.
    prefix: usize,
    /// Ids before this position have been emitted as text.
    read: usize,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: Arc<Tokenizer>, mode: SpecialTokenMode) -> Self {
        Self {
            tokenizer,
            skip_special: mode == SpecialTokenMode::Skip,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Feeds one token id; returns the text it completes (often empty while a character is split
    /// across tokens). An id outside the vocabulary is rejected and leaves the state unchanged.
    pub fn step(&mut self, id: u32) -> Result<String, TextError> {
        if self.tokenizer.id_to_token(id).is_none() {
            return Err(TextError::UnknownTokenId { id });
        }
        self.ids.push(id);
        let (before, after) = self.window()?;
        if after.len() <= before.len() || after.ends_with('\u{FFFD}') {
            // Nothing new yet, or the window ends inside a character: hold the tokens back.
            return Ok(String::new());
        }
        let delta = self.delta(&before, &after)?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(delta)
    }

    /// Ends the sequence: returns the text of held-back tokens (which then contains U+FFFD where
    /// the sequence ends mid-character, exactly as the full decode does).
    pub fn finish(&mut self) -> Result<String, TextError> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let (before, after) = self.window()?;
        let delta =
            if after.len() > before.len() { self.delta(&before, &after)? } else { "".into() };
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(delta)
    }

    /// All ids fed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Ids fed but not yet emitted as text.
    pub fn pending(&self) -> usize {
        self.ids.len() - self.read
    }

    /// Decodes `ids[prefix..read]` and `ids[prefix..]`.
    fn window(&self) -> Result<(String, String), TextError> {
        let before = self.decode(&self.ids[self.prefix..self.read])?;
        let after = self.decode(&self.ids[self.prefix..])?;
        Ok((before, after))
    }

    fn delta(&self, before: &str, after: &str) -> Result<String, TextError> {
        after.strip_prefix(before).map(str::to_string).ok_or_else(|| TextError::UnstableDecode {
            position: self.ids.len() - 1,
            before: before.to_string(),
            after: after.to_string(),
        })
    }

    fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
        self.tokenizer
            .decode(ids, self.skip_special)
            .map_err(|e| TextError::Tokenizer { op: "decode", reason: e.to_string() })
    }
}
