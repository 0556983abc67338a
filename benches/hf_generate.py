"""The peer side of benches/rollout.rs: transformers `generate` on the same model
and settings. Prints one JSON line: {"tokens_per_s": [...per run...], "tokens": N}.

Usage: python hf_generate.py MODEL_DIR PROMPTS_JSON THREADS NEW RUNS SEED TEMPERATURE TOP_K TOP_P [DTYPE]
(DTYPE float32 by default, or bfloat16.)
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    model_dir, prompts_json, threads, new, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    seed, temperature, top_k, top_p = int(sys.argv[6]), float(sys.argv[7]), int(sys.argv[8]), float(sys.argv[9])
    dtype = getattr(torch, sys.argv[10] if len(sys.argv) > 10 else "float32")
    torch.set_num_threads(threads)
    prompts = json.load(open(prompts_json))  # list of id lists
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # exactly NEW tokens per sequence, as on our side
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(attention_mask=mask, max_new_tokens=new, do_sample=True, temperature=temperature, top_k=top_k,
              top_p=top_p, pad_token_id=pad)
    rates = []
    with torch.inference_mode():
        model.generate(ids, **dict(kw, max_new_tokens=8))  # warm-up
        for r in range(runs):
            torch.manual_seed(seed + r)
            t = time.perf_counter()
            out = model.generate(ids, **kw)
            dt = time.perf_counter() - t
            n = (out.shape[1] - width) * out.shape[0]
            rates.append(n / dt)
    print(json.dumps({"tokens_per_s": rates, "tokens": n}))


if __name__ == "__main__":
    main()
