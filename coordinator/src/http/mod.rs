//! The OpenAI-compatible HTTP API of the coordinator (HTTP/1.1, axum), off unless
//! `coordinator.http_listen` is set.
//!
//! Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both whole or, with
//! `"stream": true`, server-sent events ending with `data: [DONE]`), `GET /v1/models`,
//! `GET /v1/models/{id}`, `GET /health` (200 while serving, 503 otherwise).
//!
//! Owns: the JSON shapes (`request.rs` parses, `respond.rs` answers), the text pipeline per
//! request (`pipe.rs`: detokenisation, stop sequences, reasoning split) and errors in OpenAI's
//! shape (`error.rs`). Does not own: validation limits, scheduling or the error → status
//! mapping, which are the gRPC path's (`api/validate.rs`, the engine, `api/status.rs`): both
//! front ends submit the same [`crate::engine::Submission`] to the same engine.
//!
//! Body limit: a body over `max_body_bytes` is answered 400 (`param: "body"`); bodies up to
//! [`DRAIN_FACTOR`] times the limit are read to the end first so the client sees the answer
//! instead of a reset connection.

pub mod error;
pub mod pipe;
pub mod request;
pub mod respond;
#[cfg(test)]
mod tests;

use crate::api::status::invalid;
use crate::api::validate::RequestLimits;
use crate::engine::detok::TextCodec;
use crate::engine::{EngineHandle, ServingState};
use crate::text::{ChatTemplate, SpecialTokens};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
pub use error::ApiError;
use futures::StreamExt;
use request::Endpoint;
use serde_json::json;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Bodies up to this many times the limit are drained before the 400 is sent.
pub const DRAIN_FACTOR: usize = 4;

/// What requests are parsed and checked against: the served model and its text layer.
#[derive(Debug)]
pub struct Served {
    /// The only `model` accepted (the checkpoint directory's name).
    pub model_name: String,
    pub limits: RequestLimits,
    pub codec: Option<TextCodec>,
    /// The chat format, or why the tokenizer cannot render it.
    pub template: Result<ChatTemplate, String>,
}

impl Served {
    /// Chat needs the tokenizer's DeepSeek special tokens; without them chat requests are
    /// answered 400 naming the missing token.
    pub fn new(model_name: String, codec: Option<TextCodec>, limits: RequestLimits) -> Self {
        let template = match &codec {
            None => Err("the model directory has no tokenizer.json".to_string()),
            Some(c) => SpecialTokens::from_tokenizer(c.tokenizer())
                .map(ChatTemplate::new)
                .map_err(|e| e.to_string()),
        };
        Self { model_name, limits, codec, template }
    }
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct HttpApi {
    pub(crate) engine: EngineHandle,
    pub(crate) served: Served,
    /// Ids that end generation and are not output as text.
    pub(crate) eos_ids: Vec<u32>,
    pub(crate) max_body_bytes: usize,
}

impl HttpApi {
    /// The API over `engine`.
    pub fn new(
        engine: EngineHandle,
        served: Served,
        eos_ids: Vec<u32>,
        max_body_bytes: usize,
    ) -> Self {
        Self { engine, served, eos_ids, max_body_bytes }
    }
}

/// The routes, with OpenAI-shaped 404/405 for everything else.
pub fn router(api: Arc<HttpApi>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/health", get(health))
        .fallback(|req: Request| async move { ApiError::no_route(req.uri().path()) })
        .method_not_allowed_fallback(|| async { ApiError::wrong_method() })
        .with_state(api)
}

/// Serves `api` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    api: Arc<HttpApi>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(api)).with_graceful_shutdown(shutdown).await
}

async fn completions(State(api): State<Arc<HttpApi>>, req: Request) -> Response {
    generate(&api, Endpoint::Completion, req).await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat(State(api): State<Arc<HttpApi>>, req: Request) -> Response {
    generate(&api, Endpoint::Chat, req).await.unwrap_or_else(IntoResponse::into_response)
}

async fn generate(api: &HttpApi, endpoint: Endpoint, req: Request) -> Result<Response, ApiError> {
    let parsed = match read_body(req, api.max_body_bytes).await {
        Ok(body) => request::parse(&api.served, endpoint, &body),
        Err(e) => Err(e),
    };
    // Refusals before submission are counted here; the engine counts its own.
    let job =
        parsed.inspect_err(|_| api.engine.refused(crate::metrics::status::INVALID_ARGUMENT))?;
    respond::respond(api, job).await
}

/// Reads the body, refusing more than `limit` bytes.
async fn read_body(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || -> ApiError {
        invalid("body", format!("the request body exceeds the limit of {limit} bytes")).into()
    };
    let drain_cap = limit.saturating_mul(DRAIN_FACTOR);
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > drain_cap) {
        return Err(too_large());
    }
    let mut data = req.into_body().into_data_stream();
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = data.next().await {
        let frame =
            frame.map_err(|e| ApiError::from(invalid("body", format!("reading it: {e}"))))?;
        total += frame.len();
        if total <= limit {
            buf.extend_from_slice(&frame);
        } else if total > drain_cap {
            break;
        }
    }
    if total > limit {
        return Err(too_large());
    }
    Ok(Bytes::from(buf))
}

fn model_card(api: &HttpApi) -> serde_json::Value {
    json!({
        "id": api.served.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "fathom",
        "max_model_len": api.served.limits.max_context,
    })
}

async fn models(State(api): State<Arc<HttpApi>>) -> Response {
    respond::json_response(json!({"object": "list", "data": [model_card(&api)]}))
}

async fn model(State(api): State<Arc<HttpApi>>, Path(id): Path<String>) -> Response {
    if id != api.served.model_name {
        return ApiError::unknown_model(&id, &api.served.model_name).into_response();
    }
    respond::json_response(model_card(&api))
}

async fn health(State(api): State<Arc<HttpApi>>) -> Response {
    let state = api.engine.status().state;
    let (code, name) = match state {
        ServingState::Serving => (StatusCode::OK, "serving"),
        ServingState::WaitingForWorkers => (StatusCode::SERVICE_UNAVAILABLE, "waiting_for_workers"),
        ServingState::Preparing => (StatusCode::SERVICE_UNAVAILABLE, "preparing"),
        ServingState::Reconfiguring => (StatusCode::SERVICE_UNAVAILABLE, "reconfiguring"),
    };
    let mut r = respond::json_response(json!({"status": name}));
    *r.status_mut() = code;
    r
}
