//! Random weights in memory under the HF names, for tests and benchmarks without a checkpoint
//! (`fathom checkpoint synth` writes real files; this only fills a [`MemorySource`]).
//!
//! Linear weights are uniform with std `1/sqrt(in)` so activations stay O(1) through the layers;
//! norm weights are `1 ± 0.1`; the router bias is small. Deterministic in `seed`.

use crate::weights::MemorySource;
use fathom_common::ModelConfig;
use fathom_kernels::Tensor;

struct Rng(u64);

impl Rng {
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Every tensor a DeepSeek-V3.2 model of `cfg` needs (main layers and MTP layers).
pub fn random_source(cfg: &ModelConfig, seed: u64) -> MemorySource {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut src = MemorySource::new();
    let mut put =
        |src: &mut MemorySource, name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n = shape.iter().product();
            let data = (0..n).map(|_| offset + scale * rng.next()).collect();
            src.insert(name, Tensor::new(shape, data));
        };
    let lin = |inp: usize| 3f32.sqrt() / (inp as f32).sqrt();
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    put(&mut src, "model.embed_tokens.weight".into(), vec![v, h], 1.0, 0.0);
    put(&mut src, "model.norm.weight".into(), vec![h], 0.1, 1.0);
    put(&mut src, "lm_head.weight".into(), vec![v, h], lin(h), 0.0);
    let (ql, kl, nope, rope, vd, nh) = (
        cfg.q_lora_rank,
        cfg.kv_lora_rank,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.num_attention_heads,
    );
    let (ih, id) = (cfg.index_n_heads, cfg.index_head_dim);
    for l in 0..cfg.num_hidden_layers + cfg.num_nextn_predict_layers {
        let p = format!("model.layers.{l}");
        let mut lin_w = |src: &mut MemorySource, name: &str, out: usize, inp: usize| {
            put(src, format!("{p}.{name}"), vec![out, inp], lin(inp), 0.0)
        };
        lin_w(&mut src, "self_attn.q_a_proj.weight", ql, h);
        lin_w(&mut src, "self_attn.q_b_proj.weight", nh * (nope + rope), ql);
        lin_w(&mut src, "self_attn.kv_a_proj_with_mqa.weight", kl + rope, h);
        lin_w(&mut src, "self_attn.kv_b_proj.weight", nh * (nope + vd), kl);
        lin_w(&mut src, "self_attn.o_proj.weight", h, nh * vd);
        lin_w(&mut src, "self_attn.indexer.wq_b.weight", ih * id, ql);
        lin_w(&mut src, "self_attn.indexer.wk.weight", id, h);
        lin_w(&mut src, "self_attn.indexer.weights_proj.weight", ih, h);
        if cfg.is_moe_layer(l) {
            let mi = cfg.moe_intermediate_size;
            lin_w(&mut src, "mlp.gate.weight", cfg.n_routed_experts, h);
            for e in 0..cfg.n_routed_experts {
                lin_w(&mut src, &format!("mlp.experts.{e}.gate_proj.weight"), mi, h);
                lin_w(&mut src, &format!("mlp.experts.{e}.up_proj.weight"), mi, h);
                lin_w(&mut src, &format!("mlp.experts.{e}.down_proj.weight"), h, mi);
            }
            let si = mi * cfg.n_shared_experts;
            if si > 0 {
                lin_w(&mut src, "mlp.shared_experts.gate_proj.weight", si, h);
                lin_w(&mut src, "mlp.shared_experts.up_proj.weight", si, h);
                lin_w(&mut src, "mlp.shared_experts.down_proj.weight", h, si);
            }
        } else {
            let fi = cfg.intermediate_size;
            lin_w(&mut src, "mlp.gate_proj.weight", fi, h);
            lin_w(&mut src, "mlp.up_proj.weight", fi, h);
            lin_w(&mut src, "mlp.down_proj.weight", h, fi);
        }
        if l >= cfg.num_hidden_layers {
            lin_w(&mut src, "eh_proj.weight", h, 2 * h);
            lin_w(&mut src, "shared_head.head.weight", v, h);
        }
        let mut vec1 = |src: &mut MemorySource, name: &str, n: usize, scale: f32, offset: f32| {
            put(src, format!("{p}.{name}"), vec![n], scale, offset)
        };
        vec1(&mut src, "input_layernorm.weight", h, 0.1, 1.0);
        vec1(&mut src, "post_attention_layernorm.weight", h, 0.1, 1.0);
        vec1(&mut src, "self_attn.q_a_layernorm.weight", ql, 0.1, 1.0);
        vec1(&mut src, "self_attn.kv_a_layernorm.weight", kl, 0.1, 1.0);
        vec1(&mut src, "self_attn.indexer.k_norm.weight", id, 0.1, 1.0);
        vec1(&mut src, "self_attn.indexer.k_norm.bias", id, 0.1, 0.0);
        if cfg.is_moe_layer(l) {
            vec1(&mut src, "mlp.gate.e_score_correction_bias", cfg.n_routed_experts, 0.05, 0.0);
        }
        if l >= cfg.num_hidden_layers {
            vec1(&mut src, "enorm.weight", h, 0.1, 1.0);
            vec1(&mut src, "hnorm.weight", h, 0.1, 1.0);
            vec1(&mut src, "shared_head.norm.weight", h, 0.1, 1.0);
        }
    }
    src
}
