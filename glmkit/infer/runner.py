"""The engine's model runner: one forward over some rows of the KV cache (`glmkit.model.kv_cache`).

    h = forward_rows(model, cache, r0, ids, pos, bpos, slots, sep)       # host lists (B x T) -> (B, T, hidden)

A request owns one cache row; its tokens fill slots 0, 1, 2, ... in the order they were fed (Part A
first, then every Part B token, forced or sampled). Each token carries its GLM 2D position (position id,
block position id), given by the caller.

Visibility, per row b with Part A length sep[b]: the token at slot q sees slot k iff k < sep[b] or
k <= q. Part A is bidirectional within itself; every later token sees Part A and everything fed before it
(earlier blanks' fills included), which is DESIGN.md §3's inference rule.

`forward_rows` runs B rows x T tokens, writing their keys and values at (row, slot). The rows of a call
must be a contiguous range of the pool (the engine keeps the decoding rows packed at the front), so
attention reads a view of the cache, never a copy; keys are read up to the largest filled slot of the
call (`kv_len`), and no mask is built when every query sees every key. `decode_static` steps every row
of the pool over the whole cache width with a mask: the fixed shapes `torch.compile` needs.

Chunked prefill, bounded memory. A causal prompt (or the part of a prompt after Part A) is fed by the
engine in chunks of T tokens through `forward_rows`: each chunk's keys depend only on earlier tokens,
so chunk after chunk is exact. A chunk that follows its row's Part A attends with
`AttentionMask("causal_tail")`: no mask on the CPU (see `glmkit.model.attention`), elsewhere a
(T, kv_len) boolean one, the only temporary there that grows with the context.
Part A is bidirectional: every token's hidden state in layer l + 1 depends on the keys of ALL of Part
A in layer l, later chunks included. `prefill_bidirectional` therefore runs Part A layer by layer:
for each layer, (1) every chunk's QKV projection, writing its keys and values into the row's cache
(and its queries into a Part-A-long buffer), then (2) every chunk's attention against the whole of
Part A's keys and values (no mask: every Part A query sees every Part A key), output projection,
residual and MLP, updating that chunk of the residual stream in place. What lives across chunks is
the residual stream and the queries of Part A (2 x n x hidden values, about one layer's K and V);
everything else (MLP activations, scores) is one chunk's. The result equals a one-shot prefill up to
float rounding (same operations on smaller matrices).
"""

from __future__ import annotations

import torch

from glmkit.model.attention import AttentionMask, attend
from glmkit.model.kv_cache import KVCache


class _RowsView:
    """What a model layer sees as its KV cache during one `forward_rows` call: `update` writes this
    call's k/v at (row, slot) and returns the rows' cache up to `kv_len` (`KVCache.update`: a view, not a
    copy, unless the pool stores another dtype than the activations')."""

    def __init__(self, pool: KVCache, r0: int, B: int, kv_len: int):
        self.pool, self.r0, self.B, self.kv_len = pool, r0, B, kv_len
        self.bidx = None

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.bidx is None:
            self.bidx = torch.arange(self.B, device=k.device)[:, None]     # (B, 1)
        return self.pool.update(layer, self.r0, self.bidx, slots, k, v, self.kv_len)


def visibility(slots: torch.Tensor, sep: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(B, 1, T, kv_len) bool: slot k visible to the query at slots[b, t] iff k < sep[b] or k <= slot."""
    k = torch.arange(kv_len, device=slots.device)
    return ((k < sep[:, None, None]) | (k <= slots[:, :, None]))[:, None]


def _causal_tail(slots: list[list[int]], sep: list[int], kv_len: int) -> bool:
    """One row whose T tokens fill the last T slots after its whole Part A: a chunk of causal prefill,
    query t sees keys 0 .. kv_len - T + t (`AttentionMask("causal_tail")`, no (T, kv_len) mask)."""
    if len(slots) != 1 or len(slots[0]) < 2:
        return False
    r = slots[0]
    return r[-1] == kv_len - 1 and r[-1] - r[0] == len(r) - 1 and sep[0] <= r[0]


def forward_rows(model, pool: KVCache, r0: int, ids: list[list[int]], pos: list[list[int]],
                 bpos: list[list[int]], slots: list[list[int]], sep: list[int]) -> torch.Tensor:
    """Rows r0 .. r0+B-1, T tokens each (host lists, B x T; sep: B) -> hidden states (B, T, h).

    Keys up to the largest slot of the call; no mask when every query sees every key (one token per row
    with all rows at the same slot, the usual decode step of equal-length rows; or a chunk that lies
    inside Part A). Everything about the shapes is decided on the host: no device-to-host sync."""
    device = pool.k[0].device
    B, T = len(ids), len(ids[0])
    kv_len = max(max(r) for r in slots) + 1
    every = all(r[0] == kv_len - 1 for r in slots) if T == 1 else all(s >= kv_len for s in sep)
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    slot_t = t(slots)
    if every:
        attn = AttentionMask("full")
    elif _causal_tail(slots, sep, kv_len):
        attn = AttentionMask("causal_tail")
    else:
        attn = AttentionMask("sdpa", dense=visibility(slot_t, t(sep), kv_len))
    view = _RowsView(pool, r0, B, kv_len)
    return model(t(ids), t(pos), t(bpos), attn, cache=view, input_pos=slot_t)


def decode_static(model, pool: KVCache, ids: torch.Tensor, pos: torch.Tensor, bpos: torch.Tensor,
                  slots: torch.Tensor, sep: torch.Tensor) -> torch.Tensor:
    """One decode step over every row of the pool with the whole cache width: (R, 1) tensors -> hidden
    (R, 1, h). Shapes never change, so `torch.compile` builds it once (CUDA graphs with
    mode="reduce-overhead"). Rows that are not decoding are fed at their scratch slot (the pool's last),
    which they alone see."""
    attn = AttentionMask("sdpa", dense=visibility(slots, sep, pool.max_len))
    view = _RowsView(pool, 0, pool.rows, pool.max_len)
    return model(ids, pos, bpos, attn, cache=view, input_pos=slots)


def prefill_bidirectional(model, pool: KVCache, row: int, ids: list[int], pos: list[int], bpos: list[int],
                          chunk: int) -> torch.Tensor:
    """Part A of one row, n tokens at slots 0 .. n-1 (host lists), in chunks of at most `chunk` tokens,
    layer by layer (see the module docstring). Writes the row's keys and values; returns the final
    hidden states (n, hidden), computed in place of the residual stream."""
    device = pool.k[0].device
    n = len(ids)
    t = lambda x: torch.tensor([x], dtype=torch.long, device=device)
    ids_t, pos_t, bpos_t = t(ids), t(pos), t(bpos)
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    first = model.embed(ids_t[:, :spans[0][1]], pos_t[:, :spans[0][1]], bpos_t[:, :spans[0][1]])
    x = first.new_empty(1, n, first.shape[-1])                          # the residual stream (1, n, h)
    x[:, :spans[0][1]] = first
    for s, e in spans[1:]:
        x[:, s:e] = model.embed(ids_t[:, s:e], pos_t[:, s:e], bpos_t[:, s:e])
    # cos/sin of the whole of Part A at once (n x rotary dim: small): dynamic NTK sees Part A's length
    rope = None if model.rotary is None else model.rotary(pos_t, bpos_t, x.dtype)
    q_all = None
    rows = torch.zeros(1, 1, dtype=torch.long, device=device)
    full = AttentionMask("full")
    for i, block in enumerate(model.layers):
        att = block.self_attn
        for s, e in spans:                                              # (1) keys and values of all of Part A
            r = None if rope is None else tuple(c[:, s:e] for c in rope)
            q, k, v = att.project(block.input_layernorm(x[:, s:e]), model.rotary, r)
            if q_all is None:
                q_all = q.new_empty(1, n, *q.shape[2:])                 # (1, n, H, D), reused by every layer
            q_all[:, s:e] = q
            # read back only after the last chunk: (1, n, Hkv, D) (an upcast copy when the pool is fp8)
            keys, values = pool.update(i, row, rows, t(list(range(s, e))), k, v, n if e == n else 0)
        for s, e in spans:                                              # (2) each chunk against all of them
            xs = x[:, s:e]
            a = block.input_layernorm(xs)
            h = att.output(attend(q_all[:, s:e], keys, values, full))
            x[:, s:e] = block.after_attention(xs, a, h)
    for s, e in spans:
        x[:, s:e] = model.norm(x[:, s:e])
    return x[0]
