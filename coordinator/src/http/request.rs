//! OpenAI request bodies → a validated generation job.
//!
//! Parsing here only checks the JSON shape and the OpenAI-specific rules (`n` = 1, `stop` forms,
//! logprob options, chat messages and the chat format); the resulting `GenerateRequest` then goes
//! through the same [`validate`] as gRPC, so limits (context, vocabulary, sampling ranges) are
//! checked once, in one place. Every failure is an [`EngineError::InvalidArgument`] naming the
//! request field (OpenAI's `param`).
//!
//! Defaults follow OpenAI, not gRPC: `temperature` 1, `top_p` 1; `max_tokens` 16 for completions
//! and "the rest of the context" for chat. Unknown fields are ignored (clients send many);
//! known fields we cannot honour (`n` > 1, `echo`, `suffix`, penalties, `logit_bias`, `best_of`)
//! are rejected rather than silently dropped. Extensions: `top_k`, `ignore_eos`, and
//! `chat_template_kwargs: {"thinking": true}` (or `enable_thinking`) for DeepSeek thinking mode.

use super::Served;
use crate::api::inference::server_seed;
use crate::api::status::invalid;
use crate::api::validate::{Validated, validate};
use crate::engine::EngineError;
use crate::text::{ChatMessage, ChatRequest, OrderedJson, StopMatcher, TextError, ToolCall};
use fathom_proto::v1::{
    GenerateOptions, GenerateRequest, SamplingParams, TokenIds, generate_request,
};
use serde_json::{Map, Value};

/// Which endpoint a job came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completion,
    Chat,
}

/// Stop sequences accepted per request.
pub const MAX_STOPS: usize = 16;

/// A parsed, validated request.
#[derive(Debug, Clone)]
pub struct Job {
    pub endpoint: Endpoint,
    /// Id of the response (`cmpl-…` / `chatcmpl-…`), also the engine's request id.
    pub id: String,
    /// Chat only: the prompt opened reasoning (`<think>`).
    pub thinking: bool,
    /// Chat only: tools were offered, so a whole response parses tool calls.
    pub tools: bool,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with usage and no choices.
    pub include_usage: bool,
    pub stops: Vec<String>,
    /// `Some(top)` when logprobs were asked for, with `top` alternatives per token.
    pub logprobs: Option<u32>,
    /// `ignore_eos`: EOS ids are then ordinary text, not hidden.
    pub ignore_eos: bool,
    pub validated: Validated,
}

/// Parses and validates a request body for `endpoint`.
pub fn parse(api: &Served, endpoint: Endpoint, body: &[u8]) -> Result<Job, super::ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| invalid("body", format!("malformed JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(invalid("body", "the request body must be a JSON object").into());
    };
    if let Some(model) = obj.get("model").filter(|v| !v.is_null()) {
        let model = model.as_str().ok_or_else(|| invalid("model", "must be a string"))?;
        if model != api.model_name {
            return Err(super::ApiError::unknown_model(model, &api.model_name));
        }
    }
    Ok(parse_fields(api, endpoint, &obj, body)?)
}

fn parse_fields(
    api: &Served,
    endpoint: Endpoint,
    obj: &Map<String, Value>,
    body: &[u8],
) -> Result<Job, EngineError> {
    reject_unsupported(obj)?;
    if let Some(n) = int(obj, "n")?
        && n != 1
    {
        return Err(invalid("n", format!("only n = 1 is supported (got {n})")));
    }
    let stream = boolean(obj, "stream")?.unwrap_or(false);
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => boolean(o, "include_usage")?.unwrap_or(false),
        Some(_) => return Err(invalid("stream_options", "must be an object")),
    };
    let stops = stops(obj)?;
    let logprobs = logprobs(obj, endpoint)?;
    let mut thinking = false;
    let mut tools = false;
    let (input, prompt_field) = match endpoint {
        Endpoint::Completion => (prompt(obj)?, "prompt"),
        Endpoint::Chat => {
            let (text, think, has_tools) = chat_prompt(api, obj, body)?;
            thinking = think;
            tools = has_tools;
            (generate_request::Input::Text(text), "messages")
        }
    };
    let max_tokens = match endpoint {
        Endpoint::Chat => int(obj, "max_completion_tokens")?.or(int(obj, "max_tokens")?),
        Endpoint::Completion => int(obj, "max_tokens")?,
    };
    let max_tokens = match max_tokens {
        Some(m) if m <= 0 => return Err(invalid("max_tokens", format!("must be >= 1 (got {m})"))),
        Some(m) => {
            u32::try_from(m).map_err(|_| invalid("max_tokens", format!("{m} is too large")))?
        }
        // Chat: the rest of the context, known once the prompt is tokenized (set below).
        None if endpoint == Endpoint::Chat => u32::MAX,
        None => 16,
    };
    let seed = match int(obj, "seed")? {
        Some(s) if s < 0 => return Err(invalid("seed", format!("must be >= 0 (got {s})"))),
        s => s.map(|s| s as u64),
    };
    let top_k = match int(obj, "top_k")? {
        None | Some(-1) => 0,
        Some(k) if k < 0 => return Err(invalid("top_k", format!("must be >= 0 or -1 (got {k})"))),
        Some(k) => u32::try_from(k).map_err(|_| invalid("top_k", "too large"))?,
    };
    let ignore_eos = boolean(obj, "ignore_eos")?.unwrap_or(false);
    let id = match endpoint {
        Endpoint::Completion => format!("cmpl-{:016x}", server_seed()),
        Endpoint::Chat => format!("chatcmpl-{:016x}", server_seed()),
    };
    let mut req = GenerateRequest {
        request_id: id.clone(),
        input: Some(input),
        sampling: Some(SamplingParams {
            temperature: number(obj, "temperature")?.unwrap_or(1.0),
            top_p: number(obj, "top_p")?.unwrap_or(1.0),
            top_k,
            seed,
            max_tokens,
            stop_token_ids: Vec::new(),
            ignore_eos,
        }),
        options: Some(GenerateOptions {
            return_logprobs: logprobs.is_some(),
            top_logprobs: logprobs.unwrap_or(0),
            ..Default::default()
        }),
    };
    if max_tokens == u32::MAX {
        // Tokenize once to size the default; validation below re-checks everything.
        let len = prompt_len(api, &req).map_err(|e| rename(e, prompt_field))?;
        let rest = api.limits.max_context.saturating_sub(len).max(1);
        req.sampling.as_mut().expect("set above").max_tokens = rest.min(u32::MAX as usize) as u32;
    }
    let validated =
        validate(&req, &api.limits, api.codec.as_ref()).map_err(|e| rename(e, prompt_field))?;
    Ok(Job {
        endpoint,
        id,
        thinking,
        tools,
        stream,
        include_usage,
        stops,
        logprobs,
        ignore_eos,
        validated,
    })
}

/// Prompt length in tokens (text is tokenized as `validate` does).
fn prompt_len(api: &Served, req: &GenerateRequest) -> Result<usize, EngineError> {
    match &req.input {
        Some(generate_request::Input::TokenIds(t)) => Ok(t.ids.len()),
        Some(generate_request::Input::Text(text)) => {
            let codec = api
                .codec
                .as_ref()
                .ok_or_else(|| invalid("input", "text input needs a tokenizer; send token ids"))?;
            Ok(codec.encode(text).map_err(|e| invalid("input", e.to_string()))?.len())
        }
        None => Ok(0),
    }
}

/// gRPC validation names the prompt `input`; HTTP clients know it as `prompt` / `messages`.
fn rename(e: EngineError, prompt_field: &'static str) -> EngineError {
    match e {
        EngineError::InvalidArgument { field: "input", reason } => {
            EngineError::InvalidArgument { field: prompt_field, reason }
        }
        EngineError::InvalidArgument { field: "options.top_logprobs", reason } => {
            EngineError::InvalidArgument { field: "top_logprobs", reason }
        }
        e => e,
    }
}

/// Fields whose non-default values we cannot honour.
fn reject_unsupported(obj: &Map<String, Value>) -> Result<(), EngineError> {
    for field in ["frequency_penalty", "presence_penalty"] {
        if let Some(v) = number(obj, field)?
            && v != 0.0
        {
            return Err(invalid(field, "is not supported (only 0)"));
        }
    }
    if let Some(b) = int(obj, "best_of")?
        && b != 1
    {
        return Err(invalid("best_of", "only best_of = 1 is supported"));
    }
    if boolean(obj, "echo")?.unwrap_or(false) {
        return Err(invalid("echo", "is not supported"));
    }
    match obj.get("suffix") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(_) => return Err(invalid("suffix", "is not supported")),
    }
    match obj.get("logit_bias") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) if o.is_empty() => {}
        Some(_) => return Err(invalid("logit_bias", "is not supported")),
    }
    Ok(())
}

fn int(obj: &Map<String, Value>, field: &'static str) -> Result<Option<i64>, EngineError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) => Ok(Some(i)),
            None if n.as_u64().is_some() => Err(invalid(field, format!("{n} is too large"))),
            None => Err(invalid(field, format!("must be an integer (got {n})"))),
        },
        Some(_) => Err(invalid(field, "must be an integer")),
    }
}

fn number(obj: &Map<String, Value>, field: &'static str) -> Result<Option<f32>, EngineError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64().map(|f| f as f32)),
        Some(_) => Err(invalid(field, "must be a number")),
    }
}

fn boolean(obj: &Map<String, Value>, field: &'static str) -> Result<Option<bool>, EngineError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid(field, "must be true or false")),
    }
}

/// `stop`: a string or a list of strings, each non-empty.
fn stops(obj: &Map<String, Value>) -> Result<Vec<String>, EngineError> {
    let stops = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("stop", "must be a string or a list of strings"))?,
        Some(_) => return Err(invalid("stop", "must be a string or a list of strings")),
    };
    if stops.len() > MAX_STOPS {
        return Err(invalid("stop", format!("at most {MAX_STOPS} stop sequences")));
    }
    StopMatcher::new(stops.iter().cloned()).map_err(|e| invalid("stop", e.to_string()))?;
    Ok(stops)
}

/// Completions: `logprobs` is an integer (alternatives per token). Chat: `logprobs` is a boolean
/// and `top_logprobs` the count.
fn logprobs(obj: &Map<String, Value>, endpoint: Endpoint) -> Result<Option<u32>, EngineError> {
    let top = |v: i64, field: &'static str| {
        if (0..=20).contains(&v) {
            Ok(v as u32)
        } else {
            Err(invalid(field, format!("must be in 0..=20 (got {v})")))
        }
    };
    match endpoint {
        Endpoint::Completion => int(obj, "logprobs")?.map(|v| top(v, "logprobs")).transpose(),
        Endpoint::Chat => {
            let on = boolean(obj, "logprobs")?.unwrap_or(false);
            let k = int(obj, "top_logprobs")?.map(|v| top(v, "top_logprobs")).transpose()?;
            match (on, k) {
                (false, Some(_)) => Err(invalid("top_logprobs", "needs \"logprobs\": true")),
                (false, None) => Ok(None),
                (true, k) => Ok(Some(k.unwrap_or(0))),
            }
        }
    }
}

/// Completions `prompt`: a string, token ids, or a list holding exactly one of those.
fn prompt(obj: &Map<String, Value>) -> Result<generate_request::Input, EngineError> {
    let bad = || invalid("prompt", "must be a string or a list of token ids");
    let ids = |items: &[Value]| -> Result<Vec<u32>, EngineError> {
        items
            .iter()
            .map(|v| v.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(bad))
            .collect()
    };
    match obj.get("prompt") {
        None | Some(Value::Null) => Err(invalid("prompt", "is required")),
        Some(Value::String(s)) => Ok(generate_request::Input::Text(s.clone())),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Ok(generate_request::Input::Text(s.clone())),
            [Value::Array(inner)] => {
                Ok(generate_request::Input::TokenIds(TokenIds { ids: ids(inner)? }))
            }
            [Value::String(_) | Value::Array(_), _, ..] => {
                Err(invalid("prompt", "batched prompts are not supported; send one prompt"))
            }
            items => Ok(generate_request::Input::TokenIds(TokenIds { ids: ids(items)? })),
        },
        Some(_) => Err(bad()),
    }
}

/// Renders the chat prompt: (prompt text, thinking opened, tools offered).
fn chat_prompt(
    api: &Served,
    obj: &Map<String, Value>,
    body: &[u8],
) -> Result<(String, bool, bool), EngineError> {
    let messages = match obj.get("messages") {
        None | Some(Value::Null) => return Err(invalid("messages", "is required")),
        Some(Value::Array(items)) => {
            items.iter().enumerate().map(|(i, m)| message(i, m)).collect::<Result<Vec<_>, _>>()?
        }
        Some(_) => return Err(invalid("messages", "must be a list of messages")),
    };
    let thinking = match obj.get("chat_template_kwargs") {
        None | Some(Value::Null) => false,
        Some(Value::Object(kw)) => {
            boolean(kw, "thinking")?.or(boolean(kw, "enable_thinking")?).unwrap_or(false)
        }
        Some(_) => return Err(invalid("chat_template_kwargs", "must be an object")),
    };
    // Tools keep their key order (the prompt embeds them as the model was trained on), so they
    // are read again from the raw body with an order-keeping type.
    #[derive(serde::Deserialize)]
    struct Tools {
        #[serde(default)]
        tools: Option<Vec<OrderedJson>>,
    }
    let tools = serde_json::from_slice::<Tools>(body)
        .map_err(|e| invalid("tools", format!("must be a list of tool objects: {e}")))?
        .tools
        .unwrap_or_default();
    let template = api.template.as_ref().map_err(|reason| {
        invalid("messages", format!("this model's tokenizer has no chat format: {reason}"))
    })?;
    let has_tools = !tools.is_empty();
    let text = template.render(&ChatRequest { messages, tools, thinking }).map_err(|e| {
        let field = if matches!(e, TextError::InvalidTool { .. }) { "tools" } else { "messages" };
        invalid(field, e.to_string())
    })?;
    Ok((text, thinking, has_tools))
}

/// One OpenAI chat message; `content` may be a string, null, or a list of text parts.
fn message(i: usize, m: &Value) -> Result<ChatMessage, EngineError> {
    let Value::Object(m) = m else {
        return Err(invalid("messages", format!("message {i} is not an object")));
    };
    let role = m
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("messages", format!("message {i} has no role")))?;
    let content = match m.get("content") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str))
                {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(invalid(
                            "messages",
                            format!("message {i}: only text content parts are supported"),
                        ));
                    }
                }
            }
            Some(text)
        }
        Some(_) => {
            return Err(invalid("messages", format!("message {i}: content must be a string")));
        }
    };
    let string = |key: &str| -> Result<Option<String>, EngineError> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid("messages", format!("message {i}: {key} must be a string"))),
        }
    };
    let tool_calls =
        match m.get("tool_calls") {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value::<Vec<ToolCall>>(v.clone()).map_err(|e| {
                invalid("messages", format!("message {i}: malformed tool_calls: {e}"))
            })?),
        };
    Ok(ChatMessage {
        role: role.to_string(),
        content,
        reasoning_content: string("reasoning_content")?,
        tool_calls,
        tool_call_id: string("tool_call_id")?,
    })
}
