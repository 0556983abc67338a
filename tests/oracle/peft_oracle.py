"""Oracle for LoRA: what peft and transformers compute with tarpo's files.

Usage: python peft_oracle.py BASE_DIR ADAPTER_DIR MERGED_DIR INPUTS OUT
  BASE_DIR     an HF model directory
  ADAPTER_DIR  a LoRA adapter saved by tarpo (PEFT layout)
  MERGED_DIR   the same model with the adapter merged in, exported by tarpo
  INPUTS       safetensors with input_ids, attention_mask (B, L), left-padded
  OUT          safetensors written with (B, L, V) fp32 logits, positions counted
               from the first real token:
                 peft       PeftModel.from_pretrained(base, ADAPTER_DIR)
                 peft_off   the same with the adapter disabled
                 peft_merge the same after peft's own merge_and_unload()
                 merged     AutoModelForCausalLM.from_pretrained(MERGED_DIR)

Usage: python peft_oracle.py --make BASE_DIR ADAPTER_OUT INPUTS OUT
  Makes an adapter with peft itself (r 4, alpha 8, q/v/down_proj, random
  non-zero A and B), saves it with save_pretrained to ADAPTER_OUT, and writes
  its logits on INPUTS to OUT as `peft`.

Strict: every tensor of the adapter file must land in the PeftModel unchanged,
every LoRA parameter of the PeftModel must come from the file, and
transformers must report no missing, unexpected or mismatched weights.
"""
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def load_strict(path):
    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"{path}: {problems}"
    return model.eval()


def logits_fn(inputs):
    inp = load_file(inputs)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def logits(model):
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float().contiguous()
    return logits


def make(base_dir, adapter_out, inputs, out):
    logits = logits_fn(inputs)
    torch.manual_seed(1234)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    pm = get_peft_model(load_strict(base_dir), cfg).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_" in n:
                p.copy_(0.1 * torch.randn_like(p))
        pm.save_pretrained(adapter_out)
        save_file({"peft": logits(pm)}, out)


def main():
    if sys.argv[1] == "--make":
        make(*sys.argv[2:6])
        print("ok")
        return
    base_dir, adapter_dir, merged_dir, inputs, out = sys.argv[1:6]
    logits = logits_fn(inputs)

    with torch.no_grad():
        pm = PeftModel.from_pretrained(load_strict(base_dir), adapter_dir).eval()
        saved = load_file(f"{adapter_dir}/adapter_model.safetensors")
        state = {k: v for k, v in pm.state_dict().items() if ".lora_" in k}
        assert len(state) == len(saved) > 0, (len(state), len(saved))
        for k, v in saved.items():
            loaded = state[k.replace(".weight", ".default.weight")]
            assert torch.equal(loaded.float(), v.float()), k
        res = {"peft": logits(pm)}
        with pm.disable_adapter():
            res["peft_off"] = logits(pm)
        res["peft_merge"] = logits(pm.merge_and_unload())
        res["merged"] = logits(load_strict(merged_dir))
    save_file(res, out)
    print("ok")


if __name__ == "__main__":
    main()
