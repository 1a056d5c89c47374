"""The `glmkit` command line: one verb per module, each module giving `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their verb runs, so `glmkit --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import sys

from glmkit.errors import GlmkitError

# verb -> (module, one-line help). Keep in the order a new user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("glmkit.cli.demo", "the main job: build the default corpus, show samples, pretrain a small GLM, fill blanks"),
    "corpus": ("glmkit.data.corpus", "build or inspect a tokenized corpus (default: the bilingual one)"),
    "tokenizer": ("glmkit.data.tokenizer", "train a bilingual byte-level BPE; encode/decode text"),
    "samples": ("glmkit.data.samples", "print samples of each objective (GLM [MASK]/[sMASK]/[gMASK], MLM, CLM) on real text"),
    "convert": ("glmkit.checkpoint.convert", "convert HF GLM-4 / GLM-4-0414 / GLM-4.5 checkpoints to and from glmkit"),
    "train": ("glmkit.train.loop", "pretrain a GLM (blank infilling, MLM or CLM); checkpoints, exact resume, torchrun"),
    "plot": ("glmkit.train.plot", "draw training / validation loss curves of runs to a PNG"),
    "infill": ("glmkit.infer.generate", "fill [MASK] / [sMASK] / [gMASK] blanks in text with a model, streaming"),
    "generate": ("glmkit.infer.generate", "continue a prompt ([gMASK] at its end), streaming"),
    "eval": ("glmkit.eval.evaluate", "evaluate a checkpoint: bits/byte, infilling, cloze, Chinese sentiment"),
    "experiment": ("glmkit.eval.experiment", "GLM vs BERT (MLM) vs GPT (CLM) pretrained alike, on every eval task"),
    "bench": ("glmkit.bench", "measure speed against a named peer in the same run"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glmkit", description="GLM language models: pretraining, checkpoints, inference, evaluation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 0
        parser.parse_args(argv)  # prints the usage error for an unknown verb
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"glmkit {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except GlmkitError as e:
        print(f"glmkit {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"glmkit {name}: interrupted", file=sys.stderr)
        return 130
