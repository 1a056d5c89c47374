"""RoPE scaling: the rotary frequencies of a context window stretched beyond the one a model was
trained on, as HF transformers (5.x) computes them for `Glm`, `Glm4` and `Glm4Moe`.

`GLMConfig.rope_scaling` is None (plain RoPE: inv_freq_i = theta^(-2i/R)) or one of these dicts,
normalised by `normalize` so that a config compares equal however its source spelled it:

| rope_type | keys | inv_freq | cos/sin scale |
|---|---|---|---|
| `linear` | factor | plain / factor (position interpolation) | 1 |
| `dynamic` | factor | plain with base theta·(factor·L/M − (factor−1))^(R/(R−2)), L = max(M, tokens seen) | 1 |
| `yarn` | factor, original_max_position_embeddings, beta_fast, beta_slow, attention_factor, truncate | per-frequency blend of plain (fast dims) and plain / factor (slow dims), linear ramp between the dims that rotate beta_fast and beta_slow times over the original window | attention_factor (default 0.1·ln(factor) + 1) |

(R: rotated dims per head, M: `max_position_embeddings`.) GLM-4's `rope_ratio` (ChatGLM's remote
code: base = 10000 · rope_ratio, e.g. 500 for GLM-4-9B-chat-1M) is no scaling type: it is folded into
`rope_theta` when an HF config is read (`glmkit.checkpoint.hf`).

Dynamic NTK depends on the sequence length L. transformers takes L = max(position_ids) + 1 of the
current forward over the whole batch, keeps the largest L seen in module state (a later, shorter call
still longer than M reuses it) and falls back to plain RoPE once a call is within M. glmkit computes
L per row and per call, statelessly: L = max(M, 1 + the row's largest rotary position in this call).
For one sequence (a prefill, then decode steps that each see one more position) and for a batch of
equal-length rows this is exactly transformers' value; a row of the engine never depends on the other
requests batched with it, where transformers' would. As in transformers, keys already in a KV cache
keep the rotation they were written with: during decoding past M each new token's base grows.

The usable context (`context_length`, `GLMConfig.context_length`, what the engine accepts) follows
transformers' reading of `max_position_embeddings` (M) for each type: for `linear` and `dynamic`, M
is the trained window (dynamic NTK's formula uses it as such) and the context is factor · M; for
`yarn`, M is the post-YaRN length when the config gives `original_max_position_embeddings` (as
released YaRN configs and transformers' validation expect: factor = M / original), so the context is
max(M, factor · original). `glmkit.checkpoint.hf` reads and writes M unchanged, so a config survives
the round trip and both sides derive the same context.

YaRN's `mscale` / `mscale_all_dim` (DeepSeek-style) are folded into `attention_factor`, and a missing
`factor` is M / original_max_position_embeddings, as transformers does.
"""

from __future__ import annotations

import math

import torch

from glmkit.errors import GlmkitError

TYPES = ("linear", "dynamic", "yarn")
_KEYS = {"linear": {"factor"}, "dynamic": {"factor"},
         "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                  "mscale", "mscale_all_dim", "truncate"}}


def normalize(scaling: dict | None, max_position_embeddings: int) -> dict | None:
    """The canonical form of a `rope_scaling` dict (see the module docstring); GlmkitError for a type or
    key glmkit does not implement. `type` (the pre-5 spelling of `rope_type`) and `rope_theta` /
    `partial_rotary_factor` (transformers keeps them in the same dict) are accepted and dropped."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise GlmkitError(f"rope_scaling = {scaling!r} must be a dict with a rope_type, or null")
    s = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta", "partial_rotary_factor")}
    kind = s.pop("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in TYPES:
        raise GlmkitError(f"rope_scaling type {kind!r} is not implemented in glmkit; use one of "
                          f"{', '.join(TYPES)} (or none)")
    unknown = sorted(set(s) - _KEYS[kind])
    if unknown:
        raise GlmkitError(f"rope_scaling of type {kind!r} has unknown key(s) {', '.join(unknown)}; "
                          f"it takes {', '.join(sorted(_KEYS[kind]))}")
    if kind == "yarn":
        return _normalize_yarn(s, max_position_embeddings)
    factor = s.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1:
        raise GlmkitError(f"rope_scaling {kind!r}: factor = {factor!r} must be a number >= 1")
    return {"rope_type": kind, "factor": float(factor)}


def _normalize_yarn(s: dict, max_pos: int) -> dict:
    original = s.get("original_max_position_embeddings") or max_pos
    factor = s.get("factor")
    if factor is None:
        factor = max_pos / original
    if not isinstance(factor, (int, float)) or factor < 1:
        raise GlmkitError(f"rope_scaling 'yarn': factor = {factor!r} must be a number >= 1")
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = (_mscale(factor, mscale) / _mscale(factor, mscale_all) if mscale and mscale_all
                            else _mscale(factor))
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
    if beta_fast < beta_slow:
        raise GlmkitError(f"rope_scaling 'yarn': beta_fast = {beta_fast} must be >= beta_slow = {beta_slow}")
    return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original),
            "beta_fast": float(beta_fast), "beta_slow": float(beta_slow),
            "attention_factor": float(attention_factor), "truncate": bool(s.get("truncate", True))}


def context_length(scaling: dict | None, max_position_embeddings: int) -> int:
    """Positions a model with this (normalised) scaling reads; see the module docstring."""
    if scaling is None:
        return max_position_embeddings
    if scaling["rope_type"] == "yarn":
        return max(max_position_embeddings, int(scaling["factor"] * scaling["original_max_position_embeddings"]))
    return int(scaling["factor"] * max_position_embeddings)


def _mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def plain_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """(dim/2,) fp32 theta^(-2i/dim), computed as transformers does (on the CPU, fp32)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def static_inv_freq(scaling: dict | None, theta: float, dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq (dim/2,), cos/sin scale) for plain, linear and YaRN RoPE; dynamic NTK starts as plain
    (its frequencies for rows longer than the window come from `dynamic_inv_freq`)."""
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "linear":
        return plain_inv_freq(theta, dim) / scaling["factor"], 1.0
    if kind == "yarn":
        return _yarn_inv_freq(scaling, theta, dim), scaling["attention_factor"]
    return plain_inv_freq(theta, dim), 1.0


def _yarn_inv_freq(s: dict, theta: float, dim: int) -> torch.Tensor:
    def correction_dim(rotations):      # the dim whose wavelength fits `rotations` times in the window
        return dim * math.log(s["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s["beta_fast"]), correction_dim(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001                   # as transformers: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (s["factor"] * pos_freqs)
    keep = 1 - ramp                     # 1: the dim keeps its trained frequency (fast), 0: interpolated (slow)
    return interpolation * (1 - keep) + extrapolation * keep


def dynamic_inv_freq(factor: float, theta: float, dim: int, max_pos: int, seq_len: torch.Tensor) -> torch.Tensor:
    """(B, dim/2) fp32 dynamic-NTK frequencies for rows of `seq_len` (B,) tokens (int64, on the
    device), in transformers' fp32 arithmetic: rows within `max_pos` get the plain frequencies."""
    long = seq_len.clamp_min(max_pos)
    base = theta * ((factor * long / max_pos) - (factor - 1)) ** (dim / (dim - 2))         # (B,) fp32
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_len.device).float() / dim
    scaled = 1.0 / (base[:, None] ** exponents)
    plain = plain_inv_freq(theta, dim).to(seq_len.device)
    return torch.where((seq_len > max_pos)[:, None], scaled, plain)
