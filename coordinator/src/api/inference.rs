//! `fathom.v1.Inference`: Generate (validated, queued to the engine, streamed back) and
//! ModelInfo.
//!
//! The response stream is the engine's per-request channel; dropping it (client cancel) closes
//! the channel, which the engine notices at the next step boundary. A `grpc-timeout` header
//! becomes the request's deadline.

use super::validate::{RequestLimits, validate};
use crate::engine::detok::TextCodec;
use crate::engine::{EngineHandle, Event, Submission};
use fathom_common::ModelConfig;
use fathom_proto::v1::inference_server::Inference;
use fathom_proto::v1::{
    GenerateRequest, GenerateResponse, ModelInfoRequest, ModelInfoResponse, generate_response,
};
use futures::StreamExt;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The Inference service.
#[derive(Debug, Clone)]
pub struct InferenceApi {
    engine: EngineHandle,
    model: ModelConfig,
    model_name: String,
    codec: Option<TextCodec>,
    limits: RequestLimits,
}

impl InferenceApi {
    pub fn new(
        engine: EngineHandle,
        model: ModelConfig,
        model_name: String,
        codec: Option<TextCodec>,
        max_context: usize,
    ) -> Self {
        let limits = RequestLimits { vocab_size: model.vocab_size, max_context };
        Self { engine, model, model_name, codec, limits }
    }
}

/// Parses a `grpc-timeout` header value (`<digits><unit>`, unit one of H M S m u n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub(crate) fn server_seed() -> u64 {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    // SplitMix64 finalizer of the clock: distinct per request, no global state.
    let mut z = (t as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

type GenStream = Pin<Box<dyn futures::Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceApi {
    type GenerateStream = GenStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|d| Instant::now() + d);
        let req = request.into_inner();
        let v = validate(&req, &self.limits, self.codec.as_ref())
            .inspect_err(|e| self.engine.refused(crate::metrics::status::of(e)))?;
        let request_id = if v.request_id.is_empty() {
            format!("req-{:016x}", server_seed())
        } else {
            v.request_id
        };
        // One message per token plus the final: the engine never blocks on a slow client.
        let (tx, rx) = mpsc::channel(v.max_tokens + 2);
        self.engine.submit(Submission {
            request_id,
            prompt: v.prompt,
            max_tokens: v.max_tokens,
            seed: v.seed.unwrap_or_else(server_seed),
            sampling: v.sampling,
            outputs: v.outputs,
            return_prompt_ids: v.return_prompt_ids,
            deadline,
            tx,
        })?;
        let stream = ReceiverStream::new(rx).map(|ev| match ev {
            Event::Chunk(c) => {
                Ok(GenerateResponse { kind: Some(generate_response::Kind::Chunk(c)) })
            }
            Event::Final(f) => {
                Ok(GenerateResponse { kind: Some(generate_response::Kind::Final(f)) })
            }
            Event::Error(e) => Err(Status::from(e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn model_info(
        &self,
        _request: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        let m = &self.model;
        Ok(Response::new(ModelInfoResponse {
            model_type: m.model_type.clone(),
            vocab_size: m.vocab_size as u32,
            max_position_embeddings: m.max_position_embeddings as u32,
            num_hidden_layers: m.num_hidden_layers as u32,
            eos_token_ids: m.eos_ids(),
            model_name: self.model_name.clone(),
            n_routed_experts: m.n_routed_experts as u32,
            num_experts_per_tok: m.num_experts_per_tok as u32,
            first_k_dense_replace: m.first_k_dense_replace as u32,
            has_tokenizer: self.codec.is_some(),
            max_context_tokens: self.limits.max_context as u32,
            epoch: self.engine.status().epoch,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }
}
