//! The inverse of the chat format: generated text → `reasoning_content`, `content`, tool calls.
//!
//! Rules (DeepSeek's `parse_message_from_completion_text`, re-implemented): when the prompt opened
//! thinking (it ended in `<think>`), the text before the first `</think>` is reasoning and the rest
//! is the answer; otherwise all of it is the answer. The answer ends at `<｜end▁of▁sentence｜>` if
//! that text is present (when decoding kept special tokens); tool calls start at
//! `\n\n<｜DSML｜function_calls` and nothing but the end of text may follow their block.
//!
//! Deliberate leniency: a thinking completion that never closes reasoning (cut by `max_tokens`)
//! is all reasoning with empty content, not an error. [`ReasoningSplitter`] does the reasoning
//! split on a stream of deltas (withholding a possibly-partial `</think>`); it does not parse tool
//! calls (the streamed content still contains their markup).
//!
//! Note for decoding: if `</think>` is flagged `special` in a tokenizer, decode with
//! [`super::SpecialTokenMode::Keep`], or the marker disappears before it can be split on.

use super::TextError;
use super::chat::{ChatTemplate, FunctionCall, ToolCall};
use super::dsml::{parse_tool_calls, tool_calls_start};
use super::stop::{StopEvent, StopMatcher};

/// A completion split into its parts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedCompletion {
    /// `Some` exactly when the prompt opened thinking.
    pub reasoning_content: Option<String>,
    pub content: String,
    /// Tool calls (`id` left `None`: the API layer assigns ids).
    pub tool_calls: Vec<ToolCall>,
}

impl ChatTemplate {
    /// Splits a whole completion. `thinking` says whether the prompt opened thinking (the
    /// [`super::ChatRequest::thinking`] it was rendered with). Malformed tool-call markup is an
    /// error (the caller may then return the raw text as content).
    pub fn parse_completion(
        &self,
        text: &str,
        thinking: bool,
    ) -> Result<ParsedCompletion, TextError> {
        let eos = self.tokens.eos.content.as_str();
        let until_eos = |s: &str| s.find(eos).unwrap_or(s.len());
        let mut parsed = ParsedCompletion::default();
        let mut answer = text;
        if thinking {
            match text.find(self.tokens.think_end.content.as_str()) {
                Some(p) => {
                    parsed.reasoning_content = Some(text[..p].to_string());
                    answer = &text[p + self.tokens.think_end.content.len()..];
                }
                None => {
                    parsed.reasoning_content = Some(text[..until_eos(text)].to_string());
                    return Ok(parsed);
                }
            }
        }
        let answer = &answer[..until_eos(answer)];
        let start = tool_calls_start();
        match answer.find(start.as_str()) {
            None => parsed.content = answer.to_string(),
            Some(p) => {
                parsed.content = answer[..p].to_string();
                let (calls, rest) = parse_tool_calls(&answer[p + start.len()..])?;
                if !rest.is_empty() {
                    let seen: String = rest.chars().take(40).collect();
                    return Err(TextError::MalformedToolCall {
                        reason: format!("text after the tool calls: {seen:?}"),
                    });
                }
                parsed.tool_calls = calls
                    .into_iter()
                    .map(|c| ToolCall {
                        id: None,
                        function: FunctionCall { name: c.name, arguments: c.arguments },
                    })
                    .collect();
            }
        }
        Ok(parsed)
    }

    /// A streaming splitter for a completion of a prompt rendered with `thinking`.
    pub fn reasoning_splitter(&self, thinking: bool) -> ReasoningSplitter {
        ReasoningSplitter::new(&self.tokens.think_end.content, thinking)
    }
}

/// Text of one delta, routed to reasoning or content.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReasoningDelta {
    pub reasoning: String,
    pub content: String,
}

/// Splits streamed text into reasoning and content at the first `</think>`.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    /// `Some` while in reasoning: watches for the end marker.
    marker: Option<StopMatcher>,
}

impl ReasoningSplitter {
    /// `think_end` is the end-of-reasoning marker; with `thinking` false everything is content.
    pub fn new(think_end: &str, thinking: bool) -> Self {
        let marker = (thinking && !think_end.is_empty())
            .then(|| StopMatcher::new([think_end]).expect("marker is not empty"));
        Self { marker }
    }

    /// Feeds one delta.
    pub fn push(&mut self, delta: &str) -> ReasoningDelta {
        let Some(marker) = self.marker.as_mut() else {
            return ReasoningDelta { reasoning: String::new(), content: delta.to_string() };
        };
        match marker.push(delta) {
            Ok(StopEvent::Text(reasoning)) => ReasoningDelta { reasoning, content: String::new() },
            Ok(StopEvent::Stopped { text, after, .. }) => {
                self.marker = None;
                ReasoningDelta { reasoning: text, content: after }
            }
            // The matcher is dropped as soon as it stops, so it is never fed after a stop.
            Err(_) => unreachable!("reasoning marker fed after it matched"),
        }
    }

    /// Ends the stream: withheld text (a partial marker) is reasoning.
    pub fn finish(&mut self) -> ReasoningDelta {
        let reasoning = self.marker.as_mut().map(StopMatcher::finish).unwrap_or_default();
        ReasoningDelta { reasoning, content: String::new() }
    }

    /// Whether the splitter is still in the reasoning part.
    pub fn in_reasoning(&self) -> bool {
        self.marker.is_some()
    }
}
