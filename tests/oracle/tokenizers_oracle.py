"""Oracle for tokenizers and chat templates: transformers' AutoTokenizer.

Usage: python tokenizers_oracle.py OUT_DIR NAME=MODEL_DIR...
Writes OUT_DIR/tokenizers.json: {NAME: {"dir", "texts", "ids", "ids_plain", "chat"}}.
"""
import json
import os
import sys

from transformers import AutoTokenizer

TEXTS = [
    "Hello, world!",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "Ünïcödé: naïve café, 東京タワー, Здравствуйте, مرحبا, 🤖🚀 emoji",
    "Numbers 1234567 3.14159 -42 1,000,000 0x1F 1e-9 and 2024-11-23",
    "Whitespace   runs\t\ttabs\n\n\nnewlines     and trailing   ",
    "  leading spaces",
    "Natalia sold clips to 48 of her friends in April. #### 72",
    "\\boxed{\\frac{1}{2}} and $x^2 + y^2 = z^2$",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "",
]

MESSAGES = [
    {"role": "system", "content": "You are a careful math tutor."},
    {"role": "user", "content": "What is 7 * 8?"},
    {"role": "assistant", "content": "7 * 8 = 56. #### 56"},
    {"role": "user", "content": "And 9 * 9?  Show   spacing."},
]


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    result = {}
    for arg in sys.argv[2:]:
        name, d = arg.split("=", 1)
        tok = AutoTokenizer.from_pretrained(d)
        entry = {
            "dir": d,
            "texts": TEXTS,
            "ids": [tok(t)["input_ids"] for t in TEXTS],
            "ids_plain": [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS],
            "decoded": [tok.decode(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS],
            "messages": MESSAGES,
        }
        if tok.chat_template:
            entry["chat"] = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        result[name] = entry
    json.dump(result, open(os.path.join(out, "tokenizers.json"), "w"), ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
