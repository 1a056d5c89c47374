"""`glmkit plan`: the memory an inference run needs, before loading anything.

    glmkit plan glm-4-9b --dtype bf16 --rows 8 --max-len 32768 --memory 80GiB
    glmkit plan runs/demo --max-len 2048 --chunk 512 --json
    glmkit plan glm-4-9b --quantize int8 --kv-dtype fp8 --max-len 131072 --memory 24GiB

Prints the weights, the KV cache pool (rows x max_len slots) and the activation peak of a prefill
chunk or a decode step (`glmkit.infer.plan`), their total, and whether it fits `--memory`. The
activation figure is a model of the forward, checked against measured peaks in tests/test_plan.py.
"""

from __future__ import annotations

import argparse
import json

from glmkit.cli.options import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a model preset (e.g. glm-4-9b, glm-4.5-air) or a model folder "
                                      "(glmkit checkpoint or run, HF GLM folder): only its config is read")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16",
                        help="weight, activation and KV cache dtype (default bf16)")
    parser.add_argument("--rows", type=positive_int, default=1,
                        help="KV cache rows: requests decoded together (default 1)")
    parser.add_argument("--max-len", type=positive_int, default=None,
                        help="slots per row: prompt + new tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--chunk", type=positive_int, default=None,
                        help="prefill chunk in tokens (default: --max-len, a one-shot prefill)")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="weight-only quantized linear layers, as `glmkit generate --quantize` loads them")
    parser.add_argument("--kv-dtype", choices=("auto", "fp32", "bf16", "fp16", "fp8"), default="auto",
                        help="KV cache storage dtype, as `glmkit generate --kv-dtype` (default auto: --dtype)")
    parser.add_argument("--memory", default=None, help="device memory to check against, e.g. 24GiB, 80GB")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def run(args: argparse.Namespace) -> int:
    from glmkit.errors import GlmkitError
    from glmkit.infer.plan import DTYPES, human_bytes, model_config, parse_memory, plan_memory

    try:
        memory = None if args.memory is None else parse_memory(args.memory)
    except GlmkitError:
        raise GlmkitError(f"--memory {args.memory!r} is not a size; write e.g. 24GiB, 80GB, 512MiB") from None
    config = model_config(args.model)
    max_len = args.max_len or config.max_position_embeddings
    if args.chunk and args.chunk > max_len:
        raise GlmkitError(f"--chunk {args.chunk} is longer than --max-len {max_len}; a chunk is part of one row")
    plan = plan_memory(config, DTYPES[args.dtype], args.rows, max_len, args.chunk, args.quantize, args.kv_dtype)
    out = plan.to_dict()
    if memory is not None:
        out.update(memory=memory, fits=plan.fits(memory))
    if args.json:
        print(json.dumps(out))
        return 0
    weights = plan.dtype + (f" + {plan.quantize} weights" if plan.quantize else "")
    print(f"{plan.model}  {weights}  {plan.kv_dtype} KV cache  rows {plan.rows}  max_len {plan.max_len}  "
          f"prefill chunk {plan.chunk}")
    rows = [("weights", plan.weights), ("KV cache", plan.kv_cache),
            (f"activations (prefill {human_bytes(plan.prefill_activations)}, decode "
             f"{human_bytes(plan.decode_activations)})", plan.activations), ("total", plan.total)]
    for label, n in rows:
        print(f"  {label:<58} {human_bytes(n):>12}")
    if memory is not None:
        verdict = "fits in" if plan.fits(memory) else "does NOT fit in"
        print(f"  {verdict} {human_bytes(memory)} ({human_bytes(abs(memory - plan.total))} "
              f"{'to spare' if plan.fits(memory) else 'short'})")
    return 0
