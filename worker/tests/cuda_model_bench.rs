//! Full-width layer benchmark on the GPU (`full-width:2`: one dense and one MoE layer at the real
//! shapes, random bf16 weights made on the device): decode of one layer at batch 1 / 64 / 256 and
//! contexts 4K / 32K, each beside its HBM floor (bytes the layer must read ÷ the device-to-device
//! copy bandwidth measured in the same run).
//!
//! `#[ignore]`: a measurement, not a check. The GPU runner's bench mode runs it with
//! `--ignored`; it prints a markdown table (and `BENCH {json}` lines) and fails only on errors.
//! Without a GPU it prints `SKIP: ...` and returns.

mod cuda_support;

use cuda_support::gpu;
use fathom_common::ModelConfig;
use fathom_kernels::cuda::CudaDevice;
use fathom_worker::model_cuda::CudaModel;

/// Device-to-device copy bandwidth (bytes read + written per second) over 2 GiB.
fn copy_bandwidth(dev: &CudaDevice) -> f64 {
    let n = 1usize << 30; // bf16 elements = 2 GiB
    let src = dev.zeros::<half::bf16>(n).unwrap();
    let mut dst = dev.zeros::<half::bf16>(n).unwrap();
    let s = dev.stream();
    s.memcpy_dtod(&src, &mut dst).unwrap();
    dev.synchronize().unwrap();
    let reps = 5;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        s.memcpy_dtod(&src, &mut dst).unwrap();
    }
    dev.synchronize().unwrap();
    (2 * n * 2 * reps) as f64 / t.elapsed().as_secs_f64()
}

/// Bytes one decode step of layer `li` must read from HBM in *this* model's storage (bf16 GEMM
/// and kv_b weights; f32 q_a, indexer and router weights; bf16 latent; e4m3 indexer keys with one
/// f32 scale each):
/// all attention and indexer weights, the indexer keys of every context position, the selected
/// latent rows, and the FFN weights touched (dense MLP, or the shared expert plus the expected
/// number of distinct routed experts under uniform routing, 256·(1−(1−8/256)^B)).
fn floor_bytes(c: &ModelConfig, li: usize, b: usize, ctx: usize) -> f64 {
    let (h, ql, kl) = (c.hidden_size as f64, c.q_lora_rank as f64, c.kv_lora_rank as f64);
    let (nope, rope, v) =
        (c.qk_nope_head_dim as f64, c.qk_rope_head_dim as f64, c.v_head_dim as f64);
    let nh = c.num_attention_heads as f64;
    let (ih, id) = (c.index_n_heads as f64, c.index_head_dim as f64);
    let attn = 4.0 * ql * h
        + 2.0 * nh * (nope + rope) * ql
        + 2.0 * (kl + rope) * h
        + 2.0 * nh * (nope + v) * kl
        + 2.0 * h * nh * v
        + 4.0 * (ih * id * ql + id * h + ih * h);
    let keys = (ctx + 1) as f64;
    let cache = b as f64 * (keys * (id + 4.0) + keys.min(c.index_topk as f64) * (kl + rope) * 2.0);
    let ffn = if !c.is_moe_layer(li) {
        3.0 * h * c.intermediate_size as f64 * 2.0
    } else {
        let (e, k) = (c.n_routed_experts as f64, c.num_experts_per_tok as f64);
        let expert = 3.0 * h * c.moe_intermediate_size as f64 * 2.0;
        let distinct = e * (1.0 - (1.0 - k / e).powi(b as i32));
        4.0 * e * h + expert * (distinct + c.n_shared_experts as f64)
    };
    attn + cache + ffn
}

#[test]
#[ignore = "benchmark: run by the GPU runner's bench mode"]
fn full_width_layer_decode() {
    const TEST: &str = "full_width_layer_decode";
    let Some(dev) = gpu(TEST) else { return };
    let cfg = ModelConfig::preset("full-width:2").unwrap();
    let bw = copy_bandwidth(&dev);
    let t = std::time::Instant::now();
    let mut model = CudaModel::random(dev.clone(), cfg.clone(), None, 1).unwrap();
    eprintln!("random full-width:2 weights on the device in {:.1} s", t.elapsed().as_secs_f64());
    println!("copy bandwidth (d2d, read+write): {:.0} GB/s", bw / 1e9);
    println!();
    println!("| layer | batch | context | µs per decode step | HBM floor µs | × floor |");
    println!("|---|---|---|---|---|---|");
    // The grid, then the HF peer script's shapes (64×512, 256×128; 1×4096 is in both).
    let grid = [(1, 4096), (64, 4096), (256, 4096), (1, 32768), (64, 32768), (256, 32768)];
    for (b, ctx) in grid.into_iter().chain([(64usize, 512usize), (256, 128)]) {
        {
            let mut cache = model.new_cache(b, (ctx + 1).max(cfg.index_topk)).unwrap();
            model.fill_cache_random(&mut cache, 11).unwrap();
            for (li, name, grouped) in
                [(0, "dense", false), (1, "MoE", false), (1, "MoE grouped", true)]
            {
                model.set_grouped_experts(grouped);
                let us = model.time_decode_layer(li, &mut cache, ctx, 2, 5).unwrap();
                let floor = floor_bytes(&cfg, li, b, ctx) / bw * 1e6;
                println!("| {name} | {b} | {ctx} | {us:.0} | {floor:.0} | {:.1} |", us / floor);
                println!(
                    "BENCH {{\"layer\":\"{name}\",\"batch\":{b},\"context\":{ctx},\"us\":{us:.1},\"floor_us\":{floor:.1}}}"
                );
            }
            drop(cache);
        }
    }
}
