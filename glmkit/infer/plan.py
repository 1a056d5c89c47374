"""Memory plan of inference: what a model, dtype, number of KV rows and context length cost, before
anything is allocated (`glmkit plan`).

    plan = plan_memory(GLMConfig.from_name("glm-4-9b"), torch.bfloat16, rows=8, max_len=32768)
    plan.weights, plan.kv_cache, plan.activations, plan.total      # bytes
    plan.fits(parse_memory("24GiB"))

The three parts, as the engine (`glmkit.infer.engine`, `glmkit.infer.runner`) allocates them:
- **weights**: every parameter and buffer of `GLM(config)` (built on the meta device: nothing is
  allocated), numel x element size, the MoE router in fp32 as the loaders keep it; with `quantize`,
  the int8 / int4 codes and scales of `glmkit.model.quantize`. Exact.
- **kv_cache**: the engine's pool (`glmkit.model.kv_cache.KVCache`), allocated once:
  rows x max_len x layers x 2 (k, v) x kv_heads x head_dim x the KV dtype's size (`kv_dtype`, by
  default the model's dtype; "fp8" is one byte). Exact.
- **activations**: the peak of the temporaries of one forward, the larger of
  (a) a prefill of `chunk` tokens of one row against `max_len` keys (the last chunk of a full-length
      causal prompt; chunk = max_len is a one-shot prefill; the engine feeds `prefill_chunk` tokens,
      512 by default, and a long GLM Part A layer by layer with two Part-A-long buffers of hidden size
      on top, `glmkit.infer.runner.prefill_bidirectional`), and
  (b) a decode step of every row (rows x 1 token against max_len keys) with its logits.
  It is a model of the code, not a measurement: per layer the residual stream, the (T, S) boolean
  visibility mask `glmkit.infer.runner` builds (plus the float copy SDPA makes of it; on the CPU a
  causal chunk attends without one, `AttentionMask("causal_tail")`, so there the figure is an upper
  bound), q/k/v and their rotated copies (with a KV dtype other than the model's, the upcast copy of
  the keys and values attention reads), the attention output, and the MLP's gate/up activations (MoE: the top-k copies of
  each token through the experts, the fp32 router scores). Kernel workspaces (cuBLAS, flash
  attention) and the allocator's fragmentation are not in it. `tests/test_plan.py` checks it against
  the measured peak of the same forward (CPU: torch's memory profiler; CUDA: max_memory_allocated).

At long contexts the mask dominates the activations: T x S x (1 + dtype size) bytes per prefill of
T tokens over S keys (32K x 32K in bf16: 3 GiB), whatever the model's width; only a chunked prefill
(T << S) bounds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from glmkit.checkpoint.hf import parse_size
from glmkit.errors import GlmkitError
from glmkit.model.config import GLMConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MemoryPlan:
    """Bytes of each part (see the module docstring) for one configuration."""
    model: str
    dtype: str
    quantize: str | None
    kv_dtype: str
    rows: int
    max_len: int
    chunk: int
    weights: int
    kv_cache: int
    activations: int
    prefill_activations: int
    decode_activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations

    def fits(self, memory: int) -> bool:
        return self.total <= memory

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def parse_memory(text: str | int) -> int:
    """'24GiB' -> 24·2^30, '80GB' -> 80e9, '512MiB', a plain byte count."""
    try:
        return parse_size(text)                  # the one size parser (also --max-shard-size)
    except GlmkitError:
        raise GlmkitError(f"memory size {text!r} is not a size; write e.g. 24GiB, 80GB, 512MiB or a byte count") from None


def human_bytes(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def weight_bytes(config: GLMConfig, dtype: torch.dtype, quantize: str | None = None) -> int:
    """Parameters and buffers of GLM(config) in `dtype` (the MoE router in fp32), counted on meta;
    with `quantize` ("int8" | "int4"), after `glmkit.model.quantize.quantize` (also run on meta)."""
    from glmkit.checkpoint.hf import keep_fp32, meta_parameters
    from glmkit.model.glm import GLM

    with meta_parameters():
        model = GLM(config)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not keep_fp32(name):
            t.data = t.data.to(dtype)
    if quantize is not None:
        from glmkit.model.quantize import quantize as quantize_weights

        model = quantize_weights(model, quantize)
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def largest_matrix(config: GLMConfig) -> int:
    """Elements of the largest weight a quantized forward dequantizes at once (one layer's, one expert's)."""
    c, h = config, config.hidden_size
    sizes = [h * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.num_heads * c.head_dim * h]
    if any(not c.is_moe_layer(i) for i in range(c.num_layers)):
        sizes.append(h * c.intermediate_size * (1 if c.mlp == "gelu" else 2))
    if c.is_moe:
        sizes.append(2 * h * c.moe_intermediate_size * max(1, c.n_shared_experts))
    return max(sizes)


def kv_cache_bytes(config: GLMConfig, dtype: torch.dtype, rows: int, max_len: int) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return rows * max_len * config.num_layers * 2 * config.num_kv_heads * config.head_dim * size


def forward_activation_bytes(config: GLMConfig, dtype: torch.dtype, batch: int, tokens: int, keys: int,
                             kv_upcast: bool = False) -> int:
    """Peak bytes of the temporaries of one cached forward of `batch` rows x `tokens` tokens whose
    keys fill slots up to `keys` (the runner's dense visibility mask), with one position's logits
    per row; `kv_upcast`: the pool stores another dtype, so attention reads a copy of the rows' keys
    and values in `dtype`. Counted from the code: Python keeps a call's arguments alive until it
    returns, so the block's input and its normed input stay referenced through the sublayer that reads
    them."""
    c, e = config, torch.empty((), dtype=dtype).element_size()
    n = batch * tokens                                      # tokens in the call
    h, D, H, Hkv, R = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.rotary_dim
    mask = batch * tokens * keys                            # (B, 1, T, S) bool, built once, every layer
    rope = n * R * e if c.position_embedding != "learned_2d" else 0       # cos and sin, (n, R/2) each
    # alive through every layer: the block's input (held by the caller), cos/sin, the mask
    persistent = n * h * e + rope + mask
    building = 2 * mask                                     # (k < sep) | (k <= slot) while it is formed
    # attention: normed input, fused qkv, rotated q/k, SDPA's float copy of the mask, its output and
    # the (B, T, H*D) copy fed to o_proj, o_proj's output
    attention = (2 * n * h + n * (H + 2 * Hkv) * D + n * (H + Hkv) * D + 2 * n * H * D) * e + mask * e
    if kv_upcast:
        attention += 2 * batch * keys * Hkv * D * e
    # around the MLP: the new residual, the attention output and the normed input stay alive
    mlp = 3 * n * h * e + max(_mlp_bytes(c, i, n, e) for i in range(c.num_layers))
    # a norm in half precision computes in fp32 (x.float(), x * rsqrt) beside the residual and the
    # attention output
    norm = 3 * n * h * e + (2 * n * h * 4 if e < 4 else 0)
    logits = batch * c.vocab_size * (e + 4)                 # one position per row, and its fp32 copy
    return persistent + max(building, attention, mlp, norm, logits)


def _mlp_bytes(c: GLMConfig, i: int, n: int, e: int) -> int:
    h = c.hidden_size
    if not c.is_moe_layer(i):
        f = c.intermediate_size
        if c.mlp == "gelu":             # up, gelu(up); then gelu(up) and down's output
            return n * e * max(2 * f, f + h)
        # gate_up (2f), the activation and the product (f each); then gate/up (still referenced by
        # their views), the product and down's output
        return n * e * max(4 * f, 3 * f + h)
    k, f, E, fs = c.num_experts_per_tok, c.moe_intermediate_size, c.n_routed_experts, c.moe_intermediate_size * c.n_shared_experts
    kept = n * E * 4 + n * k * 12                            # router scores (fp32), top-k ids and weights
    router = n * h * 4 + n * E * 4                           # its fp32 input and the biased choice
    experts = n * k * (h + 4 * f) * e                        # token copies, gate_up, activation, product
    combine = n * k * (h + 2 * f) * e + n * k * h * (4 + e) + n * h * e   # weighted (fp32) outputs, sum
    shared = n * h * e + n * (4 * fs) * e                    # routed output + the shared expert
    return kept + max(router, experts, combine, shared)


def model_config(model: str) -> GLMConfig:
    """The config of a preset name (`GLMConfig.from_name`), of a folder holding a config.json (glmkit's
    or HF's), or of a run folder's latest checkpoint; no weights are read."""
    from pathlib import Path

    from glmkit.model.config import PRESETS

    if model in PRESETS:
        return GLMConfig.from_name(model)
    if not Path(model).exists():
        raise GlmkitError(f"{model!r} is neither a model preset ({', '.join(PRESETS)}) nor an existing folder")
    import json

    from glmkit.checkpoint.hf import config_from_hf
    from glmkit.checkpoint.loader import locate

    folder = Path(model)
    if not (folder / "config.json").is_file():         # a run folder: its latest checkpoint's
        folder, _ = locate(model)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise GlmkitError(f"{folder / 'config.json'} is not valid JSON ({e})") from None
    if isinstance(raw, dict) and "model_type" in raw:
        return config_from_hf(raw, name=folder.name)
    return GLMConfig.load(folder)


def plan_memory(config: GLMConfig, dtype: torch.dtype = torch.bfloat16, rows: int = 1, max_len: int = 4096,
                chunk: int | None = None, quantize: str | None = None, kv_dtype: str = "auto") -> MemoryPlan:
    """The memory plan of an engine over `config` in `dtype` with `rows` KV rows of `max_len` slots,
    prefilling `chunk` tokens at a time (default max_len: one shot), weights optionally quantized
    ("int8" | "int4": their bytes after quantization, and the activations hold the largest weight
    dequantized at once: its fp32 codes x scales and the copy in `dtype`), the KV cache stored in
    `kv_dtype` ("auto": `dtype`; "fp32" | "bf16" | "fp16" | "fp8", as `Engine(kv_dtype=)`)."""
    from glmkit.model.kv_cache import KV_DTYPES, resolve_kv_dtype

    kv = resolve_kv_dtype(kv_dtype, dtype)
    kv_name = {v: k for k, v in KV_DTYPES.items()}[kv]
    chunk = chunk or max_len
    for name, value in (("rows", rows), ("max_len", max_len), ("chunk", chunk)):
        if value < 1:
            raise GlmkitError(f"{name} = {value} must be a positive integer")
    if chunk > max_len:
        raise GlmkitError(f"chunk = {chunk} is longer than max_len = {max_len}; a prefill chunk fits in a row")
    prefill = forward_activation_bytes(config, dtype, 1, chunk, max_len, kv_upcast=kv != dtype)
    decode = forward_activation_bytes(config, dtype, rows, 1, max_len, kv_upcast=kv != dtype)
    if quantize is not None:
        dequantized = largest_matrix(config) * (8 + torch.empty((), dtype=dtype).element_size())
        prefill, decode = prefill + dequantized, decode + dequantized
    name = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
    return MemoryPlan(model=config.name, dtype=name, rows=rows, max_len=max_len, chunk=chunk,
                      quantize=quantize, kv_dtype=kv_name, weights=weight_bytes(config, dtype, quantize),
                      kv_cache=kv_cache_bytes(config, kv, rows, max_len),
                      activations=max(prefill, decode), prefill_activations=prefill, decode_activations=decode)
