"""A static, preallocated KV cache and the two steps of blank-infilling inference (gpt-fast style).

    cache = KVCache.for_model(model, batch_size=B, max_len=S)
    logits = prefill(model, cache, input_ids, position_ids, block_position_ids, lengths)   # (B, vocab)
    logits = decode_one_token(model, cache, token, position_ids, block_position_ids, input_pos)

Layout. Every layer owns k/v buffers of shape (B, S, Hkv, D) allocated once; nothing is reallocated
while decoding, so `decode_one_token` can be compiled (`mode="reduce-overhead"`, CUDA graphs).
Slots are shared by all rows: the prompt occupies slots [0, P) (P = the padded prompt width; row b's
prompt is its first `lengths[b]` tokens, the rest is padding that no query ever sees) and decode
step i writes slot P + i for every row. Positions are NOT slots: each call passes the GLM 2D positions
of its tokens (blank infilling: `<sop>` at (mask position, 1), then (mask position, k+1), ...).

Visibility (the `glm` rule applied to a cache):
- prefill, query q of row b sees prompt slot k iff k < lengths[b] and (k < sep[b] or k <= q):
  Part A (the first sep[b] tokens, default the whole prompt) is bidirectional; prompt tokens after sep
  (e.g. `<sop>` of a `[gMASK]` prompt, or spans already filled) are causal.
- decode at slot s sees every valid prompt slot and every decoded slot P..s.
So a span filled earlier stays visible to later blanks, as DESIGN.md §3 asks. `decode_one_token` may
be given several tokens per row (T > 1: slots input_pos[0..T-1], causal among themselves).

Eager speed (batch-1 decode of a small model on the CPU is op overhead and weight reads, not FLOPs):
prefill attends over slots [0, P) only; an eager `decode_one_token(..., used=n)` attends over the
filled slots [0, n) only, and without any mask when the step is one token of unpadded prompts (the
same values; the default `used=None` keeps the whole-cache static shapes that torch.compile and
CUDA graphs need); `decode_layout(model)` stores the projection weights column-major, the layout
MKL's few-row GEMMs read fastest.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from glmkit.model.attention import AttentionMask
from glmkit.errors import GlmkitError


class KVCache(nn.Module):
    def __init__(self, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        shape = (batch_size, max_len, num_kv_heads, head_dim)
        for i in range(num_layers):
            self.register_buffer(f"k_{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v_{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lengths", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("prompt_len", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self.batch_size, self.max_len = batch_size, max_len
        self.padded = True          # host copy of "some prompt is shorter than P" (set by prefill)

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int) -> KVCache:
        c = model.config
        w = model.embed_tokens.weight
        return cls(c.num_layers, batch_size, max_len, c.num_kv_heads, c.head_dim, w.dtype, w.device)

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, T, Hkv, D) at slots input_pos (T,); return the whole layer cache (B, S, Hkv, D)."""
        kc, vc = getattr(self, f"k_{layer}"), getattr(self, f"v_{layer}")
        kc.index_copy_(1, input_pos, k.to(kc.dtype))
        vc.index_copy_(1, input_pos, v.to(vc.dtype))
        return kc, vc

    def reset(self) -> None:
        for b in self.buffers():
            b.zero_()


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


def _check(cache: KVCache, input_ids: torch.Tensor, needed: int) -> None:
    B = input_ids.shape[0]
    if B != cache.batch_size:
        raise GlmkitError(f"batch of {B} rows but the KV cache holds {cache.batch_size}; build it with "
                          f"KVCache.for_model(model, batch_size={B}, ...)")
    if needed > cache.max_len:
        raise GlmkitError(f"needs {needed} cache slots but the KV cache holds {cache.max_len}; build it with "
                          "a larger max_len (prompt width + new tokens)")


def prefill(model, cache: KVCache, input_ids, position_ids, block_position_ids, lengths=None, sep=None,
            return_hidden: bool = False):
    """Encode prompts (B, P) into slots [0, P). lengths (B,): valid tokens per row (default P);
    sep (B,): end of the bidirectional Part A per row (default = lengths). Returns the logits at each
    row's last valid token (B, vocab), and with return_hidden also the hidden states (B, P, hidden)."""
    B, P = input_ids.shape
    _check(cache, input_ids, P)
    dev = input_ids.device
    lengths = torch.full((B,), P, device=dev) if lengths is None else torch.as_tensor(lengths, device=dev)
    sep = lengths if sep is None else torch.as_tensor(sep, device=dev)
    cache.lengths.copy_(lengths)
    cache.prompt_len.fill_(P)
    cache.padded = bool((lengths < P).any())
    q = torch.arange(P, device=dev)[:, None]                                     # (P, 1)
    k = torch.arange(P, device=dev)[None]                                        # (1, P): slots after P are empty
    valid = k[None] < lengths[:, None, None]                                     # (B, 1, P)
    mask = valid & ((k[None] < sep[:, None, None]) | (k <= q)[None])             # (B, P, P)
    mask = mask | (valid & (q[None] >= lengths[:, None, None]))                  # padding queries: any valid key
    attn = AttentionMask("sdpa", dense=mask[:, None], kv_len=P)
    h = model(input_ids, position_ids, block_position_ids, attn, cache=cache,
              input_pos=torch.arange(P, device=dev))
    last = h[torch.arange(B, device=dev), lengths - 1]                           # (B, hidden)
    logits = model.logits(last)
    return (logits, h) if return_hidden else logits


def decode_one_token(model, cache: KVCache, token, position_ids, block_position_ids, input_pos,
                     used: int | None = None):
    """One step: token / positions (B, T) (T = 1 usually) written at slots input_pos (T,) >= P.
    Returns logits (B, vocab) for the last of the T tokens.

    used: None attends over the whole cache (static shapes, as torch.compile and CUDA graphs need).
    An eager caller that knows the step's last slot on the host passes used = input_pos[-1] + 1:
    attention then reads only slots [0, used), and a single token of unpadded prompts needs no mask."""
    if used is not None and token.shape[1] == 1 and not cache.padded:
        attn = AttentionMask("full", kv_len=used)        # every slot < used is visible to this token
    else:
        k = torch.arange(cache.max_len if used is None else used, device=token.device)   # (S,)
        slot = input_pos[:, None]                                                # (T, 1)
        in_prompt = k[None, None] < cache.lengths[:, None, None]                 # (B, 1, S)
        decoded = (k >= cache.prompt_len) & (k <= slot)                          # (T, S)
        attn = AttentionMask("sdpa", dense=(in_prompt | decoded[None])[:, None], kv_len=used)   # (B, 1, T, S)
    h = model(token, position_ids, block_position_ids, attn, cache=cache, input_pos=input_pos)
    return model.logits(h[:, -1])
