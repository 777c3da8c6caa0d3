//! RL rollouts through a real cluster (issue 12): `fathom worker` ×W + `fathom coordinator` on
//! loopback serving a golden HF checkpoint (`tests/fixtures/golden/<case>`), driven over gRPC.
//!
//! - Routed experts stream with the tokens (the first chunk covers the prompt, every later chunk
//!   the one position fed since) and equal HF transformers' router decisions (teacher-forced:
//!   the greedy rollout feeds exactly HF's teacher-forced sequence), on W=1 and on W=2 (EP over
//!   two worker processes).
//! - Seeded sampling (temperature 1, top-k 5, top-p 0.9) with logprobs and masks: every token
//!   lies in its mask, masks hold ≤ 5 ids, logprobs ≤ 0, and tokens, masks and logprobs are
//!   bit-identical to the in-process W=1 run, to a second cluster run, and across cluster layouts.
//! - A request without options gets nothing but tokens on the wire (every extra field empty, and
//!   the chunk encodes to exactly the size of a tokens-only chunk).

mod cluster_support;

use cluster_support::{Cluster, Opts};
use fathom_common::ModelConfig;
use fathom_common::ids::Epoch;
use fathom_common::plan::{ParallelPlan, PlanSpec};
use fathom_kernels::comm::CommOptions;
use fathom_proto::v1::inference_client::InferenceClient;
use fathom_proto::v1::{
    GenerateChunk, GenerateOptions, GenerateRequest, SamplingParams, TokenIds, generate_request,
    generate_response,
};
use fathom_worker::parallel::{GenerateRequest as LocalRequest, run_local};
use fathom_worker::weights::CheckpointReader;
use prost::Message;
use std::path::PathBuf;

const CASE: &str = "sparse_long";
const MARGIN: f64 = 1e-4;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden").join(CASE)
}

struct Golden {
    cfg: ModelConfig,
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    /// [position][moe_layer][top_k]
    topk: Vec<Vec<Vec<u32>>>,
    near_tie: Vec<bool>,
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn golden() -> Golden {
    let dir = golden_dir();
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let t_len = g["teacher_forced_len"].as_u64().unwrap() as usize;
    let mut topk = vec![Vec::new(); t_len];
    let mut near_tie = vec![false; t_len];
    for layer in g["routing"].as_array().unwrap() {
        for t in 0..t_len {
            topk[t].push(u32s(&layer["topk"][t]));
            let m = layer["margin"][t].as_f64().unwrap();
            let gm = layer["group_margin"][t].as_f64().unwrap_or(f64::INFINITY);
            near_tie[t] |= m < MARGIN || gm < MARGIN;
        }
    }
    Golden {
        cfg: ModelConfig::from_file(&dir.join("config.json")).unwrap(),
        prompt: u32s(&g["prompt_ids"]),
        greedy: u32s(&g["greedy_ids"]),
        topk,
        near_tie,
    }
}

fn request(
    prompt: &[u32],
    n: u32,
    sampling: SamplingParams,
    options: GenerateOptions,
) -> GenerateRequest {
    GenerateRequest {
        input: Some(generate_request::Input::TokenIds(TokenIds { ids: prompt.to_vec() })),
        sampling: Some(SamplingParams { max_tokens: n, ignore_eos: true, ..sampling }),
        options: Some(options),
        ..Default::default()
    }
}

/// Every chunk of a finished stream.
async fn chunks(
    client: &mut InferenceClient<tonic::transport::Channel>,
    req: GenerateRequest,
) -> Vec<GenerateChunk> {
    let mut stream = client.generate(req).await.expect("generate").into_inner();
    let mut out = Vec::new();
    let mut finished = false;
    while let Some(msg) = stream.message().await.expect("stream") {
        match msg.kind {
            Some(generate_response::Kind::Chunk(c)) => out.push(c),
            Some(generate_response::Kind::Final(_)) => finished = true,
            None => {}
        }
    }
    assert!(finished, "stream ended without a final message");
    out
}

/// Routed experts of a stream as [position][moe_layer][top_k], checking that they arrive with
/// the tokens: every chunk carries the positions fed since the previous one, contiguously.
fn streamed_routing(
    chunks: &[GenerateChunk],
    cfg: &ModelConfig,
    prompt_len: usize,
) -> Vec<Vec<Vec<u32>>> {
    let mut rows = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.token_ids.len(), 1, "chunk {i}: one token per chunk");
        let r = c.routed_experts.as_ref().unwrap_or_else(|| panic!("chunk {i}: no routed experts"));
        let want_positions = if i == 0 { prompt_len } else { 1 };
        assert_eq!(r.start_position as usize, rows.len(), "chunk {i}: start_position");
        assert_eq!(r.positions as usize, want_positions, "chunk {i}: positions");
        assert_eq!(r.moe_layers as usize, cfg.num_moe_layers(), "chunk {i}: moe_layers");
        assert_eq!(r.top_k as usize, cfg.num_experts_per_tok, "chunk {i}: top_k");
        assert_eq!(r.bytes_per_id, 1, "chunk {i}: ≤ 256 experts take one byte per id");
        assert_eq!(r.ids.len(), want_positions * cfg.num_moe_layers() * cfg.num_experts_per_tok);
        for pos in r.ids.chunks(cfg.num_moe_layers() * cfg.num_experts_per_tok) {
            rows.push(
                pos.chunks(cfg.num_experts_per_tok)
                    .map(|l| l.iter().map(|&b| u32::from(b)).collect())
                    .collect(),
            );
        }
    }
    rows
}

fn start(w: usize) -> Cluster {
    let opts = Opts { workers: w, extra: vec!["--tp".into(), "1".into()], etcd: None };
    Cluster::start_with_model(opts, golden_dir()).unwrap_or_else(|e| panic!("cluster W={w}: {e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_experts_stream_with_tokens_and_equal_hf_router() {
    let g = golden();
    let n = g.greedy.len() as u32;
    let opts = GenerateOptions { return_routed_experts: true, ..Default::default() };
    for w in [1, 2] {
        let c = start(w);
        let mut client = c.client().await.unwrap();
        let got = chunks(&mut client, request(&g.prompt, n, SamplingParams::default(), opts)).await;
        let tokens: Vec<u32> = got.iter().flat_map(|c| c.token_ids.clone()).collect();
        assert_eq!(tokens, g.greedy, "W={w}: greedy ids differ from HF");
        let routing = streamed_routing(&got, &g.cfg, g.prompt.len());
        assert_eq!(routing.len(), g.topk.len(), "W={w}: prompt + generated - 1 positions");
        let mut excluded = 0;
        for (t, (ours, hf)) in routing.iter().zip(&g.topk).enumerate() {
            if g.near_tie[t] {
                excluded += 1;
                continue;
            }
            assert_eq!(ours, hf, "W={w}: position {t}: routed experts [moe_layer][k]");
        }
        eprintln!(
            "W={w}: {} positions compared with HF over gRPC, {excluded} excluded (margin < {MARGIN:e})",
            routing.len()
        );
        assert_eq!(excluded, 0, "W={w}: the fixture has no near-tie router margins");
    }
}

fn sampling(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_k: 5,
        top_p: 0.9,
        seed: Some(seed),
        ..Default::default()
    }
}

/// (token, mask, logprob bits) per generated token.
type Decisions = Vec<(u32, Vec<u32>, u32)>;

fn decisions(chunks: &[GenerateChunk]) -> Decisions {
    chunks
        .iter()
        .map(|c| {
            assert_eq!((c.token_ids.len(), c.logprobs.len(), c.sampling_masks.len()), (1, 1, 1));
            let m = &c.sampling_masks[0];
            assert!(!m.all, "top-k 5 truncates: the mask is never the whole vocabulary");
            (c.token_ids[0], m.token_ids.clone(), c.logprobs[0].logprob.to_bits())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_rollouts_with_masks_and_logprobs_are_reproducible_over_grpc() {
    let g = golden();
    let n = 24u32;
    let seed = 0xA11CE;
    let opts = GenerateOptions {
        return_logprobs: true,
        top_logprobs: 3,
        return_sampling_mask: true,
        ..Default::default()
    };
    // In-process W=1 reference with the same sampler parameters.
    let reader = CheckpointReader::open(&golden_dir()).unwrap();
    let plan = ParallelPlan::build(&PlanSpec::new(Epoch(1), 1, 1), &g.cfg).unwrap();
    let local = run_local(
        &g.cfg,
        &reader,
        &plan,
        &[LocalRequest {
            prompts: vec![g.prompt.clone()],
            max_new_tokens: n as usize,
            sampling: fathom_worker::sampling::SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                top_k: 5,
                seed,
                return_mask: true,
                top_logprobs: 3,
            },
            stop_ids: Vec::new(),
            keep_logits: false,
            record_routing: false,
            block_size: 16,
        }],
        CommOptions::default(),
    )
    .unwrap();
    let want: Decisions = local[0].sampled[0]
        .iter()
        .map(|x| (x.token, x.mask.clone().unwrap(), x.logprob.to_bits()))
        .collect();

    let mut per_layout = Vec::new();
    for w in [1, 2] {
        let c = start(w);
        let mut client = c.client().await.unwrap();
        let first = chunks(&mut client, request(&g.prompt, n, sampling(seed), opts)).await;
        let second = chunks(&mut client, request(&g.prompt, n, sampling(seed), opts)).await;
        let a = decisions(&first);
        assert_eq!(a, decisions(&second), "W={w}: two runs differ");
        for (i, ((tok, mask, lp), c)) in a.iter().zip(&first).enumerate() {
            assert!(!mask.is_empty() && mask.len() <= 5, "W={w} token {i}: mask {mask:?}");
            assert!(mask.windows(2).all(|p| p[0] < p[1]), "W={w} token {i}: mask not ascending");
            assert!(mask.binary_search(tok).is_ok(), "W={w} token {i}: {tok} outside {mask:?}");
            let lp = f32::from_bits(*lp);
            assert!(lp.is_finite() && lp <= 0.0, "W={w} token {i}: logprob {lp}");
            let top = &c.logprobs[0].top;
            assert!(!top.is_empty() && top.len() <= 3, "W={w} token {i}: top {top:?}");
            assert!(top.iter().all(|t| mask.contains(&t.token_id) && t.logprob <= 0.0));
        }
        assert_eq!(a, want, "W={w}: cluster differs from the in-process W=1 sampler");
        let other = chunks(&mut client, request(&g.prompt, n, sampling(seed + 1), opts)).await;
        assert_ne!(decisions(&other), a, "W={w}: the seed changed nothing");
        per_layout.push(a);
    }
    assert_eq!(per_layout[0], per_layout[1], "W=1 and W=2 clusters differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_options_get_nothing_but_tokens() {
    let g = golden();
    let c = start(2);
    let mut client = c.client().await.unwrap();
    let bare =
        chunks(&mut client, request(&g.prompt, 8, sampling(5), GenerateOptions::default())).await;
    assert_eq!(bare.len(), 8);
    for (i, ch) in bare.iter().enumerate() {
        assert!(ch.routed_experts.is_none(), "chunk {i}: routed experts sent unasked");
        assert!(ch.logprobs.is_empty(), "chunk {i}: logprobs sent unasked");
        assert!(ch.sampling_masks.is_empty(), "chunk {i}: masks sent unasked");
        assert!(ch.top_logits.is_empty(), "chunk {i}: top logits sent unasked");
        let tokens_only = GenerateChunk {
            token_ids: ch.token_ids.clone(),
            text_delta: ch.text_delta.clone(),
            ..Default::default()
        };
        assert_eq!(ch.encoded_len(), tokens_only.encoded_len(), "chunk {i}: extra bytes");
    }
    // The same request with every option: the fields are there (so the checks above can fail),
    // and the tokens are the same (capture does not change what is drawn).
    let all = GenerateOptions {
        return_routed_experts: true,
        return_logprobs: true,
        return_sampling_mask: true,
        ..Default::default()
    };
    let full = chunks(&mut client, request(&g.prompt, 8, sampling(5), all)).await;
    let ids =
        |cs: &[GenerateChunk]| cs.iter().flat_map(|c| c.token_ids.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&full), ids(&bare), "asking for outputs changed the tokens");
    for (i, ch) in full.iter().enumerate() {
        assert!(ch.routed_experts.is_some(), "chunk {i}: no routed experts");
        assert_eq!((ch.logprobs.len(), ch.sampling_masks.len()), (1, 1), "chunk {i}");
        assert!(ch.encoded_len() > bare[i].encoded_len());
    }
}
