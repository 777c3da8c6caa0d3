//! The DeepSeek-V3.2 special tokens, as the model's `tokenizer.json` defines them.
//!
//! The strings are fixed by the chat format; their ids are not (the spec could not verify the ids
//! of `<think>`/`</think>`), so they are looked up among the tokenizer's added tokens and a
//! missing one is an error naming it. Invariant: every field of [`SpecialTokens`] names an added
//! token that exists in the tokenizer it was read from. Whether a token is flagged `special`
//! (skipped by `skip_special_tokens` decoding) is recorded, not required.

use tokenizers::Tokenizer;

use super::TextError;

/// `<｜begin▁of▁sentence｜>`: BOS (id 0 in DeepSeek-V3.2).
pub const BOS: &str = "<｜begin▁of▁sentence｜>";
/// `<｜end▁of▁sentence｜>`: EOS, ends every assistant turn (id 1).
pub const EOS: &str = "<｜end▁of▁sentence｜>";
/// `<｜User｜>`: opens a user turn.
pub const USER: &str = "<｜User｜>";
/// `<｜Assistant｜>`: closes a user turn and opens the assistant's.
pub const ASSISTANT: &str = "<｜Assistant｜>";
/// `<think>`: opens reasoning (thinking mode, last user turn).
pub const THINK_START: &str = "<think>";
/// `</think>`: closes reasoning; alone after `<｜Assistant｜>` it means "no reasoning".
pub const THINK_END: &str = "</think>";

/// One added token: its text and its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub content: String,
    pub id: u32,
    /// The tokenizer's `special` flag (decoding with [`super::SpecialTokenMode::Skip`] drops
    /// exactly the tokens with this flag set).
    pub special: bool,
}

/// The special tokens the chat format uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: SpecialToken,
    pub eos: SpecialToken,
    pub user: SpecialToken,
    pub assistant: SpecialToken,
    pub think_start: SpecialToken,
    pub think_end: SpecialToken,
}

impl SpecialTokens {
    /// Reads the tokens from the tokenizer's added vocabulary (`added_tokens` of `tokenizer.json`).
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Self, TextError> {
        let added = tokenizer.get_added_tokens_decoder();
        let find = |content: &'static str| -> Result<SpecialToken, TextError> {
            added
                .iter()
                .filter(|(_, token)| token.content == content)
                .map(|(&id, token)| SpecialToken {
                    content: content.to_string(),
                    id,
                    special: token.special,
                })
                // Lowest id if a token were listed twice: deterministic.
                .min_by_key(|token| token.id)
                .ok_or(TextError::MissingSpecialToken { token: content })
        };
        Ok(Self {
            bos: find(BOS)?,
            eos: find(EOS)?,
            user: find(USER)?,
            assistant: find(ASSISTANT)?,
            think_start: find(THINK_START)?,
            think_end: find(THINK_END)?,
        })
    }
}
