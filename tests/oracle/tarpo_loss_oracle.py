"""Independent computation of the TARPO loss and its router gradient, in PyTorch
with transformers, on the same weights and rollout records as the Rust test.

Each completion is rebuilt and run alone (no padding): prompt embeddings, then
for every generated token but the last its embedding (hard) or the mixture of
its recorded top-k ids and weights (soft).

With REF_INPUTS "hard" (the paper's code) the reference rows are rebuilt with
every input hard, while the router reference is still scored at the modes the
policy chose.

Usage: python tarpo_loss_oracle.py OUT_JSON POLICY_DIR REF_DIR CASE_JSON ROUTERS_SAFETENSORS [same|hard]
"""
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def k3(logp, logp_ref):
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def row_scores(model, prompt, recs, temp, w, b, router_temp, hard_inputs=False):
    emb = model.get_input_embeddings().weight
    parts = [emb[torch.tensor(prompt)]]
    for r in recs[:-1]:
        if r["mode"] == 1 and not hard_inputs:
            ws = torch.tensor(r["mix_weights"], dtype=torch.float32)
            parts.append((ws[:, None] * emb[torch.tensor(r["mix_ids"])]).sum(0, keepdim=True))
        else:
            parts.append(emb[torch.tensor([r["token"]])])
    x = torch.cat(parts, 0)[None]
    h = model.model(inputs_embeds=x).last_hidden_state[0]
    p = len(prompt)
    hs = h[p - 1: p - 1 + len(recs)]
    logp_all = torch.log_softmax(model.lm_head(hs).float() / temp, -1)
    tokens = torch.tensor([r["token"] for r in recs])
    modes = torch.tensor([r["mode"] for r in recs])
    logp = logp_all.gather(-1, tokens[:, None])[:, 0]
    rlogp_all = torch.log_softmax((hs.float() @ w.T + b) / router_temp, -1)
    rlogp = rlogp_all.gather(-1, modes[:, None])[:, 0]
    return logp, rlogp


def main():
    out, policy_dir, ref_dir, case_path, routers_path = sys.argv[1:6]
    hard_ref = len(sys.argv) > 6 and sys.argv[6] == "hard"
    case = json.load(open(case_path))
    routers = load_file(routers_path)
    w = routers["weight"].clone().requires_grad_(True)
    b = routers["bias"].clone().requires_grad_(True)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    temp, rt, lam, beta = case["temperature"], case["router_temperature"], case["lambda"], case["beta"]
    losses, kl_tok, kl_r, rms = [], [], [], []
    for prompt, recs, a in zip(case["prompts"], case["records"], case["adv"]):
        logp, rlogp = row_scores(policy, prompt, recs, temp, w, b, rt)
        with torch.no_grad():
            logp_ref, rlogp_ref = row_scores(ref, prompt, recs, temp, routers["weight_ref"], routers["bias_ref"], rt,
                                             hard_inputs=hard_ref)
        rm = torch.tensor([0.0 if r["forced"] else 1.0 for r in recs])
        n = len(recs)
        pg = -((logp + lam * rm * rlogp) * a).sum() / n
        kl = beta * (k3(logp, logp_ref) + rm * k3(rlogp, rlogp_ref)).sum() / n
        losses.append(pg + kl)
        kl_tok.append(k3(logp, logp_ref).detach())
        kl_r.append((rm * k3(rlogp, rlogp_ref)).detach())
        rms.append(rm)
    loss = torch.stack(losses).mean()
    loss.backward()
    json.dump({"loss": loss.item(), "grad_weight": w.grad.tolist(), "grad_bias": b.grad.tolist(),
               "kl_token": torch.cat(kl_tok).mean().item(),
               "kl_router": (torch.cat(kl_r).sum() / torch.cat(rms).sum()).item()}, open(out, "w"))


if __name__ == "__main__":
    main()
