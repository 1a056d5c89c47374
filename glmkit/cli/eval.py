"""`glmkit eval`: one checkpoint on every task, results as JSON.

    glmkit eval runs/glm --out runs/glm/eval.json
    glmkit eval runs/glm --infill-n 0 --cloze-n 0 --sentiment-test 0      # bits per byte only

Each task shows a progress bar while it runs and a line when done; at the end a table puts every
number beside its baseline (unigram, most frequent token, chance, majority class) and flags each one
that is no better.

Options other than --out / --objective are the fields of `glmkit.eval.evaluate.EvalConfig`; a task
count of 0 skips that task.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from glmkit.cli.options import check_device, check_output_file, existing_dir
from glmkit.eval.baselines import baseline_rows, format_baseline_table
from glmkit.eval.evaluate import EvalConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=existing_dir, help="a glmkit run / checkpoint directory")
    parser.add_argument("--out", help="write the results JSON here (default: CHECKPOINT/eval.json)")
    parser.add_argument("--objective", choices=("glm", "mlm", "clm"),
                        help="how to read the model (default: the objective it was trained with)")
    for name, default in asdict(EvalConfig()).items():
        if name == "corpus":
            parser.add_argument("--corpus", type=existing_dir, default=None,
                                help="the corpus the model was trained on (default: the default corpus)")
        elif name == "device":
            parser.add_argument("--device", default=default, help="cpu | cuda | cuda:N (default cpu)")
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)


class _TaskBars:
    """One transient tqdm bar per running task (the `progress` callback of `evaluate`)."""

    def __init__(self):
        self.bar, self.task = None, None

    def update(self, task: str, done: int, total: int) -> None:
        from tqdm import tqdm
        if task != self.task:
            self.close()
            self.bar, self.task = tqdm(total=total, desc=f"  {task}", leave=False, dynamic_ncols=True), task
        self.bar.update(done - self.bar.n)

    def write(self, line: str) -> None:
        """A finished task's line: its bar goes first, so the line stays in the scrollback alone."""
        self.close()
        print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.task = None, None


def run(args: argparse.Namespace) -> int:
    from glmkit.checkpoint.loader import load
    from glmkit.eval.evaluate import evaluate
    cfg = EvalConfig(**{k: getattr(args, k) for k in asdict(EvalConfig())}).validate()
    check_device(cfg.device)
    out = check_output_file(args.out or Path(args.checkpoint) / "eval.json", "--out", (".json",))
    loaded = load(args.checkpoint, cfg.device)
    model, tok = loaded.model, loaded.tokenizer
    objective = args.objective or loaded.objective
    print(f"evaluating {args.checkpoint} as a {objective} model")
    bars = _TaskBars()
    try:
        res = evaluate(model, tok, objective, cfg, log=bars.write, progress=bars.update)
    finally:
        bars.close()
    print("\n" + format_baseline_table(baseline_rows(res)))
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0
