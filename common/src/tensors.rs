//! The canonical tensor list of a DeepSeek-V3.2 checkpoint: every tensor's exact HF name, its
//! shape `[out, in]` (1-D for norms and biases), how DeepSeek's FP8 checkpoint stores it, and
//! where it belongs (layer, routed expert, tensor-parallel split dim).
//!
//! This list is the single source of truth for the synthetic checkpoint writer, the reader's
//! validation and `fathom checkpoint inspect --dry` (spec §4.1). It owns names and shapes only;
//! it does not own file formats, initialisation or loading.
//!
//! Storage rules (spec §4.1–4.2): large linear weights are e4m3 with an fp32 `weight_scale_inv`
//! of shape `[ceil(out/b0), ceil(in/b1)]` (block `b` from `quantization_config`). Kept
//! unquantized: embeddings, LM heads, all norms, the router (`mlp.gate.weight` bf16,
//! `mlp.gate.e_score_correction_bias` fp32), `indexer.weights_proj` (bf16), `indexer.k_norm`
//! (fp32) and the MTP `eh_proj` (bf16: vLLM builds it as a plain `nn.Linear`, and DeepSeek's
//! checkpoint carries no scale for it; readers may still accept it as FP8).
//!
//! Order: the list is emitted in a stable order (embedding, layers 0.., MTP layers, final norm,
//! head), layer by layer; writers use this order, so files are reproducible.
//!
//! MTP layers sit at indices `num_hidden_layers..num_hidden_layers + num_nextn_predict_layers`:
//! `enorm`, `hnorm`, `eh_proj [H, 2H]`, `shared_head.norm`, `shared_head.head`, `embed_tokens`,
//! plus a full MoE decoder block (attention, indexer, router, experts).

use crate::config::ModelConfig;
use serde::Serialize;

/// What a tensor does; decides its storage class and (in synth) its initialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Role {
    /// `[vocab, H]` token embedding (main model or an MTP copy).
    Embedding,
    /// `[vocab, H]` output head (main model or an MTP copy).
    LmHead,
    /// RMSNorm weight `[d]`.
    Norm,
    /// The indexer's LayerNorm weight `[index_head_dim]` (fp32).
    LayerNormWeight,
    /// The indexer's LayerNorm bias `[index_head_dim]` (fp32).
    LayerNormBias,
    /// A linear projection reading the normed residual or an inner activation (FP8 in DeepSeek).
    Linear,
    /// A linear projection writing into the residual stream: `o_proj`, every `down_proj` (FP8).
    OutputLinear,
    /// `indexer.weights_proj` `[index_n_heads, H]` (bf16).
    IndexerWeights,
    /// Router `mlp.gate.weight` `[n_routed_experts, H]` (bf16).
    RouterGate,
    /// Router `mlp.gate.e_score_correction_bias` `[n_routed_experts]` (fp32).
    RouterBias,
    /// MTP `eh_proj` `[H, 2H]` (bf16).
    MtpProj,
}

/// Which expert an FFN tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Expert {
    /// Routed expert `e` (logical index, `0..n_routed_experts`).
    Routed(usize),
    /// The shared expert(s), stored as one SwiGLU of `n_shared_experts · moe_intermediate_size`.
    Shared,
}

/// One tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorSpec {
    /// Exact HF name, e.g. `model.layers.3.mlp.experts.17.down_proj.weight`.
    pub name: String,
    /// `[out, in]` for matrices, `[d]` for vectors.
    pub shape: Vec<usize>,
    pub role: Role,
    /// Whether DeepSeek's FP8 checkpoint stores it as e4m3 + `weight_scale_inv`.
    pub quantized: bool,
    /// Decoder layer index (MTP layers included); `None` for embedding, final norm and head.
    pub layer: Option<usize>,
    /// Set for FFN tensors of a MoE layer.
    pub expert: Option<Expert>,
    /// Dimension a tensor-parallel rank splits (spec §4.4: 0 = column/output rows, 1 = input
    /// columns); `None` when every rank holds it whole (norms, router, indexer, routed experts,
    /// which are split by expert instead).
    pub tp_split_dim: Option<usize>,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Name of the companion scale tensor of an FP8 weight.
    pub fn scale_name(&self) -> String {
        scale_name(&self.name)
    }

    /// Whether this tensor belongs to an MTP layer of `cfg`.
    pub fn is_mtp(&self, cfg: &ModelConfig) -> bool {
        self.layer.is_some_and(|l| l >= cfg.num_hidden_layers)
    }

    /// Whether a reader may accept this tensor stored as e4m3 + scale.
    pub fn fp8_allowed(&self) -> bool {
        self.quantized || self.role == Role::MtpProj
    }
}

/// `W.weight` → `W.weight_scale_inv`.
pub fn scale_name(weight_name: &str) -> String {
    format!("{weight_name}_scale_inv")
}

/// Shape of the `weight_scale_inv` of a `[out, in]` weight with blocks `block`:
/// `[ceil(out/block[0]), ceil(in/block[1])]` (partial edge blocks count as whole blocks).
pub fn scale_shape(shape: &[usize], block: [usize; 2]) -> [usize; 2] {
    [shape[0].div_ceil(block[0]), shape[1].div_ceil(block[1])]
}

/// The FP8 block size of `cfg` (`[128, 128]` when the config has no quantization_config).
pub fn fp8_block(cfg: &ModelConfig) -> [usize; 2] {
    cfg.quantization_config.as_ref().map(|q| q.weight_block_size).unwrap_or([128, 128])
}

struct Builder<'a> {
    cfg: &'a ModelConfig,
    out: Vec<TensorSpec>,
}

impl Builder<'_> {
    fn push(
        &mut self,
        name: String,
        shape: Vec<usize>,
        role: Role,
        layer: Option<usize>,
        expert: Option<Expert>,
        tp_split_dim: Option<usize>,
    ) {
        let quantized = matches!(role, Role::Linear | Role::OutputLinear);
        self.out.push(TensorSpec { name, shape, role, quantized, layer, expert, tp_split_dim });
    }

    fn swiglu(&mut self, p: &str, layer: usize, inner: usize, expert: Option<Expert>) {
        let h = self.cfg.hidden_size;
        // Routed experts are placed whole on one rank; dense and shared FFNs are TP-split.
        let (col, row) = match expert {
            Some(Expert::Routed(_)) => (None, None),
            _ => (Some(0), Some(1)),
        };
        let l = Some(layer);
        self.push(format!("{p}.gate_proj.weight"), vec![inner, h], Role::Linear, l, expert, col);
        self.push(format!("{p}.up_proj.weight"), vec![inner, h], Role::Linear, l, expert, col);
        self.push(
            format!("{p}.down_proj.weight"),
            vec![h, inner],
            Role::OutputLinear,
            l,
            expert,
            row,
        );
    }

    /// Attention, indexer, norms and FFN of decoder layer `i`.
    fn block(&mut self, i: usize) {
        let c = self.cfg;
        let h = c.hidden_size;
        let p = format!("model.layers.{i}");
        let l = Some(i);
        let a = format!("{p}.self_attn");
        let heads = c.num_attention_heads;
        self.push(format!("{p}.input_layernorm.weight"), vec![h], Role::Norm, l, None, None);
        self.push(
            format!("{a}.q_a_proj.weight"),
            vec![c.q_lora_rank, h],
            Role::Linear,
            l,
            None,
            None,
        );
        self.push(
            format!("{a}.q_a_layernorm.weight"),
            vec![c.q_lora_rank],
            Role::Norm,
            l,
            None,
            None,
        );
        self.push(
            format!("{a}.q_b_proj.weight"),
            vec![heads * c.qk_head_dim(), c.q_lora_rank],
            Role::Linear,
            l,
            None,
            Some(0),
        );
        self.push(
            format!("{a}.kv_a_proj_with_mqa.weight"),
            vec![c.kv_lora_rank + c.qk_rope_head_dim, h],
            Role::Linear,
            l,
            None,
            None,
        );
        self.push(
            format!("{a}.kv_a_layernorm.weight"),
            vec![c.kv_lora_rank],
            Role::Norm,
            l,
            None,
            None,
        );
        self.push(
            format!("{a}.kv_b_proj.weight"),
            vec![heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank],
            Role::Linear,
            l,
            None,
            Some(0),
        );
        self.push(
            format!("{a}.o_proj.weight"),
            vec![h, heads * c.v_head_dim],
            Role::OutputLinear,
            l,
            None,
            Some(1),
        );
        let x = format!("{a}.indexer");
        self.push(
            format!("{x}.wq_b.weight"),
            vec![c.index_n_heads * c.index_head_dim, c.q_lora_rank],
            Role::Linear,
            l,
            None,
            None,
        );
        self.push(format!("{x}.wk.weight"), vec![c.index_head_dim, h], Role::Linear, l, None, None);
        self.push(
            format!("{x}.k_norm.weight"),
            vec![c.index_head_dim],
            Role::LayerNormWeight,
            l,
            None,
            None,
        );
        self.push(
            format!("{x}.k_norm.bias"),
            vec![c.index_head_dim],
            Role::LayerNormBias,
            l,
            None,
            None,
        );
        self.push(
            format!("{x}.weights_proj.weight"),
            vec![c.index_n_heads, h],
            Role::IndexerWeights,
            l,
            None,
            None,
        );
        self.push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Role::Norm,
            l,
            None,
            None,
        );
        let m = format!("{p}.mlp");
        if c.is_moe_layer(i) {
            self.push(
                format!("{m}.gate.weight"),
                vec![c.n_routed_experts, h],
                Role::RouterGate,
                l,
                None,
                None,
            );
            self.push(
                format!("{m}.gate.e_score_correction_bias"),
                vec![c.n_routed_experts],
                Role::RouterBias,
                l,
                None,
                None,
            );
            for e in 0..c.n_routed_experts {
                self.swiglu(
                    &format!("{m}.experts.{e}"),
                    i,
                    c.moe_intermediate_size,
                    Some(Expert::Routed(e)),
                );
            }
            if c.n_shared_experts > 0 {
                self.swiglu(
                    &format!("{m}.shared_experts"),
                    i,
                    c.n_shared_experts * c.moe_intermediate_size,
                    Some(Expert::Shared),
                );
            }
        } else {
            self.swiglu(&m, i, c.intermediate_size, None);
        }
    }

    fn mtp_extras(&mut self, i: usize) {
        let c = self.cfg;
        let h = c.hidden_size;
        let p = format!("model.layers.{i}");
        let l = Some(i);
        self.push(
            format!("{p}.embed_tokens.weight"),
            vec![c.vocab_size, h],
            Role::Embedding,
            l,
            None,
            None,
        );
        self.push(format!("{p}.enorm.weight"), vec![h], Role::Norm, l, None, None);
        self.push(format!("{p}.hnorm.weight"), vec![h], Role::Norm, l, None, None);
        self.push(format!("{p}.eh_proj.weight"), vec![h, 2 * h], Role::MtpProj, l, None, None);
        self.push(format!("{p}.shared_head.norm.weight"), vec![h], Role::Norm, l, None, None);
        self.push(
            format!("{p}.shared_head.head.weight"),
            vec![c.vocab_size, h],
            Role::LmHead,
            l,
            None,
            Some(0),
        );
    }
}

/// Every tensor of the checkpoint of `cfg` (scale tensors are not listed: derive them with
/// [`TensorSpec::scale_name`] and [`scale_shape`] for `quantized` tensors), in writer order.
pub fn checkpoint_tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let mut b = Builder { cfg, out: Vec::new() };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    b.push("model.embed_tokens.weight".into(), vec![v, h], Role::Embedding, None, None, Some(0));
    for i in 0..cfg.num_hidden_layers {
        b.block(i);
    }
    for i in cfg.num_hidden_layers..cfg.num_hidden_layers + cfg.num_nextn_predict_layers {
        b.mtp_extras(i);
        b.block(i);
    }
    b.push("model.norm.weight".into(), vec![h], Role::Norm, None, None, None);
    b.push("lm_head.weight".into(), vec![v, h], Role::LmHead, None, None, Some(0));
    b.out
}

/// Parameter counts of a config, from shapes alone (scales are not parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    /// Main model: embedding, layers `0..num_hidden_layers`, final norm, head.
    pub main: u64,
    /// All tensors stored under the MTP layers (their embedding and head copies included).
    pub mtp_stored: u64,
    /// MTP parameters without the embedding/head copies (spec §1: ≈ 11.6 B for 671B).
    pub mtp_unique: u64,
    /// Parameters one token activates in the main model (`num_experts_per_tok` routed experts).
    pub main_activated: u64,
}

/// Counts parameters of `cfg` (see [`ParamCounts`]).
pub fn param_counts(cfg: &ModelConfig) -> ParamCounts {
    let mut c = ParamCounts { main: 0, mtp_stored: 0, mtp_unique: 0, main_activated: 0 };
    for t in checkpoint_tensors(cfg) {
        let n = t.numel() as u64;
        if t.is_mtp(cfg) {
            c.mtp_stored += n;
            if !matches!(t.role, Role::Embedding | Role::LmHead) {
                c.mtp_unique += n;
            }
        } else {
            c.main += n;
            let active = match t.expert {
                Some(Expert::Routed(e)) => e < cfg.num_experts_per_tok,
                _ => true,
            };
            if active {
                c.main_activated += n;
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn full_param_counts_match_spec() {
        let c = param_counts(&ModelConfig::full());
        // spec §1: 671.88 B main (derived from the per-block counts), MTP ≈ 11.6 B unique.
        assert_eq!(c.main, 671_877_944_064);
        assert_eq!(c.mtp_unique, 11_624_027_648);
        assert_eq!(c.mtp_stored, 11_624_027_648 + 2 * 926_679_040);
        // ≈ 38.4 B activated incl. embedding + head (spec §1).
        assert!((c.main_activated as f64 / 1e9 - 38.4).abs() < 0.1, "{}", c.main_activated);
    }

    #[test]
    fn full_shapes_and_storage_follow_spec_table() {
        let cfg = ModelConfig::full();
        let list = checkpoint_tensors(&cfg);
        let get = |n: &str| list.iter().find(|t| t.name == n).unwrap_or_else(|| panic!("{n}"));
        let kv = get("model.layers.0.self_attn.kv_a_proj_with_mqa.weight");
        assert_eq!(kv.shape, [576, 7168]);
        assert!(kv.quantized);
        assert_eq!(scale_shape(&kv.shape, fp8_block(&cfg)), [5, 56]);
        let cases: [(&str, [usize; 2], [usize; 2]); 7] = [
            ("model.layers.0.self_attn.q_a_proj.weight", [1536, 7168], [12, 56]),
            ("model.layers.0.self_attn.q_b_proj.weight", [24576, 1536], [192, 12]),
            ("model.layers.0.self_attn.kv_b_proj.weight", [32768, 512], [256, 4]),
            ("model.layers.0.self_attn.o_proj.weight", [7168, 16384], [56, 128]),
            ("model.layers.0.self_attn.indexer.wk.weight", [128, 7168], [1, 56]),
            ("model.layers.2.mlp.down_proj.weight", [7168, 18432], [56, 144]),
            ("model.layers.60.mlp.experts.255.gate_proj.weight", [2048, 7168], [16, 56]),
        ];
        for (n, shape, scale) in cases {
            let t = get(n);
            assert_eq!(t.shape, shape, "{n}");
            assert!(t.quantized, "{n}");
            assert_eq!(scale_shape(&t.shape, [128, 128]), scale, "{n}");
        }
        for n in [
            "model.layers.3.mlp.gate.weight",
            "model.layers.3.mlp.gate.e_score_correction_bias",
            "model.layers.3.self_attn.indexer.weights_proj.weight",
            "model.layers.3.self_attn.indexer.k_norm.bias",
            "model.layers.3.input_layernorm.weight",
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.61.eh_proj.weight",
        ] {
            assert!(!get(n).quantized, "{n}");
        }
        assert_eq!(get("model.layers.61.eh_proj.weight").shape, [7168, 14336]);
        assert_eq!(
            get("model.layers.61.mlp.experts.7.up_proj.weight").expert,
            Some(Expert::Routed(7))
        );
        assert!(list.iter().all(|t| !t.name.contains("layers.62.")));
        assert!(!list.iter().any(|t| t.name == "model.layers.2.mlp.gate.weight"));
        let names: HashSet<_> = list.iter().map(|t| &t.name).collect();
        assert_eq!(names.len(), list.len(), "duplicate names");
    }

    #[test]
    fn tiny_layout() {
        let cfg = ModelConfig::tiny();
        let list = checkpoint_tensors(&cfg);
        let experts: HashSet<_> = list
            .iter()
            .filter_map(|t| match t.expert {
                Some(Expert::Routed(e)) => Some((t.layer.unwrap(), e)),
                _ => None,
            })
            .collect();
        // 3 MoE layers + 1 MTP layer, 16 experts each.
        assert_eq!(experts.len(), 4 * 16);
        assert_eq!(list.first().unwrap().name, "model.embed_tokens.weight");
        assert_eq!(list.last().unwrap().name, "lm_head.weight");
        let mtp: Vec<_> = list.iter().filter(|t| t.is_mtp(&cfg)).collect();
        assert!(mtp.iter().all(|t| t.name.starts_with("model.layers.4.")));
        assert!(mtp.iter().any(|t| t.name == "model.layers.4.shared_head.head.weight"));
    }
}
