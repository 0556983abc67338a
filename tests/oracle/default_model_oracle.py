"""Oracle for the embedded default model: transformers (and its tokenizers
library) on the committed directory as it is.

Usage: python default_model_oracle.py OUT_DIR MODEL_DIR PROMPT
Writes OUT_DIR/default_model.json: the prompt's ids, the logits at every
position, and the greedy continuation (at most 64 tokens, stopping at EOS)
with its text.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast


def main():
    out, model_dir, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
    os.makedirs(out, exist_ok=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].tolist()
        gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=64, do_sample=False)[0, len(ids):].tolist()
    json.dump({"ids": ids, "logits": logits, "greedy": gen, "text": tok.decode(gen, skip_special_tokens=True)},
              open(os.path.join(out, "default_model.json"), "w"))


if __name__ == "__main__":
    main()
