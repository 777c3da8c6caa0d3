//! DeepSeek-V3.2 chat format: a list of messages → the prompt text the model continues.
//!
//! Re-implements the rules of DeepSeek's `encoding/encoding_dsv32.py` (read, not copied):
//! - the prompt opens with BOS; a system message contributes its text, nothing around it;
//! - a user turn is `<｜User｜>{content}<｜Assistant｜>` followed by `<think>` when it is the last
//!   user turn and thinking is on, `</think>` otherwise;
//! - an assistant turn is `{content}{tool_calls}<｜end▁of▁sentence｜>`; in thinking mode an
//!   assistant turn *after* the last user turn (the tool loop of the current answer) is preceded by
//!   `{reasoning_content}</think>`, and must have reasoning or tool calls. Reasoning of turns before
//!   the last user turn is always dropped (the `</think>` after their user turn says "no
//!   reasoning"), and in chat mode reasoning is never rendered;
//! - tool calls are DSML markup ([`super::dsml`]); the tool messages answering them (one per call,
//!   in order) render as `\n\n<function_results>`, `\n<result>{content}</result>` each,
//!   `\n</function_results>`, then `\n\n<think>` (thinking mode) or `\n\n</think>`;
//! - tools (OpenAI `tools` of the request) render as the format's tools section, appended as
//!   `\n\n{tools}` to the first message when it is a system message, otherwise as a leading system
//!   message of its own (the Python attaches tools to a system message; the placement for requests
//!   without one is our choice).
//!
//! Invariants of a rendered prompt: it ends waiting for the assistant (`<think>` or `</think>`),
//! so the last message is a user message or the last tool result of an assistant's calls; every
//! assistant tool call has exactly one tool message answering it. Not supported (rejected as an
//! unknown role): DeepSeek's `developer` role. `response_format` is not rendered.

use super::TextError;
use super::dsml::{DsmlCall, render_tool_calls, render_tools};
use super::json::OrderedJson;
use super::special::SpecialTokens;
use serde::{Deserialize, Serialize};

/// One message, in the shape of OpenAI's chat API (extra fields are ignored by deserialisation).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`; anything else is rejected when rendering.
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// The assistant's reasoning (DeepSeek API field name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// Which call a tool message answers. Not rendered: the format pairs results with calls by
    /// order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// An assistant's tool call (OpenAI shape: `{"id", "type": "function", "function": {...}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub function: FunctionCall,
}

/// `name` and `arguments` (a JSON object, as text, as OpenAI sends it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

impl ChatMessage {
    fn with(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: Some(content.to_string()), ..Self::default() }
    }
    pub fn system(content: &str) -> Self {
        Self::with("system", content)
    }
    pub fn user(content: &str) -> Self {
        Self::with("user", content)
    }
    pub fn assistant(content: &str) -> Self {
        Self::with("assistant", content)
    }
    /// An assistant message with its reasoning.
    pub fn assistant_reasoning(reasoning: &str, content: &str) -> Self {
        Self { reasoning_content: Some(reasoning.to_string()), ..Self::with("assistant", content) }
    }
    /// An assistant message making tool calls (`(name, arguments JSON)` pairs), without content.
    pub fn assistant_tool_calls(calls: &[(&str, &str)]) -> Self {
        let calls = calls
            .iter()
            .map(|(name, arguments)| ToolCall {
                id: None,
                function: FunctionCall { name: name.to_string(), arguments: arguments.to_string() },
            })
            .collect();
        Self { role: "assistant".to_string(), tool_calls: Some(calls), ..Self::default() }
    }
    pub fn tool(content: &str) -> Self {
        Self::with("tool", content)
    }

    fn calls(&self) -> &[ToolCall] {
        self.tool_calls.as_deref().unwrap_or(&[])
    }
}

/// What to render: the conversation, the tools offered (OpenAI `tools` array entries,
/// `{"type": "function", "function": {...}}`, key order kept) and whether the answer opens with
/// reasoning.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub tools: Vec<OrderedJson>,
    #[serde(default)]
    pub thinking: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    fn parse(index: usize, role: &str) -> Result<Self, TextError> {
        match role {
            "system" => Ok(Self::System),
            "user" => Ok(Self::User),
            "assistant" => Ok(Self::Assistant),
            "tool" => Ok(Self::Tool),
            other => Err(TextError::UnknownRole { index, role: other.to_string() }),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// Where a tool message stands among the results answering one assistant message.
#[derive(Debug, Clone, Copy)]
struct ToolSlot {
    /// 1-based position among the results.
    order: usize,
    /// Number of calls (= results) of the assistant message.
    calls: usize,
}

/// Renders prompts (and, in [`super::completion`], parses completions) with a model's special
/// tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    pub tokens: SpecialTokens,
}

impl ChatTemplate {
    pub fn new(tokens: SpecialTokens) -> Self {
        Self { tokens }
    }

    /// The prompt text for `request` (see the module doc for the rules).
    pub fn render(&self, request: &ChatRequest) -> Result<String, TextError> {
        let messages = &request.messages;
        if messages.is_empty() {
            return Err(TextError::EmptyMessages);
        }
        let roles = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Role::parse(i, &m.role))
            .collect::<Result<Vec<_>, _>>()?;
        let slots = tool_slots(messages, &roles)?;
        let last = *roles.last().expect("messages is not empty");
        if last != Role::User && last != Role::Tool {
            return Err(TextError::NotAwaitingAssistant { role: last.name() });
        }
        let last_user = roles.iter().rposition(|&r| r == Role::User);
        let after_last_user = |i: usize| last_user.is_none_or(|u| i > u);
        let t = &self.tokens;

        let tools = self.tools_section(&request.tools)?;
        let mut out = t.bos.content.clone();
        if let Some(tools) = &tools
            && roles[0] != Role::System
        {
            out.push_str("\n\n");
            out.push_str(tools);
        }
        for (i, (msg, &role)) in messages.iter().zip(&roles).enumerate() {
            match role {
                Role::System => {
                    out.push_str(msg.content.as_deref().unwrap_or(""));
                    if i == 0
                        && let Some(tools) = &tools
                    {
                        out.push_str("\n\n");
                        out.push_str(tools);
                    }
                }
                Role::User => {
                    let content = required(i, role, msg)?;
                    out.push_str(&t.user.content);
                    out.push_str(content);
                    out.push_str(&t.assistant.content);
                    let opens_thinking = request.thinking && Some(i) == last_user;
                    out.push_str(self.think_marker(opens_thinking));
                }
                Role::Assistant => {
                    if request.thinking && after_last_user(i) {
                        if msg.reasoning_content.is_none() && msg.calls().is_empty() {
                            return Err(TextError::MissingReasoning { index: i });
                        }
                        out.push_str(msg.reasoning_content.as_deref().unwrap_or(""));
                        out.push_str(&t.think_end.content);
                    }
                    out.push_str(msg.content.as_deref().unwrap_or(""));
                    if !msg.calls().is_empty() {
                        let calls: Vec<DsmlCall<'_>> = msg
                            .calls()
                            .iter()
                            .map(|c| DsmlCall {
                                name: &c.function.name,
                                arguments: &c.function.arguments,
                            })
                            .collect();
                        out.push_str(&render_tool_calls(i, &calls)?);
                    }
                    out.push_str(&t.eos.content);
                }
                Role::Tool => {
                    let content = required(i, role, msg)?;
                    let slot = slots[i].expect("tool_slots gives every tool message a slot");
                    if slot.order == 1 {
                        out.push_str("\n\n<function_results>");
                    }
                    out.push_str("\n<result>");
                    out.push_str(content);
                    out.push_str("</result>");
                    if slot.order == slot.calls {
                        out.push_str("\n</function_results>\n\n");
                        out.push_str(self.think_marker(request.thinking && after_last_user(i)));
                    }
                }
            }
        }
        Ok(out)
    }

    /// `<think>` when the next assistant text is reasoning, `</think>` when it is the answer.
    fn think_marker(&self, opens_thinking: bool) -> &str {
        if opens_thinking {
            &self.tokens.think_start.content
        } else {
            &self.tokens.think_end.content
        }
    }

    fn tools_section(&self, tools: &[OrderedJson]) -> Result<Option<String>, TextError> {
        if tools.is_empty() {
            return Ok(None);
        }
        let schemas = tools
            .iter()
            .enumerate()
            .map(|(index, tool)| {
                tool.get("function")
                    .filter(|f| f.is_object())
                    .ok_or(TextError::InvalidTool { index })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(render_tools(
            &schemas,
            &self.tokens.think_start.content,
            &self.tokens.think_end.content,
        )))
    }
}

fn required(index: usize, role: Role, msg: &ChatMessage) -> Result<&str, TextError> {
    msg.content.as_deref().ok_or(TextError::MissingContent { index, role: role.name() })
}

/// Pairs tool messages with the assistant calls they answer (by order), checking that only
/// assistant messages carry calls and that each call gets exactly one result.
fn tool_slots(
    messages: &[ChatMessage],
    roles: &[Role],
) -> Result<Vec<Option<ToolSlot>>, TextError> {
    let mut slots = vec![None; messages.len()];
    // (assistant index, calls, results seen so far)
    let mut open: Option<(usize, usize, usize)> = None;
    for (i, (msg, &role)) in messages.iter().zip(roles).enumerate() {
        if role != Role::Assistant && !msg.calls().is_empty() {
            return Err(TextError::ToolCallsOnNonAssistant { index: i, role: role.name() });
        }
        if role == Role::Tool {
            match open.as_mut() {
                Some((_, calls, seen)) if *seen < *calls => {
                    *seen += 1;
                    slots[i] = Some(ToolSlot { order: *seen, calls: *calls });
                }
                _ => return Err(TextError::ToolWithoutCall { index: i }),
            }
            continue;
        }
        if let Some((index, calls, results)) = open.take()
            && results != calls
        {
            return Err(TextError::ToolResultCount { index, calls, results });
        }
        if role == Role::Assistant && !msg.calls().is_empty() {
            open = Some((i, msg.calls().len(), 0));
        }
    }
    match open {
        // An assistant message with calls is last: reported as "not awaiting the assistant".
        Some((index, calls, results)) if results != calls && results > 0 => {
            Err(TextError::ToolResultCount { index, calls, results })
        }
        _ => Ok(slots),
    }
}
