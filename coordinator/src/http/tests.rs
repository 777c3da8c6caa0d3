//! Request parsing and the text pipe against the byte-level fixture tokenizer
//! (`tests/fixtures/text/tokenizer.json`, which has the DeepSeek-V3.2 special tokens).

use super::Served;
use super::pipe::{Piece, Pipe};
use super::request::{Endpoint, Job, parse};
use crate::api::validate::RequestLimits;
use crate::engine::detok::TextCodec;
use fathom_proto::v1::GenerateChunk;
use serde_json::{Value, json};
use std::path::Path;

const FIXTURE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/text");
const B: &str = "<｜begin▁of▁sentence｜>";
const U: &str = "<｜User｜>";
const A: &str = "<｜Assistant｜>";
const MAX_CONTEXT: usize = 96;

fn codec() -> TextCodec {
    TextCodec::load_dir(Path::new(FIXTURE_DIR)).unwrap().expect("fixture tokenizer.json")
}

fn served() -> Served {
    let codec = codec();
    let vocab_size = codec.tokenizer().get_vocab_size(true);
    Served::new("tiny".into(), Some(codec), RequestLimits { vocab_size, max_context: MAX_CONTEXT })
}

fn job(endpoint: Endpoint, body: Value) -> Result<Job, super::ApiError> {
    parse(&served(), endpoint, body.to_string().as_bytes())
}

#[test]
fn chat_renders_the_deepseek_prompt_with_openai_defaults() {
    let body = json!({
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
        ],
        "chat_template_kwargs": {"thinking": true},
    });
    let j = job(Endpoint::Chat, body).unwrap();
    let want = codec().encode(&format!("{B}Be brief.{U}Hi!{A}<think>")).unwrap();
    assert_eq!(j.validated.prompt, want);
    assert!(j.thinking && !j.stream && !j.tools);
    assert_eq!(j.validated.sampling.temperature, 1.0, "OpenAI's default temperature");
    assert_eq!(j.validated.max_tokens, MAX_CONTEXT - want.len(), "chat: the rest of the context");
    assert!(j.id.starts_with("chatcmpl-"));
}

#[test]
fn completion_prompt_forms_and_defaults() {
    let text = codec().encode("abc").unwrap();
    for prompt in [json!("abc"), json!(["abc"])] {
        let j = job(Endpoint::Completion, json!({"prompt": prompt})).unwrap();
        assert_eq!(j.validated.prompt, text);
        assert_eq!(j.validated.max_tokens, 16);
    }
    for prompt in [json!([5, 6, 7]), json!([[5, 6, 7]])] {
        let j = job(Endpoint::Completion, json!({"prompt": prompt, "max_tokens": 3})).unwrap();
        assert_eq!(j.validated.prompt, vec![5, 6, 7]);
    }
    let j = job(
        Endpoint::Completion,
        json!({"prompt": "x", "logprobs": 3, "stop": "##", "seed": 9, "temperature": 0}),
    )
    .unwrap();
    assert_eq!(j.logprobs, Some(3));
    assert!(j.validated.outputs.logprobs && j.validated.outputs.top_logprobs == 3);
    assert_eq!(j.stops, vec!["##".to_string()]);
    assert_eq!(j.validated.seed, Some(9));
}

#[test]
fn every_bad_field_is_named() {
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (Endpoint::Chat, json!({}), "messages"),
        (Endpoint::Chat, json!({"messages": []}), "messages"),
        (Endpoint::Chat, json!({"messages": [{"role": "robot", "content": "x"}]}), "messages"),
        (Endpoint::Chat, json!({"messages": [{"content": "x"}]}), "messages"),
        (Endpoint::Chat, json!({"messages": user, "max_tokens": 0}), "max_tokens"),
        (Endpoint::Chat, json!({"messages": user, "max_completion_tokens": -1}), "max_tokens"),
        (Endpoint::Chat, json!({"messages": user, "max_tokens": 1000}), "max_tokens"),
        (Endpoint::Chat, json!({"messages": user, "temperature": -1}), "temperature"),
        (Endpoint::Chat, json!({"messages": user, "temperature": "hot"}), "temperature"),
        (Endpoint::Chat, json!({"messages": user, "top_p": 1.5}), "top_p"),
        (Endpoint::Chat, json!({"messages": user, "n": 3}), "n"),
        (Endpoint::Chat, json!({"messages": user, "stop": [""]}), "stop"),
        (Endpoint::Chat, json!({"messages": user, "stop": 5}), "stop"),
        (Endpoint::Chat, json!({"messages": user, "seed": -1}), "seed"),
        (Endpoint::Chat, json!({"messages": user, "top_logprobs": 2}), "top_logprobs"),
        (
            Endpoint::Chat,
            json!({"messages": user, "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (Endpoint::Chat, json!({"messages": user, "presence_penalty": 0.5}), "presence_penalty"),
        (Endpoint::Chat, json!({"messages": user, "tools": [{"type": "function"}]}), "tools"),
        (Endpoint::Completion, json!({}), "prompt"),
        (Endpoint::Completion, json!({"prompt": ""}), "prompt"),
        (Endpoint::Completion, json!({"prompt": ["a", "b"]}), "prompt"),
        (Endpoint::Completion, json!({"prompt": [1, -2]}), "prompt"),
        (Endpoint::Completion, json!({"prompt": [100000]}), "prompt"),
        (Endpoint::Completion, json!({"prompt": "x", "echo": true}), "echo"),
        (Endpoint::Completion, json!({"prompt": "x", "logprobs": 30}), "logprobs"),
        (Endpoint::Completion, json!({"prompt": "x", "model": 3}), "model"),
    ];
    for (endpoint, body, field) in cases {
        let e = job(endpoint, body.clone()).expect_err(&body.to_string());
        assert_eq!(e.status, 400, "{body}: {e:?}");
        assert_eq!(e.param, Some(field), "{body}: {}", e.message);
    }
    let e = parse(&served(), Endpoint::Chat, b"{\"messages\": [").unwrap_err();
    assert_eq!((e.status.as_u16(), e.param), (400, Some("body")));
    let e = parse(&served(), Endpoint::Chat, b"[1]").unwrap_err();
    assert_eq!((e.status.as_u16(), e.param), (400, Some("body")));
    let e = job(Endpoint::Chat, json!({"model": "gpt-4o", "messages": user})).unwrap_err();
    assert_eq!((e.status.as_u16(), e.code), (404, Some("model_not_found")));
}

/// Feeds `ids` in chunks of `size` and then finishes.
fn run(pipe: &mut Pipe, ids: &[u32], size: usize) -> Piece {
    let mut out = Piece::default();
    for c in ids.chunks(size) {
        out.append(pipe.chunk(&GenerateChunk { token_ids: c.to_vec(), ..Default::default() }));
        if pipe.stopped() {
            return out;
        }
    }
    out.append(pipe.finish());
    out
}

#[test]
fn pipe_splits_reasoning_and_stops_inside_tokens_whatever_the_chunking() {
    let codec = codec();
    // "é" and "中" are several byte tokens each: stops and splits must not break them.
    let ids = codec.encode("why é</think>yes 中 STOP and more").unwrap();
    let stop_end = codec.encode("why é</think>yes 中 STOP").unwrap().len();
    for size in [1, 2, 5, ids.len()] {
        let mut pipe =
            Pipe::new(Some(codec.clone()), vec![1], &["STOP".into()], "</think>", true, false);
        let out = run(&mut pipe, &ids, size);
        assert_eq!(out.reasoning, "why é", "chunks of {size}");
        assert_eq!(out.content, "yes 中 ", "chunks of {size}");
        assert!(pipe.stopped());
        // Tokens after the one completing the stop are not taken (within a chunk either).
        assert_eq!(pipe.tokens() as usize, stop_end, "chunks of {size}");
    }
}

#[test]
fn pipe_hides_the_final_eos_and_keeps_everything_without_thinking() {
    let codec = codec();
    let mut ids = codec.encode("a</think>b").unwrap();
    ids.push(1); // EOS
    let mut pipe = Pipe::new(Some(codec.clone()), vec![1], &[], "</think>", false, true);
    let out = run(&mut pipe, &ids, 1);
    assert_eq!(out.content, "a</think>b");
    assert_eq!(out.reasoning, "");
    assert!(!pipe.stopped());
    assert_eq!(pipe.tokens() as usize, ids.len(), "the EOS counts as a completion token");
    // No logprobs in the chunks: none reported.
    assert!(out.logprobs.is_empty());
}

#[test]
fn logprob_tokens_carry_their_raw_bytes() {
    use fathom_proto::v1::{GeneratedLogprob, TokenLogprob as Alt};
    let codec = codec();
    // "é" is two byte tokens; each alone decodes to U+FFFD but keeps its byte.
    let ids = codec.encode("é!").unwrap();
    assert_eq!(ids.len(), 3);
    let lp =
        |id| GeneratedLogprob { logprob: -1.0, top: vec![Alt { token_id: id, logprob: -1.0 }] };
    let chunk = GenerateChunk {
        token_ids: ids.clone(),
        logprobs: ids.iter().map(|&i| lp(i)).collect(),
        ..Default::default()
    };
    let mut pipe = Pipe::new(Some(codec), vec![1], &[], "</think>", false, true);
    let out = pipe.chunk(&chunk);
    let bytes: Vec<Vec<u8>> = out.logprobs.iter().map(|l| l.token.bytes.clone()).collect();
    assert_eq!(bytes, vec![vec![0xC3], vec![0xA9], vec![b'!']]);
    assert_eq!(out.logprobs[2].token.text, "!");
    assert_eq!(out.logprobs[0].top[0].0.bytes, vec![0xC3]);
    assert_eq!(out.content, "é!");
}
