"""The `glmkit` command line: the command layer over the library.

One module per verb, each giving `add_arguments(parser)` and `run(args) -> int`; argparse, printing and
exit codes live only here (library modules take arguments and return values). Modules are imported
only when their verb runs, so `glmkit --help` is instant. This package may import every other one.

Exit status: 0 done; 2 bad input (an argparse error, a `GlmkitError` or an `OSError` such as a
permission refused, printed as one line, no traceback); 130 interrupted. Anything else escaping a verb
is a bug in glmkit and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from glmkit.errors import GlmkitError

# verb -> (module, one-line help). Keep in the order a new user meets them. A two-word name ("eval tools")
# is a sub-verb: `glmkit eval tools ...` runs its own module, `glmkit eval ...` the verb's.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("glmkit.cli.demo", "the main job: build the default corpus, show samples, pretrain a small GLM, fill blanks, teach it to call tools"),
    "corpus": ("glmkit.cli.corpus", "build or inspect a tokenized corpus (default: the bilingual one)"),
    "tokenizer": ("glmkit.cli.tokenizer", "train a bilingual byte-level BPE; encode/decode text"),
    "samples": ("glmkit.cli.samples", "print samples of each objective (GLM [MASK]/[sMASK]/[gMASK], MLM, CLM) on real text"),
    "convert": ("glmkit.cli.convert", "convert HF GLM-4 / GLM-4-0414 / GLM-4.5 checkpoints to and from glmkit"),
    "train": ("glmkit.cli.train", "pretrain a GLM (blank infilling, MLM or CLM); checkpoints, exact resume, torchrun"),
    "tooltasks": ("glmkit.cli.tooltasks", "write the tool-use task suite: SFT conversations, held-out tasks, documents"),
    "sft": ("glmkit.cli.sft", "fine-tune on chat conversations with tool calls (loss on the assistant's turns)"),
    "rl": ("glmkit.cli.rl", "RL from tool outcomes: sample task attempts, reward checked answers, group-relative update"),
    "plot": ("glmkit.cli.plot", "draw training / validation loss curves of runs to a PNG"),
    "infill": ("glmkit.cli.infer", "fill [MASK] / [sMASK] / [gMASK] blanks in text with a model, streaming"),
    "generate": ("glmkit.cli.infer", "continue a prompt ([gMASK] at its end), streaming"),
    "chat": ("glmkit.cli.chat", "chat with a model that calls tools: python (sandboxed), a browser, your functions"),
    "plan": ("glmkit.cli.plan", "memory of an inference run: weights, KV cache, activations; does it fit"),
    "eval": ("glmkit.cli.eval", "evaluate a checkpoint: bits/byte, infilling, cloze, Chinese sentiment"),
    "eval passkey": ("glmkit.cli.eval_passkey", "passkey retrieval: a number hidden in long filler text, lengths x depths, a heat map"),
    "eval tools": ("glmkit.cli.eval_tools", "tool use on the held-out tool tasks: parse rate, call accuracy, answers with and without tools"),
    "experiment": ("glmkit.cli.experiment", "GLM vs BERT (MLM) vs GPT (CLM) pretrained alike, on every eval task"),
    "serve": ("glmkit.cli.serve", "an OpenAI-compatible HTTP server (chat, tool calls, streaming, continuous batching)"),
    "bench": ("glmkit.cli.bench", "measure speed against a named peer in the same run"),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the option, with where to read more."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    import glmkit

    parser = Parser(prog="glmkit",
                    description="GLM language models: pretraining, checkpoints, inference, evaluation.")
    parser.add_argument("--version", action="version", version=f"glmkit {glmkit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        if " " not in name:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def verb_parser(name: str) -> argparse.ArgumentParser:
    """The parser of one verb, with its module's arguments."""
    module_name, help_text = COMMANDS[name]
    parser = Parser(prog=f"glmkit {name}", description=help_text)
    importlib.import_module(module_name).add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] not in COMMANDS:
            parser = build_parser()
            if not argv:
                parser.print_help()
                return 0
            parser.parse_args(argv)  # --help / --version exit 0; an unknown verb is a usage error
            return 2
        name, rest = argv[0], argv[1:]
        if rest and f"{name} {rest[0]}" in COMMANDS:
            name, rest = f"{name} {rest[0]}", rest[1:]
        args = verb_parser(name).parse_args(rest)
    except SystemExit as e:      # argparse's --help (0) or usage error (2): a status, not an exception
        return e.code if isinstance(e.code, int) else 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.run(args) or 0)
    except GlmkitError as e:
        print(f"glmkit {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"glmkit {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:       # the machine refused (permissions, a full disk): say what, not where in glmkit
        where = f": {e.filename}" if e.filename else ""
        print(f"glmkit {name}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
