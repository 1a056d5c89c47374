"""Quantization table for BENCHMARKS.md: one checkpoint in fp32, bf16, int8 and int4 (weight-only,
`glmkit.model.quantize`, quantized from the bf16 weights, bf16 activations).

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_quantize.py RUN_OR_CKPT [--corpus DIR] [--threads 1]

Per variant: the bytes of every weight (and of the blocks' linear / expert weights alone), the
validation bits per byte of the corpus the model was trained on (`glmkit.eval.evaluate.bits_per_byte`,
20K tokens in windows of 256), and greedy decode tokens/s on the engine (batch 1, a 32-token prompt,
128 new tokens, best of 3). Prints a Markdown table, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from glmkit.checkpoint.loader import load
from glmkit.data.corpus import Corpus, default_corpus
from glmkit.eval.evaluate import bits_per_byte
from glmkit.infer.engine import Engine, Request
from glmkit.infer.sampling import SamplingConfig
from glmkit.model.quantize import QuantizedWeight, quantize, weight_nbytes


def variant(path: str, name: str):
    dtype = torch.float32 if name == "fp32" else torch.bfloat16
    loaded = load(path, dtype=dtype)
    if name in ("int8", "int4"):
        quantize(loaded.model, name)
    return loaded


def block_bytes(model) -> int:
    quantized = sum(w.nbytes() for w in model.modules() if isinstance(w, QuantizedWeight))
    floats = sum(t.numel() * t.element_size() for n, t in model.layers.named_parameters()
                 if t.dim() >= 2 and not n.endswith("gate.weight"))
    return quantized + floats


def decode_rate(model, tok, prompt: list[int], new: int = 128, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        engine = Engine(model, tok, max_batch=1, max_len=len(prompt) + new)
        t = time.perf_counter()
        engine.generate([Request.causal(prompt, SamplingConfig(max_new_tokens=new), ignore_stop=True)])
        best = min(best, time.perf_counter() - t)
    return new / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--corpus", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in ("fp32", "bf16", "int8", "int4"):
        loaded = variant(args.checkpoint, name)
        model, tok = loaded.model, loaded.tokenizer
        corpus = Corpus.open(args.corpus) if args.corpus else default_corpus()
        val = corpus.documents("val")
        objective = loaded.objective
        bpb = bits_per_byte(model, tok, val, objective)["bits_per_byte"]
        prompt = [int(x) for x in val[0][:32]]
        rows.append(dict(variant=name, weight_bytes=weight_nbytes(model), block_bytes=block_bytes(model),
                         bits_per_byte=bpb, decode_tokens_per_s=decode_rate(model, tok, prompt)))
    base = next(r for r in rows if r["variant"] == "bf16")
    print("| variant | weights (all) | blocks' linear weights | bits/byte (val) | vs bf16 | decode tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['weight_bytes'] / 2**20:.2f} MiB | {r['block_bytes'] / 2**20:.2f} MiB | "
              f"{r['bits_per_byte']:.4f} | {100 * (r['bits_per_byte'] / base['bits_per_byte'] - 1):+.2f}% | "
              f"{r['decode_tokens_per_s']:.1f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
