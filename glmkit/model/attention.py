"""Attention for every GLM family: rotary positions, the per-batch mask in each backend's form, and
the one `attend` call every layer makes.

Contract
- `make_attention_mask(batch, backend)` is called ONCE per batch (outside any compiled region) and the
  returned `AttentionMask` is handed to every layer. The rule it encodes is `glmkit.batch`'s: query q
  sees key k iff same segment and (k < sep[q] or (k <= q and same span id)).
- What must be read on the host (which backend runs, whether any row needs a mask at all, the split
  backend's flat-token plan) is a `MaskPlan`: `plan_mask(batch, ...)` builds it from the numpy batch
  before the batch reaches the device (the trainer does it in its data prefetcher), `MaskPlan.to`
  ships it with the batch, and `make_attention_mask(batch, plan=plan)` then builds the rest on the
  device without reading anything back. Without a plan, `make_attention_mask` makes one from `batch`
  itself (a device-to-host copy when the batch is on a GPU: fine for inference and tests).
- `attend(q, k, v, mask)` takes q (B, T, H, D) and k, v (B, S, Hkv, D) (GQA: H a multiple of Hkv),
  and returns (B, T, H, D). `mask=None` means plain causal attention.

Backends (`BACKENDS`, chosen by name: a run's option, set on the model with
`GLM.set_runtime(attention_backend=...)`, or an argument of `make_attention_mask`):
- `sdpa`  the REFERENCE: a dense (B, 1, T, T) boolean mask (`glmkit.batch.dense_mask`) through
          `F.scaled_dot_product_attention`. Any layout, packed rows; O(T^2) mask memory. CPU training.
- `flex`  FlexAttention with a `BlockMask` built once per batch from segment_ids / sep / span_ids;
          fully masked blocks are skipped. Any layout, packed rows. GPU training (compiled); on the
          CPU it runs eagerly (forward only: torch 2.13's Flex has no CPU backward), for inference.
- `split` GPU only (CUDA, fp16/bf16): uses the prefix structure of the `glm` layout. Every sample
          (packed or not) is one Part A block that is bidirectional within itself, then a Part B block
          that is causal against A+B. Both are stock flash kernels through
          `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10; `_varlen` adapts to each version's
          signature) on the flattened tokens: Part A tokens gathered into
          one varlen batch (non-causal), Part B queries gathered into another against the whole sample
          as keys, causal with flash's bottom-right alignment. Work done: a^2 + ab + b^2/2 per sample,
          exactly the mask's. Applies only when each sample's Part B is one causal run (`glm` layout,
          MLM, CLM); the `span` layout falls back to flex.
- `segments` any device, no mask at all: the split's decomposition with stock SDPA, one sample at
          a time (a Python loop over the samples of the rows, planned on the host): Part A
          bidirectional over itself, Part B as the last rows of a causal SDPA over the whole sample
          (which computes the Part A rows' causal triangle once more and drops it: a^2 + (a+b)^2/2
          of work, against the dense mask's T^2 per row). Memory O(T) instead of the dense mask's
          O(T^2), which on the CPU is worse than it looks: SDPA turns the bool mask into a float one
          (4 bytes an entry) in every layer and keeps it for the backward (at 8K tokens 256 MB per
          layer). The long-context CPU training path. Applies where the split does (else sdpa).
- `auto`  CUDA: split when it applies, the dtype is half precision and rows are at least
          `SPLIT_MIN_LEN` long, else flex; CPU: segments when it applies and rows are at least
          `SEGMENTS_MIN_LEN` long, else sdpa. The length rule comes from DESIGN.md §4's kernel
          table (one H200, fwd+bwd, head dim 64): at 1024 tokens Flex beat the split (1.11 vs 1.34 ms at
          90% Part A, 0.93 vs 1.15 at 50%), at 4096 the split beat Flex (2.93 vs 4.11, 2.47 vs 2.98);
          the two cross near 2048. Re-measure with `glmkit bench train --attention-table` on your card.
Whatever the backend, a batch whose rows are each one unpadded causal sample (CLM) or one
bidirectional sample (MLM) gets no mask at all (`AttentionMask("causal" | "full")`): the stock kernels
then skip the masked half instead of reading a mask.

`AttentionMask("causal_tail")` is a chunk of a causal prefill against a KV cache: the T queries are
the last T of the S keys and query t sees keys 0 .. S - T + t (causal, aligned bottom-right). On the
CPU it is two mask-free flash calls, the S - T earlier keys (all visible) and the T x T causal block,
merged by their log-sum-exps (`_causal_tail`), so no (T, S) mask exists; elsewhere it is the (T, S)
boolean mask through SDPA.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from glmkit.batch import Batch, dense_mask
from glmkit.errors import GlmkitError
from glmkit.model import rope_scaling

BACKENDS = ("auto", "sdpa", "flex", "split", "segments")
SPLIT_MIN_LEN = 2048     # `auto` picks split only for rows at least this long (see the docstring)
SEGMENTS_MIN_LEN = 1024  # `auto` on the CPU picks segments for rows at least this long (BENCHMARKS.md)


# ------------------------------------------------------------------------------------------------
# Rotary position embeddings
# ------------------------------------------------------------------------------------------------
class Rotary(nn.Module):
    """cos/sin tables for a batch of positions. Three flavours (GLMConfig.position_embedding):
    `rope` rotates the first `rotary_dim` dims of each head by the 1-D position
    (position_ids + block_position_ids), interleaved pairs (GLM-4) or rotate-half (GLM-4.5, 130B);
    `rope_2d` (ChatGLM-6B) rotates the first half of each head by position_ids and the second half by
    block_position_ids, rotate-half within each half. Frequencies and dtype handling follow HF
    transformers (cos/sin in fp32, rounded to the activation dtype before use).
    `rope` takes `GLMConfig.rope_scaling` (linear, dynamic NTK, YaRN: `glmkit.model.rope_scaling`);
    dynamic NTK's frequencies depend on each row's largest position in the call."""

    def __init__(self, config):
        super().__init__()
        self.kind = config.position_embedding
        self.interleaved = config.rope_interleaved if self.kind == "rope" else False
        self.dim = dim = config.rotary_dim
        scaling = config.rope_scaling if self.kind == "rope" else None
        inv_freq, self.attention_scaling = rope_scaling.static_inv_freq(scaling, config.rope_theta, dim)
        self.dynamic = scaling if scaling and scaling["rope_type"] == "dynamic" else None
        self.theta, self.max_positions = config.rope_theta, config.max_position_embeddings
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._inv_freq_fp32 = inv_freq.clone()      # computed on the CPU as HF does; survives model.to(bf16)

    def forward(self, position_ids, block_position_ids, dtype):
        """-> (cos, sin), each (B, T, 1, R/2) for rope or (B, T, 1, 2, R/2) for rope_2d."""
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:           # the module was cast: use the exact fp32 values
            inv_freq = self._inv_freq_fp32.to(inv_freq.device)
        if self.kind == "rope":
            pos = position_ids + block_position_ids
            if self.dynamic is not None:              # (B, R/2): each row's own base
                inv_freq = rope_scaling.dynamic_inv_freq(self.dynamic["factor"], self.theta, self.dim,
                                                         self.max_positions, pos.amax(1) + 1)[:, None]
            pos = pos[..., None].float()                                        # (B, T, 1)
        else:
            pos = torch.stack((position_ids, block_position_ids), -1)[..., None].float()  # (B, T, 2, 1)
        freqs = (pos * inv_freq)[:, :, None]                                    # (B, T, 1, [2,] R/2)
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:             # YaRN: scales q.k by attention_scaling^2
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def rotate(self, x, cos, sin):
        """Rotate x (B, T, H, D) in place of its rotary dims; the rest passes through."""
        if self.kind == "rope_2d":
            half = x.shape[-1] // 2
            return torch.cat((_rotate(x[..., :half], cos[..., 0, :], sin[..., 0, :], False),
                              _rotate(x[..., half:], cos[..., 1, :], sin[..., 1, :], False)), -1)
        return _rotate(x, cos, sin, self.interleaved)


def _rotate(x, cos, sin, interleaved: bool):
    r = 2 * cos.shape[-1]
    xr = x[..., :r]
    if interleaved:          # pairs (x0, x1), (x2, x3), ... share frequency i
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)
    else:                    # rotate-half: (x_i, x_{i+r/2}) share frequency i
        x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
    return out if r == x.shape[-1] else torch.cat((out, x[..., r:]), -1)


# ------------------------------------------------------------------------------------------------
# The per-batch mask
# ------------------------------------------------------------------------------------------------
@dataclass
class SplitPlan:
    """Flat-token bookkeeping for the split backend (indices into the (B*T) flattened tokens)."""
    a_idx: torch.Tensor      # (Na,) Part A tokens, sample by sample
    b_idx: torch.Tensor      # (Nb,) Part B tokens, sample by sample
    inverse: torch.Tensor    # (B*T,) position of each flat token in cat(a_idx, b_idx)
    cu_a: torch.Tensor       # (S+1,) int32 cumulative Part A lengths
    cu_b: torch.Tensor       # (S+1,) int32 cumulative Part B lengths (queries)
    cu_k: torch.Tensor       # (S+1,) int32 cumulative sample lengths (Part B keys: the whole sample)
    max_len: int             # T: an upper bound for every max_q / max_k (constant: no recompiles)

    def _map(self, fn) -> SplitPlan:
        tensors = (self.a_idx, self.b_idx, self.inverse, self.cu_a, self.cu_b, self.cu_k)
        return SplitPlan(*(fn(t) for t in tensors), self.max_len)

    def to(self, device: str | torch.device, non_blocking: bool = False) -> SplitPlan:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> SplitPlan:
        return self._map(torch.Tensor.pin_memory)


@dataclass
class MaskPlan:
    """The host-side part of a batch's mask: the backend that runs ("causal" / "full" when no row needs
    a mask) and, for split, the flat-token plan (CPU tensors until `to` moves them)."""
    backend: str                          # "sdpa" | "flex" | "split" | "segments" | "causal" | "full"
    split: SplitPlan | None = None
    runs: tuple[tuple[int, int, int, int], ...] | None = None    # segments: `segment_runs`

    def to(self, device: str | torch.device, non_blocking: bool = False) -> MaskPlan:
        split = self.split.to(device, non_blocking) if self.split is not None else None
        return MaskPlan(self.backend, split, self.runs)

    def pin_memory(self) -> MaskPlan:
        return MaskPlan(self.backend, self.split.pin_memory() if self.split is not None else None, self.runs)


@dataclass
class AttentionMask:
    backend: str                          # "sdpa" | "flex" | "split" | "causal" | "full" (no mask needed)
                                          # | "causal_tail" (queries = the last T of the S keys, causal)
    dense: torch.Tensor | None = None     # sdpa: (B, 1, Tq, Tk) bool, True = visible
    block_mask: Any = None                # flex: torch BlockMask
    plan: SplitPlan | None = None         # split
    runs: tuple[tuple[int, int, int, int], ...] | None = None    # segments: (row, start, sep, end) per sample
    kv_len: int | None = None             # attend to the first kv_len keys only (a KV cache's filled
                                          # slots, eager decoding); None = every key
    flex_options: dict | None = None      # flex on CUDA: FlexKernelOptions (see `check_flex_options`)


def resolve_backend(backend: str, device: torch.device | str, dtype: torch.dtype | None = None,
                    batch: Batch | None = None) -> str:
    if backend not in BACKENDS:
        raise GlmkitError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    cuda = torch.device(device).type == "cuda"
    if backend == "segments":
        return "segments" if batch is None or split_applies(batch) else "sdpa"     # the span layout: dense
    if backend == "auto":
        if not cuda:
            long_rows = batch is not None and batch.input_ids.shape[1] >= SEGMENTS_MIN_LEN
            return "segments" if long_rows and split_applies(batch) else "sdpa"
        half = dtype in (torch.float16, torch.bfloat16)
        long_rows = batch is None or batch.input_ids.shape[1] >= SPLIT_MIN_LEN
        return "split" if half and long_rows and split_available() and (batch is None or split_applies(batch)) \
            else "flex"
    if backend == "split":
        if not cuda:
            raise GlmkitError("attention backend 'split' needs a CUDA device; use 'sdpa' or 'flex' (or 'auto')")
        if not split_available():
            raise GlmkitError("attention backend 'split' is not available on this GPU / torch build (see the "
                              "warning above); use 'flex' or 'auto'")
        if batch is not None and not split_applies(batch):
            return "flex"       # the span layout: documented fallback
    return backend


def plan_mask(batch: Batch, backend: str = "sdpa", device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> MaskPlan:
    """The host-side decisions for `batch`'s mask, read from its arrays (numpy: no device involved):
    the backend (`resolve_backend` for a model on `device` computing in `dtype`), no mask at all for
    plain rows, and the split plan (CPU tensors)."""
    backend = resolve_backend(backend, device, dtype, batch)
    plain = _plain_rows(batch)
    if plain:                       # every row one unpadded causal (CLM) or bidirectional (MLM) sample
        return MaskPlan(plain)
    if backend == "flex" and batch.input_ids.shape[1] < 16:      # below Flex's smallest block: dense
        backend = "sdpa"
    if backend == "split":
        return MaskPlan("split", split_plan(batch, device="cpu"))
    if backend == "segments":
        return MaskPlan("segments", runs=segment_runs(batch))
    return MaskPlan(backend)


def make_attention_mask(batch: Batch, backend: str = "sdpa", dtype: torch.dtype | None = None,
                        flex_options: dict | None = None, plan: MaskPlan | None = None) -> AttentionMask:
    """Build the mask for `batch` (torch tensors, on the model's device) once; reuse it in every layer.
    With `plan` (from `plan_mask`, already on the device) nothing is read back from the device and
    `backend` is the plan's; without, the plan is made here from `batch`."""
    if plan is None:
        device = batch.input_ids.device if isinstance(batch.input_ids, torch.Tensor) else torch.device("cpu")
        plan = plan_mask(batch, backend, device, dtype)
        if plan.split is not None:
            plan = plan.to(device)
    if plan.backend in ("causal", "full"):
        return AttentionMask(plan.backend)
    if plan.backend == "sdpa":
        return AttentionMask("sdpa", dense=dense_mask(batch)[:, None])
    if plan.backend == "flex":
        return AttentionMask("flex", block_mask=_block_mask(batch), flex_options=flex_options)
    if plan.backend == "segments":
        return AttentionMask("segments", runs=plan.runs)
    return AttentionMask("split", plan=plan.split)


def _plain_rows(batch: Batch) -> str | None:
    """'causal' / 'full' when no row needs a mask (stock kernels then skip the masked half or the
    mask read), else None. Reads the batch on the host."""
    seg, sep, span = _host(batch.segment_ids), _host(batch.sep), _host(batch.span_ids)
    if (seg != seg[:, :1]).any() or (seg < 0).any():
        return None
    if (sep == 0).all() and (span == span[:, :1]).all():
        return "causal"
    return "full" if (sep >= seg.shape[1]).all() else None


def _block_mask(batch: Batch):
    from torch.nn.attention.flex_attention import create_block_mask

    seg, sep, span = batch.segment_ids, batch.sep, batch.span_ids
    B, T = seg.shape

    def visible(b, h, q, k):
        return (seg[b, q] == seg[b, k]) & ((k < sep[b, q]) | ((k <= q) & (span[b, k] == span[b, q])))

    # a block never longer than the row: compiled Flex (torch 2.13) is wrong when T < BLOCK_SIZE
    block = 128 if T >= 128 else 1 << (T.bit_length() - 1)
    return create_block_mask(visible, B, None, T, T, device=seg.device, BLOCK_SIZE=block)


def _host(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _samples(seg: np.ndarray):
    """Yield (row, start, end) for each run of equal segment ids in each row."""
    B, T = seg.shape
    for b in range(B):
        cuts = np.flatnonzero(np.diff(seg[b])) + 1
        bounds = np.concatenate(([0], cuts, [T]))
        for s, e in zip(bounds[:-1], bounds[1:]):
            yield b, int(s), int(e)


def split_applies(batch: Batch) -> bool:
    """True when every sample is [Part A][one causal run]: sep constant within the sample and the
    span id constant over its Part B (the `glm` layout, MLM, CLM). False for the `span` layout."""
    seg, sep, span = _host(batch.segment_ids), _host(batch.sep), _host(batch.span_ids)
    for b, s, e in _samples(seg):
        a_end = int(sep[b, s])
        if (sep[b, s:e] != a_end).any():
            return False
        part_b = span[b, min(max(a_end, s), e):e]
        if part_b.size and (part_b != part_b[0]).any():
            return False
    return True


def segment_runs(batch: Batch) -> tuple[tuple[int, int, int, int], ...]:
    """(row, start, Part A end, end) of every sample of every row (padding is one bidirectional run)."""
    seg, sep = _host(batch.segment_ids), _host(batch.sep)
    return tuple((b, s, min(max(int(sep[b, s]), s), e), e) for b, s, e in _samples(seg))


def split_plan(batch: Batch, device: str | torch.device | None = None) -> SplitPlan:
    """The split backend's flat-token plan for `batch`, on `device` (default: the batch's)."""
    seg, sep = _host(batch.segment_ids), _host(batch.sep)
    B, T = seg.shape
    a_idx, b_idx, la, lb, lk = [], [], [], [], []
    for b, s, e in _samples(seg):
        a_end = min(max(int(sep[b, s]), s), e)
        a_idx.append(np.arange(b * T + s, b * T + a_end))
        b_idx.append(np.arange(b * T + a_end, b * T + e))
        la.append(a_end - s)
        lb.append(e - a_end)
        lk.append(e - s)
    order = np.concatenate(a_idx + b_idx)
    inverse = np.empty(B * T, dtype=np.int64)
    inverse[order] = np.arange(B * T)
    if device is None:
        device = batch.input_ids.device if isinstance(batch.input_ids, torch.Tensor) else "cpu"

    def cu(lengths):
        return torch.tensor(np.concatenate(([0], np.cumsum(lengths))), dtype=torch.int32, device=device)

    def idx(x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)

    return SplitPlan(a_idx=idx(np.concatenate(a_idx)), b_idx=idx(np.concatenate(b_idx)),
                     inverse=idx(inverse), cu_a=cu(la), cu_b=cu(lb), cu_k=cu(lk), max_len=T)


_split_ok: bool | None = None


def split_available() -> bool:
    """varlen flash attention exists here AND passes a one-time check against the dense reference
    (flash's bottom-right causal alignment, empty Part A / Part B samples). Otherwise `auto` uses flex."""
    global _split_ok
    if _split_ok is None:
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
            _split_ok = torch.cuda.is_available() and _split_self_check()
        except Exception as e:  # an unsupported GPU, a kernel that refuses the shapes, ...
            warnings.warn(f"split attention unavailable ({type(e).__name__}: {e}); using flex", stacklevel=2)
            _split_ok = False
    return _split_ok


def _split_self_check() -> bool:
    # one row: a GLM sample (A=5, B=3), a CLM sample (A=0, B=4), an MLM sample (A=4, B=0), padding
    T = 20
    seg = np.array([[0] * 8 + [1] * 4 + [2] * 4 + [-1] * 4])
    sep = np.array([[5] * 8 + [8] * 4 + [16] * 4 + [20] * 4])
    span = np.array([[0] * 5 + [1] * 3 + [0] * 12])
    z = np.zeros((1, T), dtype=np.int64)
    batch = Batch(z, z, z.astype(bool), z, z, seg, sep, span).to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, T, n, 64, device="cuda", generator=g, dtype=torch.bfloat16) for n in (4, 2, 2))
    got = _split(q, k, v, split_plan(batch), None).float()
    m = dense_mask(batch)[:, None]
    kr, vr = (x.float().repeat_interleave(2, 2).transpose(1, 2) for x in (k, v))
    ref = F.scaled_dot_product_attention(q.float().transpose(1, 2), kr, vr, attn_mask=m).transpose(1, 2)
    ok = bool((got - ref).abs().max() < 3e-2)
    if not ok:
        warnings.warn("split attention disagrees with the reference mask on this GPU; using flex", stacklevel=3)
    return ok


# ------------------------------------------------------------------------------------------------
# attend
# ------------------------------------------------------------------------------------------------
# The compiled flex_attention, shared by every model in the process (compiling is slow; the kernel
# options are an argument of each call, not of the compiled function).
_compiled_flex = None


def check_flex_options(options: dict | str | None) -> dict | None:
    """FlexAttention kernel options (torch's FlexKernelOptions: BLOCK_M, BLOCK_N, num_warps, num_stages,
    USE_TMA, ROWS_GUARANTEED_SAFE, ...) from a dict, its JSON text, or None / "" / {} for torch's
    defaults (returned as None). Unknown names are an error that lists the known ones.
    `glmkit bench train --attention-table --flex-options JSON` times candidates beside the defaults."""
    if isinstance(options, str):
        try:
            options = json.loads(options) if options.strip() else None
        except ValueError as e:
            raise GlmkitError(f"Flex kernel options {options!r} are not JSON ({e}); write e.g. "
                              '\'{"BLOCK_M": 64, "BLOCK_N": 64}\'') from None
    if options is not None:
        if not isinstance(options, dict):
            raise GlmkitError(f"Flex kernel options must be a JSON object, got {options!r}")
        from torch.nn.attention.flex_attention import FlexKernelOptions
        known = set(FlexKernelOptions.__annotations__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise GlmkitError(f"unknown Flex kernel option(s) {', '.join(unknown)}; this torch knows "
                              f"{', '.join(sorted(known))}")
    return dict(options) if options else None


def _flex(q, k, v, block_mask, gqa, options: dict | None = None):
    """q (B, H, T, D). Compiled on CUDA (the fused kernel); eager on the CPU (reference math).
    options: Flex kernel options, used by the CUDA kernel only."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    kw = {"kernel_options": options} if options and q.device.type == "cuda" else {}
    if torch.compiler.is_compiling():       # inside a compiled block: dynamo lowers flex itself
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa, **kw)
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=gqa, **kw)
    with warnings.catch_warnings():       # "called without torch.compile": intended on the CPU
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def attend(q, k, v, mask: AttentionMask | None = None, scale: float | None = None) -> torch.Tensor:
    """q (B, T, H, D), k/v (B, S, Hkv, D) -> (B, T, H, D)."""
    H, Hkv = q.shape[2], k.shape[2]
    gqa = H != Hkv
    if mask is not None and mask.kv_len is not None:
        k, v = k[:, :mask.kv_len], v[:, :mask.kv_len]
    if mask is not None and mask.backend == "split":
        return _split(q, k, v, mask.plan, scale)
    if mask is not None and mask.backend == "causal_tail" and k.shape[1] > q.shape[1]:
        return _causal_tail(q, k, v, scale)
    if mask is not None and mask.backend == "segments":
        return _segments(q, k, v, mask.runs, scale)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)      # (B, H, T, D)
    if mask is None or mask.backend in ("causal", "full", "causal_tail"):     # causal_tail here: T == S
        causal = mask is None or mask.backend != "full"
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa)
    elif mask.backend == "flex":
        # contiguous inputs: compiled Flex (torch 2.13, inductor CPU at least) returns wrong values when
        # v is a slice of the fused qkv output and q, k are not (a storage-offset view)
        qt, kt, vt = (x.contiguous().transpose(1, 2) for x in (q, k, v))
        out = _flex(qt, kt, vt, mask.block_mask, gqa, mask.flex_options)
    else:
        if gqa and q.device.type == "cuda" and q.shape[1] > 1:   # masked CUDA kernels prefer explicit heads
            kt, vt = (x.repeat_interleave(H // Hkv, dim=1) for x in (kt, vt))
            gqa = False
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask.dense, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def _causal_tail(q, k, v, scale):
    """q (B, T, H, D) = the last T of the S positions of k, v (B, S, Hkv, D), causal -> (B, T, H, D).
    CPU: attention over the S - T earlier keys (no mask: all visible; GQA by folding each group's
    queries into one kv head's sequence) and over the last T keys (causal, the stock top-left mask),
    merged by log-sum-exp: out = (e^l1 o1 + e^l2 o2) / (e^l1 + e^l2). Temporaries are (T, heads)-sized;
    no (T, S) mask. Elsewhere (or without torch's CPU flash kernel): the (T, S) boolean mask."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    P, G = S - T, H // Hkv
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if q.device.type != "cpu" or flash is None:
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=P)    # k <= P + t
        return attend(q, k, v, AttentionMask("sdpa", dense=visible[None, None]), scale)
    qt = q.transpose(1, 2)                                                        # (B, H, T, D)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)                                 # (B, Hkv, S, D)
    # earlier keys: head h reads kv head h // G, so G query heads x T tokens form one kv head's queries
    o1, l1 = flash(qt.reshape(B, Hkv, G * T, D), kt[:, :, :P], vt[:, :, :P], 0.0, False, scale=scale)
    tail_k, tail_v = kt[:, :, P:], vt[:, :, P:]
    if G > 1:
        tail_k, tail_v = (x.repeat_interleave(G, dim=1) for x in (tail_k, tail_v))   # (B, H, T, D): T-sized
    o2, l2 = flash(qt, tail_k, tail_v, 0.0, True, scale=scale)
    l1 = l1.reshape(B, H, T, 1)
    l2 = l2.reshape(B, H, T, 1)
    lse = torch.logaddexp(l1, l2)
    out = o1.reshape(B, H, T, D) * torch.exp(l1 - lse).to(o1.dtype) + o2 * torch.exp(l2 - lse).to(o2.dtype)
    return out.transpose(1, 2)


def _varlen(q, k, v, cu_q, cu_k, max_len: int, scale: float, causal: bool, gqa: bool):
    """`varlen_attn` across torch versions: 2.10 takes `is_causal` and no scale / GQA; later versions take
    `scale`, `window_size` ((-1, 0) = causal, bottom-right aligned) and `enable_gqa`. What a version lacks
    is done here: a non-default scale folded into q, GQA by repeating the k/v heads."""
    import torch.nn.attention.varlen as vl

    params = _varlen_params(vl.varlen_attn)
    kw = {}
    if "window_size" in params:
        if causal:
            kw["window_size"] = (-1, 0)
    elif causal:
        kw["is_causal"] = True
    if "scale" in params:
        kw["scale"] = scale
    elif scale != 1.0 / math.sqrt(q.shape[-1]):
        q = q * (scale * math.sqrt(q.shape[-1]))
    if gqa:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    return vl.varlen_attn(q, k, v, cu_q, cu_k, max_len, max_len, **kw)


@functools.cache
def _varlen_params(fn) -> frozenset:
    """The parameter names of this torch's `varlen_attn` (read once per function object)."""
    return frozenset(inspect.signature(fn).parameters)


def _split(q, k, v, plan: SplitPlan, scale):
    B, T, H, D = q.shape
    qf, kf, vf = (x.reshape(B * T, x.shape[2], D).contiguous() for x in (q, k, v))   # (B*T, heads, D)
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    gqa = H != k.shape[2]
    # index_select (not x[idx]): its backward is a plain index_add, not a sorting index_put
    a = [x.index_select(0, plan.a_idx) for x in (qf, kf, vf)]
    oa = _varlen(*a, plan.cu_a, plan.cu_a, plan.max_len, scale, causal=False, gqa=gqa)
    ob = _varlen(qf.index_select(0, plan.b_idx), kf, vf, plan.cu_b, plan.cu_k, plan.max_len, scale,
                 causal=True, gqa=gqa)                                     # causal, bottom-right aligned
    return torch.cat((oa, ob)).index_select(0, plan.inverse).view(B, T, H, D)


def _segments(q, k, v, runs: tuple[tuple[int, int, int, int], ...], scale):
    """The segments backend: per sample, SDPA without a mask (module docstring)."""
    B, T, H, _ = q.shape
    gqa = H != k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)              # (B, H, T, D)
    rows: list[list[torch.Tensor]] = [[] for _ in range(B)]
    for b, s, a, e in runs:
        if a > s:                                           # Part A: bidirectional over itself
            qa, ka, va = (x[b:b + 1, :, s:a] for x in (qt, kt, vt))
            rows[b].append(F.scaled_dot_product_attention(qa, ka, va, scale=scale, enable_gqa=gqa))
        if e > a:                                           # Part B: the rows of a causal pass over the sample
            qs, ks, vs = (x[b:b + 1, :, s:e] for x in (qt, kt, vt))
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
            rows[b].append(out[:, :, a - s:])
    return torch.cat([torch.cat(r, dim=2) for r in rows]).transpose(1, 2)            # (B, T, H, D)
