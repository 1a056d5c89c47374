"""`glmkit experiment compare`: GLM vs BERT (MLM) vs GPT (CLM), pretrained alike, on every eval task.

    glmkit experiment compare                 # the CPU default (~27 min on 2 cores)
    glmkit experiment compare --quick         # a ~3-minute smoke run of the whole pipeline

Options are the fields of `glmkit.eval.experiment.CompareConfig`.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace

from glmkit.cli.options import check_device, existing_dir, positive_float, positive_int
from glmkit.errors import GlmkitError
from glmkit.eval.experiment import DEFAULT_EVAL, QUICK, QUICK_EVAL, VARIANTS, CompareConfig

# options that must be positive numbers (the rest are names, lists or a seed)
POSITIVE = {"steps": positive_int, "seq_len": positive_int, "batch_size": positive_int,
            "eval_every": positive_int, "lr": positive_float, "corpus": existing_dir}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    p = sub.add_parser("compare", help="GLM vs MLM vs CLM (+ GLM without span shuffling), pretrained alike")
    for name, default in asdict(CompareConfig()).items():
        flag = f"--{name.replace('_', '-')}"
        kind = POSITIVE.get(name, type(default) if default is not None else str)
        p.add_argument(flag, type=kind, default=default, help=f"(default: {default})")
    p.add_argument("--quick", action="store_true", help="a ~3-minute smoke version (tiny model, 30 steps)")


def run(args: argparse.Namespace) -> int:
    from glmkit.eval.experiment import compare
    cfg = CompareConfig(**{k: getattr(args, k) for k in asdict(CompareConfig())})
    check_device(cfg.device)
    bad = [v for v in cfg.variants.split(",") if v.strip() not in VARIANTS]
    if bad or not cfg.variants.strip():
        raise GlmkitError(f"--variants: unknown variant(s) {', '.join(bad) or '(none given)'}; choose from "
                          f"{', '.join(VARIANTS)}")
    eval_cfg = DEFAULT_EVAL
    if args.quick:
        cfg = replace(cfg, **QUICK, out_dir=cfg.out_dir if cfg.out_dir != CompareConfig.out_dir else "runs/compare-quick")
        eval_cfg = QUICK_EVAL
    compare(cfg, eval_cfg, log=lambda line: print(line, flush=True))
    return 0
