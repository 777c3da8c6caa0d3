#!/usr/bin/env python3
"""Independent numpy (float64) forward of the golden fixtures, written from the spec, not HF.

It reads only a case's `config.json` + `model.safetensors`, runs the teacher-forced forward over
`prompt_ids + greedy_ids[:-1]` (spec §2: interleaved MLA RoPE on the checkpoint layout, YaRN,
mscale² softmax scale, half-split indexer RoPE, ReLU-weighted index scores with top-k, sigmoid
group-limited routing), and compares with `expected.safetensors` (`logits`, and `hidden_states`
when present) and the routing/indexer decisions in `golden.json`. This confirms the fixtures
mean what tests/fixtures/golden/README.md says, independently of HF's code paths.

Run: /work/venv-hf/bin/python scripts/golden/check_golden.py [tests/fixtures/golden/<case> ...]
Needs numpy and safetensors only.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys

import numpy as np
from safetensors.numpy import load_file

TOL = 2e-5  # float64 here vs float32 in HF (observed <= 6e-6)


def rms(x, w, eps):
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def yarn_inv_freq(cfg):
    rp = cfg["rope_parameters"]
    d, base, f = cfg["qk_rope_head_dim"], rp["rope_theta"], rp["factor"]
    orig = rp["original_max_position_embeddings"]
    freqs = base ** (-np.arange(0, d, 2) / d)

    def corr(r):
        return d * math.log(orig / (2 * math.pi * r)) / (2 * math.log(base))

    low = max(math.floor(corr(rp["beta_fast"])), 0)
    high = min(math.ceil(corr(rp["beta_slow"])), d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
    return freqs / f * ramp + freqs * (1 - ramp)


def rope_interleaved(x, ang):  # x [..., T, d] pairs (2i, 2i+1); ang [T, d/2]
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


def rope_half(x, ang):  # x [..., T, d] pairs (i, i+d/2)
    c, s = np.cos(ang), np.sin(ang)
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return np.concatenate([a * c - b * s, a * s + b * c], -1)


def silu(x):
    return x / (1 + np.exp(-x))


def forward(cfg, W, ids):
    T = len(ids)
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    dn, dr, dv, kvr = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    ih, idim, ik = cfg["index_n_heads"], cfg["index_head_dim"], cfg["index_topk"]
    eps = cfg["rms_norm_eps"]
    rp = cfg["rope_parameters"]
    m = 0.1 * rp["mscale_all_dim"] * math.log(rp["factor"]) + 1
    scale = (dn + dr) ** -0.5 * m * m
    ang = np.arange(T)[:, None] * yarn_inv_freq(cfg)[None, :]  # [T, dr/2]
    causal = np.tril(np.ones((T, T), bool))
    h = W["model.embed_tokens.weight"][ids]  # [T, H]
    hidden, routes, selections = [h], {}, {}
    for li in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{li}."
        x = rms(h, W[p + "input_layernorm.weight"], eps)
        qr = rms(x @ W[p + "self_attn.q_a_proj.weight"].T, W[p + "self_attn.q_a_layernorm.weight"], eps)
        q = (qr @ W[p + "self_attn.q_b_proj.weight"].T).reshape(T, nh, dn + dr).transpose(1, 0, 2)
        q_nope, q_pe = q[..., :dn], rope_interleaved(q[..., dn:], ang)  # [nh, T, *]
        ckv = x @ W[p + "self_attn.kv_a_proj_with_mqa.weight"].T  # [T, kvr + dr]
        c = rms(ckv[:, :kvr], W[p + "self_attn.kv_a_layernorm.weight"], eps)
        k_pe = rope_interleaved(ckv[:, kvr:], ang)  # [T, dr]
        kv = (c @ W[p + "self_attn.kv_b_proj.weight"].T).reshape(T, nh, dn + dv).transpose(1, 0, 2)
        k_nope, v = kv[..., :dn], kv[..., dn:]
        logits = (q_nope @ k_nope.transpose(0, 2, 1) + q_pe @ k_pe.T[None]) * scale  # [nh, T, T]
        # indexer
        ip = p + "self_attn.indexer."
        qi = (qr @ W[ip + "wq_b.weight"].T).reshape(T, ih, idim)
        qi = np.concatenate([rope_half(qi[..., :dr].transpose(1, 0, 2), ang).transpose(1, 0, 2), qi[..., dr:]], -1)
        ki = x @ W[ip + "wk.weight"].T
        mu, var = ki.mean(-1, keepdims=True), ki.var(-1, keepdims=True)
        ki = (ki - mu) / np.sqrt(var + 1e-6) * W[ip + "k_norm.weight"] + W[ip + "k_norm.bias"]
        ki = np.concatenate([rope_half(ki[:, :dr], ang), ki[:, dr:]], -1)
        wts = (x @ W[ip + "weights_proj.weight"].T) * ih**-0.5  # [T, ih]
        sc = np.maximum(np.einsum("thd,sd->ths", qi, ki) * idim**-0.5, 0)
        iscore = np.where(causal, np.einsum("th,ths->ts", wts, sc), -np.inf)
        allowed = causal.copy()
        sel = []
        for t in range(T):
            if t + 1 > ik:
                top = np.argsort(-iscore[t], kind="stable")[:ik]
                allowed[t] = False
                allowed[t, top] = True
                sel.append(sorted(top.tolist()))
            else:
                sel.append(None)
        selections[li] = sel
        logits = np.where(allowed[None], logits, -np.inf)
        pr = np.exp(logits - logits.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = (pr @ v).transpose(1, 0, 2).reshape(T, nh * dv)
        h = h + o @ W[p + "self_attn.o_proj.weight"].T
        x = rms(h, W[p + "post_attention_layernorm.weight"], eps)
        if li < cfg["first_k_dense_replace"]:
            f = p + "mlp."
            y = (silu(x @ W[f + "gate_proj.weight"].T) * (x @ W[f + "up_proj.weight"].T)) @ W[f + "down_proj.weight"].T
        else:
            y, routes[li] = moe(cfg, W, p + "mlp.", x)
        h = h + y
        hidden.append(h)
    out = rms(h, W["model.norm.weight"], eps) @ W["lm_head.weight"].T
    return out, np.stack(hidden), routes, selections


def moe(cfg, W, f, x):
    E, G, kg, k = cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]
    sig = 1 / (1 + np.exp(-(x @ W[f + "gate.weight"].T)))  # [T, E]
    u = sig + W[f + "gate.e_score_correction_bias"]
    gs = np.sort(u.reshape(-1, G, E // G), -1)[..., -2:].sum(-1)  # [T, G]
    y = np.zeros_like(x)
    chosen = []
    for t in range(x.shape[0]):
        groups = np.argsort(-gs[t], kind="stable")[:kg]
        masked = np.full(E, -np.inf)
        for g in groups:
            masked[g * (E // G) : (g + 1) * (E // G)] = u[t, g * (E // G) : (g + 1) * (E // G)]
        top = np.argsort(-masked, kind="stable")[:k]
        wt = sig[t, top] / sig[t, top].sum() * cfg["routed_scaling_factor"]
        for e, w in zip(top, wt):
            g = f + f"experts.{e}."
            y[t] += w * ((silu(x[t] @ W[g + "gate_proj.weight"].T) * (x[t] @ W[g + "up_proj.weight"].T)) @ W[g + "down_proj.weight"].T)
        chosen.append(sorted(top.tolist()))
    s = f + "shared_experts."
    y += (silu(x @ W[s + "gate_proj.weight"].T) * (x @ W[s + "up_proj.weight"].T)) @ W[s + "down_proj.weight"].T
    return y, chosen


def check(case_dir) -> bool:
    cfg = json.load(open(os.path.join(case_dir, "config.json")))
    W = {k: v.astype(np.float64) for k, v in load_file(os.path.join(case_dir, "model.safetensors")).items()}
    exp = load_file(os.path.join(case_dir, "expected.safetensors"))
    g = json.load(open(os.path.join(case_dir, "golden.json")))
    ids = g["prompt_ids"] + g["greedy_ids"][:-1]
    logits, hidden, routes, sel = forward(cfg, W, np.array(ids))
    d = float(np.abs(logits - exp["logits"]).max())
    ok = d <= TOL
    msg = [f"logits max|Δ|={d:.2e}"]
    if "hidden_states" in exp:
        dh = float(np.abs(hidden[:, -1] - exp["hidden_states"]).max())
        ok &= dh <= TOL
        msg.append(f"hidden max|Δ|={dh:.2e}")
    r_ok = all(routes[r["layer"]] == r["topk"] for r in g["routing"])
    i_ok = all(sel[e["layer"]] == e["selected"] for e in g["indexer"])
    greedy_ok = np.argmax(logits[len(g["prompt_ids"]) - 1 :], -1).tolist() == g["greedy_ids"]
    ok &= r_ok and i_ok and greedy_ok
    msg += [f"routing {'ok' if r_ok else 'DIFFERS'}", f"indexer {'ok' if i_ok else 'DIFFERS'}",
            f"greedy {'ok' if greedy_ok else 'DIFFERS'}"]
    print(f"{'ok  ' if ok else 'FAIL'} {os.path.basename(case_dir)}: " + ", ".join(msg))
    return ok


def main() -> int:
    dirs = sys.argv[1:] or sorted(os.path.dirname(p) for p in glob.glob("tests/fixtures/golden/*/golden.json"))
    if not dirs:
        print("no fixture directories found", file=sys.stderr)
        return 2
    results = [check(d) for d in dirs]
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
