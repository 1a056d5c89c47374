"""`glmkit rl`: reinforcement learning from tool outcomes on the tool-use task suite.

    glmkit tooltasks --out data/tooltasks --format glm4
    glmkit sft --init runs/small --chat-data data/tooltasks/train.jsonl --out-dir runs/sft
    glmkit rl --init runs/sft --rl-tasks data/tooltasks --out-dir runs/rl --score-heldout

Each micro-batch plays `--rl-tasks-per-batch` train tasks `--rl-group` times through the real agent loop
with the current weights, rewards each attempt by its checked answer (`glmkit.eval.toolrl`), and trains on
the sampled replies weighted by their group-relative advantage (`glmkit.train.rl`): the `glmkit train`
machinery (checkpoints, exact resume, metrics.jsonl with the reward of every step, torchrun with ddp).
The options are `TrainConfig`'s (see `glmkit train --help`) without the corpus, model, chat-data and LoRA
ones. `--score-heldout` plays the held-out tasks greedily with `--init` and with the result and prints
both (the last line is a JSON object).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from glmkit.cli.train import add_config_arguments, run_config
from glmkit.train.setup import TrainConfig

SKIP = ("model", "model_overrides", "corpus", "objective", "mixture", "chat_data", "chat_val", "batch_size", "eval_every",
        "eval_batches",
        "lora_rank", "lora_alpha", "lora_targets")
# a short run at a fine-tuning learning rate; sampling needs the weights of the step (no prefetch)
DEFAULTS = {"out_dir": "runs/rl", "lr": 2e-5, "max_steps": 50, "eval_every": 0, "save_every": 10, "prefetch": 0,
            "seq_len": 1024, "warmup_steps": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, skip=SKIP, defaults=DEFAULTS, required=("init", "rl_tasks"))
    parser.add_argument("--score-heldout", action="store_true",
                        help="after training, play the held-out tasks greedily with --init and with the result and "
                             "print the share answered right (overall and per family)")


def run(args: argparse.Namespace) -> int:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    cfg.validate()
    source = _source(cfg, "train", cfg.rl_temperature)
    status = run_config(cfg, episodes=source)
    if args.score_heldout and status == 0:
        _score(cfg)
    return status


def _source(cfg: TrainConfig, split: str, temperature: float):
    from glmkit.eval.toolrl import ToolEpisodes
    return ToolEpisodes.from_folder(cfg.rl_tasks, split, fmt=cfg.chat_format, temperature=temperature,
                                    max_new_tokens=cfg.rl_max_new_tokens, max_rounds=cfg.rl_max_rounds,
                                    format_reward=cfg.rl_format_reward, concurrency=cfg.rl_concurrency)


def _score(cfg: TrainConfig) -> None:
    """The held-out tasks through `glmkit.eval.tooleval.evaluate_tools` (greedy, with the family's tools, the
    episode limits of the run) with --init and with the run's last checkpoint."""
    from glmkit.checkpoint.loader import load
    from glmkit.eval.tooleval import evaluate_tools
    from glmkit.eval.tooltasks import ExactPython
    from glmkit.infer.engine import Engine

    heldout = _source(cfg, "heldout", 0.0)
    out = {}
    for name, path in (("init", cfg.init), ("rl", cfg.out_dir)):
        loaded = load(path)
        engine = Engine(loaded.model, loaded.tokenizer, max_batch=8, max_len=cfg.seq_len)
        report = evaluate_tools(engine, loaded.tokenizer, heldout.tasks, fmt=cfg.chat_format, store=heldout.store,
                                python=ExactPython(), max_rounds=cfg.rl_max_rounds,
                                max_new_tokens=cfg.rl_max_new_tokens, causal=loaded.objective == "clm")
        out[name] = report.summary()
    families = list(out["init"]["families"])
    print(f"held-out tasks ({out['init']['tasks']}), greedy, with tools: parse rate, answer exact match")
    print(f"{'model':<6}{'parse':>8}{'EM':>8}" + "".join(f"{'EM ' + f:>14}" for f in families))
    for name in ("init", "rl"):
        s = out[name]
        cells = [s["parse_rate"], s["answer_em_with_tools"]] + [s["families"][f]["answer_em_with_tools"]
                                                               for f in families]
        print(f"{name:<6}" + "".join(f"{_cell(c):>{w}}" for c, w in zip(cells, [8, 8] + [14] * len(families))))
    print(json.dumps({"heldout": out}))


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"
