"""`glmkit train`: pretrain a GLM with blank infilling (or MLM / CLM) on a corpus; exact resume.

    glmkit train --model small --objective glm --max-steps 2000 --out-dir runs/small
    torchrun --nproc_per_node 2 -m glmkit train --parallel fsdp ...      # DDP by default under torchrun

Every option is a field of `glmkit.train.setup.TrainConfig`: the string under each field is its
`--help` text, its type the option's type. What the options mean and how a run resumes:
`glmkit.train.loop`.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import os
from dataclasses import fields

from glmkit.train.setup import TrainConfig


def field_help(cls=TrainConfig) -> dict[str, str]:
    """The string literal under each dataclass field: the `--help` text of its option."""
    tree = ast.parse(inspect.getsource(cls))
    body, out = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            out[node.target.id] = " ".join(str(nxt.value.value).split())
    return out


CHAT_ONLY = ("chat_data", "chat_format", "chat_val", "init", "lora_rank", "lora_alpha", "lora_targets")   # `glmkit sft`'s options
RL_ONLY = ("rl_tasks", "rl_group", "rl_tasks_per_batch", "rl_temperature", "rl_max_new_tokens", "rl_max_rounds",
           "rl_scale_std", "rl_format_reward", "rl_concurrency")                             # `glmkit rl`'s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, skip=CHAT_ONLY + RL_ONLY)


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), defaults: dict | None = None,
                         required: tuple[str, ...] = ()) -> None:
    """One option per `TrainConfig` field, except `skip`; `defaults` overrides the fields' defaults."""
    helps = field_help()
    defaults = defaults or {}
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type).split("|")[0].strip()
        text = helps.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            shown = "" if "default" in text or f.name in required else f" (default: {default})"
            parser.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=default,
                                help=text + shown, required=f.name in required)


def run(args: argparse.Namespace) -> int:
    return run_config(TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}))


def run_config(cfg: TrainConfig, episodes=None) -> int:
    """Train `cfg` (an RL run: on `episodes`), printing the outcome on the main process; the exit status."""
    from glmkit.train import distributed as D
    from glmkit.train.loop import train

    main_rank = int(os.environ.get("RANK", "0")) == 0
    res = train(cfg, log=(lambda line: print(line, flush=True)) if main_rank else None, episodes=episodes)
    D.shutdown()        # only after a run that finished on every rank: see its docstring
    if main_rank:
        loss = f": loss {res['loss']:.4f}" if res["loss"] is not None else " (nothing left to train)"
        val = f", val loss {res['val_loss']:.4f}" if res["val_loss"] is not None else ""
        rate = f", {res['tok_per_s']:,.0f} tokens/s" if res.get("tok_per_s") else ""
        print(f"step {res['step']}{loss}{val}{rate}; run in {res['run_dir']}"
              + (f", checkpoint {res['checkpoint']}" if res["checkpoint"] else ""))
        if cfg.chat_data is not None:
            share = 100 * res["trainable_params"] / max(1, res["num_params"])
            print(f"trainable parameters: {res['trainable_params']:,} of {res['num_params']:,} ({share:.2f}%); "
                  f"peak memory: {res['peak_memory_bytes'] / 2**20:,.0f} MiB")
    return 130 if res["interrupted"] else 0
