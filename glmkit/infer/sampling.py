"""Sampling: how the next token is chosen from a row of logits.

Pure functions on (B, V) logits (greedy, temperature, top-k, top-p, CTRL repetition penalty); filtered
entries become -inf. Draws come from a caller-owned `torch.Generator`, so a seed reproduces a run exactly
on one device. The engine keeps one generator per request, so a seeded request samples the same tokens
whether it runs alone or inside a continuous batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmkit.errors import GlmkitError


@dataclass
class SamplingConfig:
    """How each next token is chosen (the `--help` of `glmkit generate` / `glmkit infill`)."""
    temperature: float = 0.0         # 0 = greedy (argmax); > 0 divides the logits before sampling
    top_k: int = 0                   # keep the k most likely tokens; 0 = all
    top_p: float = 1.0               # keep the smallest set whose probability reaches p; 1 = all
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output (CTRL)
    max_new_tokens: int = 64         # per blank
    seed: int | None = None          # seeds the sampling generator; None = fresh randomness

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise GlmkitError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise GlmkitError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p}")
        if self.top_k < 0:
            raise GlmkitError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise GlmkitError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise GlmkitError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: for tokens already seen (`seen` (B, V) bool), positive logits are divided by
    `penalty` and negative ones multiplied, so the token always becomes less likely."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are all kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                      # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens whose cumulative probability first reaches p
    (the token that crosses p is kept, so at least one token always survives)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs          # mass strictly before each token
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids under `cfg`."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities under the model's own distribution (raw logits, before any sampling filter, as
    OpenAI and vLLM report them): of each row's `chosen` token, and the `top` most likely (id, logprob)."""
    lp = torch.log_softmax(logits.float(), dim=-1)                               # (B, V)
    chosen_lp = lp.gather(1, chosen[:, None]).squeeze(1).tolist()
    if top <= 0:
        return chosen_lp, [[] for _ in chosen_lp]
    vals, ids = lp.topk(top, dim=-1)
    return chosen_lp, [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
