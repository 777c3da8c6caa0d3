//! The text layer of the coordinator: everything between user-visible text and token ids.
//!
//! Owns:
//! - [`special`]: the DeepSeek-V3.2 special tokens, read from the model's `tokenizer.json`;
//! - [`chat`]: the DeepSeek-V3.2 chat format (messages → prompt text), following the rules of
//!   DeepSeek's `encoding/encoding_dsv32.py` (re-implemented, not copied);
//! - [`completion`]: the inverse (generated text → `reasoning_content`, `content`, tool calls),
//!   whole or streamed;
//! - [`dsml`]: the "｜DSML｜" tool-call markup;
//! - [`json`]: order-keeping JSON written as Python's `json.dumps` writes it;
//! - [`detok`]: incremental detokenisation (token ids → text deltas that are never a broken
//!   character);
//! - [`stop`]: text stop sequences that may span deltas.
//!
//! Does not own: the OpenAI-compatible HTTP layer (it converts its JSON into [`chat::ChatRequest`]),
//! sampling, or scheduling. Nothing here reads the environment or holds global state; the only
//! file access is [`load_tokenizer`].
//!
//! Known limitation: [`encode_prompt`] matches added-token strings anywhere in the prompt, so a
//! user who types `<｜Assistant｜>` gets that token (DeepSeek's reference encodes the same way).

pub mod chat;
pub mod completion;
pub mod detok;
pub mod dsml;
pub mod json;
pub mod special;
pub mod stop;

use std::path::Path;

pub use chat::{ChatMessage, ChatRequest, ChatTemplate, FunctionCall, ToolCall};
pub use completion::{ParsedCompletion, ReasoningDelta, ReasoningSplitter};
pub use detok::{IncrementalDecoder, SpecialTokenMode};
pub use json::OrderedJson;
pub use special::{SpecialToken, SpecialTokens};
pub use stop::{StopEvent, StopMatcher};
pub use tokenizers::Tokenizer;

/// Errors of the text layer. Every variant names what was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TextError {
    #[error("cannot load tokenizer {path}: {reason}")]
    TokenizerLoad { path: String, reason: String },
    #[error("tokenizer has no added token {token:?} (tokenizer.json `added_tokens`)")]
    MissingSpecialToken { token: &'static str },
    #[error("tokenizer failed to {op}: {reason}")]
    Tokenizer { op: &'static str, reason: String },
    #[error("token id {id} is not in the tokenizer's vocabulary")]
    UnknownTokenId { id: u32 },
    #[error(
        "decoder output is not prefix-stable at token {position}: {before:?} is not a prefix of \
         {after:?}"
    )]
    UnstableDecode { position: usize, before: String, after: String },
    #[error("chat request has no messages")]
    EmptyMessages,
    #[error("message {index}: unknown role {role:?} (expected system, user, assistant or tool)")]
    UnknownRole { index: usize, role: String },
    #[error("message {index} ({role}) has no content")]
    MissingContent { index: usize, role: &'static str },
    #[error("message {index} ({role}) carries tool_calls; only assistant messages may")]
    ToolCallsOnNonAssistant { index: usize, role: &'static str },
    #[error("message {index} (tool) does not answer a tool call of a preceding assistant message")]
    ToolWithoutCall { index: usize },
    #[error(
        "assistant message {index} made {calls} tool call(s) but {results} tool message(s) follow it"
    )]
    ToolResultCount { index: usize, calls: usize, results: usize },
    #[error("message {index}: tool call {name:?} has invalid arguments: {reason}")]
    ToolCallArguments { index: usize, name: String, reason: String },
    #[error("tools[{index}] is not an OpenAI tool object with a `function` field")]
    InvalidTool { index: usize },
    #[error(
        "message {index} (assistant) follows the last user message in thinking mode and has \
         neither reasoning_content nor tool_calls"
    )]
    MissingReasoning { index: usize },
    #[error(
        "the last message is {role}; a prompt must end with a user message or with the tool \
         results of the last assistant message"
    )]
    NotAwaitingAssistant { role: &'static str },
    #[error("malformed DSML tool call in completion: {reason}")]
    MalformedToolCall { reason: String },
    #[error("stop sequence {index} is empty")]
    EmptyStop { index: usize },
    #[error("text fed to a stop matcher after it already stopped")]
    FedAfterStop,
}

/// Loads a `tokenizer.json` (HF `tokenizers` format).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, TextError> {
    Tokenizer::from_file(path).map_err(|e| TextError::TokenizerLoad {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Encodes a rendered prompt into token ids. No special tokens are added: the chat format writes
/// BOS itself, and special-token strings inside the text are matched as the added tokens they are.
pub fn encode_prompt(tokenizer: &Tokenizer, prompt: &str) -> Result<Vec<u32>, TextError> {
    let encoding = tokenizer
        .encode(prompt, false)
        .map_err(|e| TextError::Tokenizer { op: "encode", reason: e.to_string() })?;
    Ok(encoding.get_ids().to_vec())
}
