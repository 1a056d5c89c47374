"""Prefill and decode against context length: glmkit vs HF transformers, same weights (`glmkit bench context`).

    glmkit bench context                                       # CPU, `small`, 1K .. 32K, one thread
    glmkit bench context --device cuda --dtype bfloat16 --preset bench-338m --lengths 4096,16384,65536,131072

One random-weight model of a preset (its `max_position_embeddings` raised to the longest length) is
saved as an HF checkpoint (`glmkit.checkpoint.hf.to_hf`); glmkit reads it with `from_hf` (and
`decode_layout`, as `glmkit.checkpoint.loader.load` does), transformers with `AutoModelForCausalLM`
(`attn_implementation="sdpa"`), so both sides run identical weights.

At each length L, each side runs in a FRESH SUBPROCESS (nothing cached from another length or side):
load the model, warm up on a short prompt, then
- glmkit: one causal request of L random tokens on an `Engine` with one KV row of L + 2 slots and
  `--prefill-chunk` (the engine's chunked prefill); prefill = the steps until its first token,
  decode = the next step (one token against L keys);
- HF: `model(prompt, use_cache=True, logits_to_keep=1)` (a dynamic cache, and the last position's
  logits only, as `generate` does), then one decode forward with the cache;
- with `--part-a`, also glmkit with the prompt as a GLM Part A (bidirectional: `Request.infill` with a
  [gMASK] at its end), prefilled layer by layer; HF has no such layout.
Times are wall clock (CUDA synchronised) and the process's CPU time beside it (`*_cpu_*`: on a shared
CPU with one thread the cost of the computation itself, whatever else runs; `prefill_cpu_time_ratio`);
the first sampled token of both sides is compared (`match`).

Peak memory, the same method for every side:
- CPU: peak resident set size (Linux `VmHWM`, reset through `/proc/self/clear_refs` right before the
  prefill) minus the resident size at that moment (model loaded, warmed up, prompt built), over the
  prefill and the decode step: everything the request allocated, the KV cache included. glibc's
  allocator keeps some freed memory, so this is an upper bound on live tensors, alike for both.
- CUDA: `torch.cuda.max_memory_allocated` minus `memory_allocated` at the same moment.

Budgets: a process that runs past 3 x `--time-budget` + 120 s is killed; a side skips the lengths whose predicted cost exceeds `--time-budget` seconds (prefill time
grows at most quadratically: the last measured time x (L / L_last)^2) or `--memory-budget` MiB (peak
grows linearly beyond the KV cache: last peak x L / L_last x 1.5); skipped lengths are listed in the
output. The summary compares the two sides at the longest length both ran: `peak_ratio` =
glmkit / HF peak, `prefill_time_ratio` = glmkit / HF prefill time (below 1: glmkit is leaner / faster).
A PNG of the curves is written to `--plot`.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from glmkit.errors import GlmkitError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIDES = ("glmkit", "hf", "glmkit_part_a")


@dataclass
class ContextBench:
    """What `bench_context` measures (the options of `glmkit bench context`)."""
    preset: str = "small"                              # model preset (glmkit.model.config PRESETS)
    device: str = "cpu"
    dtype: str = "float32"                             # float32 | bfloat16 | float16
    lengths: str = "1024,2048,4096,8192,16384,32768"   # comma-separated context lengths (tokens)
    prefill_chunk: int = 512                           # glmkit's prefill chunk
    part_a: bool = False                               # also glmkit with the prompt as a bidirectional Part A
    threads: int = 1                                   # torch threads in every subprocess
    time_budget: float = 600.0                         # seconds: skip a side's lengths predicted slower
    memory_budget: int = 16384                         # MiB: skip a side's lengths predicted larger
    plot: str = "context.png"                          # PNG of the curves ('' = none)
    seed: int = 0


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise GlmkitError(f"--lengths {text!r} is not a comma-separated list of token counts, e.g. 1024,4096") from None
    if not lengths or lengths[0] < 16:
        raise GlmkitError(f"--lengths {text!r}: give at least one length, each >= 16 tokens")
    return lengths


def _check(bench: ContextBench) -> list[int]:
    from glmkit.model.config import PRESETS
    lengths = parse_lengths(bench.lengths)
    if bench.preset not in PRESETS:
        raise GlmkitError(f"--preset {bench.preset!r} is not a model preset; choose one of {', '.join(PRESETS)}")
    if bench.dtype not in DTYPES:
        raise GlmkitError(f"--dtype {bench.dtype!r} is not one of {', '.join(DTYPES)}")
    if bench.prefill_chunk < 1 or bench.threads < 1:
        raise GlmkitError("--prefill-chunk and --threads must be positive")
    if bench.time_budget <= 0 or bench.memory_budget <= 0:
        raise GlmkitError("--time-budget and --memory-budget must be positive")
    if bench.device.startswith("cuda") and not torch.cuda.is_available():
        raise GlmkitError("--device cuda asked for but CUDA is not available; use --device cpu")
    if not bench.device.startswith(("cpu", "cuda")):
        raise GlmkitError(f"--device {bench.device!r}: use cpu or cuda[:N]")
    if not bench.device.startswith("cuda") and not Path("/proc/self/clear_refs").exists():
        raise GlmkitError("CPU peak memory is read from Linux's /proc/self (VmHWM); run on Linux or with --device cuda")
    return lengths


# ------------------------------------------------------------------------------ the measuring subprocess

def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise GlmkitError(f"/proc/self/status has no {key}")


class _Peak:
    """Peak memory from `start()` on, in bytes above the memory in use at `start()` (module docstring)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")             # VmHWM := VmRSS
            self.base = _status_kib("VmRSS") * 1024

    def read(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        return _status_kib("VmHWM") * 1024 - self.base


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _glmkit_side(folder: str, job: dict) -> dict:
    from types import SimpleNamespace

    from glmkit.checkpoint.hf import from_hf
    from glmkit.infer.engine import Engine, Request
    from glmkit.infer.sampling import SamplingConfig
    from glmkit.model.kv_cache import decode_layout

    device = job["device"]
    model = decode_layout(from_hf(folder, dtype=DTYPES[job["dtype"]], device=device).eval())
    v = model.config.vocab_size
    ids = SimpleNamespace(sop_id=v - 1, eop_id=v - 2, eot_id=v - 3, gmask_id=v - 4)
    part_a = job["side"] == "glmkit_part_a"

    def request(prompt):
        cfg = SamplingConfig(max_new_tokens=2)
        if part_a:                            # Part A = the prompt and a [gMASK]: all of it bidirectional
            return Request.infill(prompt + [ids.gmask_id], [len(prompt)], cfg, ignore_stop=True)
        return Request.causal(prompt, cfg, ignore_stop=True)

    def run(prompt, peak=None):
        engine = Engine(model, ids, max_batch=1, max_len=len(prompt) + 8, prefill_chunk=job["prefill_chunk"],
                        prefix_reuse=False)
        engine.add(request(prompt))
        tokens, times, prefill_peak = [], [], 0
        _sync(device)
        t0 = _clock()
        while engine.has_work() and len(tokens) < 2:
            new = [o.token for o in engine.step() if o.token is not None]
            if new:
                _sync(device)
                times.append(_clock())
                tokens += new
                if len(tokens) == 1 and peak is not None:
                    prefill_peak = peak.read()
        if len(tokens) < 2:
            raise GlmkitError(f"the engine produced {len(tokens)} token(s) instead of 2")
        return tokens[0], _minus(times[0], t0), _minus(times[1], times[0]), prefill_peak

    return _one_point(run, job)


def _hf_side(folder: str, job: dict) -> dict:
    from transformers import AutoModelForCausalLM

    device = job["device"]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[job["dtype"]], attn_implementation="sdpa")
    hf = hf.to(device).eval()

    def run(prompt, peak=None):
        x = torch.tensor([prompt], device=device)
        _sync(device)
        t0 = _clock()
        out = hf(input_ids=x, use_cache=True, logits_to_keep=1)
        token = out.logits[0, -1].argmax()
        _sync(device)
        t1 = _clock()
        prefill_peak = peak.read() if peak else 0
        hf(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        _sync(device)
        t2 = _clock()
        return int(token), _minus(t1, t0), _minus(t2, t1), prefill_peak

    with torch.inference_mode():
        return _one_point(run, job)


def _one_point(run, job: dict) -> dict:
    """One side's point: `run(prompt, peak)` -> (first token, prefill (wall, cpu), decode (wall, cpu),
    peak at the end of prefill), once on a short prompt to warm up, then on the job's prompt with the
    peak tracker running."""
    run(_prompt(job, min(job["length"], 256), seed=1))             # warm-up
    prompt = _prompt(job, job["length"])
    peak = _Peak(job["device"])
    peak.start()
    token, prefill, decode, prefill_peak = run(prompt, peak)
    return {"token": token, "prefill_s": prefill[0], "decode_s": decode[0], "prefill_cpu_s": prefill[1],
            "decode_cpu_s": decode[1], "prefill_peak": prefill_peak, "peak": peak.read()}


def _clock() -> tuple[float, float]:
    """(wall clock, this process's CPU time): with one thread on a shared machine the CPU time is what
    the computation cost, whatever else runs; the wall clock is what a user waits."""
    return time.perf_counter(), time.process_time()


def _minus(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] - b[0], a[1] - b[1]


def _prompt(job: dict, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(job["seed"] * 1000 + seed)
    return torch.randint(0, job["vocab"] - 8, (n,), generator=g).tolist()


def worker() -> None:
    """The subprocess: argv[1] = the checkpoint folder, argv[2] = the job (JSON); prints one JSON line."""
    folder, job = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(job["threads"])
    side = _hf_side if job["side"] == "hf" else _glmkit_side
    with torch.inference_mode():
        print(json.dumps(side(folder, job)), flush=True)


def _measure(folder: str, job: dict, timeout: float) -> dict | None:
    """One point in a fresh process; None when it ran past `timeout` seconds (it is killed)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
    cmd = [sys.executable, "-c", "from glmkit.bench.context import worker; worker()", folder, json.dumps(job)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise GlmkitError(f"the {job['side']} measurement at {job['length']} tokens failed (exit {p.returncode}): "
                          + " | ".join(tail))
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ the driver

def _build(bench: ContextBench, longest: int, folder: str):
    from glmkit.checkpoint.hf import to_hf
    from glmkit.model.config import GLMConfig
    from glmkit.model.glm import GLM

    config = GLMConfig.from_name(bench.preset)
    config = config.with_(max_position_embeddings=max(config.max_position_embeddings, longest + 8))
    torch.manual_seed(bench.seed)
    model = GLM(config).to(DTYPES[bench.dtype]).eval()
    to_hf(model, folder)
    return config, model.num_params()


def _skip_reason(last: tuple[int, dict] | None, L: int, bench: ContextBench) -> str | None:
    if last is None:
        return None
    L0, r = last
    t = r["prefill_s"] * (L / L0) ** 2
    mb = r["peak"] / 2**20 * L / L0 * 1.5
    if t > bench.time_budget:
        return f"predicted prefill {t:.0f} s > --time-budget {bench.time_budget:.0f} s"
    if mb > bench.memory_budget:
        return f"predicted peak {mb:.0f} MiB > --memory-budget {bench.memory_budget} MiB"
    return None


def bench_context(bench: ContextBench, log: Callable[[str], None] | None = None) -> dict:
    """Measure every side at every length (see the module docstring); returns the result dict (`glmkit
    bench context` prints it as its last line). `log` gets the human-readable lines."""
    log = log or (lambda line: None)
    lengths = _check(bench)
    sides = ["glmkit", "hf"] + (["glmkit_part_a"] if bench.part_a else [])
    device_name = torch.cuda.get_device_name() if bench.device.startswith("cuda") else "cpu"
    method = ("torch.cuda.max_memory_allocated - memory_allocated" if bench.device.startswith("cuda")
              else "peak RSS (VmHWM reset via /proc/self/clear_refs) - RSS before the request, fresh process per point")
    rows: dict[int, dict] = {L: {"length": L} for L in lengths}
    skipped: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        config, n_params = _build(bench, lengths[-1], folder)
        log(f"glmkit vs HF transformers, prefill + one decode step: preset {bench.preset} ({n_params / 1e6:.1f}M "
            f"params), {bench.dtype}, {device_name}, {bench.threads} thread(s), glmkit prefill chunk "
            f"{bench.prefill_chunk}; torch {torch.__version__}; memory: {method}")
        last: dict[str, tuple[int, dict] | None] = {s: None for s in sides}
        for L in lengths:
            for side in sides:
                why = _skip_reason(last[side], L, bench)
                if why is not None:
                    skipped.append({"side": side, "length": L, "reason": why})
                    log(f"{L:>7} {side:<14} skipped: {why}")
                    continue
                job = {"side": side, "length": L, "device": bench.device, "dtype": bench.dtype, "seed": bench.seed,
                       "threads": bench.threads, "prefill_chunk": bench.prefill_chunk, "vocab": config.vocab_size}
                timeout = 3 * bench.time_budget + 120           # load, warm-up, prefill, decode
                r = _measure(folder, job, timeout)
                if r is None:
                    skipped.append({"side": side, "length": L, "reason": f"killed after {timeout:.0f} s"})
                    log(f"{L:>7} {side:<14} killed after {timeout:.0f} s (3 x --time-budget + 120)")
                    last[side] = (L, {"prefill_s": float("inf"), "peak": 0})
                    continue
                last[side] = (L, r)
                rows[L][side] = r
                log(f"{L:>7} {side:<14} prefill {r['prefill_s']:8.3f} s (CPU {r['prefill_cpu_s']:7.3f} s)  "
                    f"decode {r['decode_s'] * 1e3:8.2f} ms (CPU {r['decode_cpu_s'] * 1e3:7.2f})  "
                    f"peak {r['peak'] / 2**20:9.1f} MiB (prefill {r['prefill_peak'] / 2**20:.1f})")
            ours, theirs = rows[L].get("glmkit"), rows[L].get("hf")
            if ours and theirs:
                rows[L]["match"] = ours["token"] == theirs["token"]
    both = [L for L in lengths if "glmkit" in rows[L] and "hf" in rows[L]]
    out = {"preset": bench.preset, "device": device_name, "dtype": bench.dtype, "threads": bench.threads,
           "prefill_chunk": bench.prefill_chunk, "torch": torch.__version__, "memory_method": method,
           "lengths": lengths, "skipped": skipped,
           "points": [_point(rows[L]) for L in lengths]}
    if both:
        L = both[-1]
        ours, theirs = rows[L]["glmkit"], rows[L]["hf"]
        out.update(max_len=L, glmkit_peak_mb=ours["peak"] / 2**20, hf_peak_mb=theirs["peak"] / 2**20,
                   peak_ratio=ours["peak"] / theirs["peak"] if theirs["peak"] > 0 else None,
                   prefill_time_ratio=ours["prefill_s"] / theirs["prefill_s"],
                   prefill_cpu_time_ratio=ours["prefill_cpu_s"] / theirs["prefill_cpu_s"],
                   decode_time_ratio=ours["decode_s"] / theirs["decode_s"],
                   match=all(rows[x]["match"] for x in both))
        ratio = "n/a" if out["peak_ratio"] is None else f"{out['peak_ratio']:.2f}"
        log(f"at {L} tokens: glmkit peak {out['glmkit_peak_mb']:.1f} MiB vs HF {out['hf_peak_mb']:.1f} MiB "
            f"(ratio {ratio}), prefill time ratio {out['prefill_time_ratio']:.2f} (CPU time "
            f"{out['prefill_cpu_time_ratio']:.2f}), "
            f"decode step ratio {out['decode_time_ratio']:.2f}, same first token at every length: {out['match']}")
    else:
        out.update(max_len=None, glmkit_peak_mb=None, hf_peak_mb=None, peak_ratio=None, prefill_time_ratio=None)
    if bench.plot:
        out["plot"] = plot_context(out["points"], bench.plot, f"{bench.preset}, {bench.dtype}, {device_name}")
        log(f"curves: {out['plot']}")
    return out


def _point(row: dict) -> dict:
    p = {"length": row["length"]}
    for side in SIDES:
        if side in row:
            r = row[side]
            p[side] = {"prefill_s": r["prefill_s"], "decode_ms": r["decode_s"] * 1e3,
                       "prefill_cpu_s": r["prefill_cpu_s"], "decode_cpu_ms": r["decode_cpu_s"] * 1e3,
                       "peak_mb": r["peak"] / 2**20, "prefill_peak_mb": r["prefill_peak"] / 2**20}
    if "match" in row:
        p["match"] = row["match"]
    return p


def plot_context(points: list[dict], path: str, title: str) -> str:
    """Prefill time, decode step time and peak memory against context length, one line per side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, ax, label in (("prefill_s", axes[0], "prefill (s): wall, dashed = CPU time"),
                           ("decode_ms", axes[1], "one decode step (ms): wall, dashed = CPU time"),
                           ("peak_mb", axes[2], "peak memory (MiB)")):
        for i, side in enumerate(SIDES):
            xs = [p["length"] for p in points if side in p]
            if not xs:
                continue
            color = f"C{i}"
            ax.plot(xs, [p[side][key] for p in points if side in p], marker="o", color=color, label=side)
            cpu = key.replace("_s", "_cpu_s").replace("_ms", "_cpu_ms")
            if cpu != key:
                ax.plot(xs, [p[side][cpu] for p in points if side in p], ls="--", color=color)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"glmkit vs HF transformers: {title}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)

