//! Running a [`Job`] on the engine and answering in OpenAI's shapes: one JSON object, or
//! server-sent events (`data: {chunk}` … `data: [DONE]`).
//!
//! The job is submitted exactly as gRPC submits (same [`Submission`], same queue); submission
//! errors (queue full, not serving) become HTTP errors before any byte of the response is sent.
//! A failure after streaming started is sent as one `data: {"error": …}` event before `[DONE]`.
//! A client that goes away drops the engine stream, which cancels the request at the next step.

use super::HttpApi;
use super::error::ApiError;
use super::pipe::{Piece, Pipe, TokenLogprob, TokenText};
use super::request::{Endpoint, Job};
use crate::engine::{EngineError, Event, Submission};
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use fathom_proto::v1::{FinishReason, GenerateFinal};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Answers `job` (whole or streamed).
pub async fn respond(api: &HttpApi, job: Job) -> Result<Response, ApiError> {
    let (rx, pipe) = submit(api, &job)?;
    if job.stream {
        return Ok(stream(api, job, rx, pipe));
    }
    whole(api, job, rx, pipe).await
}

fn submit(api: &HttpApi, job: &Job) -> Result<(mpsc::Receiver<Event>, Pipe), ApiError> {
    let v = &job.validated;
    let (tx, rx) = mpsc::channel(v.max_tokens + 2);
    api.engine.submit(Submission {
        request_id: job.id.clone(),
        prompt: v.prompt.clone(),
        max_tokens: v.max_tokens,
        seed: v.seed.unwrap_or_else(crate::api::inference::server_seed),
        sampling: v.sampling.clone(),
        outputs: v.outputs,
        return_prompt_ids: false,
        deadline: None,
        tx,
    })?;
    let hidden = if job.ignore_eos { Vec::new() } else { api.eos_ids.clone() };
    let think_end = api.served.template.as_ref().map(|t| t.tokens.think_end.content.as_str());
    let pipe = Pipe::new(
        api.served.codec.clone(),
        hidden,
        &job.stops,
        think_end.unwrap_or(""),
        job.thinking,
        job.logprobs.is_some(),
    );
    Ok((rx, pipe))
}

/// How the request ended, OpenAI's spelling.
fn finish_reason(f: &GenerateFinal) -> &'static str {
    match FinishReason::try_from(f.finish_reason) {
        Ok(FinishReason::Stop) => "stop",
        Ok(FinishReason::Aborted) => "abort",
        _ => "length",
    }
}

/// What one engine event meant for the response.
enum Step {
    Piece(Piece),
    /// The output ended (with its last text).
    Done(Piece, &'static str),
    Failed(EngineError),
}

fn step(pipe: &mut Pipe, ev: Option<Event>) -> Step {
    match ev {
        Some(Event::Chunk(c)) => {
            let piece = pipe.chunk(&c);
            if pipe.stopped() { Step::Done(piece, "stop") } else { Step::Piece(piece) }
        }
        Some(Event::Final(f)) => Step::Done(pipe.finish(), finish_reason(&f)),
        Some(Event::Error(e)) => Step::Failed(e),
        None => Step::Failed(EngineError::Internal("the engine dropped the request".into())),
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn usage(job: &Job, pipe: &Pipe) -> Value {
    let prompt = job.validated.prompt.len();
    let completion = pipe.tokens() as usize;
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

async fn whole(
    api: &HttpApi,
    job: Job,
    mut rx: mpsc::Receiver<Event>,
    mut pipe: Pipe,
) -> Result<Response, ApiError> {
    let mut out = Piece::default();
    let mut offset = 0;
    let finish = loop {
        match step(&mut pipe, rx.recv().await) {
            Step::Piece(p) => out.append(p),
            Step::Done(p, reason) => {
                out.append(p);
                break reason;
            }
            Step::Failed(e) => return Err(e.into()),
        }
    };
    drop(rx);
    let mut choice = json!({"index": 0, "finish_reason": finish});
    let object = match job.endpoint {
        Endpoint::Completion => {
            choice["text"] = json!(out.content);
            choice["logprobs"] = completion_logprobs(&job, &out.logprobs, &mut offset);
            "text_completion"
        }
        Endpoint::Chat => {
            let mut message = json!({"role": "assistant", "content": out.content});
            if job.thinking {
                message["reasoning_content"] = json!(out.reasoning);
            }
            if job.tools
                && let Ok(template) = &api.served.template
                && let Ok(parsed) = template.parse_completion(pipe.raw(), job.thinking)
                && !parsed.tool_calls.is_empty()
            {
                let calls: Vec<Value> = parsed
                    .tool_calls
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        json!({
                            "id": format!("call_{}_{i}", job.id),
                            "type": "function",
                            "function": {"name": c.function.name, "arguments": c.function.arguments},
                        })
                    })
                    .collect();
                message["content"] = json!(parsed.content);
                message["tool_calls"] = Value::Array(calls);
                choice["finish_reason"] = json!("tool_calls");
            }
            choice["message"] = message;
            choice["logprobs"] = chat_logprobs(&job, &out.logprobs);
            "chat.completion"
        }
    };
    let body = json!({
        "id": job.id,
        "object": object,
        "created": now(),
        "model": api.served.model_name,
        "choices": [choice],
        "usage": usage(&job, &pipe),
    });
    Ok(json_response(body))
}

pub fn json_response(body: Value) -> Response {
    let mut r = body.to_string().into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Completions' logprobs object (`null` when not asked for).
fn completion_logprobs(job: &Job, lps: &[TokenLogprob], offset: &mut usize) -> Value {
    let Some(top) = job.logprobs else { return Value::Null };
    let mut offsets = Vec::with_capacity(lps.len());
    for lp in lps {
        offsets.push(*offset);
        *offset += lp.token.text.len();
    }
    json!({
        "tokens": lps.iter().map(|l| l.token.text.as_str()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": if top == 0 {
            Value::Null
        } else {
            lps.iter()
                .map(|l| {
                    let m: serde_json::Map<String, Value> =
                        l.top.iter().map(|(t, p)| (t.text.clone(), json!(p))).collect();
                    Value::Object(m)
                })
                .collect()
        },
        "text_offset": offsets,
    })
}

/// Chat's logprobs object (`null` when not asked for).
fn chat_logprobs(job: &Job, lps: &[TokenLogprob]) -> Value {
    if job.logprobs.is_none() {
        return Value::Null;
    }
    let entry = |token: &TokenText, logprob: f32| json!({"token": token.text, "logprob": logprob, "bytes": token.bytes});
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(&l.token, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|(t, p)| entry(t, *p)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

fn sse(v: &Value) -> Result<Bytes, Infallible> {
    Ok(Bytes::from(format!("data: {v}\n\n")))
}

fn stream(api: &HttpApi, job: Job, mut rx: mpsc::Receiver<Event>, mut pipe: Pipe) -> Response {
    let (tx, body) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let created = now();
    let model = api.served.model_name.clone();
    let object = match job.endpoint {
        Endpoint::Completion => "text_completion",
        Endpoint::Chat => "chat.completion.chunk",
    };
    let id = job.id.clone();
    let chunk = move |choices: Value| {
        json!({"id": id, "object": object, "created": created, "model": model,
               "choices": choices})
    };
    tokio::spawn(async move {
        let mut offset = 0;
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(sse(&v)).await.is_ok() }
        };
        if job.endpoint == Endpoint::Chat {
            let first = json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": null, "finish_reason": null}]);
            if !send(chunk(first)).await {
                return;
            }
        }
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                // The client went away: dropping `rx` cancels the request.
                _ = tx.closed() => return,
            };
            let (piece, finish) = match step(&mut pipe, ev) {
                Step::Piece(p) => (p, None),
                Step::Done(p, reason) => (p, Some(reason)),
                Step::Failed(e) => {
                    let err = ApiError::from(e);
                    let v: Value = serde_json::from_str(&err.to_json()).unwrap_or(Value::Null);
                    let _ = send(v).await;
                    let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
                    return;
                }
            };
            if !piece.is_empty() {
                let choice = match job.endpoint {
                    Endpoint::Completion => json!({
                        "index": 0, "text": piece.content, "finish_reason": null,
                        "logprobs": completion_logprobs(&job, &piece.logprobs, &mut offset),
                    }),
                    Endpoint::Chat => {
                        let mut delta = json!({});
                        if !piece.reasoning.is_empty() {
                            delta["reasoning_content"] = json!(piece.reasoning);
                        }
                        if !piece.content.is_empty() {
                            delta["content"] = json!(piece.content);
                        }
                        json!({"index": 0, "delta": delta, "finish_reason": null,
                               "logprobs": chat_logprobs(&job, &piece.logprobs)})
                    }
                };
                if !send(chunk(json!([choice]))).await {
                    return;
                }
            }
            if let Some(reason) = finish {
                let last = match job.endpoint {
                    Endpoint::Completion => {
                        json!({"index": 0, "text": "", "logprobs": null, "finish_reason": reason})
                    }
                    Endpoint::Chat => {
                        json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason})
                    }
                };
                if !send(chunk(json!([last]))).await {
                    return;
                }
                drop(rx);
                if job.include_usage {
                    let mut u = chunk(json!([]));
                    u["usage"] = usage(&job, &pipe);
                    if !send(u).await {
                        return;
                    }
                }
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
                return;
            }
        }
    });
    let mut r = Body::from_stream(ReceiverStream::new(body)).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
