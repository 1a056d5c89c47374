"""Long-context training table for BENCHMARKS.md: peak memory and step time of one training step
(forward, backward, AdamW) against the row length, with and without activation checkpointing.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_long_context.py --lengths 2048,8192,16384 --threads 1 \
        --backends sdpa,segments --skip sdpa:16384

Each (length, backend, checkpointing) cell runs in its own process, so its peak resident memory is its own:
the model (`--preset`, default `small`, with max_position_embeddings raised to the length), one
batch of `--batch-size` rows built by the real objective code (`glmkit.data.packing.pack_documents`,
GLM-Large's [MASK] spans over random documents of 1K..40K tokens, so rows hold whole documents and
pieces of long ones), each attention backend of `--backends` (`glmkit.model.attention`), one
warm-up step, then `--steps` timed steps. `step_peak_mb` = peak RSS minus the RSS before the first
step (weights, optimizer state and the batch's mask included only as far as they grow in the step).
Prints a Markdown table, then one JSON object.

`--crossover` instead times the attention alone (forward + backward, mask building included) of the
dense-mask `sdpa` and `segments` backends on 4096 positions of packed GLM rows at 256..2048 tokens a
row (documents of log-normal lengths, median ~400 tokens like the default corpus): where `auto` should
switch on the CPU (`glmkit.model.attention.SEGMENTS_MIN_LEN`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def one_cell(args) -> dict:
    import numpy as np
    import torch

    from glmkit.data.objective_config import ObjectiveConfig, SpecialIds
    from glmkit.data.packing import pack_documents
    from glmkit.model.attention import make_attention_mask
    from glmkit.model.config import GLMConfig
    from glmkit.model.glm import GLM

    torch.set_num_threads(args.threads)
    T = args.length
    torch.manual_seed(0)
    model = GLM(GLMConfig.from_name(args.preset, max_position_embeddings=max(T, 2048))).train()
    model.set_runtime(attention_backend=args.backend)
    model.checkpointing = args.checkpointing
    V = model.config.vocab_size                            # text ids below V - 8, the special ids above
    sp = SpecialIds(mask=V - 8, smask=V - 7, gmask=V - 6, sop=V - 5, eop=V - 4, eot=V - 3, pad=V - 2, vocab_size=V)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, sp.mask, size=int(n)) for n in rng.integers(1024, 40_000, size=64)]
    batch = pack_documents(docs, ObjectiveConfig.from_name("glm-large"), sp, rng, args.batch_size, T).batch.to("cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        attn = make_attention_mask(batch, args.backend, torch.float32)
        assert attn.backend == args.backend, attn.backend
        loss = model.loss(batch, attn)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    base = rss_mb()
    step()                                                  # warm-up: allocator growth, Adam state
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"length": T, "backend": args.backend, "checkpointing": args.checkpointing, "step_s": min(times), "peak_rss_mb": round(peak),
            "step_peak_mb": round(peak - base), "positions": int((batch.segment_ids >= 0).sum()),
            "loss_tokens": int(batch.loss_mask.sum())}


def crossover(threads: int) -> list[dict]:
    import numpy as np
    import torch

    from glmkit.data.objective_config import ObjectiveConfig, SpecialIds
    from glmkit.data.packing import pack_documents
    from glmkit.model.attention import attend, make_attention_mask

    torch.set_num_threads(threads)
    V = 8192
    sp = SpecialIds(mask=V - 8, smask=V - 7, gmask=V - 6, sop=V - 5, eop=V - 4, eot=V - 3, pad=V - 2, vocab_size=V)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, V - 8, size=int(n)) for n in np.exp(rng.normal(6.0, 1.0, size=400)).clip(20, 40000)]
    out = []
    for T in (256, 512, 1024, 2048):
        B = 4096 // T
        batch = pack_documents(docs, ObjectiveConfig.from_name("glm-large"), sp, rng, B, T).batch.to("cpu")
        row = {"rows": B, "length": T}
        for backend in ("sdpa", "segments"):
            best = float("inf")
            for _ in range(3):
                q = torch.randn(B, T, 4, 64, requires_grad=True)
                k, v = (torch.randn(B, T, 2, 64, requires_grad=True) for _ in range(2))
                t0 = time.perf_counter()
                attend(q, k, v, make_attention_mask(batch, backend)).sum().backward()
                best = min(best, time.perf_counter() - t0)
            row[f"{backend}_s"] = round(best, 3)
        out.append(row)
        print(row, flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="2048,8192,16384")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--backends", default="sdpa,segments")
    p.add_argument("--skip", default="", help="backend:length cells not to run, comma-separated")
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--crossover", action="store_true", help="time the attention alone (see the docstring)")
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)           # one cell (the child process)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.crossover:
        print(json.dumps(crossover(args.threads)))
        return 0
    if args.length:
        print(json.dumps(one_cell(args)))
        return 0
    rows = []
    skip = set(filter(None, args.skip.split(",")))
    cells = [(T, be, ckpt) for T in (int(x) for x in args.lengths.split(",")) for be in args.backends.split(",")
             for ckpt in (False, True) if f"{be}:{T}" not in skip]
    for T, backend, ckpt in cells:
        cmd = [sys.executable, __file__, "--length", str(T), "--preset", args.preset, "--batch-size",
               str(args.batch_size), "--backend", backend, "--steps", str(args.steps), "--threads",
               str(args.threads)] + (["--checkpointing"] if ckpt else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if out.returncode != 0:
            rows.append({"length": T, "backend": backend, "checkpointing": ckpt,
                         "error": out.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr, flush=True)
    print("| row length | attention | checkpointing | step (s) | step peak (MB) | process peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['length']} | {r['backend']} | {'on' if r['checkpointing'] else 'off'} "
        if "error" in r:
            print(head + f"| failed: {r['error']} | | |")
        else:
            print(head + f"| {r['step_s']:.2f} | {r['step_peak_mb']} | {r['peak_rss_mb']} |")
    print(json.dumps({"preset": args.preset, "batch_size": args.batch_size, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
