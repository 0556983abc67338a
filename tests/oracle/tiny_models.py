"""Oracle fixtures: tiny random-weight Llama/Qwen2 models made with transformers,
and what transformers computes on them.

Usage: python tiny_models.py OUT_DIR
Writes OUT_DIR/<name>/ (an HF model directory) and OUT_DIR/<name>/expected.safetensors:
  input_ids, attention_mask (B, L) left-padded prompts; logits (B, L, V) at every
  position with positions counted from the first real token (as `generate` does);
  greedy (B, 32) greedy continuation with no stop token; logits_bf16 the logits
  of the same model cast to bf16.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 320
NEW = 32


def make_tokenizer(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog. 12 + 30 = 42. #### 42"] * 50
    tok.train_from_iterator(text, trainer)
    tok.save(path)


def common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, rms_norm_eps=1e-5, max_position_embeddings=256,
                initializer_range=0.2, bos_token_id=0, eos_token_id=1)
    base.update(kw)
    return base


# name -> (config class, model class, config kwargs, legacy rope keys to write into config.json)
CONFIGS = {
    "llama_mha_tied": (LlamaConfig, LlamaForCausalLM, common(num_key_value_heads=4, tie_word_embeddings=True), None),
    "llama_gqa_llama3_bias": (LlamaConfig, LlamaForCausalLM, common(
        num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True, mlp_bias=True, head_dim=8,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32)), None),
    "qwen2_mqa_tied_legacy_theta": (Qwen2Config, Qwen2ForCausalLM, common(
        num_key_value_heads=1, tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
        {"rope_theta": 1e6}),
    "qwen2_gqa_untied_linear": (Qwen2Config, Qwen2ForCausalLM, common(
        num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
        {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}),
}


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    lengths = [5, 11, 3, 8]
    prompts = [torch.randint(2, VOCAB, (n,)).tolist() for n in lengths]
    L = max(lengths)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    for seed, (name, (cfg_cls, model_cls, kw, legacy)) in enumerate(CONFIGS.items()):
        torch.manual_seed(100 + seed)
        cfg = cfg_cls(**kw)
        model = model_cls(cfg).eval()
        with torch.no_grad():
            # Random norm weights and biases too, so a wrong one shows.
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.copy_(1 + 0.3 * torch.randn_like(p))
                elif n.endswith("bias"):
                    p.copy_(0.3 * torch.randn_like(p))
        d = os.path.join(out, name)
        model.save_pretrained(d, safe_serialization=True)
        make_tokenizer(os.path.join(d, "tokenizer.json"))
        if legacy is not None:
            path = os.path.join(d, "config.json")
            c = json.load(open(path))
            c.pop("rope_parameters", None)
            c.update(legacy)
            json.dump(c, open(path, "w"), indent=2)
            # The legacy form must mean the same thing to transformers.
            reloaded = model_cls.from_pretrained(d).eval()
            assert torch.equal(reloaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq), name
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            # No stop token (min_new_tokens would instead mask EOS out of the argmax).
            model.generation_config.eos_token_id = None
            greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                    do_sample=False, pad_token_id=0)[:, L:]
            assert greedy.shape[1] == NEW
            # The same model in bf16 (norms in fp32 inside, as transformers does).
            logits_bf16 = model.to(torch.bfloat16)(input_ids=ids, attention_mask=mask,
                                                   position_ids=positions).logits.float()
        save_file({"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous(),
                   "greedy": greedy.contiguous(), "logits_bf16": logits_bf16.contiguous()},
                  os.path.join(d, "expected.safetensors"))
    print("ok")


if __name__ == "__main__":
    main()
