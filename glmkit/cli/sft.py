"""`glmkit sft`: fine-tune a model on chat conversations (OpenAI-style JSONL with optional tools).

    glmkit sft --init runs/small --chat-data train.jsonl --chat-format glm4 --out-dir runs/sft
    glmkit sft --init GLM-4-9B-0414 --chat-data train.jsonl --chat-format glm4 --device cuda ...

The `glmkit train` machinery (checkpoints, exact resume, metrics, torchrun) with the data of
`glmkit.train.chat_data`: conversations rendered in the format, the loss on what the assistant writes,
packed so that no conversation sees another. The model, tokenizer and objective come from `--init`;
the options are `TrainConfig`'s (see `glmkit train --help`) without the corpus and model ones.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from glmkit.cli.train import RL_ONLY, add_config_arguments, run_config
from glmkit.train.setup import TrainConfig

PRETRAIN_ONLY = ("model", "model_overrides", "corpus", "objective", "mixture")
# fine-tuning defaults: a short run at a lower learning rate than pretraining
DEFAULTS = {"out_dir": "runs/sft", "lr": 1e-4, "max_steps": 200, "eval_every": 50, "save_every": 100}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, skip=PRETRAIN_ONLY + RL_ONLY, defaults=DEFAULTS, required=("init", "chat_data"))


def run(args: argparse.Namespace) -> int:
    return run_config(TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}))
