"""Oracle fixtures for the looped (Ouro) model: tiny random-weight checkpoints
in Ouro's format, and what an independent PyTorch implementation of
ALGORITHMS.md section 6 computes on them (written here from the spec, not
from tarpo's code).

Usage: python ouro_models.py OUT_DIR
Writes OUT_DIR/<name>/ (config.json, model.safetensors, tokenizer.json) and
OUT_DIR/<name>/expected.safetensors: input_ids (B, L); loop_logits
(T, B, L, V), every loop's logits at every position; exit_pdf (B, L, T);
exit_index (B, L), the loop inference reads at early_exit_threshold;
exit_logits (B, L, V), the logits of that loop; greedy (B, NEW), greedy
continuations from the exit logits, recomputed from scratch at every step.
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import make_tokenizer, VOCAB  # noqa: E402

NEW = 12
CONFIGS = {
    # name: (kv heads, loops T, tied head, early_exit_threshold)
    "ouro_gqa_t2_untied": (2, 2, False, 1.0),
    "ouro_mha_t4_tied": (4, 4, True, 0.6),
    "ouro_mqa_t4_untied": (1, 4, False, 0.5),
}
H, FFN, LAYERS, HEADS, EPS, THETA = 64, 96, 2, 4, 1e-6, 10000.0


def rms(x, w):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def rotate(x, pos):
    d = x.shape[-1]
    inv = 1.0 / (THETA ** (torch.arange(0, d, 2).float() / d))
    ang = pos[:, None].float() * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + half * sin


def attention(x, w, p, kv):
    B, L, _ = x.shape
    d = H // HEADS
    q = (x @ w[p + "q_proj.weight"].T).view(B, L, HEADS, d).transpose(1, 2)
    k = (x @ w[p + "k_proj.weight"].T).view(B, L, kv, d).transpose(1, 2)
    v = (x @ w[p + "v_proj.weight"].T).view(B, L, kv, d).transpose(1, 2)
    pos = torch.arange(L)
    q, k = rotate(q, pos), rotate(k, pos)
    k, v = k.repeat_interleave(HEADS // kv, 1), v.repeat_interleave(HEADS // kv, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, L, H)
    return y @ w[p + "o_proj.weight"].T


def forward(w, ids, kv, T):
    """Every loop's normed state (T, B, L, H)."""
    h = w["model.embed_tokens.weight"][ids]
    states = []
    for _ in range(T):
        for i in range(LAYERS):
            p = f"model.layers.{i}."
            a = attention(rms(h, w[p + "input_layernorm.weight"]), w, p + "self_attn.", kv)
            h = h + rms(a, w[p + "input_layernorm_2.weight"])
            x = rms(h, w[p + "post_attention_layernorm.weight"])
            m = (torch.nn.functional.silu(x @ w[p + "mlp.gate_proj.weight"].T)
                 * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
            h = h + rms(m, w[p + "post_attention_layernorm_2.weight"])
        h = rms(h, w["model.norm.weight"])
        states.append(h)
    return torch.stack(states)


def exit_pdf(w, states):
    T = states.shape[0]
    lam = torch.sigmoid((states @ w["model.early_exit_gate.weight"].T).squeeze(-1)
                        + w["model.early_exit_gate.bias"]).float()
    rest, pdf = torch.ones_like(lam[0]), []
    for t in range(T):
        if t < T - 1:
            pdf.append(lam[t] * rest)
            rest = rest * (1 - lam[t])
        else:
            pdf.append(rest)
    return torch.stack(pdf, -1)


def exit_index(pdf, q):
    cum = pdf.cumsum(-1)
    idx = torch.full(pdf.shape[:-1], pdf.shape[-1] - 1, dtype=torch.long)
    for t in reversed(range(pdf.shape[-1])):
        idx = torch.where(cum[..., t] >= q, torch.full_like(idx, t), idx)
    return idx


def exit_logits(w, ids, kv, T, q, head):
    states = forward(w, ids, kv, T)
    idx = exit_index(exit_pdf(w, states), q)
    picked = torch.gather(states.permute(1, 2, 0, 3), 2,
                          idx[..., None, None].expand(-1, -1, 1, H)).squeeze(2)
    return states, idx, picked @ head.T


def weights(kv, tied):
    d = H // HEADS
    w = {"model.embed_tokens.weight": torch.randn(VOCAB, H) * 0.5, "model.norm.weight": 1 + 0.3 * torch.randn(H),
         "model.early_exit_gate.weight": torch.randn(1, H) * 0.3, "model.early_exit_gate.bias": torch.randn(1)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for n, shape in [("self_attn.q_proj", (HEADS * d, H)), ("self_attn.k_proj", (kv * d, H)),
                         ("self_attn.v_proj", (kv * d, H)), ("self_attn.o_proj", (H, HEADS * d)),
                         ("mlp.gate_proj", (FFN, H)), ("mlp.up_proj", (FFN, H)), ("mlp.down_proj", (H, FFN))]:
            w[p + n + ".weight"] = torch.randn(*shape) * 0.2
        for n in ["input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"]:
            w[p + n + ".weight"] = 1 + 0.3 * torch.randn(H)
    if not tied:
        w["lm_head.weight"] = torch.randn(VOCAB, H) * 0.3
    return w


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for seed, (name, (kv, T, tied, q)) in enumerate(CONFIGS.items()):
        torch.manual_seed(200 + seed)
        w = weights(kv, tied)
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        save_file({k: v.contiguous() for k, v in w.items()}, os.path.join(d, "model.safetensors"))
        cfg = dict(model_type="ouro", architectures=["OuroForCausalLM"], vocab_size=VOCAB, hidden_size=H,
                   intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   num_key_value_heads=kv, rms_norm_eps=EPS, rope_theta=THETA, max_position_embeddings=256,
                   hidden_act="silu", tie_word_embeddings=tied, total_ut_steps=T, early_exit_threshold=q,
                   bos_token_id=0, eos_token_id=1)
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=2)
        make_tokenizer(os.path.join(d, "tokenizer.json"))
        head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
        ids = torch.randint(2, VOCAB, (2, 9))
        with torch.no_grad():
            states, idx, logits = exit_logits(w, ids, kv, T, q, head)
            pdf = exit_pdf(w, states)
            seq = ids
            for _ in range(NEW):
                nxt = exit_logits(w, seq, kv, T, q, head)[2][:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
        save_file({"input_ids": ids, "loop_logits": (states @ head.T).contiguous(), "exit_pdf": pdf.contiguous(),
                   "exit_index": idx.contiguous(), "exit_logits": logits.contiguous(),
                   "greedy": seq[:, ids.shape[1]:].contiguous()}, os.path.join(d, "expected.safetensors"))
    print("ok")


if __name__ == "__main__":
    main()
