"""Oracle for the converted SmolLM2-135M-Instruct: transformers on the same directory.

Usage: python smollm2_oracle.py OUT_DIR MODEL_DIR
Writes OUT_DIR/smollm2.json with a chat prompt's ids, its greedy continuation
(stopping at EOS, at most 48 tokens) and text, and the last-position logits of a
short id list.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "Write a short sentence about the sea."
IDS = [1, 504, 3458, 282, 4649, 314]


def main():
    out, model_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=48, do_sample=False)[0, len(prompt_ids):].tolist()
        logits = model(torch.tensor([IDS])).logits[0, -1].tolist()
    json.dump({"prompt": PROMPT, "prompt_ids": prompt_ids, "greedy": gen,
               "text": tok.decode(gen, skip_special_tokens=True), "ids": IDS, "logits": logits},
              open(os.path.join(out, "smollm2.json"), "w"))


if __name__ == "__main__":
    main()
