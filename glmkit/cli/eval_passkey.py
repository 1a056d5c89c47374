"""`glmkit eval passkey`: passkey retrieval over a grid of prompt lengths x key depths; a heat map.

    glmkit eval passkey runs/glm --lengths 1K,2K,4K --depths 0,0.25,0.5,0.75,1 --trials 5
    glmkit eval passkey runs/glm --filler kjv --lengths 512,1K --depths 5 --out runs/glm/passkey_kjv.json

Writes the report JSON (--out, default CHECKPOINT/passkey.json: every trial with its key and answer)
and the heat map beside it (--plot, default the JSON's name with .png); the last line printed is one
JSON object: lengths, depths, accuracy (one row per length, one column per depth), mean_accuracy and
the two files. What is measured and why: `glmkit.eval.passkey` and docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from glmkit.cli.options import (
    add_memory_arguments,
    check_device,
    check_output_file,
    existing_dir,
    positive_int,
)
from glmkit.eval.passkey import FILLERS, PasskeyConfig, parse_depths, parse_lengths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PasskeyConfig()
    parser.add_argument("checkpoint", type=existing_dir, help="a glmkit run / checkpoint directory, or an HF GLM folder")
    parser.add_argument("--lengths", default=",".join(map(str, d.lengths)),
                        help="prompt lengths in tokens, comma-separated; K = 1024 (default: %(default)s)")
    parser.add_argument("--depths", default=",".join(map(str, d.depths)),
                        help="where the key sits: shares of the filler before it in [0, 1], comma-separated, "
                             "or a count N for N evenly spaced depths (default: %(default)s)")
    parser.add_argument("--trials", type=positive_int, default=d.trials, help="prompts per cell (default: %(default)s)")
    parser.add_argument("--digits", type=positive_int, default=d.digits, help="digits of the key (default: %(default)s)")
    parser.add_argument("--filler", choices=FILLERS, default=d.filler,
                        help="repeat: the standard repeated sentences; or real text of that corpus source "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="keys and filler starts (default: %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=d.batch, help="prompts decoded at once (default: %(default)s)")
    parser.add_argument("--prefill-chunk", type=positive_int, default=d.prefill_chunk,
                        help="most prompt tokens the engine feeds per step (default: %(default)s)")
    parser.add_argument("--objective", choices=("glm", "clm"),
                        help="read the prompt as a GLM Part A + [gMASK] (glm) or causally (clm); default: as trained")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    add_memory_arguments(parser)
    parser.add_argument("--out", help="the report JSON (default: CHECKPOINT/passkey.json)")
    parser.add_argument("--plot", help="the heat map, .png / .pdf / .svg (default: the report's name with .png)")


def run(args: argparse.Namespace) -> int:
    cfg = PasskeyConfig(lengths=parse_lengths(args.lengths), depths=parse_depths(args.depths), trials=args.trials,
                        digits=args.digits, filler=args.filler, seed=args.seed, batch=args.batch,
                        prefill_chunk=args.prefill_chunk, kv_dtype=args.kv_dtype).validate()
    check_device(args.device)
    out = check_output_file(args.out or Path(args.checkpoint) / "passkey.json", "--out", (".json",))
    plot = check_output_file(args.plot or out.with_suffix(".png"), "--plot", (".png", ".pdf", ".svg"))

    from tqdm import tqdm

    from glmkit.checkpoint.loader import load
    from glmkit.eval.passkey import passkey_eval, plot_heatmap
    loaded = load(args.checkpoint, args.device, quantize=args.quantize)
    objective = args.objective or loaded.objective
    print(f"passkey retrieval: {args.checkpoint} read as a {objective} model, {len(cfg.lengths)} lengths x "
          f"{len(cfg.depths)} depths x {cfg.trials} trials, {cfg.filler} filler", flush=True)
    bar = tqdm(total=len(cfg.lengths) * len(cfg.depths) * cfg.trials, desc="  prompts", leave=False, dynamic_ncols=True)
    try:
        report = passkey_eval(loaded.model, loaded.tokenizer, objective, cfg,
                              progress=lambda done, total: bar.update(done - bar.n))
    finally:
        bar.close()
    print(_table(report))
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot_heatmap(report, plot, title=f"passkey retrieval, {Path(args.checkpoint).name}: mean "
                                     f"{report['mean_accuracy']:.2f}")
    print(f"wrote {out} and {plot}")
    print(json.dumps({k: report[k] for k in ("lengths", "depths", "accuracy", "mean_accuracy")}
                     | {"json": str(out), "plot": str(plot)}))
    return 0


def _table(report: dict) -> str:
    """Accuracy as text: one line per length, one column per depth."""
    head = "length  " + " ".join(f"{100 * d:>5.0f}%" for d in report["depths"])
    rows = [f"{n:>6}  " + " ".join(f"{a:>6.2f}" for a in row) for n, row in zip(report["lengths"], report["accuracy"])]
    return "\n".join([head, *rows, f"mean accuracy {report['mean_accuracy']:.3f} ({report['seconds']} s)"])
