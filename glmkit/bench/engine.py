"""`glmkit bench engine`: many requests of mixed lengths through glmkit's engine vs HF transformers'
continuous batching and vs HF `generate` one request at a time, same weights, same requests.

One random-weight model of a preset is saved as an HF checkpoint (`glmkit.checkpoint.hf.to_hf`) and
loaded back by transformers, so the three runs compute with identical weights (glmkit's laid out for
decoding as the loader does). `requests` causal requests get prompts of uniformly random length in
[min_prompt, max_prompt] and exactly n new tokens each, n uniform in [min_new, max_new] (greedy, no
stopping: every side produces the same token count). Two arrival patterns:
- `burst`: every request arrives at time 0;
- `spread`: arrivals evenly spaced over half of glmkit's burst time (the same schedule for every side).
Per side and pattern: generated tokens / wall time from the first arrival to the last finish, and p50 /
p99 of each request's time from its arrival to its last token. HF continuous batching is
`model.init_continuous_batching()` (its background thread; requests added at their arrival); HF
sequential is one `generate` call per request in arrival order. HF continuous batching is sized for the
workload and unpadded (`hf_continuous_config`; its CUDA-graph defaults are far slower on the CPU), with a
token budget per step equal to glmkit's (a prefill chunk plus a token per row). `match` is the share of requests
whose glmkit tokens equal HF continuous batching's (greedy on the same weights: 1.0 up to float ties).
The result's top-level ratios are for the burst pattern. Every side runs with the same number of torch
threads (`threads`, default 1: on a small shared CPU, two OpenMP threads that wait on each other under
load slow every op many times over, which would measure the machine's load rather than the engines).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from glmkit.bench.generate import DTYPES, build
from glmkit.errors import GlmkitError


@dataclass
class EngineBench:
    preset: str = "small"
    device: str = "cpu"
    dtype: str = "float32"
    requests: int = 64
    min_prompt: int = 16
    max_prompt: int = 512
    min_new: int = 8
    max_new: int = 128
    max_batch: int = 32                 # glmkit engine rows
    prefill_chunk: int = 256
    patterns: str = "burst,spread"
    sequential: bool = True             # also time HF generate one request at a time
    threads: int | None = 1             # torch intra-op threads for every side (None: torch's default)
    seed: int = 0


def _workload(b: EngineBench, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(b.seed)
    lens = rng.integers(b.min_prompt, b.max_prompt + 1, b.requests)
    news = rng.integers(b.min_new, b.max_new + 1, b.requests)
    prompts = [rng.integers(0, vocab - 8, n).tolist() for n in lens]
    return prompts, [int(n) for n in news]


def _summary(name: str, new: list[int], t0: float, done: dict[int, float], arrive: list[float]) -> dict:
    lat = np.array([done[i] - (t0 + arrive[i]) for i in range(len(new))])
    wall = max(done.values()) - t0
    return {f"{name}_tokens_per_s": sum(new) / wall, f"{name}_p50_ms": float(np.percentile(lat, 50)) * 1e3,
            f"{name}_p99_ms": float(np.percentile(lat, 99)) * 1e3, f"{name}_wall_s": wall}


def run_glmkit(model, prompts, news, arrive, b: EngineBench) -> tuple[dict[int, float], float, list[list[int]]]:
    from glmkit.bench.generate import _ids
    from glmkit.infer.engine import Engine, Request
    from glmkit.infer.sampling import SamplingConfig
    engine = Engine(model, _ids(model.config), max_batch=b.max_batch, max_len=max(map(len, prompts)) + max(news),
                    prefill_chunk=b.prefill_chunk, prefix_reuse=False)
    order = sorted(range(len(prompts)), key=lambda i: arrive[i])
    rid_of, done, tokens = {}, {}, [[] for _ in prompts]
    t0 = time.perf_counter()
    k = 0
    while len(done) < len(prompts):
        now = time.perf_counter() - t0
        while k < len(order) and arrive[order[k]] <= now:
            i = order[k]
            rid_of[engine.add(Request.causal(prompts[i], SamplingConfig(max_new_tokens=news[i]), ignore_stop=True))] = i
            k += 1
        if not engine.has_work():
            time.sleep(max(0.0, arrive[order[k]] - now))
            continue
        for o in engine.step():
            i = rid_of[o.request]
            if o.token is not None:
                tokens[i].append(o.token)
            if o.finished:
                done[i] = time.perf_counter()
    return done, t0, tokens


def hf_continuous_config(prompts, news, max_batch_tokens: int):
    """HF continuous batching sized for this workload. Its defaults target CUDA graphs: a KV cache of 60%
    of memory and keys padded to 16,384 per step, which on the CPU makes one 6-request run take over a
    minute; here the cache holds the workload (pages of 64) and nothing is padded (no graphs on the CPU),
    which was its fastest setting in our trials."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints
    page = 64
    blocks = sum(-(-(len(p) + n) // page) for p, n in zip(prompts, news)) + len(prompts)
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=max_batch_tokens,
                                  q_padding_interval_size=1, kv_padding_interval_size=1)
    return cb, WorkloadHints(max(map(len, prompts)), max(news), len(prompts))


def run_hf_continuous(hf, prompts, news, arrive, max_batch_tokens: int) -> tuple[dict[int, float], float, list[list[int]]]:
    from transformers import GenerationConfig
    cfg = GenerationConfig(max_new_tokens=max(news), do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb, hints = hf_continuous_config(prompts, news, max_batch_tokens)
    manager = hf.init_continuous_batching(generation_config=cfg, continuous_batching_config=cb, workload_hints=hints)
    manager.start()
    order = sorted(range(len(prompts)), key=lambda i: arrive[i])
    done, tokens = {}, [[] for _ in prompts]
    try:
        t0 = time.perf_counter()
        k = 0
        while len(done) < len(prompts):
            now = time.perf_counter() - t0
            while k < len(order) and arrive[order[k]] <= now:
                i = order[k]
                manager.add_request(prompts[i], request_id=f"r{i}", max_new_tokens=news[i], eos_token_id=-1)
                k += 1
            r = manager.get_result(timeout=0.002)
            if r is not None and r.is_finished():
                i = int(r.request_id[1:])
                done[i] = time.perf_counter()
                tokens[i] = list(r.generated_tokens)
            elif r is None and not manager.is_running():
                raise GlmkitError("HF continuous batching stopped before finishing (see its log above)")
    finally:
        manager.stop(block=True)
    return done, t0, tokens


def run_hf_sequential(hf, prompts, news, arrive) -> tuple[dict[int, float], float]:
    order = sorted(range(len(prompts)), key=lambda i: arrive[i])
    done = {}
    t0 = time.perf_counter()
    for i in order:
        wait = t0 + arrive[i] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        ids = torch.tensor([prompts[i]], device=hf.device)
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=news[i], min_new_tokens=news[i],
                    do_sample=False, pad_token_id=0, eos_token_id=None)
        done[i] = time.perf_counter()
    return done, t0


def bench_engine(b: EngineBench, log: Callable[[str], None] | None = None) -> dict:
    log = log or (lambda line: None)
    if not 1 <= b.min_prompt <= b.max_prompt or not 1 <= b.min_new <= b.max_new or b.requests < 1:
        raise GlmkitError("need 1 <= --min-prompt <= --max-prompt, 1 <= --min-new <= --max-new, --requests >= 1")
    patterns = [p.strip() for p in b.patterns.split(",") if p.strip()]
    if not patterns or any(p not in ("burst", "spread") for p in patterns):
        raise GlmkitError(f"--patterns {b.patterns!r}: choose from burst, spread (comma-separated)")
    if b.device.startswith("cuda") and not torch.cuda.is_available():
        raise GlmkitError("--device cuda asked for but CUDA is not available; use --device cpu")
    if b.threads is not None:
        if b.threads < 1:
            raise GlmkitError(f"--threads must be >= 1, got {b.threads}")
        torch.set_num_threads(b.threads)
    with tempfile.TemporaryDirectory():
        model, hf = build(b.preset, b.device, DTYPES[b.dtype], b.seed)
    prompts, news = _workload(b, model.config.vocab_size)
    need = max(map(len, prompts)) + max(news)
    if need > model.config.max_position_embeddings:
        raise GlmkitError(f"prompts + new tokens reach {need} positions but preset {b.preset} reads "
                          f"{model.config.max_position_embeddings}; lower --max-prompt / --max-new")
    log(f"glmkit engine vs HF continuous batching vs HF generate one at a time: preset {b.preset} "
        f"({model.num_params() / 1e6:.1f}M params), {b.dtype}, {b.device}, {b.requests} requests, prompts "
        f"{b.min_prompt}-{b.max_prompt}, new tokens {b.min_new}-{b.max_new} ({sum(news)} in all), "
        f"glmkit rows {b.max_batch}, torch threads {torch.get_num_threads()}")
    with torch.inference_mode():                       # warm-up: first calls allocate and pick kernels
        run_glmkit(model, prompts[:2], [4, 4], [0.0, 0.0], b)
    out: dict = {"preset": b.preset, "device": b.device, "dtype": b.dtype, "requests": b.requests,
                 "new_tokens": sum(news), "prompt_tokens": sum(map(len, prompts))}
    burst_wall = None
    for pattern in patterns:
        if pattern == "burst":
            arrive = [0.0] * b.requests
        else:
            span = (burst_wall or 10.0) / 2
            arrive = [span * i / b.requests for i in range(b.requests)]
        done, t0, ours = run_glmkit(model, prompts, news, arrive, b)
        r = _summary("engine", news, t0, done, arrive)
        burst_wall = burst_wall or r["engine_wall_s"]
        done, t0, theirs = run_hf_continuous(hf, prompts, news, arrive, b.prefill_chunk + b.max_batch)
        r.update(_summary("hf_continuous", news, t0, done, arrive))
        r["match"] = sum(a == t for a, t in zip(ours, theirs)) / len(ours)
        if b.sequential:
            done, t0 = run_hf_sequential(hf, prompts, news, arrive)
            r.update(_summary("hf_sequential", news, t0, done, arrive))
            r["ratio_vs_hf_sequential"] = r["engine_tokens_per_s"] / r["hf_sequential_tokens_per_s"]
        r["ratio_vs_hf_continuous"] = r["engine_tokens_per_s"] / r["hf_continuous_tokens_per_s"]
        log(f"{pattern}: glmkit {r['engine_tokens_per_s']:,.1f} tokens/s (p50 {r['engine_p50_ms']:,.0f} ms, "
            f"p99 {r['engine_p99_ms']:,.0f} ms) | HF continuous {r['hf_continuous_tokens_per_s']:,.1f} tokens/s "
            f"(p50 {r['hf_continuous_p50_ms']:,.0f}, p99 {r['hf_continuous_p99_ms']:,.0f})"
            + (f" | HF sequential {r['hf_sequential_tokens_per_s']:,.1f} tokens/s (p50 "
               f"{r['hf_sequential_p50_ms']:,.0f}, p99 {r['hf_sequential_p99_ms']:,.0f})" if b.sequential else "")
            + f" | ratio {r['ratio_vs_hf_continuous']:.2f}x continuous"
            + (f", {r['ratio_vs_hf_sequential']:.2f}x sequential" if b.sequential else "")
            + f"; same tokens as HF: {r['match']:.0%}")
        out[pattern] = r
    top = out.get("burst") or out[patterns[0]]
    for k in ("engine_tokens_per_s", "hf_continuous_tokens_per_s", "hf_sequential_tokens_per_s",
              "ratio_vs_hf_continuous", "ratio_vs_hf_sequential", "engine_p99_ms", "hf_continuous_p99_ms"):
        out[k] = top.get(k)
    return out
