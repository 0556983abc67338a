"""Greedy counterfactuals by transformers, for a rollout whose decisions were
all hard: the input after token p becomes the soft mixture (the top-k of
softmax(logits), renormalised, times the embedding table) and decoding goes on
greedily with hard inputs, as the workbench's counterfactual must do.

Usage: python counterfactual_oracle.py MODEL_DIR ROLLOUT_JSONL FLIPS_JSON MAX_NEW TOPK
FLIPS_JSON: [[completion, position], ...]. Prints JSON: the continuation's
text (special tokens skipped) for each flip, in order.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast


def main():
    model_dir, rollout, flips, max_new, topk = sys.argv[1:6]
    max_new, topk = int(max_new), int(topk)
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    emb = model.get_input_embeddings().weight
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = [json.loads(l) for l in open(rollout)]
    out = []
    with torch.no_grad():
        for i, p in json.loads(flips):
            row = rows[i]
            ids = row["tokens"]
            assert all(m == "hard" for m in row["modes"]), "the oracle needs an all-hard rollout"
            inputs = emb[torch.tensor(row["prompt_ids"])]
            # The original tokens up to p are fed hard; their logits give token p's mixture.
            for t in ids[:p]:
                inputs = torch.cat([inputs, emb[t][None]])
            logits = model(inputs_embeds=inputs[None]).logits[0, -1]
            probs = torch.softmax(logits.float(), -1)
            w, top = probs.topk(topk)
            mix = (w / w.sum()) @ emb[top]
            seq = ids[: p + 1]
            x = torch.cat([inputs, mix[None]])
            while len(seq) < max_new and seq[-1] not in eos:
                nxt = int(model(inputs_embeds=x[None]).logits[0, -1].argmax())
                seq.append(nxt)
                x = torch.cat([x, emb[nxt][None]])
            out.append(tok.decode(seq, skip_special_tokens=True))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
