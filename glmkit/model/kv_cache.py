"""The KV cache: a pool of rows, allocated once, one row per running request (gpt-fast / nanochat style).

    cache = KVCache.for_model(model, rows=16, max_len=2048)
    decode_layout(model)                  # inference weight layout for CPU decoding

Layout. Every layer owns k/v buffers of shape (R, S, Hkv, D) allocated once; nothing is reallocated
while decoding, so a decode step over the whole pool has static shapes (`torch.compile`, CUDA graphs).
A row holds one sequence's keys and values in slots 0, 1, 2, ... in the order its tokens were fed, so a
row is always one contiguous run [0, lengths[r]). Positions are NOT slots: each token carries its GLM 2D
position. The model writes into it through `glmkit.infer.runner` (which decides which rows a forward
covers and what each query may see); `copy_prefix` and `swap` move rows' contents (prefix reuse, and
keeping the decoding rows packed at the front so attention reads a view of the pool, never a copy).

Storage dtype (`kv_dtype`, a run-time choice: `Engine(..., kv_dtype=)`, `--kv-dtype`): "auto" stores
K/V in the model's dtype; "fp32" / "bf16" / "fp16" in that float dtype; "fp8" as float8_e4m3fn (one
byte: a quarter of fp32, half of bf16), clamped to its range (+-448) on write. `update` writes this
call's keys and values in the storage dtype and returns the rows' keys and values in the activation
dtype: a view when the two agree, an upcast copy (of the read slots only) when they do not (no
attention kernel here reads fp8 or mixed dtypes). fp8 has no scale: each value keeps its own 4-bit
exponent, which covers the range of keys and values of the models measured (BENCHMARKS.md, the
quantization table); a per-token scale did not measurably change the logits there.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from glmkit.errors import GlmkitError

KV_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max          # 448: larger magnitudes are clamped on write


def resolve_kv_dtype(kv_dtype: str | torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of "auto" (the model's) or a name of KV_DTYPES (or a torch dtype among them)."""
    if isinstance(kv_dtype, torch.dtype) and kv_dtype in KV_DTYPES.values():
        return kv_dtype
    if kv_dtype == "auto":
        return model_dtype
    if kv_dtype not in KV_DTYPES:
        raise GlmkitError(f"KV cache dtype {kv_dtype!r} is not one of auto, {', '.join(KV_DTYPES)}")
    return KV_DTYPES[kv_dtype]


class KVCache:
    """k/v buffers (R, S, Hkv, D) per layer; `lengths[r]` filled slots of row r (host ints)."""

    def __init__(self, num_layers: int, rows: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (rows, max_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rows, self.max_len = rows, max_len
        self.lengths = [0] * rows

    @classmethod
    def for_model(cls, model, rows: int, max_len: int, kv_dtype: str | torch.dtype = "auto") -> KVCache:
        c, w = model.config, model.embed_tokens.weight
        dtype = resolve_kv_dtype(kv_dtype, w.dtype)
        return cls(c.num_layers, rows, max_len, c.num_kv_heads, c.head_dim, dtype, w.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(self, layer: int, r0: int, rows: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, T, Hkv, D) of pool rows r0 + rows (B, 1) at slots (B, T); return those rows' keys
        and values of slots [0, kv_len), (B, kv_len, Hkv, D) in k's dtype (a view of the pool if it is the
        storage dtype, else an upcast copy)."""
        B = rows.shape[0]
        kc, vc = self.k[layer][r0:r0 + B], self.v[layer][r0:r0 + B]         # (B, S, Hkv, D) views
        kc[rows, slots] = self._stored(k)
        vc[rows, slots] = self._stored(v)
        kc, vc = kc[:, :kv_len], vc[:, :kv_len]
        if kc.dtype != k.dtype:
            kc, vc = kc.to(k.dtype), vc.to(v.dtype)
        return kc, vc

    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float8_e4m3fn:        # saturate explicitly: a cast may give NaN past +-448
            x = x.clamp(-FP8_MAX, FP8_MAX)
        return x.to(self.dtype)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Row dst's first n slots := row src's (a shared prefix handed to another request)."""
        for t in self.k + self.v:
            t[dst, :n] = t[src, :n]
        self.lengths[dst] = n

    def swap(self, a: int, b: int) -> None:
        """Exchange the contents of rows a and b (only their filled slots are moved)."""
        if a == b:
            return
        la, lb = self.lengths[a], self.lengths[b]
        for t in self.k + self.v:
            keep = t[a, :la].clone()
            t[a, :lb] = t[b, :lb]
            t[b, :la] = keep
        self.lengths[a], self.lengths[b] = lb, la


def decode_layout(model):
    """Store the model's projection weights column-major, in place, for CPU decoding; returns the model.

    Same values, shapes and Parameters (optimizers and state dicts are unaffected; saving makes them
    contiguous again): only `weight.t()` becomes contiguous, so `F.linear` hands MKL a row-major
    (in, out) matrix. At decode's few rows per step MKL reads that layout much faster: the 17 weight
    matrices of one `small` decode step take ~0.9 ms against ~1.6 ms (fp32, one thread, x86). Results
    match the default layout to rounding (another summation order), not bit for bit. Only fp32 weights
    on the CPU are changed (the only case measured); inference only (`glmkit.checkpoint.loader.load` applies it).
    """
    def relayout(w: nn.Parameter) -> None:
        if w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and w.is_contiguous():
            w.data = w.data.t().contiguous().t()

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                relayout(m.weight)
        if model.lm_head is None:             # tied: the embedding table is the output projection
            relayout(model.embed_tokens.weight)
    return model
