"""Oracle fixture: torch.optim.AdamW with gradient clipping and a warm-up + cosine
LambdaLR (transformers' get_cosine_with_min_lr_schedule_with_warmup), on fixed
parameters and gradients.

Usage: python adamw_oracle.py OUT_DIR
Writes OUT_DIR/adamw.safetensors (float32 except lr, float64):
  init.{i}        the 4 initial parameters: group A = 0 (4,3), 1 (5,); group B = 2 (2,2), 3 (2,)
  grad.{k}.{i}    the gradient of parameter i at step k (k < 6)
  param.{k}.{i}   parameter i after step k
  norm            (6,) total gradient norm before clipping returned by clip_grad_norm_
  lr              (6, 2) learning rate of each group used at step k
Group A: lr 1e-2, weight decay 0.1; group B: lr 3e-2, weight decay 0.
AdamW betas (0.9, 0.99), eps 1e-8, foreach=False; clip_grad_norm_(max_norm=1.0);
warm-up 2 steps, cosine to 0.1 of the base lr at step 6. Step 3's gradients are
scaled up so that clipping triggers; the others stay below the threshold.
"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import get_cosine_with_min_lr_schedule_with_warmup

STEPS = 6
SHAPES = [(4, 3), (5,), (2, 2), (2,)]


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(1234)
    params = [torch.randn(s, dtype=torch.float32).requires_grad_() for s in SHAPES]
    grads = []
    for k in range(STEPS):
        scale = 3.0 if k == 3 else 0.08
        grads.append([torch.randn(s, dtype=torch.float32) * scale for s in SHAPES])

    tensors = {f"init.{i}": p.detach().clone() for i, p in enumerate(params)}
    opt = torch.optim.AdamW(
        [
            {"params": params[:2], "lr": 1e-2, "weight_decay": 0.1},
            {"params": params[2:], "lr": 3e-2, "weight_decay": 0.0},
        ],
        betas=(0.9, 0.99),
        eps=1e-8,
        foreach=False,
    )
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, num_warmup_steps=2, num_training_steps=STEPS, min_lr_rate=0.1
    )
    norms, lrs = [], []
    for k in range(STEPS):
        opt.zero_grad()
        for i, (p, g) in enumerate(zip(params, grads[k])):
            p.grad = g.clone()
            tensors[f"grad.{k}.{i}"] = g.clone()
        lrs.append([group["lr"] for group in opt.param_groups])
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        norms.append(norm.item())
        opt.step()
        sched.step()
        for i, p in enumerate(params):
            tensors[f"param.{k}.{i}"] = p.detach().clone()
    assert sum(n > 1.0 for n in norms) == 1, norms
    tensors["norm"] = torch.tensor(norms, dtype=torch.float32)
    tensors["lr"] = torch.tensor(lrs, dtype=torch.float64)
    save_file(tensors, os.path.join(out, "adamw.safetensors"))


if __name__ == "__main__":
    main()
