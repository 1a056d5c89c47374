"""Decode speed of glmkit against HF transformers `generate`, same weights (`glmkit bench generate`).

One random-weight model of a preset is built, saved as an HF checkpoint with `glmkit.checkpoint.hf.to_hf`, and
loaded back by transformers' `AutoModelForCausalLM`, so both sides run identical weights (glmkit's
stored column-major by `glmkit.model.kv_cache.decode_layout`, as `glmkit.checkpoint.loader.load` does). Each side
continues the same random prompts (`--prompt-len` tokens, causally read: exactly what HF computes)
for exactly `--new-tokens` tokens, greedy, at each `--batches` size; time = prefill + all decode
steps, best of `--repeats` after one warm-up, the two sides alternated. tokens/s = batch x new tokens / time.

    glmkit bench generate                                   # CPU, the `small` preset
    glmkit bench generate --device cuda --dtype bfloat16 --compile --preset bench-1.9b

HF runs its default dynamic cache; with `--compile` the glmkit decode step is `torch.compile`d
(static cache, CUDA graphs on GPU) and HF is also timed with its static cache
(`cache_implementation="static"`, which transformers compiles on GPU): `hf_tokens_per_s` is the faster
of HF's two paths. On CUDA the
bench also reports the share of the memory-bandwidth limit: bytes read per decode step (weights
except the embedding table, plus the whole static KV cache) / step time, against a measured
device-to-device copy bandwidth. `bench_generate` returns the numbers as a dict; its top-level numbers
are for the first batch size (default 1).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from glmkit.errors import GlmkitError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerateBench:
    """What `bench_generate` measures (the options of `glmkit bench generate`)."""
    preset: str = "small"             # model preset (glmkit.model.config PRESETS)
    device: str = "cpu"
    dtype: str = "float32"            # float32 | bfloat16 | float16
    batches: str = "1,8"              # comma-separated batch sizes
    prompt_len: int = 32
    new_tokens: int = 128
    repeats: int = 5
    compile: bool = False             # compile the decode step (static cache)
    seed: int = 0


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _best(fn, repeats: int, device) -> float:
    fn()                                          # warm-up (and compilation)
    return min(_time(fn, device) for _ in range(repeats))


def _best_pair(a, b, repeats: int, device) -> tuple[float, float]:
    """Best-of-`repeats` times of a and b, alternated so both meet the same machine load."""
    a(), b()                                      # warm-up (and compilation)
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_time(a, device))
        tb.append(_time(b, device))
    return min(ta), min(tb)


def _ids(config) -> SimpleNamespace:
    """Special ids for the engine: the top of the vocabulary (random weights: any ids do)."""
    v = config.vocab_size
    return SimpleNamespace(sop_id=v - 1, eop_id=v - 2, eot_id=v - 3, gmask_id=v - 4, pad_id=0)


def glmkit_run(model, prompts: torch.Tensor, n_new: int, compile: bool):
    """Every prompt as one causal request on a fresh engine (no prefix reuse between repeats)."""
    from glmkit.infer.engine import Engine, Request
    from glmkit.infer.sampling import SamplingConfig
    engine = Engine(model, _ids(model.config), max_batch=len(prompts), max_len=prompts.shape[1] + n_new,
                    compile=compile, prefix_reuse=False)
    cfg = SamplingConfig(max_new_tokens=n_new)
    results = engine.generate([Request.causal(p.tolist(), cfg, ignore_stop=True) for p in prompts])
    return sum(len(r.tokens[0]) for r in results)


def hf_run(hf, prompts: torch.Tensor, n_new: int, static: bool):
    kw = {"cache_implementation": "static"} if static else {}
    out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n_new,
                      min_new_tokens=n_new, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
    return out.shape[1] - prompts.shape[1]


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = _best(lambda: y.copy_(x), 5, device)
    return 2 * nbytes / t


def bytes_per_step(model, batch: int, max_len: int) -> int:
    c = model.config
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "embed_tokens.weight")
    if c.tie_word_embeddings:
        weights += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    kv = 2 * c.num_layers * batch * max_len * c.num_kv_heads * c.head_dim * model.embed_tokens.weight.element_size()
    return weights + kv


def build(preset: str, device: str, dtype: torch.dtype, seed: int):
    from transformers import AutoModelForCausalLM

    from glmkit.checkpoint.hf import to_hf
    from glmkit.model.config import GLMConfig
    from glmkit.model.glm import GLM
    from glmkit.model.kv_cache import decode_layout
    torch.manual_seed(seed)
    config = GLMConfig.from_name(preset)
    with torch.device(device):
        model = GLM(config).to(dtype).eval()
    with tempfile.TemporaryDirectory() as d:
        to_hf(model, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return decode_layout(model), hf


def bench_generate(bench: GenerateBench, log: Callable[[str], None] | None = None) -> dict:
    """Decode tokens/s of glmkit and HF at each batch size; returns the result dict (`glmkit bench
    generate` prints it as its last line; its top-level numbers are for the first batch size). `log`
    gets the human-readable lines."""
    log = log or (lambda line: None)
    try:
        batches = [int(b) for b in bench.batches.split(",") if b.strip()]
    except ValueError:
        raise GlmkitError(f"--batches {bench.batches!r} is not a comma-separated list of batch sizes, e.g. 1,8") from None
    if bench.dtype not in DTYPES:
        raise GlmkitError(f"--dtype {bench.dtype!r} is not one of {', '.join(DTYPES)}")
    if not batches or min(batches) < 1 or bench.new_tokens < 1 or bench.prompt_len < 1:
        raise GlmkitError("--batches, --new-tokens and --prompt-len must be positive")
    if bench.device.startswith("cuda") and not torch.cuda.is_available():
        raise GlmkitError("--device cuda asked for but CUDA is not available; use --device cpu")
    dtype = DTYPES[bench.dtype]
    model, hf = build(bench.preset, bench.device, dtype, bench.seed)
    step = bench.compile
    dev_name = torch.cuda.get_device_name() if bench.device.startswith("cuda") else "cpu"
    bw = copy_bandwidth(bench.device) if bench.device.startswith("cuda") else None
    log(f"glmkit vs HF transformers generate: preset {bench.preset} ({model.num_params() / 1e6:.1f}M params), "
        f"{bench.dtype}, {dev_name}, prompt {bench.prompt_len}, {bench.new_tokens} new tokens, greedy, "
        f"compile={bench.compile}, threads={torch.get_num_threads()}")
    by_batch = {}
    g = torch.Generator().manual_seed(bench.seed)
    with torch.no_grad():
        for b in batches:
            prompts = torch.randint(0, model.config.vocab_size - 8, (b, bench.prompt_len), generator=g).to(bench.device)
            assert glmkit_run(model, prompts, bench.new_tokens, step) == b * bench.new_tokens
            t_ours, t_hf = _best_pair(lambda p=prompts: glmkit_run(model, p, bench.new_tokens, step),
                                      lambda p=prompts: hf_run(hf, p, bench.new_tokens, False),
                                      bench.repeats, bench.device)
            r = {"glmkit_tokens_per_s": b * bench.new_tokens / t_ours, "hf_dynamic_tokens_per_s": b * bench.new_tokens / t_hf}
            if bench.compile:   # HF's static cache too; the peer is whichever HF path is faster
                t_static = _best(lambda p=prompts: hf_run(hf, p, bench.new_tokens, True), bench.repeats, bench.device)
                r["hf_static_tokens_per_s"] = b * bench.new_tokens / t_static
            r["hf_tokens_per_s"] = max(v for k, v in r.items() if k.startswith("hf_"))
            r["ratio"] = r["glmkit_tokens_per_s"] / r["hf_tokens_per_s"]
            if bw:
                step_s = t_ours / bench.new_tokens
                r["bandwidth_share"] = bytes_per_step(model, b, bench.prompt_len + bench.new_tokens) / step_s / bw
            by_batch[b] = r
            extra = f", {r['bandwidth_share']:.0%} of the copy-bandwidth limit" if bw else ""
            log(f"batch {b}: glmkit {r['glmkit_tokens_per_s']:,.1f} tokens/s, HF {r['hf_tokens_per_s']:,.1f} "
                f"tokens/s, ratio {r['ratio']:.2f}x{extra}")
    first = by_batch[batches[0]]
    out = {**first, "batch": batches[0], "device": dev_name, "dtype": bench.dtype, "preset": bench.preset,
           "compile": bench.compile, "new_tokens": bench.new_tokens, "prompt_len": bench.prompt_len,
           "copy_bandwidth_GBps": bw / 1e9 if bw else None,
           "by_batch": {str(k): v for k, v in by_batch.items()}}
    return out
