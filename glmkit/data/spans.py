"""Span sampling for GLM blank infilling (DESIGN.md §1): which tokens of each sample are blanked out.

`[MASK]`: spans of Poisson(lambda) lengths (restricted to 1..max_span) until int(ratio * L) tokens
are covered, placed uniformly without overlapping or touching; `[sMASK]`: whole sentences, in random
order, until the same share is covered; `[gMASK]`: one long span, a suffix (prefix-LM) or a middle
infill. `span_ranks` draws the order of the spans in Part B.

Vectorised over all samples of a batch: samples are a flat token array plus offsets
(`tokens[offsets[i]:offsets[i+1]]` is sample i), and the spans come back as one `Spans` of flat
arrays sorted by (sample, start). The samplers read their options from an `ObjectiveConfig` and
their ids from `SpecialIds` (both in `glmkit.data.objective_config`); `glmkit.data.objectives` writes
the samples.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from glmkit.data.objective_config import ObjectiveConfig, SpecialIds
from glmkit.errors import GlmkitError


@dataclass
class Spans:
    """Spans to blank out, flat and sorted by (sample, start); `start` is relative to the sample."""
    sample: np.ndarray      # (K,) which sample
    start: np.ndarray       # (K,)
    length: np.ndarray      # (K,)
    mask_id: np.ndarray     # (K,) the token that replaces the span in Part A

    @staticmethod
    def empty() -> Spans:
        z = np.zeros(0, dtype=np.int64)
        return Spans(z, z, z, z)

    @staticmethod
    def concat(parts: list[Spans]) -> Spans:
        """Spans of several lists, sorted by (sample, start)."""
        if len(parts) == 1:
            return parts[0]
        s = Spans(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("sample", "start", "length", "mask_id")))
        order = np.lexsort((s.start, s.sample))
        return Spans(s.sample[order], s.start[order], s.length[order], s.mask_id[order])


# ---------------------------------------------------------------- flat-array helpers

def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """(S,) lengths -> (S+1,) offsets starting at 0."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _group_excl_cumsum(x: np.ndarray, group_first: np.ndarray) -> np.ndarray:
    """Exclusive running sum of x within contiguous groups; group_first[j] = index of j's group start."""
    c = np.cumsum(x) - x
    return c - c[group_first]


def _group_first(group: np.ndarray, n_groups: int) -> np.ndarray:
    """For elements sorted by group: the index of the first element of each element's group."""
    return offsets_of(np.bincount(group, minlength=n_groups))[group]


# ---------------------------------------------------------------- span lengths

@functools.lru_cache(maxsize=16)
def span_length_pmf(lam: float, max_span: int) -> np.ndarray:
    """P(length = 1..max_span) of Poisson(lam) restricted to 1..max_span (renormalised)."""
    k = np.arange(1, max_span + 1)
    p = np.exp(k * math.log(lam) - lam - np.array([math.lgamma(i + 1) for i in k]))
    return p / p.sum()


def truncated_poisson(rng: np.random.Generator, n: int, lam: float, max_span: int) -> np.ndarray:
    """n draws of span lengths from `span_length_pmf` (inverse CDF on uniforms)."""
    cdf = np.cumsum(span_length_pmf(float(lam), int(max_span)))
    return np.searchsorted(cdf, rng.random(n), side="right").clip(0, max_span - 1) + 1


def span_length_moments(lam: float, max_span: int) -> tuple[float, float]:
    """Mean and variance of the restricted Poisson span length (mean 3.157 for lam 3, 1..39)."""
    k, p = np.arange(1, max_span + 1), span_length_pmf(float(lam), int(max_span))
    mean = float((k * p).sum())
    return mean, float(((k - mean) ** 2 * p).sum())


# ---------------------------------------------------------------- span sampling

def mask_spans(lengths: np.ndarray, cfg: ObjectiveConfig, rng: np.random.Generator, mask_id: int,
               max_len: int | None = None) -> tuple[Spans, np.ndarray]:
    """[MASK] spans for samples of the given lengths: Poisson lengths drawn until the masked total
    reaches int(ratio * L), placed without overlapping or touching. Returns the spans and `ok` (S,):
    False where no placement was found in `cfg.max_tries` draws (too short, or L + 2n > max_len)."""
    L = np.asarray(lengths, dtype=np.int64)
    S = len(L)
    target = (cfg.mask_ratio * L).astype(np.int64)
    max_len = np.iinfo(np.int64).max if max_len is None else max_len
    pending = np.flatnonzero(target >= 1)
    got_sample, got_len = [], []
    slack = np.zeros(S, dtype=np.int64)   # unmasked tokens beyond the one separator between spans
    for _ in range(cfg.max_tries):
        if len(pending) == 0:
            break
        tp = target[pending]
        k = tp // 3 + 8                              # draws per sample (mean length ~3.2): enough almost always
        owner = np.repeat(np.arange(len(pending)), k)
        draws = truncated_poisson(rng, int(k.sum()), cfg.poisson_lambda, cfg.max_span)
        before = _group_excl_cumsum(draws, offsets_of(k)[owner])
        keep = before < tp[owner]                    # draw until the total reaches the target
        n = np.bincount(owner[keep], minlength=len(pending))
        masked = np.bincount(owner[keep], weights=draws[keep], minlength=len(pending)).astype(np.int64)
        Lp = L[pending]
        m = Lp - masked - (n - 1)
        fits = (masked >= tp) & (m >= 0) & (Lp + 2 * n <= max_len)
        sel = keep & fits[owner]
        got_sample.append(pending[owner[sel]])
        got_len.append(draws[sel])
        slack[pending[fits]] = m[fits]
        pending = pending[~fits]
    ok = (target >= 1)
    ok[pending] = False
    if not got_sample:
        return Spans.empty(), ok
    sample, length = np.concatenate(got_sample), np.concatenate(got_len)
    if len(got_sample) > 1:                          # spans of redraws: group them by sample
        order = np.argsort(sample, kind="stable")
        sample, length = sample[order], length[order]
    _swap_last(length, offsets_of(np.bincount(sample, minlength=S)), rng)
    return Spans(sample, _place(sample, length, slack, S, rng), length, np.full(len(sample), mask_id)), ok


def _swap_last(length: np.ndarray, first: np.ndarray, rng: np.random.Generator) -> None:
    """In each group [first[i], first[i+1]), swap the last length with a uniformly chosen one.

    The draw that crossed the target is longer on average (inspection paradox) and comes last; the
    earlier draws are exchangeable (the stopping rule sees only their sum), so this last step of a
    Fisher-Yates shuffle makes every order equally likely and no position of the document favoured."""
    lo, hi = first[:-1], first[1:]
    lo, hi = lo[hi > lo], hi[hi > lo]
    j = lo + (rng.random(len(lo)) * (hi - lo)).astype(np.int64)
    last = length[hi - 1].copy()
    length[hi - 1] = length[j]
    length[j] = last


def _place(sample: np.ndarray, length: np.ndarray, slack: np.ndarray, S: int,
           rng: np.random.Generator) -> np.ndarray:
    """Starts for spans grouped by sample: each span gets a place in 0..slack (sorted within the
    sample); span j starts at place_j + sum over earlier spans of (length + 1): the +1 keeps an
    unmasked token between neighbours, so spans never overlap or touch."""
    place = (rng.random(len(sample)) * (slack[sample] + 1)).astype(np.int64)
    m = int(slack.max(initial=0)) + 2
    place = np.sort(sample * m + place) - sample * m          # sorted within each sample
    return place + _group_excl_cumsum(length + 1, _group_first(sample, S))


def sentence_spans(tokens: np.ndarray, offsets: np.ndarray, cfg: ObjectiveConfig, specials: SpecialIds,
                   rng: np.random.Generator, max_len: int | None = None) -> tuple[Spans, np.ndarray]:
    """[sMASK] spans: whole sentences, in random order until int(ratio * L) tokens are covered.

    A sentence is a maximal run of tokens without a sentence-end id inside one sample; its end token
    stays in Part A, so two masked sentences never touch. `ok` is False where no sentence fits
    (no sentence at all, every token would be masked, or the sample would exceed max_len)."""
    L = np.diff(offsets)
    S = len(L)
    target = (cfg.mask_ratio * L).astype(np.int64)
    inside = ~np.isin(tokens, np.asarray(specials.sentence_ends, dtype=tokens.dtype))
    first = np.zeros(len(tokens), dtype=bool)
    first[offsets[:-1][L > 0]] = True
    last = np.zeros(len(tokens), dtype=bool)
    last[offsets[1:][L > 0] - 1] = True
    begins = inside & (first | np.concatenate([[True], ~inside[:-1]]))
    ends = inside & (last | np.concatenate([~inside[1:], [True]]))
    s_abs, e_abs = np.flatnonzero(begins), np.flatnonzero(ends) + 1
    owner = np.searchsorted(offsets, s_abs, side="right") - 1
    slen = e_abs - s_abs
    order = np.argsort(owner + rng.random(len(owner)), kind="stable")   # random order within each sample
    owner_o, slen_o = owner[order], slen[order]
    take = _group_excl_cumsum(slen_o, _group_first(owner_o, S)) < target[owner_o]
    chosen = np.sort(order[take])
    sample = owner[chosen]
    n = np.bincount(sample, minlength=S)
    masked = np.bincount(sample, weights=slen[chosen], minlength=S).astype(np.int64)
    ok = (target >= 1) & (n > 0) & (masked < L)
    if max_len is not None:
        ok &= L + 2 * n <= max_len
    keep = ok[sample]
    chosen, sample = chosen[keep], sample[keep]
    spans = Spans(sample, s_abs[chosen] - offsets[sample], slen[chosen], np.full(len(sample), specials.smask))
    return spans, ok


def gmask_spans(lengths: np.ndarray, cfg: ObjectiveConfig, rng: np.random.Generator, gmask_id: int,
                force_suffix: np.ndarray | None = None) -> Spans:
    """[gMASK]: one span of a uniform share in [gmask_min_ratio, gmask_max_ratio] of each sample
    (at least one token stays in Part A). With probability gmask_suffix_prob, or where force_suffix,
    it is the suffix (a prefix-LM sample: `source [gMASK] <sop> target`); else a middle infill with
    at least one token after it. Needs L >= 2."""
    L = np.asarray(lengths, dtype=np.int64)
    if len(L) and L.min() < 2:
        raise GlmkitError("[gMASK] needs samples of at least 2 tokens; drop shorter documents")
    lo = np.maximum(1, np.ceil(cfg.gmask_min_ratio * L - 1e-9)).astype(np.int64)
    hi = np.minimum(L - 1, np.floor(cfg.gmask_max_ratio * L + 1e-9)).astype(np.int64)
    lo = np.minimum(lo, hi)
    u_len, u_suffix, u_start = rng.random((3, len(L)))
    glen = lo + (u_len * (hi - lo + 1)).astype(np.int64)
    suffix = u_suffix < cfg.gmask_suffix_prob
    if force_suffix is not None:
        suffix |= force_suffix
    start = np.where(suffix, L - glen, (u_start * (L - glen)).astype(np.int64))
    idx = np.arange(len(L))
    return Spans(idx, start, glen, np.full(len(L), gmask_id))


def span_ranks(spans: Spans, n_samples: int, shuffle: bool, rng: np.random.Generator) -> np.ndarray:
    """The Part B rank of every span within its sample: a random permutation (or left to right)."""
    first = _group_first(spans.sample, n_samples)
    if not shuffle:
        return np.arange(len(spans.sample)) - first
    order = np.argsort(spans.sample + rng.random(len(spans.sample)), kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - first[order]
    return rank
