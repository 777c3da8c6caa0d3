//! Validation of `GenerateRequest`s: every rule the API promises, each failure naming the field
//! and what was wrong (never the prompt itself).
//!
//! Proto3 zero values mean "unset": `top_p = 0` is nucleus sampling off (as 1), an absent
//! `sampling` is greedy with `max_tokens = 16`. A present `sampling` with `max_tokens = 0` is an
//! error (it would generate nothing).

use super::status::invalid;
use crate::engine::EngineError;
use crate::engine::detok::TextCodec;
use fathom_proto::v1::{GenerateRequest, SamplingParams, SeqOutputs, generate_request};

/// Limits a request is checked against.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub vocab_size: usize,
    /// Longest prompt + max_tokens accepted.
    pub max_context: usize,
}

/// The validated parts of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub seed: Option<u64>,
    pub outputs: SeqOutputs,
    pub return_prompt_ids: bool,
}

const DEFAULT_MAX_TOKENS: u32 = 16;

/// Checks `req` and tokenizes text input.
pub fn validate(
    req: &GenerateRequest,
    limits: &RequestLimits,
    codec: Option<&TextCodec>,
) -> Result<Validated, EngineError> {
    if req.request_id.len() > 128
        || !req.request_id.bytes().all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b))
    {
        return Err(invalid("request_id", "at most 128 bytes of [A-Za-z0-9._:-]"));
    }
    let prompt = match &req.input {
        None => return Err(invalid("input", "missing: give text or token_ids")),
        Some(generate_request::Input::TokenIds(t)) => t.ids.clone(),
        Some(generate_request::Input::Text(text)) => {
            let codec = codec
                .ok_or_else(|| invalid("input", "text input needs a tokenizer; send token_ids"))?;
            codec.encode(text).map_err(|e| invalid("input", e.to_string()))?
        }
    };
    if prompt.is_empty() {
        return Err(invalid("input", "empty prompt"));
    }
    if let Some((i, &id)) =
        prompt.iter().enumerate().find(|(_, id)| **id as usize >= limits.vocab_size)
    {
        return Err(invalid(
            "input",
            format!("token id {id} at index {i} is >= the vocabulary size {}", limits.vocab_size),
        ));
    }
    let mut sampling = req
        .sampling
        .clone()
        .unwrap_or(SamplingParams { max_tokens: DEFAULT_MAX_TOKENS, ..Default::default() });
    let t = sampling.temperature;
    if !t.is_finite() || t < 0.0 {
        return Err(invalid("temperature", format!("{t} must be finite and >= 0")));
    }
    let p = sampling.top_p;
    if !p.is_finite() || !(0.0..=1.0).contains(&p) {
        return Err(invalid("top_p", format!("{p} is outside (0, 1] (0 means unset)")));
    }
    if p == 0.0 {
        sampling.top_p = 1.0;
    }
    if sampling.max_tokens == 0 {
        return Err(invalid("max_tokens", "must be >= 1"));
    }
    if let Some(&id) = sampling.stop_token_ids.iter().find(|&&id| id as usize >= limits.vocab_size)
    {
        return Err(invalid("stop_token_ids", format!("{id} is >= the vocabulary size")));
    }
    let max_tokens = sampling.max_tokens as usize;
    if prompt.len() + max_tokens > limits.max_context {
        return Err(invalid(
            "max_tokens",
            format!(
                "prompt ({} tokens) + max_tokens ({max_tokens}) exceeds the context limit {}",
                prompt.len(),
                limits.max_context
            ),
        ));
    }
    let o = req.options.unwrap_or_default();
    if o.top_logprobs > 20 {
        return Err(invalid("options.top_logprobs", format!("{} > 20", o.top_logprobs)));
    }
    if o.logits_top_k > 64 {
        return Err(invalid("options.logits_top_k", format!("{} > 64", o.logits_top_k)));
    }
    Ok(Validated {
        request_id: req.request_id.clone(),
        prompt,
        max_tokens,
        seed: sampling.seed,
        sampling,
        outputs: SeqOutputs {
            routed_experts: o.return_routed_experts,
            logprobs: o.return_logprobs,
            top_logprobs: o.top_logprobs,
            sampling_mask: o.return_sampling_mask,
            logits_top_k: o.logits_top_k,
        },
        return_prompt_ids: o.return_prompt_token_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_proto::v1::TokenIds;

    fn req(ids: Vec<u32>, sampling: Option<SamplingParams>) -> GenerateRequest {
        GenerateRequest {
            input: Some(generate_request::Input::TokenIds(TokenIds { ids })),
            sampling,
            ..Default::default()
        }
    }

    fn field(r: Result<Validated, EngineError>) -> &'static str {
        match r {
            Err(EngineError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn every_rule_names_its_field() {
        let l = RequestLimits { vocab_size: 100, max_context: 32 };
        let sp = |f: fn(&mut SamplingParams)| {
            let mut s = SamplingParams { max_tokens: 4, ..Default::default() };
            f(&mut s);
            Some(s)
        };
        assert_eq!(field(validate(&req(vec![], None), &l, None)), "input");
        assert_eq!(field(validate(&req(vec![1, 100], None), &l, None)), "input");
        assert_eq!(
            field(validate(&req(vec![1], sp(|s| s.temperature = -0.5)), &l, None)),
            "temperature"
        );
        assert_eq!(field(validate(&req(vec![1], sp(|s| s.top_p = 1.5)), &l, None)), "top_p");
        assert_eq!(field(validate(&req(vec![1], sp(|s| s.top_p = -0.1)), &l, None)), "top_p");
        assert_eq!(
            field(validate(&req(vec![1], sp(|s| s.max_tokens = 0)), &l, None)),
            "max_tokens"
        );
        assert_eq!(
            field(validate(&req(vec![1; 30], sp(|s| s.max_tokens = 3)), &l, None)),
            "max_tokens"
        );
        let mut text = req(vec![], None);
        text.input = Some(generate_request::Input::Text("hi".into()));
        assert_eq!(field(validate(&text, &l, None)), "input");
        let mut bad_id = req(vec![1], None);
        bad_id.request_id = "a b".into();
        assert_eq!(field(validate(&bad_id, &l, None)), "request_id");
    }

    #[test]
    fn defaults_are_greedy_sixteen_tokens() {
        let l = RequestLimits { vocab_size: 100, max_context: 32 };
        let v = validate(&req(vec![1, 2], None), &l, None).unwrap();
        assert_eq!(v.max_tokens, 16);
        assert_eq!(v.sampling.temperature, 0.0);
        assert_eq!(v.sampling.top_p, 1.0);
    }
}
