"""The two checkpoints of benches/looped_rollout.rs, from SmolLM2-135M's weights.

OUT/ouro:  a looped (Ouro) model: SmolLM2's first LAYERS layers as the shared
           stack, applied LOOPS times; the extra sandwich norms at 1, the exit
           gate at 0, early exit off (threshold 1: every loop runs).
OUT/llama: the same stack unrolled for transformers: a Llama model of
           LOOPS x LAYERS layers, layer i holding layer i % LAYERS's weights.

Usage: python make_looped.py SMOLLM2_DIR OUT LAYERS LOOPS
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file


def main():
    src, out, layers, loops = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cfg = json.load(open(os.path.join(src, "config.json")))
    if layers > cfg["num_hidden_layers"]:
        sys.exit(f"{src} has {cfg['num_hidden_layers']} layers, fewer than {layers}")
    w = load_file(os.path.join(src, "model.safetensors"))
    shared = {k: v for k, v in w.items() if not k.startswith("model.layers.")}
    layer = lambda i, k: w[f"model.layers.{i}.{k}"]
    names = sorted({k.split(".", 3)[3] for k in w if k.startswith("model.layers.0.")})
    hidden = cfg["hidden_size"]

    ouro = dict(shared)
    for i in range(layers):
        for k in names:
            ouro[f"model.layers.{i}.{k}"] = layer(i, k)
        for k in ["input_layernorm_2", "post_attention_layernorm_2"]:
            ouro[f"model.layers.{i}.{k}.weight"] = torch.ones(hidden)
    ouro["model.early_exit_gate.weight"] = torch.zeros(1, hidden)
    ouro["model.early_exit_gate.bias"] = torch.zeros(1)
    ouro_cfg = dict(cfg, model_type="ouro", architectures=["OuroForCausalLM"], num_hidden_layers=layers,
                    total_ut_steps=loops, early_exit_threshold=1.0)

    llama = dict(shared)
    for i in range(layers * loops):
        for k in names:
            llama[f"model.layers.{i}.{k}"] = layer(i % layers, k).clone()
    llama_cfg = dict(cfg, num_hidden_layers=layers * loops)

    for name, tensors, c in [("ouro", ouro, ouro_cfg), ("llama", llama, llama_cfg)]:
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        json.dump(c, open(os.path.join(d, "config.json"), "w"), indent=2)
        for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"]:
            if os.path.exists(os.path.join(src, f)):
                shutil.copy(os.path.join(src, f), os.path.join(d, f))


if __name__ == "__main__":
    main()
