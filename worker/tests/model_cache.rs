//! Model-level properties on the `tiny` preset with random weights: chunked prefill equals
//! one-shot, incremental decode equals full recompute, a mixed batch (prefill chunk + decodes)
//! equals each sequence alone, head and expert shards sum to the whole, MTP produces draft
//! logits, and bad input is a clear error that leaves the cache untouched.

use fathom_common::ModelConfig;
use fathom_worker::kv::{BlockAllocator, KvError};
use fathom_worker::model::experts::{Assignment, Experts};
use fathom_worker::model::ffn::Ffn;
use fathom_worker::model::mla::Mla;
use fathom_worker::model::random::random_source;
use fathom_worker::model::{ForwardOptions, LogitsMode, Model, ModelError, SeqInput, ShardSpec};
use fathom_worker::weights::MemorySource;

const BS: usize = 4;

fn tiny() -> (ModelConfig, MemorySource, Model) {
    let cfg = ModelConfig::tiny();
    let src = random_source(&cfg, 7);
    let model = Model::load(&src, cfg.clone(), ShardSpec::full(&cfg)).unwrap();
    (cfg, src, model)
}

fn prompt(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 97 + seed * 31 + 5) % 512).collect()
}

fn all_logits() -> ForwardOptions {
    ForwardOptions { logits: LogitsMode::All, ..Default::default() }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Logits of every token, fed in `chunks`.
fn chunked(model: &Model, tokens: &[u32], chunks: &[usize]) -> Vec<f32> {
    let mut cache = model.new_cache(BS, 32).unwrap();
    let mut alloc = BlockAllocator::new(32);
    let mut table = Vec::new();
    let mut out = Vec::new();
    let mut pos = 0;
    for &c in chunks {
        alloc.grow(&mut table, pos + c, BS).unwrap();
        let seq = SeqInput { tokens: &tokens[pos..pos + c], start_pos: pos, block_table: &table };
        out.extend(model.forward(&[seq], &mut cache, &all_logits()).unwrap().logits);
        pos += c;
    }
    out
}

#[test]
fn chunked_prefill_and_incremental_decode_equal_one_shot() {
    let (_, _, model) = tiny();
    // 23 tokens > index_topk 8: sparse selection bites.
    let tokens = prompt(23, 1);
    let one = chunked(&model, &tokens, &[23]);
    assert!(one.iter().all(|v| v.is_finite()));
    let scale = one.iter().map(|v| v.abs()).fold(0.0, f32::max);
    for chunks in [vec![5, 5, 5, 5, 3], vec![1; 23], vec![10, 1, 1, 11], vec![7, 16]] {
        let d = max_diff(&chunked(&model, &tokens, &chunks), &one);
        assert!(d <= 1e-5 * scale, "chunks {chunks:?}: max diff {d} (logit scale {scale})");
    }
}

#[test]
fn mixed_batch_equals_sequences_alone() {
    let (_, _, model) = tiny();
    let a = prompt(13, 2);
    let b = prompt(6, 3);
    let c = prompt(11, 4);
    let alone: Vec<Vec<f32>> =
        [&a, &b, &c].iter().map(|t| chunked(&model, t, &[t.len()])).collect();

    // Step 1 prefills a[..9] and all of b; step 2 mixes a's remaining chunk, a decode of b and
    // c's whole prompt, with interleaved block tables from one allocator.
    let mut cache = model.new_cache(BS, 32).unwrap();
    let mut alloc = BlockAllocator::new(32);
    let (mut ta, mut tb, mut tc) = (Vec::new(), Vec::new(), Vec::new());
    alloc.grow(&mut ta, 9, BS).unwrap();
    alloc.grow(&mut tb, 5, BS).unwrap();
    let out1 = model
        .forward(
            &[
                SeqInput { tokens: &a[..9], start_pos: 0, block_table: &ta },
                SeqInput { tokens: &b[..5], start_pos: 0, block_table: &tb },
            ],
            &mut cache,
            &all_logits(),
        )
        .unwrap();
    alloc.grow(&mut ta, 13, BS).unwrap();
    alloc.grow(&mut tb, 6, BS).unwrap();
    alloc.grow(&mut tc, 11, BS).unwrap();
    let out2 = model
        .forward(
            &[
                SeqInput { tokens: &a[9..], start_pos: 9, block_table: &ta },
                SeqInput { tokens: &b[5..], start_pos: 5, block_table: &tb },
                SeqInput { tokens: &c, start_pos: 0, block_table: &tc },
            ],
            &mut cache,
            &all_logits(),
        )
        .unwrap();
    let v = model.config().vocab_size;
    let tol = 1e-5 * alone[0].iter().map(|x| x.abs()).fold(0.0, f32::max);
    assert!(max_diff(&out1.logits[..9 * v], &alone[0][..9 * v]) <= tol);
    assert!(max_diff(&out1.logits[9 * v..], &alone[1][..5 * v]) <= tol);
    assert!(max_diff(&out2.logits[..4 * v], &alone[0][9 * v..]) <= tol);
    assert!(max_diff(&out2.logits[4 * v..5 * v], &alone[1][5 * v..]) <= tol);
    assert!(max_diff(&out2.logits[5 * v..], &alone[2]) <= tol);

    // LastPerSeq returns one row per sequence: the last token of each.
    let mut cache = model.new_cache(BS, 32).unwrap();
    let t: Vec<u32> = (0..16).collect();
    let o = model
        .forward(
            &[
                SeqInput { tokens: &a, start_pos: 0, block_table: &t[..4] },
                SeqInput { tokens: &c, start_pos: 0, block_table: &t[4..8] },
            ],
            &mut cache,
            &ForwardOptions::default(),
        )
        .unwrap();
    assert_eq!(o.logit_rows, vec![12, 23]);
    assert!(max_diff(&o.logits[..v], &alone[0][12 * v..]) <= tol);
    assert!(max_diff(&o.logits[v..], &alone[2][10 * v..]) <= tol);
}

#[test]
fn head_shards_sum_to_full_attention() {
    let (cfg, src, model) = tiny();
    let tokens = prompt(12, 5);
    let table: Vec<u32> = (0..4).collect();
    let seqs = [SeqInput { tokens: &tokens, start_pos: 0, block_table: &table }];
    let ctx = model.step_ctx(&seqs);
    let x: Vec<f32> =
        (0..12 * cfg.hidden_size).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let prefix = "model.layers.1.self_attn";
    let run = |heads: std::ops::Range<usize>| {
        let mla = Mla::load(&src, &cfg, prefix, heads).unwrap();
        let mut cache = model.new_cache(BS, 8).unwrap();
        mla.forward(&x, &ctx, &mut cache, 1).unwrap()
    };
    let full = run(0..4);
    let a = run(0..1);
    let b = run(1..3);
    let c = run(3..4);
    let sum: Vec<f32> = (0..full.len()).map(|i| a[i] + b[i] + c[i]).collect();
    assert!(max_diff(&sum, &full) < 1e-5, "{}", max_diff(&sum, &full));
    assert!(matches!(Mla::load(&src, &cfg, prefix, 3..5), Err(ModelError::Shard(_))));
}

#[test]
fn expert_shards_over_assignment_lists_sum_to_full_moe() {
    let (cfg, src, model) = tiny();
    let Ffn::Moe(moe) = &model.layers[2].ffn else { panic!("layer 2 of tiny is MoE") };
    let n = 9;
    let h = cfg.hidden_size;
    let x: Vec<f32> = (0..n * h).map(|i| ((i * 13 % 29) as f32 / 14.0) - 1.0).collect();
    let assignments = moe.router.route(&x);
    assert_eq!(assignments.len(), n * cfg.num_experts_per_tok);
    let mut full = vec![0.0; n * h];
    moe.experts.forward(&x, &assignments, 2, &mut full).unwrap();
    let mut parts = vec![0.0; n * h];
    for ids in [(0..5).collect::<Vec<u32>>(), (5..16).collect()] {
        let shard = Experts::load(&src, "model.layers.2.mlp.experts", &ids, &cfg).unwrap();
        let mine: Vec<Assignment> =
            assignments.iter().filter(|a| ids.contains(&a.expert)).copied().collect();
        shard.forward(&x, &mine, 2, &mut parts).unwrap();
        // An expert it does not hold is an error naming it.
        let other = assignments.iter().find(|a| !ids.contains(&a.expert)).unwrap();
        assert!(matches!(
            shard.forward(&x, &[*other], 2, &mut vec![0.0; n * h]),
            Err(ModelError::ExpertNotLoaded { layer: 2, expert }) if expert == other.expert
        ));
    }
    assert!(max_diff(&parts, &full) < 1e-5);
}

#[test]
fn mtp_produces_draft_logits_from_its_own_cache_layer() {
    let (cfg, _, model) = tiny();
    assert_eq!(model.mtp.len(), 1);
    let tokens = prompt(10, 6);
    let table: Vec<u32> = (0..8).collect();
    let mut cache = model.new_cache(BS, 8).unwrap();
    let out = model
        .forward(
            &[SeqInput { tokens: &tokens, start_pos: 0, block_table: &table }],
            &mut cache,
            &all_logits(),
        )
        .unwrap();
    let hidden = model.final_norm(&out.hidden);
    // Row i pairs h_i with token t_{i+1}.
    let snapshot = |cache: &fathom_worker::kv::PagedKvCache,
                    layers: std::ops::Range<usize>|
     -> Vec<Vec<f32>> {
        layers.map(|l| cache.read_latent(l, &table, 10).unwrap()).collect()
    };
    let main_before = snapshot(&cache, 0..cfg.num_hidden_layers);
    let next = &tokens[1..];
    let seq = [SeqInput { tokens: next, start_pos: 0, block_table: &table }];
    let draft = model.mtp_forward(0, &seq, &hidden[..9 * cfg.hidden_size], &mut cache).unwrap();
    assert_eq!(draft.len(), 9 * cfg.vocab_size);
    assert!(draft.iter().all(|v| v.is_finite()));
    // MTP writes only its own cache layer (index num_hidden_layers).
    assert_eq!(snapshot(&cache, 0..cfg.num_hidden_layers), main_before);
    let mtp_layer = snapshot(&cache, cfg.num_hidden_layers..cfg.num_hidden_layers + 1);
    assert!(mtp_layer[0][..9 * 40].iter().any(|&v| v != 0.0));
    // Depends on the hidden state.
    let zeros = vec![0.5; 9 * cfg.hidden_size];
    let other = model.mtp_forward(0, &seq, &zeros, &mut cache).unwrap();
    assert!(max_diff(&other, &draft) > 1e-3);
    assert!(matches!(
        model.mtp_forward(0, &seq, &zeros[..5], &mut cache),
        Err(ModelError::MtpInput(_))
    ));
    assert!(matches!(model.mtp_forward(1, &seq, &zeros, &mut cache), Err(ModelError::NoMtp)));
}

#[test]
fn bad_input_is_a_clear_error_and_leaves_the_cache_untouched() {
    let (cfg, _, model) = tiny();
    let table: Vec<u32> = (0..8).collect();
    let mut cache = model.new_cache(BS, 8).unwrap();
    let good = prompt(6, 7);
    let before = model
        .forward(
            &[SeqInput { tokens: &good, start_pos: 0, block_table: &table }],
            &mut cache,
            &all_logits(),
        )
        .unwrap();
    let mut bad = good.clone();
    bad[3] = 512;
    let err = model
        .forward(
            &[SeqInput { tokens: &bad, start_pos: 0, block_table: &table }],
            &mut cache,
            &all_logits(),
        )
        .unwrap_err();
    assert!(
        matches!(err, ModelError::TokenOutOfVocab { seq: 0, pos: 3, id: 512, vocab: 512 }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "token id 512 (sequence 0, position 3) is not below vocab_size 512"
    );
    let err = model
        .forward(
            &[SeqInput { tokens: &[], start_pos: 0, block_table: &table }],
            &mut cache,
            &all_logits(),
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::EmptySequence { seq: 0 }));
    let err = model
        .forward(
            &[SeqInput {
                tokens: &good,
                start_pos: cfg.max_position_embeddings - 2,
                block_table: &table,
            }],
            &mut cache,
            &all_logits(),
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::ContextTooLong { end: 1028, max: 1024, .. }), "{err}");
    let err = model
        .forward(
            &[SeqInput { tokens: &good, start_pos: 0, block_table: &table[..1] }],
            &mut cache,
            &all_logits(),
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::Kv(KvError::TableTooShort { .. })), "{err}");
    let err = model
        .forward(
            &[SeqInput { tokens: &good, start_pos: 0, block_table: &[0, 99] }],
            &mut cache,
            &all_logits(),
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::Kv(KvError::BlockOutOfRange { block: 99, .. })), "{err}");
    let wrong = fathom_worker::kv::PagedKvCache::new(fathom_worker::kv::CacheConfig {
        num_layers: 1,
        block_size: BS,
        num_blocks: 8,
        latent_dim: 40,
        index_dim: 32,
    })
    .unwrap();
    let mut wrong = wrong;
    assert!(matches!(
        model.forward(
            &[SeqInput { tokens: &good, start_pos: 0, block_table: &table }],
            &mut wrong,
            &all_logits()
        ),
        Err(ModelError::CacheMismatch(_))
    ));
    // A failed forward wrote nothing: the same good forward gives the same logits.
    let after = model
        .forward(
            &[SeqInput { tokens: &good, start_pos: 0, block_table: &table }],
            &mut cache,
            &all_logits(),
        )
        .unwrap();
    assert_eq!(before.logits, after.logits);
}
