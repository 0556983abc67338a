"""Independent computation of the RLTT loss (ALGORITHMS.md section 6) and
its gradients, in plain PyTorch with the looped forward of ouro_models.py,
on the weights and rollout the Rust test (tests/rltt.rs) wrote.

Each completion runs alone (no padding): prompt then sampled tokens; loop t's
log-prob of token j is log_softmax(h_t W^T / temperature)[y_j]. Per row
  L_i = -(1/n) sum_j sum_t w_t,j logP^(t)(y_j) A_i + beta (1/n) sum_j k3_j
with k3 on the final loop against the reference, and the loss the mean of L_i
(seq-mean-token-mean).

Usage: python rltt_oracle.py OUT_JSON CASE_JSON POLICY_SAFETENSORS REF_SAFETENSORS
"""
import json
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import ouro_models as om  # noqa: E402


def loop_logps(w, ids, p, tokens, kv, T, temp, head):
    states = om.forward(w, torch.tensor(ids)[None], kv, T)[:, 0]  # (T, L, H)
    hs = states[:, p - 1: p - 1 + len(tokens)]
    lp = torch.log_softmax((hs @ head.T).float() / temp, -1)
    return lp.gather(-1, torch.tensor(tokens)[None, :, None].expand(T, -1, 1))[..., 0], hs


def main():
    out, case_path, pol_path, ref_path = sys.argv[1:5]
    c = json.load(open(case_path))
    w = load_file(pol_path)
    ref = load_file(ref_path)
    train = ["model.early_exit_gate.weight", "model.early_exit_gate.bias", "model.norm.weight"]
    for k in train:
        w[k] = w[k].clone().requires_grad_(True)
    theta = torch.tensor(c["theta"], requires_grad=True) if c["theta"] is not None else None
    kv, T, temp, beta = c["kv_heads"], c["loops"], c["temperature"], c["beta"]
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
    ref_head = ref["lm_head.weight"] if "lm_head.weight" in ref else ref["model.embed_tokens.weight"]
    losses = []
    for prompt, tokens, a in zip(c["prompts"], c["tokens"], c["adv"]):
        ids, p, n = prompt + tokens, len(prompt), len(tokens)
        lp, hs = loop_logps(w, ids, p, tokens, kv, T, temp, head)  # (T, n)
        with torch.no_grad():
            lp_ref, _ = loop_logps(ref, ids, p, tokens, kv, T, temp, ref_head)
        kind = c["weighting"]
        if kind == "uniform":
            wt = torch.full((T, 1), 1.0 / T)
        elif kind == "progressive":
            s = torch.arange(1, T + 1, dtype=torch.float32) ** c["alpha"]
            wt = (s / s.sum())[:, None]
        elif kind == "exit_pdf":
            wt = om.exit_pdf(w, hs[:, None])[0].T  # (T, n)
        else:
            wt = torch.softmax(theta, 0)[:, None]
        d = lp_ref[-1] - lp[-1]
        k3 = torch.exp(d) - d - 1
        losses.append(-(wt * lp).sum() * a / n + beta * k3.sum() / n)
    loss = torch.stack(losses).mean()
    loss.backward()
    res = {"loss": loss.item()}
    for k in train:
        g = w[k].grad  # None where the loss does not reach (the gate, unless exit_pdf)
        res[k] = (g if g is not None else torch.zeros_like(w[k])).flatten().tolist()
    if theta is not None:
        res["theta"] = theta.grad.tolist()
    json.dump(res, open(out, "w"))


if __name__ == "__main__":
    main()
