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
"""

from __future__ import annotations

import torch
import torch.nn as nn


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
    def for_model(cls, model, rows: int, max_len: int) -> KVCache:
        c, w = model.config, model.embed_tokens.weight
        return cls(c.num_layers, rows, max_len, c.num_kv_heads, c.head_dim, w.dtype, w.device)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

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
