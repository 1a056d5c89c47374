"""The GLM transformer, every generation in one module (DESIGN.md §2), for one device.

    model = GLM(GLMConfig.from_name("tiny"))
    model.set_runtime(attention_backend="sdpa")      # run-time choices (not in the config)
    loss = model.loss(batch)                         # batch: glmkit.batch.Batch of torch tensors
    h = model(input_ids, position_ids, block_position_ids, attn=mask)  # (B, T, hidden) final-normed
    logits = model.logits(h)                         # (..., vocab)

Contract
- `forward` returns the final hidden states (after the last norm), NOT logits: training projects to
  the vocabulary only at loss positions (`loss`), inference only at the last position. `attn` is an
  `AttentionMask` from `glmkit.model.attention.make_attention_mask(batch, backend)`, built once per batch;
  `attn=None` is plain causal attention over the row.
- Run-time choices live on the model, never in `GLMConfig`: `set_runtime(attention_backend=...,
  flex_options=..., moe_impl=...)` (defaults auto, torch's Flex defaults, auto); `attention_mask`
  uses them. No module globals: two models in one process can run different backends.
- Positions are always GLM's 2D pair. `learned_2d` adds two embedding tables; `rope_2d` rotates half
  of each head by each; the 1-D RoPE families (GLM-130B, GLM-4, GLM-4.5) use
  `position_ids + block_position_ids`, which is the running index for causal text and makes blank
  infilling work on them too.
- `loss(batch, attn, loss_index)`: mean cross-entropy over `batch.loss_mask` (each position's term
  times `batch.loss_weight` when the batch has weights, still divided by the count); hidden states are
  gathered at those positions right after the last block's attention (`forward(..., select=idx)`),
  so that block's MLP, the final norm and the output projection run only there; + MoE balance terms
  if `router_aux_loss_coef > 0`. `loss_index` (`glmkit.batch.loss_positions`, built on the host by the
  trainer) saves the `nonzero` that would otherwise read the mask back from the device.
- KV cache (`glmkit.model.kv_cache`): `forward(..., cache=cache, input_pos=slots)` writes this call's keys
  and values at `input_pos` and attends over the whole cache with `attn.dense` (B, 1, T, S), or over
  its first `attn.kv_len` slots when that is set (eager decoding reads only the filled slots).
- `model.layers` is a ModuleList of `Block`s (wrap each with FSDP2 / compile outside the model);
  `model.checkpointing = True` recomputes each block in the backward (activation checkpointing).
- Weight names follow HF transformers where the layouts agree (`embed_tokens`, `layers.i.self_attn.*`,
  `input_layernorm`, `post_attention_layernorm`, `post_self_attn_layernorm`, `post_mlp_layernorm`,
  `mlp.gate_up_proj`, `mlp.down_proj`, `mlp.gate`, `mlp.experts`, `mlp.shared_experts`, `norm`,
  `lm_head`); q/k/v are fused in `self_attn.qkv_proj` (rows: q heads, then k heads, then v heads) and
  the MoE shared expert / dense MLP fuse gate and up (gate first) in `gate_up_proj`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from glmkit.batch import Batch, loss_positions
from glmkit.errors import GlmkitError
from glmkit.model.attention import (
    BACKENDS,
    AttentionMask,
    MaskPlan,
    Rotary,
    attend,
    check_flex_options,
    make_attention_mask,
)
from glmkit.model.config import GLMConfig
from glmkit.model.moe import MoE, set_moe_impl


class RMSNorm(nn.Module):
    """HF-exact: normalise in fp32, round to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if x.dtype == self.weight.dtype == torch.float32:   # the same fp32 arithmetic in one call (bit-equal)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(config: GLMConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    return nn.LayerNorm(dim, eps=config.norm_eps) if config.norm == "layernorm" else RMSNorm(dim, config.norm_eps)


class MLP(nn.Module):
    """gelu: down(gelu(up x)); geglu: a, b = halves, a * gelu(b) (GLM-130B: second half activated);
    swiglu: gate, up = halves, silu(gate) * up (GLM-4: first half through SiLU)."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        h, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.kind, self.approx = config.mlp, config.gelu_approximate
        self.gate_up_proj = nn.Linear(h, f if self.kind == "gelu" else 2 * f, bias=bias)
        self.down_proj = nn.Linear(f, h, bias=bias)

    def forward(self, x):
        x = self.gate_up_proj(x)
        if self.kind == "gelu":
            x = F.gelu(x, approximate=self.approx)
        elif self.kind == "geglu":
            a, b = x.chunk(2, dim=-1)
            x = a * F.gelu(b, approximate=self.approx)
        else:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        return self.down_proj(x)


class Attention(nn.Module):
    def __init__(self, config: GLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q, kv = self.n_head * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, q + 2 * kv, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q, config.hidden_size, bias=config.out_bias)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(self, x, rotary, rope, attn, cache=None, input_pos=None):
        q, k, v = self.project(x, rotary, rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, input_pos, k, v)          # (B, S, Hkv, D)
        return self.output(attend(q, k, v, attn))

    def project(self, x, rotary, rope):
        """x (B, T, h) -> q (B, T, H, D), k and v (B, T, Hkv, D): normed (QK norm) and rotated."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, D)                 # heads: H of q, Hkv of k, Hkv of v
        qk, v = qkv[:, :, :H + Hkv], qkv[:, :, H + Hkv:]
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])), dim=2)
        if rope is not None:
            qk = rotary.rotate(qk, *rope)              # q and k heads in one call (elementwise: same values)
        q, k = qk.split([H, Hkv], dim=2)
        return q, k, v

    def output(self, y):
        """The attention result y (B, T, H, D) -> (B, T, h)."""
        B, T, H, D = y.shape
        return self.o_proj(y.reshape(B, T, H * D))


class Block(nn.Module):
    def __init__(self, config: GLMConfig, layer_idx: int):
        super().__init__()
        self.residual = config.residual
        self.alpha = math.sqrt(2 * config.num_layers) if config.residual == "deepnorm" else 1.0
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config)
        if config.residual == "sandwich":       # GLM-4-0414: norm each sublayer's output before the add
            self.post_self_attn_layernorm = make_norm(config)
            self.post_mlp_layernorm = make_norm(config)

    def forward(self, x, rotary, rope, attn, cache=None, input_pos=None, select=None):
        """x (B, T, h) -> (B, T, h); with `select` (N,) flat indices into B*T -> (N, h): only those
        positions go through the rest of the block after attention (the last block, in the loss)."""
        a = self.input_layernorm(x)
        return self.after_attention(x, a, self.self_attn(a, rotary, rope, attn, cache, input_pos), select)

    def after_attention(self, x, a, h, select=None):
        """The rest of the block once attention has run: x the block's input, a = input_layernorm(x),
        h the attention output (`Attention.output`) -> the block's output (see `forward`)."""
        def pick(t):
            if select is None:
                return t
            return t.reshape(-1, t.shape[-1]).index_select(0, select)

        if self.residual == "deepnorm":
            # post-LN, written as ChatGLM does: the residual branch carries the normed input * alpha
            x = pick(a) * self.alpha + pick(h)
            b = self.post_attention_layernorm(x)
            return b * self.alpha + self.mlp(b)
        x, h = pick(x), pick(h)
        if self.residual == "sandwich":
            h = self.post_self_attn_layernorm(h)
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.residual == "sandwich":
            h = self.post_mlp_layernorm(h)
        return x + h


class GLM(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config.validate()
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        if c.position_embedding == "learned_2d":
            self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
            self.block_position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
            self.rotary = None
        else:
            self.rotary = Rotary(c)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_layers))
        self.norm = make_norm(c)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.checkpointing = False
        self.attention_backend = "auto"          # run-time choices: set_runtime
        self.flex_options: dict | None = None
        self.reset_parameters()

    def set_runtime(self, attention_backend: str | None = None, flex_options: dict | str | None = None,
                    moe_impl: str | None = None) -> GLM:
        """How this model computes, never part of its config: the attention backend (`BACKENDS`), the
        Flex kernel options (a dict or its JSON; "" or {} for torch's defaults), the MoE expert path
        (auto | loop | grouped). None leaves a choice as it is. Returns the model."""
        if attention_backend is not None:
            if attention_backend not in BACKENDS:
                raise GlmkitError(f"unknown attention backend {attention_backend!r}; choose one of "
                                  f"{', '.join(BACKENDS)}")
            self.attention_backend = attention_backend
        if flex_options is not None:
            self.flex_options = check_flex_options(flex_options)
        if moe_impl is not None:
            set_moe_impl(self, moe_impl)
        return self

    # -- init ------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self):
        """normal(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2L) (GPT-2);
        DeepNorm (GLM-130B): Xavier normal, with gain beta = (2N)^-1/2 on v, out and MLP weights."""
        c, std = self.config, self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, MoE):
                nn.init.normal_(m.gate.weight, 0.0, std)
                m.gate.e_score_correction_bias.zero_()
                nn.init.normal_(m.experts.gate_up_proj, 0.0, std)
                nn.init.normal_(m.experts.down_proj, 0.0, std / math.sqrt(2 * c.num_layers))
        for block in self.layers:
            if c.residual == "deepnorm":
                self._deepnorm_init(block)
            else:
                nn.init.normal_(block.self_attn.o_proj.weight, 0.0, std / math.sqrt(2 * c.num_layers))
                if isinstance(block.mlp, MLP):
                    nn.init.normal_(block.mlp.down_proj.weight, 0.0, std / math.sqrt(2 * c.num_layers))

    def _deepnorm_init(self, block):
        beta = (2 * self.config.num_layers) ** -0.5
        attn = block.self_attn
        q_rows = attn.n_head * attn.head_dim
        kv_rows = attn.n_kv * attn.head_dim
        w = attn.qkv_proj.weight
        nn.init.xavier_normal_(w[: q_rows + kv_rows])            # q, k: gain 1
        nn.init.xavier_normal_(w[q_rows + kv_rows:], gain=beta)   # v
        nn.init.xavier_normal_(attn.o_proj.weight, gain=beta)
        nn.init.xavier_normal_(block.mlp.gate_up_proj.weight, gain=beta)
        nn.init.xavier_normal_(block.mlp.down_proj.weight, gain=beta)

    # -- forward ---------------------------------------------------------------------------------
    def embed(self, input_ids, position_ids, block_position_ids):
        x = self.embed_tokens(input_ids)
        if self.rotary is None:
            n = self.config.max_position_embeddings
            # not while training on a GPU, where reading the maximum back would stall every step: the
            # trainer raises max_position_embeddings to its row length, so no position exceeds it
            check = not (self.training and position_ids.is_cuda)
            if check and max(int(position_ids.max()), int(block_position_ids.max())) >= n:
                raise GlmkitError(f"a position id is >= max_position_embeddings = {n} of this learned-position "
                                  "model; use shorter rows or a config with more positions")
            x = x + self.position_embeddings(position_ids) + self.block_position_embeddings(block_position_ids)
        return x

    def forward(self, input_ids, position_ids, block_position_ids, attn: AttentionMask | None = None,
                cache=None, input_pos=None, select=None):
        """input_ids, position_ids, block_position_ids: (B, T) -> final hidden states (B, T, hidden).
        select: (N,) flat indices into B*T -> (N, hidden) at those positions only; the last block then
        runs its MLP there only (a dense last block; an MoE one runs everywhere and is gathered after,
        so its expert-load counts stay those of the whole batch)."""
        x = self.embed(input_ids, position_ids, block_position_ids)
        rope = None if self.rotary is None else self.rotary(position_ids, block_position_ids, x.dtype)
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            sel = select if i == last and not isinstance(block.mlp, MoE) else None
            if self.checkpointing and self.training and cache is None:
                x = checkpoint(block, x, self.rotary, rope, attn, None, None, sel, use_reentrant=False)
            else:
                x = block(x, self.rotary, rope, attn, cache, input_pos, sel)
        if select is not None and x.dim() == 3:          # not selected inside the last block (MoE)
            x = x.reshape(-1, x.shape[-1]).index_select(0, select)
        return self.norm(x)

    def logits(self, hidden):
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w)

    def attention_mask(self, batch: Batch, backend: str | None = None, plan: MaskPlan | None = None,
                       dtype: torch.dtype | None = None) -> AttentionMask:
        """The mask of `batch` for every layer, in this model's backend (or `backend`); `plan` (from
        `glmkit.model.attention.plan_mask`, on this device) holds what was decided on the host. dtype:
        the compute dtype (default: the weights'; under autocast pass the autocast dtype)."""
        return make_attention_mask(batch, backend or self.attention_backend, dtype or self.embed_tokens.weight.dtype,
                                   flex_options=self.flex_options, plan=plan)

    def loss(self, batch: Batch, attn: AttentionMask | None = None,
             loss_index: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over batch.loss_mask (weighted by batch.loss_weight when it is set). Hidden states are gathered at those positions inside
        the last block (after its attention), so its MLP, the final norm and the vocabulary projection
        run only there. loss_index: `glmkit.batch.loss_positions(batch)` made on the host (default: made
        here from the device's loss_mask, which reads it back)."""
        if attn is None:
            attn = self.attention_mask(batch)
        sel = loss_positions(batch) if loss_index is None else loss_index               # (N_loss,)
        h = self(batch.input_ids, batch.position_ids, batch.block_position_ids, attn, select=sel)
        if sel.numel() == 0:                      # nothing to score: a zero that keeps the graph
            return h.sum() * 0.0
        targets = batch.targets.reshape(-1).index_select(0, sel)
        if batch.loss_weight is None:
            loss = F.cross_entropy(self.logits(h).float(), targets)
        else:                                     # sum(weight x cross-entropy) / number of loss positions
            weight = batch.loss_weight.reshape(-1).index_select(0, sel).float()
            loss = (F.cross_entropy(self.logits(h).float(), targets, reduction="none") * weight).sum() / sel.numel()
        for m in self.moe_layers():
            if m.aux_loss is not None:
                loss = loss + m.aux_loss
        return loss

    # -- MoE -------------------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.layers if isinstance(b.mlp, MoE)]

    def update_router_bias(self, rate: float = 1e-3) -> None:
        """Aux-loss-free balancing (GLM-4.5): move each correction bias towards under-used experts by
        `rate` using the load counted since the last call. Call after optimizer steps, or never (frozen)."""
        for m in self.moe_layers():
            m.update_bias(rate)

    # -- accounting ------------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
            if self.rotary is None:
                n -= self.position_embeddings.weight.numel() + self.block_position_embeddings.weight.numel()
            if self.lm_head is not None:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """`6N + 12·L·H·Q·T` (DESIGN.md §4), N = active matmul parameters incl. the output projection."""
        return self.config.flops_per_token(seq_len)
