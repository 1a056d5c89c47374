"""`glmkit tooltasks`: write the tool-use task suite: SFT conversations for its train split, its tasks and
its document store.

    glmkit tooltasks --out data/tooltasks --format glm45 --train 40 --heldout 10
    glmkit sft --init runs/small --chat-data data/tooltasks/train.jsonl --chat-format glm45 ...

Counts are per task family (arithmetic, counting, lookup, functions) and language (en, zh); what the
families are and how the splits stay disjoint: `glmkit.eval.tooltasks`, docs/tools.md.
"""

from __future__ import annotations

import argparse

from glmkit.cli.options import folder_to_write, nonnegative_int
from glmkit.eval.tooltasks import FAMILIES, LANGS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=folder_to_write, required=True,
                        help="folder for train.jsonl, train_tasks.jsonl, heldout_tasks.jsonl and facts.sqlite")
    parser.add_argument("--format", choices=("glm4", "glm45"), default="glm4",
                        help="chat format whose tool dialect the conversations use (default: glm4)")
    parser.add_argument("--train", type=nonnegative_int, default=40,
                        help="train tasks per family and language (default: 40)")
    parser.add_argument("--heldout", type=nonnegative_int, default=10,
                        help="held-out tasks per family and language (default: 10)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="draws the tasks (default: 0)")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated task families (default: {','.join(FAMILIES)})")
    parser.add_argument("--langs", default=",".join(LANGS), help=f"comma-separated languages (default: {','.join(LANGS)})")
    parser.add_argument("--sandbox", action="store_true",
                        help="run the python calls in the sandboxed interpreter (default: computed exactly in-process, "
                             "the same observations for the suite's code)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from glmkit.eval.toolsft import write_suite
    from glmkit.eval.tooltasks import ToolSuite

    split = lambda text: tuple(x.strip() for x in text.split(",") if x.strip())  # noqa: E731
    suite = ToolSuite(seed=args.seed, per_split={"train": args.train, "heldout": args.heldout},
                      families=split(args.families), langs=split(args.langs))
    if args.sandbox:
        from glmkit.chat.sandbox import Sandbox
        with Sandbox(Path(args.out) / "workspace") as box:
            paths = write_suite(suite, args.out, args.format, python=box)
    else:
        paths = write_suite(suite, args.out, args.format)
    n_train, n_held = len(suite.tasks("train")), len(suite.tasks("heldout"))
    print(f"{n_train} train conversations ({args.format}) in {paths['train']}; {n_train} train and {n_held} "
          f"held-out tasks in {paths['train_tasks'].parent}; {len(suite.documents())} documents in {paths['store']}")
    return 0
