"""`glmkit plot RUN_DIR... [--out loss.png]`: training and validation loss curves of runs.

Without `--out` the image goes into the first run's folder (`RUN_DIR/loss.png`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from glmkit.cli.options import check_output_file, existing_path, nonnegative_int
from glmkit.train.plot import plot

IMAGE_SUFFIXES = (".png", ".pdf", ".svg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", type=existing_path,
                        help="run directories (or metrics.jsonl files)")
    parser.add_argument("--out", default=None,
                        help="image to write: .png, .pdf or .svg (default: loss.png in the first run's folder)")
    parser.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis")
    parser.add_argument("--smooth", type=nonnegative_int, default=20,
                        help="running-mean window for the train loss (0 or 1: none; default 20)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--log-y", action="store_true", help="logarithmic loss axis")


def default_out(run: str) -> Path:
    path = Path(run)
    return (path.parent if path.is_file() else path) / "loss.png"


def run(args: argparse.Namespace) -> int:
    out = check_output_file(args.out or default_out(args.runs[0]), "--out", IMAGE_SUFFIXES)
    out = plot(args.runs, out, x=args.x, window=args.smooth, title=args.title, log_y=args.log_y)
    print(f"wrote {out}")
    return 0
