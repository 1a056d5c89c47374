"""One checkpoint in several memory forms: weight bytes, KV cache bytes, bits per byte and decode speed
(`glmkit bench quantize`, the quantization table of BENCHMARKS.md).

    glmkit bench quantize runs/demo --threads 1

Variants (`VARIANTS`): the weights in fp32 and bf16, int8 and int4 (weight-only,
`glmkit.model.quantize`, quantized from the bf16 weights; activations in bf16), and bf16 / int8
weights with an fp8 KV cache (`glmkit.model.kv_cache`). For each:
- `weight_bytes`: every parameter and buffer held (codes and scales of the quantized weights
  included); `block_weight_bytes`: the blocks' linear and expert weights alone (what quantization
  replaces; the embedding and the output head stay bf16); `kv_bytes_per_token`: the KV cache's
  bytes per token of context (layers x 2 x kv heads x head dim x the KV dtype's size);
- `bits_per_byte`: the validation text of the checkpoint's corpus (windows of `window` tokens, up to
  `val_tokens` scored) read through the engine with `prompt_logprobs`, so the KV cache's dtype
  counts: every key and value is written to the pool and read back before attention. The windows
  are read as `glmkit eval` reads them (`glmkit.eval.evaluate.bits_per_byte`: a GLM model scores
  `x_1 [gMASK] <sop> x_2 .. x_n`, a CLM model `x_1 .. x_n` causally); with the fp32 variant the two
  agree to rounding (tests/test_bench_quantize.py);
- `decode_tokens_per_s`: greedy decoding on a fresh engine, batch 1, a `prompt_len`-token prompt from
  the validation text, `new_tokens` new tokens (stops ignored; the prompt's prefill is in the time),
  best of `repeats` rounds in which the variants take turns (every variant is held in memory at once:
  the bench is meant for checkpoints that fit several times over);
- `greedy_match`: the share of those greedy tokens equal to the bf16 variant's (position by
  position: one changed token usually changes the rest of the row).
Ratios against bf16 and fp32 are in the result; the top level holds the figures the issue targets
(int8's bits/byte and weight bytes against bf16's).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from glmkit.errors import GlmkitError

# name -> (weight dtype, quantization, KV cache dtype)
VARIANTS: dict[str, tuple[str, str | None, str]] = {
    "fp32": ("fp32", None, "auto"),
    "bf16": ("bf16", None, "auto"),
    "int8": ("bf16", "int8", "auto"),
    "int4": ("bf16", "int4", "auto"),
    "bf16+fp8kv": ("bf16", None, "fp8"),
    "int8+fp8kv": ("bf16", "int8", "fp8"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class QuantizeBench:
    """What `bench_quantize` measures (the options of `glmkit bench quantize`)."""
    checkpoint: str = ""              # a glmkit run or checkpoint folder (or an HF folder)
    corpus: str | None = None         # its corpus (default: the default corpus, data/default)
    variants: str = ",".join(VARIANTS)
    val_tokens: int = 20000           # validation tokens scored per variant
    window: int = 256                 # tokens per validation window
    prompt_len: int = 32
    new_tokens: int = 128
    repeats: int = 3
    threads: int = 1
    device: str = "cpu"


def _variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise GlmkitError(f"--variants {text!r}: choose from {', '.join(VARIANTS)} (comma-separated)")
    return names


def load_variant(path: str, name: str, device: str = "cpu"):
    """The checkpoint as variant `name` (`glmkit.checkpoint.loader.Loaded`)."""
    from glmkit.checkpoint.loader import load

    dtype, scheme, _ = VARIANTS[name]
    return load(path, device, dtype=DTYPES[dtype], quantize=scheme)


def block_weight_bytes(model) -> int:
    """Bytes of the blocks' linear and expert weights (quantized or not); not the router, norms, biases."""
    from glmkit.model.quantize import QuantizedWeight

    quantized = sum(w.nbytes() for w in model.layers.modules() if isinstance(w, QuantizedWeight))
    floats = sum(t.numel() * t.element_size() for n, t in model.layers.named_parameters()
                 if t.dim() >= 2 and not n.endswith("gate.weight"))
    return quantized + floats


def validation_windows(docs, window: int, budget: int) -> list[list[int]]:
    """The windows `glmkit eval` scores (`glmkit.eval.evaluate._windows`)."""
    from glmkit.eval.evaluate import _windows

    return _windows(docs, window, budget)


def engine_bits_per_byte(model, tok, windows: list[list[int]], objective: str, kv_dtype: str = "auto",
                         batch: int = 16) -> float:
    """Bits per byte of x_2..x_n given x_1 in each window, through the engine's KV cache in `kv_dtype`."""
    from glmkit.eval.baselines import scored_bytes
    from glmkit.infer.engine import Engine, Request
    from glmkit.infer.sampling import SamplingConfig

    longest = max(len(w) for w in windows) + 2
    engine = Engine(model, tok, max_batch=batch, max_len=longest, prefill_chunk=longest, kv_dtype=kv_dtype,
                    prefix_reuse=False)
    cfg = SamplingConfig()
    if objective == "clm":
        reqs = [Request.causal(w, cfg, max_new_tokens=0, prompt_logprobs=True) for w in windows]
    else:           # x_1 [gMASK] | <sop> x_2 .. x_n: the [gMASK] suffix sample, Part A = x_1 [gMASK]
        reqs = [Request([w[0], tok.gmask_id, tok.sop_id] + w[1:], 2, (1,), cfg, max_new_tokens=0,
                        prompt_logprobs=True) for w in windows]
    nll = -sum(math.fsum(r.prompt_logprobs) for r in engine.generate(reqs))
    return nll / math.log(2) / scored_bytes(tok.decode, windows)


def greedy_decode(model, tok, prompt: list[int], new_tokens: int, kv_dtype: str, causal: bool) -> list[int]:
    from glmkit.infer.engine import Engine, Request
    from glmkit.infer.sampling import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=new_tokens)
    engine = Engine(model, tok, max_batch=1, max_len=len(prompt) + new_tokens + 3, kv_dtype=kv_dtype)
    if causal:
        req = Request.causal(prompt, cfg, ignore_stop=True)
    else:           # continue the prompt as `glmkit generate` does: Part A = prompt [gMASK], fill the [gMASK]
        req = Request.infill(prompt + [tok.gmask_id], [len(prompt)], cfg, ignore_stop=True)
    [res] = engine.generate([req])
    return res.tokens[0]


def kv_bytes_per_token(model, kv_dtype: str) -> int:
    from glmkit.model.kv_cache import resolve_kv_dtype

    c = model.config
    size = torch.empty((), dtype=resolve_kv_dtype(kv_dtype, model.embed_tokens.weight.dtype)).element_size()
    return c.num_layers * 2 * c.num_kv_heads * c.head_dim * size


def bench_quantize(bench: QuantizeBench, log: Callable[[str], None] | None = None) -> dict:
    """Measure every variant; returns the result dict (`glmkit bench quantize` prints it last)."""
    from glmkit.data.corpus import Corpus, default_corpus
    from glmkit.model.quantize import weight_nbytes

    log = log or (lambda line: None)
    names = _variants(bench.variants)
    for option in ("val_tokens", "window", "prompt_len", "new_tokens", "repeats", "threads"):
        if getattr(bench, option) < 1:
            raise GlmkitError(f"--{option.replace('_', '-')} must be a positive integer")
    if bench.window < 2:
        raise GlmkitError("--window must be at least 2 tokens")
    if bench.device.startswith("cuda") and not torch.cuda.is_available():
        raise GlmkitError(f"--device {bench.device}: CUDA is not available on this machine; use --device cpu")
    torch.set_num_threads(bench.threads)
    corpus = Corpus.open(bench.corpus) if bench.corpus else default_corpus()
    val = corpus.documents("val")
    rows, models, reference_tokens = [], {}, None
    windows = prompt = path = objective = None
    for name in ["bf16"] + [n for n in names if n != "bf16"]:        # bf16 first: the greedy reference
        loaded = load_variant(bench.checkpoint, name, bench.device)
        model, tok = loaded.model, loaded.tokenizer
        if corpus.tokenizer.hash != tok.hash:
            raise GlmkitError(f"the corpus at {corpus.directory} was built with another tokenizer than "
                              f"{bench.checkpoint}'s; pass --corpus with the corpus the model was trained on")
        if windows is None:
            window = min(bench.window, model.config.max_position_embeddings - 3)
            windows = validation_windows(val, window, bench.val_tokens)
            if not windows:
                raise GlmkitError(f"the corpus at {corpus.directory} has no validation text to score")
            prompt = [t for w in windows for t in w][:bench.prompt_len]
        kv = VARIANTS[name][2]
        path, objective = loaded.path, loaded.objective
        with torch.inference_mode():
            bpb = engine_bits_per_byte(model, tok, windows, objective, kv)
            tokens = greedy_decode(model, tok, prompt, bench.new_tokens, kv, objective == "clm")   # + warm-up
        reference_tokens = reference_tokens or tokens
        row = dict(variant=name, weight_dtype=VARIANTS[name][0], quantize=VARIANTS[name][1], kv_dtype=kv,
                   weight_bytes=weight_nbytes(model), block_weight_bytes=block_weight_bytes(model),
                   kv_bytes_per_token=kv_bytes_per_token(model, kv), bits_per_byte=bpb,
                   greedy_match=sum(a == b for a, b in zip(tokens, reference_tokens)) / len(reference_tokens))
        log(f"{name}: {row['weight_bytes'] / 2**20:.2f} MiB of weights, {row['kv_bytes_per_token']} KV bytes/token, "
            f"{bpb:.4f} bits/byte, greedy match {row['greedy_match']:.2f}")
        if name in names:
            rows.append(row)
            models[name] = (model, tok)
    # decode speed: the variants alternated round by round, so that all meet the same machine load
    best = dict.fromkeys(models, float("inf"))
    with torch.inference_mode():
        for _ in range(bench.repeats):
            for name, (model, tok) in models.items():
                t = time.perf_counter()
                n = len(greedy_decode(model, tok, prompt, bench.new_tokens, VARIANTS[name][2], objective == "clm"))
                best[name] = min(best[name], (time.perf_counter() - t) / n)
    for r in rows:
        r["decode_tokens_per_s"] = 1 / best[r["variant"]]
        log(f"{r['variant']}: {r['decode_tokens_per_s']:.1f} decode tokens/s")
    rows.sort(key=lambda r: names.index(r["variant"]))
    base = _by_name(rows, "bf16")
    fp32 = _by_name(rows, "fp32")
    for r in rows:
        for ref, label in ((base, "bf16"), (fp32, "fp32")):
            if ref is not None:
                r[f"bits_per_byte_vs_{label}"] = r["bits_per_byte"] / ref["bits_per_byte"]
                r[f"weight_bytes_vs_{label}"] = r["weight_bytes"] / ref["weight_bytes"]
                r[f"block_weight_bytes_vs_{label}"] = r["block_weight_bytes"] / ref["block_weight_bytes"]
    out = {"checkpoint": str(path), "objective": objective,
           "val_tokens": sum(len(w) - 1 for w in windows), "window": len(windows[0]), "prompt_len": len(prompt),
           "new_tokens": bench.new_tokens, "threads": bench.threads, "device": bench.device,
           "torch": torch.__version__, "variants": rows}
    int8 = _by_name(rows, "int8")
    if int8 is not None and base is not None:
        out["int8_bits_per_byte_vs_bf16"] = int8["bits_per_byte_vs_bf16"]
        out["int8_block_weight_bytes_vs_bf16"] = int8["block_weight_bytes_vs_bf16"]
        out["int8_weight_bytes_vs_bf16"] = int8["weight_bytes_vs_bf16"]
    for line in table(out):
        log(line)
    return out


def _by_name(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["variant"] == name), None)


def table(result: dict) -> list[str]:
    """The result as a Markdown table (BENCHMARKS.md)."""
    lines = ["| variant | weights (all) | blocks' linear weights | KV cache bytes/token | bits/byte (val) | vs bf16 "
             "| decode tokens/s | greedy tokens = bf16's |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["variants"]:
        vs = r.get("bits_per_byte_vs_bf16")
        delta = "" if vs is None else f"{100 * (vs - 1):+.2f}%"
        ratio = f" ({r['block_weight_bytes_vs_bf16']:.2f}×)" if "block_weight_bytes_vs_bf16" in r else ""
        lines.append(f"| {r['variant']} | {r['weight_bytes'] / 2**20:.2f} MiB | {r['block_weight_bytes'] / 2**20:.2f} MiB"
                     f"{ratio} | {r['kv_bytes_per_token']:,} | {r['bits_per_byte']:.4f} | {delta} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['greedy_match']:.2f} |")
    return lines
