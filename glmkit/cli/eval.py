"""`glmkit eval`: one checkpoint on every task, results as JSON.

    glmkit eval runs/glm --out runs/glm/eval.json
    glmkit eval runs/glm --infill-n 0 --cloze-n 0 --sentiment-test 0      # bits per byte only

Options other than --out / --objective are the fields of `glmkit.eval.evaluate.EvalConfig`; a task
count of 0 skips that task.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from glmkit.cli.options import check_device, check_output_file, existing_path
from glmkit.eval.evaluate import EvalConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=existing_path, help="a glmkit run / checkpoint directory")
    parser.add_argument("--out", help="write the results JSON here (default: CHECKPOINT/eval.json)")
    parser.add_argument("--objective", choices=("glm", "mlm", "clm"),
                        help="how to read the model (default: the objective it was trained with)")
    for name, default in asdict(EvalConfig()).items():
        if name in ("corpus", "device"):
            parser.add_argument(f"--{name}", default=default)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)


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
    res = evaluate(model, tok, objective, cfg, log=lambda line: print(line, flush=True))
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0
