//! `fathom generate`: the arguments shared by the in-process (`--model`) and gRPC (`--endpoint`)
//! forms, the gRPC client, and the one output format both print ([`GenerationOutput`]).
//!
//! Output contract (CLI.md): `--json` prints one JSON object on stdout with `prompt_ids`,
//! `generated_ids`, `text`, `finish_reason` (and `steps`, `routed_experts`, `logprobs`,
//! `sampling_masks` when asked); otherwise the text (or ids without a tokenizer) streams to
//! stdout and timings go to stderr.

use anyhow::{Context, Result, bail};
use clap::Args;
use fathom_proto::v1::inference_client::InferenceClient;
use fathom_proto::v1::{
    FinishReason, GenerateOptions, GenerateRequest, SamplingParams, TokenIds, generate_request,
    generate_response,
};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `fathom generate` arguments (both forms).
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Model directory: run in this process.
    #[arg(long, conflicts_with = "endpoint", required_unless_present = "endpoint")]
    pub model: Option<PathBuf>,
    /// gRPC endpoint of a running cluster, e.g. http://127.0.0.1:50051.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Prompt text (tokenized by the model's tokenizer).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    pub prompt: Option<String>,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: u32,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Extra stop token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub stop_ids: Vec<u32>,
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Record the K largest logits per generated token (`steps[i].top`).
    #[arg(long, default_value_t = 0)]
    pub logits_topk: u32,
    #[arg(long)]
    pub return_routed_experts: bool,
    #[arg(long)]
    pub return_logprobs: bool,
    /// In-process only: ranks.
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    /// In-process only: tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// In-process only: collective backend.
    #[arg(long, default_value = "local")]
    pub comm: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Per-request deadline in milliseconds (gRPC `grpc-timeout`); 0 means none.
    #[arg(long, default_value_t = 0)]
    pub timeout_ms: u64,
}

/// One step's largest logits.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepTop {
    pub top: Vec<(u32, f32)>,
}

/// What `fathom generate` prints (both forms fill it the same way).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GenerationOutput {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    /// `length` or `stop`.
    pub finish_reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepTop>>,
    /// Per position fed through the model, per MoE layer, the sorted expert ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routed_experts: Option<Vec<Vec<Vec<u32>>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling_masks: Option<Vec<Vec<u32>>>,
}

impl GenerationOutput {
    /// Prints the JSON object (with `--json`) or the final newline after streamed text.
    pub fn print(&self, json: bool) -> Result<()> {
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(out, "{}", serde_json::to_string(self)?)?;
        } else {
            writeln!(out)?;
        }
        Ok(())
    }
}

/// Timings of one streamed generation.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub ttft: Duration,
    pub total: Duration,
    pub tokens: usize,
}

impl Timings {
    pub fn print(&self) {
        let decode = self.total.saturating_sub(self.ttft);
        let tps = if self.tokens > 1 && !decode.is_zero() {
            (self.tokens - 1) as f64 / decode.as_secs_f64()
        } else {
            0.0
        };
        say!(
            "fathom: {} tokens, time to first token {:.1} ms, total {:.1} ms, {:.1} tokens/s",
            self.tokens,
            self.ttft.as_secs_f64() * 1e3,
            self.total.as_secs_f64() * 1e3,
            tps
        );
    }
}

/// `fathom generate --endpoint`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    let endpoint = args.endpoint.clone().context("--endpoint is required")?;
    let rt = tokio::runtime::Runtime::new()?;
    let (out, timings) = rt.block_on(generate_remote(&endpoint, args, !args.json))?;
    out.print(args.json)?;
    if !args.json {
        timings.print();
    }
    Ok(())
}

/// Builds the request from the arguments.
pub fn request_of(args: &GenerateArgs) -> GenerateRequest {
    let input = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => generate_request::Input::Text(text.clone()),
        (None, ids) => {
            generate_request::Input::TokenIds(TokenIds { ids: ids.clone().unwrap_or_default() })
        }
    };
    GenerateRequest {
        request_id: String::new(),
        input: Some(input),
        sampling: Some(SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            max_tokens: args.max_new_tokens,
            stop_token_ids: args.stop_ids.clone(),
            ignore_eos: args.ignore_eos,
        }),
        options: Some(GenerateOptions {
            return_routed_experts: args.return_routed_experts,
            return_logprobs: args.return_logprobs,
            top_logprobs: 0,
            return_sampling_mask: args.return_logprobs,
            logits_top_k: args.logits_topk,
            return_prompt_token_ids: true,
        }),
    }
}

/// Sends one request to `endpoint` and collects the stream; with `stream_text` the text deltas
/// are printed to stdout as they arrive.
pub async fn generate_remote(
    endpoint: &str,
    args: &GenerateArgs,
    stream_text: bool,
) -> Result<(GenerationOutput, Timings)> {
    let url =
        if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    let mut client = InferenceClient::connect(url.clone())
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let mut request = tonic::Request::new(request_of(args));
    if args.timeout_ms > 0 {
        request.set_timeout(Duration::from_millis(args.timeout_ms));
    }
    let started = Instant::now();
    let mut stream = match client.generate(request).await {
        Ok(r) => r.into_inner(),
        Err(s) => bail!("generate: {:?}: {}", s.code(), s.message()),
    };
    let mut out = GenerationOutput::default();
    let mut ttft = None;
    let mut steps = Vec::new();
    let mut logprobs = Vec::new();
    let mut masks = Vec::new();
    let mut routed: Vec<Vec<Vec<u32>>> = Vec::new();
    let mut finished = false;
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(s) => bail!("generate: {:?}: {}", s.code(), s.message()),
        };
        match msg.kind {
            Some(generate_response::Kind::Chunk(c)) => {
                ttft.get_or_insert_with(|| started.elapsed());
                out.generated_ids.extend_from_slice(&c.token_ids);
                out.text.push_str(&c.text_delta);
                if stream_text {
                    let mut so = std::io::stdout().lock();
                    if c.text_delta.is_empty() && !c.token_ids.is_empty() {
                        for id in &c.token_ids {
                            write!(so, "[{id}]")?;
                        }
                    } else {
                        write!(so, "{}", c.text_delta)?;
                    }
                    so.flush()?;
                }
                steps.extend(c.top_logits.iter().map(|t| StepTop {
                    top: t.entries.iter().map(|e| (e.token_id, e.logit)).collect(),
                }));
                logprobs.extend(c.logprobs.iter().map(|l| l.logprob));
                masks.extend(c.sampling_masks.iter().map(|m| m.token_ids.clone()));
                if let Some(r) = c.routed_experts {
                    routed.extend(unpack_routed(&r));
                }
            }
            Some(generate_response::Kind::Final(f)) => {
                out.prompt_ids = f.prompt_token_ids;
                out.finish_reason = match FinishReason::try_from(f.finish_reason) {
                    Ok(FinishReason::Stop) => "stop",
                    Ok(FinishReason::Length) => "length",
                    Ok(FinishReason::Aborted) => "aborted",
                    _ => "unspecified",
                }
                .into();
                finished = true;
            }
            None => {}
        }
    }
    if !finished {
        bail!("the stream ended without a final message");
    }
    if args.logits_topk > 0 {
        out.steps = Some(steps);
    }
    if args.return_logprobs {
        out.logprobs = Some(logprobs);
        out.sampling_masks = Some(masks);
    }
    if args.return_routed_experts {
        out.routed_experts = Some(routed);
    }
    let timings = Timings {
        ttft: ttft.unwrap_or_default(),
        total: started.elapsed(),
        tokens: out.generated_ids.len(),
    };
    Ok((out, timings))
}

/// Unpacks `RoutedExperts` rows into [position][moe_layer][top_k].
fn unpack_routed(r: &fathom_proto::v1::RoutedExperts) -> Vec<Vec<Vec<u32>>> {
    let (layers, k, b) = (r.moe_layers as usize, r.top_k as usize, r.bytes_per_id as usize);
    if !matches!(b, 1 | 2) || r.ids.len() != r.positions as usize * layers * k * b {
        return Vec::new();
    }
    let id = |i: usize| -> u32 {
        if b == 2 {
            u16::from_le_bytes([r.ids[2 * i], r.ids[2 * i + 1]]) as u32
        } else {
            r.ids[i] as u32
        }
    };
    (0..r.positions as usize)
        .map(|p| {
            (0..layers).map(|l| (0..k).map(|j| id((p * layers + l) * k + j)).collect()).collect()
        })
        .collect()
}
