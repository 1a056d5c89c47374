"""`glmkit bench WHAT`: speed measured against a named peer in the same run.

Each benchmark is a module here with `add_arguments(parser)` and `run(args) -> int`; it prints its
numbers and, as its last line, one JSON object (with at least the keys its issue names and `ratio`).
"""

from __future__ import annotations

import argparse
import importlib

# benchmark -> (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "data": ("glmkit.bench.data", "objective corruption + packing tokens/s per core vs a pure-Python GLM pipeline"),
    "train": ("glmkit.bench.train", "training steps of a glmkit model vs the same HF transformers model"),
    "generate": ("glmkit.bench.generate", "decode tokens/s of glmkit vs HF transformers generate, same weights"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, (module_name, help_text) in BENCHES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(p)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHES[args.bench][0]).run(args)
