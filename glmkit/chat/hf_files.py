"""What HF transformers, vLLM and SGLang need to chat with an exported glmkit model, unchanged.

    write_chat_files(out_dir, "glm4", tokenizer, max_len=4096)   # -> ["tokenizer_config.json", "generation_config.json"]

- `tokenizer_config.json`: `PreTrainedTokenizerFast` over the folder's `tokenizer.json`, the format's
  `chat_template` (`chat_template(fmt)`: renders what glmkit's renderer renders), `<|endoftext|>` as
  eos and pad, the tokenizer's special tokens as `additional_special_tokens`;
- `generation_config.json`: `eos_token_id` = the format's stop ids (`<|endoftext|>`, `<|user|>`,
  `<|observation|>`), so `generate`, `transformers serve` and vLLM end a turn where glmkit does.
Without them an exported model gets HTTP 500 from `transformers serve` ("tokenizer.chat_template is
not set") and never stops at the end of a turn.
"""

from __future__ import annotations

import json
from pathlib import Path

from glmkit.chat.render import chat_template, stop_ids


def chat_files(fmt: str, tokenizer, max_len: int) -> dict[str, dict]:
    """The two files' contents (see the module docstring)."""
    stops = stop_ids(fmt, tokenizer)                 # also checks that the tokenizer has the format's tokens
    eot = tokenizer.backend.id_to_token(stops[0])
    specials = sorted((tokenizer.backend.id_to_token(i) for i in tokenizer.special_ids),
                      key=tokenizer.backend.token_to_id)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template(fmt),
        "eos_token": eot,
        "pad_token": eot,
        "additional_special_tokens": [t for t in specials if t != eot],
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    generation = {"eos_token_id": stops, "pad_token_id": stops[0]}
    return {"tokenizer_config.json": config, "generation_config.json": generation}


def write_chat_files(out: str | Path, fmt: str, tokenizer, max_len: int) -> list[str]:
    out = Path(out)
    written = []
    for name, content in chat_files(fmt, tokenizer, max_len).items():
        (out / name).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        written.append(name)
    return written
