"""The pretraining objectives as pure numpy functions over token arrays (DESIGN.md §1).

GLM autoregressive blank infilling (`[MASK]` Poisson spans, `[sMASK]` whole sentences, `[gMASK]` one
long span: middle infill or prefix-LM), BERT-style MLM and GPT-style CLM all produce `Samples`: many
samples written back to back into flat arrays, each sample laid out as its Part A then its Part B.
`glmkit.data.packing` writes them straight into the rows of a `glmkit.batch.Batch`.

This file holds how long a document piece may be (`chunk_length`) and the builders that write
samples: `build_infill` (GLM Part A / Part B from given spans), `mlm_samples`, `clm_samples`, and the
GLM pipeline (`draw_kinds`, `glm_spans`, `build_glm`). What to train on (`ObjectiveConfig` and its presets, `SpecialIds`) is in
`glmkit.data.objective_config`; which tokens the GLM spans cover is drawn in `glmkit.data.spans`.

Everything is vectorised over all samples of a batch at once: documents come in as one flat token
array plus offsets (`tokens[offsets[i]:offsets[i+1]]` is sample i), spans as flat arrays sorted by
(sample, start). No model, no torch, no tokenizer import: special ids come in as `SpecialIds`.

One GLM sample (the worked example of DESIGN.md §1: tokens t0..t6, spans (t2) and (t5 t6), Part B
order second span first):

    input      t0 t1 [M] t3 t4 [M] | <sop> t5 t6  <sop> t2
    target      .  .  .   .  .  .  |  t5   t6 <eop> t2 <eop>
    position    0  1  2   3  4  5  |  5    5  5     2   2
    block pos   0  0  0   0  0  0  |  1    2  3     1   2
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glmkit.data.objective_config import ObjectiveConfig, SpecialIds
from glmkit.data.spans import (
    Spans,
    gmask_spans,
    mask_spans,
    offsets_of,
    sentence_spans,
    span_length_moments,
    span_ranks,
)
from glmkit.errors import GlmkitError

# Which objective built a sample (`Samples.kind`).
MASK, SMASK, GMASK, MLM, CLM = range(5)
KIND_NAMES = ("[MASK]", "[sMASK]", "[gMASK]", "MLM", "CLM")




@dataclass
class Samples:
    """Samples written into flat arrays: sample i occupies `[start[i], start[i] + length[i])`, Part A
    first (`part_a[i]` tokens), then Part B. Positions between samples keep their fill values."""
    input_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    position_ids: np.ndarray
    block_position_ids: np.ndarray
    span_ids: np.ndarray    # 0 in Part A; Part B: 1 (glm layout) or 1 + rank of the span (span layout)
    start: np.ndarray       # (S,)
    length: np.ndarray      # (S,)
    part_a: np.ndarray      # (S,) |A|: sep relative to the sample start
    kind: np.ndarray        # (S,) MASK .. CLM
    n_spans: np.ndarray     # (S,)

    def __len__(self) -> int:
        return len(self.start)

    def select(self, idx: np.ndarray, offset: int = 0, size: int | None = None) -> Samples:
        """Samples idx, which lie in [offset, offset + size) of the arrays, as their own Samples."""
        size = len(self.input_ids) - offset if size is None else size
        flat = {f: getattr(self, f)[offset:offset + size] for f in
                ("input_ids", "targets", "loss_mask", "position_ids", "block_position_ids", "span_ids")}
        return Samples(**flat, start=self.start[idx] - offset, length=self.length[idx], part_a=self.part_a[idx],
                       kind=self.kind[idx], n_spans=self.n_spans[idx])

    def sample(self, i: int) -> dict[str, np.ndarray | int]:
        """Sample i as a dict of its arrays, plus `sep` and `kind`."""
        sl = slice(int(self.start[i]), int(self.start[i] + self.length[i]))
        out = {f: getattr(self, f)[sl] for f in
               ("input_ids", "targets", "loss_mask", "position_ids", "block_position_ids", "span_ids")}
        out.update(sep=int(self.part_a[i]), kind=int(self.kind[i]))
        return out


# ---------------------------------------------------------------- how long a document piece may be

def max_glm_length(cfg: ObjectiveConfig, seq_len: int) -> int:
    """The longest document chunk whose [MASK] sample (L + 2 * n_spans tokens) fits seq_len except in
    rare draws (the expected span count plus four standard deviations); the rest are redrawn."""
    mean, var = span_length_moments(cfg.poisson_lambda, cfg.max_span)
    L = np.arange(1, seq_len + 1)
    t = np.floor(cfg.mask_ratio * L)
    n_hi = np.ceil(t / mean + 2 + 4 * np.sqrt(t * var / mean ** 3))
    fits = L + 2 * n_hi <= seq_len
    return int(L[fits].max()) if fits.any() else 0


def chunk_length(cfg: ObjectiveConfig, seq_len: int) -> int:
    """Longest piece of a document that becomes one sample fitting a row of seq_len tokens: the row for
    MLM and CLM, the row less [gMASK]'s two tokens when every sample is a [gMASK] one, else the
    [MASK] bound of `max_glm_length` (~91% of a long row: 2 tokens per ~3.2 masked)."""
    if cfg.kind != "glm":
        return seq_len
    if cfg.mixture[0] == cfg.mixture[1] == 0 and seq_len - 2 >= cfg.min_length:
        return seq_len - 2
    c = max_glm_length(cfg, seq_len)
    if c < cfg.min_length:
        need = next(T for T in range(seq_len, 100 * seq_len + 100) if max_glm_length(cfg, T) >= cfg.min_length)
        raise GlmkitError(f"seq_len={seq_len} is too small for GLM samples (a document piece plus 2 tokens per "
                          f"span must fit); use seq_len >= {need}")
    return c


# ---------------------------------------------------------------- building samples

# Dtype of every token / position array the builders write (Batch.to() widens to int64 for torch).
INT = np.int32


def _alloc(size: int, pad_id: int) -> dict[str, np.ndarray]:
    return dict(input_ids=np.full(size, pad_id, dtype=INT), targets=np.zeros(size, dtype=INT),
                loss_mask=np.zeros(size, dtype=bool), position_ids=np.zeros(size, dtype=INT),
                block_position_ids=np.zeros(size, dtype=INT), span_ids=np.zeros(size, dtype=INT))


def fill_runs(size: int, at: np.ndarray, values: np.ndarray, before: int = 0, dtype=np.int64) -> np.ndarray:
    """(size,) array equal to values[j] from position at[j] up to the next position (`before` ahead
    of at[0]); `at` non-decreasing, positions >= size ignored, of equal positions the last wins.

    The step function is written as its jumps and summed up: one cumulative sum instead of a repeat
    and a gather per element, which is what makes the builders fast."""
    at, values = np.asarray(at), np.asarray(values, dtype=dtype)
    if len(at) > 1:
        last = np.ones(len(at), dtype=bool)
        last[:-1] = at[1:] != at[:-1]
        at, values = at[last], values[last]
    z = np.zeros(size + 1, dtype=dtype)
    z[at] = np.diff(values, prepend=dtype(before)) if len(at) else 0
    z[0] += before
    return np.cumsum(z[:size], dtype=dtype)


def take_samples(tokens: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The samples idx (increasing) of a flat token array, as a new (tokens, offsets)."""
    L = np.diff(offsets)
    if len(idx) == 0 or (idx[0] == 0 and idx[-1] == len(idx) - 1):     # a prefix: no copy
        return tokens[:offsets[len(idx)]], offsets[:len(idx) + 1]
    chosen = np.zeros(len(L), dtype=bool)
    chosen[idx] = True
    return tokens[np.repeat(chosen, L)], offsets_of(L[idx])


def build_infill(tokens: np.ndarray, offsets: np.ndarray, spans: Spans, rank: np.ndarray, specials: SpecialIds,
                 layout: str = "glm", start: np.ndarray | None = None, size: int | None = None,
                 kind: np.ndarray | None = None) -> Samples:
    """GLM samples: Part A = the text with each span replaced by its mask token (original order),
    Part B = for each span in `rank` order, `<sop>` + the span, targets the span + `<eop>`.

    tokens/offsets: the original samples (flat, none empty); spans sorted by (sample, start),
    non-overlapping; rank: (K,) Part B order within each sample. Sample i is written at `start[i]` of
    arrays of `size` (default: back to back)."""
    L = np.diff(offsets)
    S = len(L)
    n = np.bincount(spans.sample, minlength=S)
    masked = np.bincount(spans.sample, weights=spans.length, minlength=S).astype(np.int64)
    a_len, b_len = L - masked + n, masked + n
    if start is None:
        start = offsets_of(a_len + b_len)[:-1]
        size = int((a_len + b_len).sum())
    out = _alloc(size, specials.pad)
    abs_start = offsets[spans.sample] + spans.start
    mask_pos = _write_part_a(out, tokens, spans, abs_start, a_len, start)
    _write_part_b(out, tokens, spans, abs_start, rank, mask_pos, start + a_len, b_len, specials, layout)
    kind = np.full(S, MASK, dtype=np.int8) if kind is None else kind
    return Samples(**out, start=start, length=a_len + b_len, part_a=a_len, kind=kind, n_spans=n)


def _write_part_a(out: dict, tokens: np.ndarray, spans: Spans, abs_start: np.ndarray, a_len: np.ndarray,
                  start: np.ndarray) -> np.ndarray:
    """Write every Part A; return the position of each span's mask token in its Part A.

    Over all Part As concatenated, element i is token i + (tokens removed before it), except each
    span's first token, which becomes its mask token (at `mask_a`)."""
    a_off = offsets_of(a_len)
    NA = int(a_off[-1])
    a_idx = np.arange(NA, dtype=np.int64)
    removed = np.cumsum(spans.length - 1)                  # span tokens dropped up to each span's end
    mask_a = abs_start - (removed - (spans.length - 1))
    a_tok = tokens[a_idx + fill_runs(NA, mask_a + 1, removed)]
    a_tok[mask_a] = spans.mask_id
    a_dest = a_idx + fill_runs(NA, a_off[:-1], start - a_off[:-1])
    out["input_ids"][a_dest] = a_tok
    out["position_ids"][a_dest] = a_idx - fill_runs(NA, a_off[:-1], a_off[:-1])
    return mask_a - a_off[spans.sample]


def _write_part_b(out: dict, tokens: np.ndarray, spans: Spans, abs_start: np.ndarray, rank: np.ndarray,
                  mask_pos: np.ndarray, b_start: np.ndarray, b_len: np.ndarray, specials: SpecialIds,
                  layout: str) -> None:
    """Write every Part B (at b_start of each sample): spans in (sample, rank) order, block j =
    <sop> + span j as inputs, span j + <eop> as targets, at its mask's position, block positions 1.."""
    border = np.lexsort((rank, spans.sample))
    bo = offsets_of(spans.length[border] + 1)
    NB, b0 = int(bo[-1]), bo[:-1]
    b_idx = np.arange(NB, dtype=np.int64)
    k = b_idx - fill_runs(NB, b0, b0)                        # 0 = <sop>, then the span
    b_in = tokens[b_idx + fill_runs(NB, b0, abs_start[border] - b0) - 1]
    b_in[b0] = specials.sop
    b_tgt = np.empty(NB, dtype=b_in.dtype)
    b_tgt[:-1] = b_in[1:]                                    # teacher forcing: target = next input ...
    b_tgt[bo[1:] - 1] = specials.eop                         # ... and <eop> closes every span
    b_dest = b_idx + fill_runs(NB, b0, (b_start - offsets_of(b_len)[:-1])[spans.sample[border]])
    out["input_ids"][b_dest] = b_in
    out["targets"][b_dest] = b_tgt
    out["loss_mask"][b_dest] = True
    out["position_ids"][b_dest] = fill_runs(NB, b0, mask_pos[border])
    out["block_position_ids"][b_dest] = k + 1
    out["span_ids"][b_dest] = 1 if layout == "glm" else fill_runs(NB, b0, rank[border] + 1)


def mlm_samples(tokens: np.ndarray, offsets: np.ndarray, cfg: ObjectiveConfig, specials: SpecialIds,
                rng: np.random.Generator, start: np.ndarray | None = None, size: int | None = None) -> Samples:
    """BERT MLM: round(ratio * L) tokens of each sample selected (at least one); of those
    mlm_mask_prob become [MASK], mlm_random_prob a random non-special token, the rest stay. Fully
    bidirectional (sep = sample end); loss on the selected tokens, targets the original tokens."""
    L = np.diff(offsets)
    S, N = len(L), int(offsets[-1])
    start, size, dest, pos = _plain_dest(L, offsets, start, size)
    out = _alloc(size, specials.pad)
    count = np.maximum(1, np.rint(cfg.mask_ratio * L)).astype(np.int64)
    selected = _random_subsets(L, offsets, count, pos, rng)
    u = rng.random(N)
    pool = specials.random_pool()
    random_tok = pool[rng.integers(0, len(pool), N)]
    inp = np.where(selected & (u < cfg.mlm_mask_prob), specials.mask, tokens)
    inp = np.where(selected & (u >= cfg.mlm_mask_prob) & (u < cfg.mlm_mask_prob + cfg.mlm_random_prob), random_tok, inp)
    out["input_ids"][dest] = inp
    out["targets"][dest] = np.where(selected, tokens, 0)
    out["loss_mask"][dest] = selected
    out["position_ids"][dest] = pos
    return Samples(**out, start=start, length=L.copy(), part_a=L.copy(), kind=np.full(S, MLM, dtype=np.int8),
                   n_spans=np.zeros(S, dtype=np.int64))


def _random_subsets(L: np.ndarray, offsets: np.ndarray, count: np.ndarray, pos: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """(N,) bool: count[i] positions of sample i, chosen uniformly without replacement.

    Each token gets the key (sample, random, position) packed into one int64 (21 + 22 + 20 bits):
    sorting plain integers is several times faster than an argsort, and the position comes back
    from the low bits. The first count[i] keys of each sample win."""
    S, N = len(L), int(offsets[-1])
    if S >= 1 << 21 or (len(L) and int(L.max()) >= 1 << 20):
        raise GlmkitError("MLM selection supports up to 2M samples of up to 1M tokens per call; pack fewer")
    owner = np.repeat(np.arange(S, dtype=np.int64), L)
    key = (owner << 42) | (rng.integers(0, 1 << 22, N, dtype=np.int64) << 20) | pos
    key.sort()
    owner = key >> 42
    rank = np.arange(N) - offsets[owner]                               # rank in the random order
    chosen = rank < count[owner]
    selected = np.zeros(N, dtype=bool)
    selected[(offsets[owner] + (key & ((1 << 20) - 1)))[chosen]] = True
    return selected


def clm_samples(tokens: np.ndarray, offsets: np.ndarray, specials: SpecialIds,
                start: np.ndarray | None = None, size: int | None = None) -> Samples:
    """GPT CLM: the sample itself, each position predicting the next token of the sample (the last
    position has no target). Causal: sep = sample start."""
    L = np.diff(offsets)
    S = len(L)
    start, size, dest, pos = _plain_dest(L, offsets, start, size)
    out = _alloc(size, specials.pad)
    has_next = np.ones(len(tokens), dtype=bool)
    has_next[offsets[1:][L > 0] - 1] = False
    out["input_ids"][dest] = tokens
    out["targets"][dest[:-1]] = tokens[1:]
    out["targets"][dest[~has_next]] = 0
    out["loss_mask"][dest] = has_next
    out["position_ids"][dest] = pos
    return Samples(**out, start=start, length=L.copy(), part_a=np.zeros(S, dtype=np.int64),
                   kind=np.full(S, CLM, dtype=np.int8), n_spans=np.zeros(S, dtype=np.int64))


def _plain_dest(L, offsets, start, size):
    """Where each token of same-length samples (MLM, CLM) goes, and its position in its sample."""
    if start is None:
        start, size = offsets[:-1].copy(), int(offsets[-1])
    N = int(offsets[-1])
    idx = np.arange(N, dtype=np.int64)
    return start, size, idx + fill_runs(N, offsets[:-1], start - offsets[:-1]), idx - fill_runs(N, offsets[:-1], offsets[:-1])


# ---------------------------------------------------------------- one document at a time

def glm_sample(tokens, spans: list[tuple[int, int]], specials: SpecialIds, order: list[int] | None = None,
               mask_id: int | None = None, layout: str = "glm") -> dict[str, np.ndarray | int]:
    """One GLM sample from explicit spans [(start, length), ...] (left to right) and a Part B
    order (span indices, first to last; default left to right). For tests, examples and inference."""
    tokens = np.asarray(tokens, dtype=np.int64)
    spans = sorted(spans)
    for (s0, l0), (s1, _) in zip(spans, spans[1:]):
        if s0 + l0 >= s1:
            raise GlmkitError(f"spans {spans} overlap or touch; leave at least one token between spans")
    if spans and (spans[0][0] < 0 or spans[-1][0] + spans[-1][1] > len(tokens) or min(s[1] for s in spans) < 1):
        raise GlmkitError(f"spans {spans} fall outside the {len(tokens)}-token document or are empty")
    order = list(range(len(spans))) if order is None else list(order)
    if sorted(order) != list(range(len(spans))):
        raise GlmkitError(f"order {order} is not a permutation of the {len(spans)} spans")
    rank = np.empty(len(spans), dtype=np.int64)
    rank[order] = np.arange(len(spans))
    K = len(spans)
    sp = Spans(np.zeros(K, dtype=np.int64), np.array([s for s, _ in spans], dtype=np.int64),
               np.array([n for _, n in spans], dtype=np.int64), np.full(K, specials.mask if mask_id is None else mask_id))
    return build_infill(tokens, np.array([0, len(tokens)]), sp, rank, specials, layout).sample(0)


def random_glm_samples(documents: list[np.ndarray], cfg: ObjectiveConfig, specials: SpecialIds,
                       rng: np.random.Generator, kinds: np.ndarray | None = None) -> tuple[Samples, np.ndarray]:
    """GLM samples of whole documents (no packing, no length limit), each of the kind in `kinds`
    (default: drawn from cfg.mixture). Documents that cannot be masked are left out; returns the
    samples and the index of the document each came from. For inspection and tests."""
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    tokens = np.concatenate(documents).astype(np.int64) if documents else np.zeros(0, np.int64)
    offsets = offsets_of(lengths)
    if kinds is None:
        kinds = draw_kinds(len(documents), cfg, rng)
    spans, ok, kinds = glm_spans(tokens, offsets, kinds, cfg, specials, rng)
    keep = np.flatnonzero(ok)
    return build_glm(tokens, offsets, spans, kinds, keep, cfg, specials, rng), keep


def draw_kinds(n: int, cfg: ObjectiveConfig, rng: np.random.Generator) -> np.ndarray:
    """The mask kind (MASK/SMASK/GMASK) of n samples, per sample or one for all (cfg.mix_per)."""
    if max(cfg.mixture) == 1.0:                 # one kind only: no draw
        return np.full(n, cfg.mixture.index(1.0), dtype=np.int8)
    cdf = np.cumsum(cfg.mixture)
    u = rng.random(1 if cfg.mix_per == "batch" else n)
    k = np.searchsorted(cdf / cdf[-1], u, side="right").clip(0, 2).astype(np.int8)
    return np.broadcast_to(k, (n,)).copy()


def glm_spans(tokens: np.ndarray, offsets: np.ndarray, kinds: np.ndarray, cfg: ObjectiveConfig,
              specials: SpecialIds, rng: np.random.Generator,
              max_len: int | None = None) -> tuple[Spans, np.ndarray, np.ndarray]:
    """[MASK] and [sMASK] spans for the samples of those kinds ([gMASK] spans are drawn later, by
    `build_glm`, once packing knows whether a row holds several samples). Samples whose sentences
    cannot be masked fall back to [MASK]. Returns spans, ok (S,), and the kinds actually used."""
    L = np.diff(offsets)
    kinds = kinds.copy()
    ok = L >= cfg.min_length
    parts = []
    sm = np.flatnonzero((kinds == SMASK) & ok)
    if len(sm):
        sp, sm_ok = sentence_spans(*take_samples(tokens, offsets, sm), cfg, specials, rng, max_len)
        parts.append(Spans(sm[sp.sample], sp.start, sp.length, sp.mask_id))
        kinds[sm[~sm_ok]] = MASK
    mk = np.flatnonzero((kinds == MASK) & ok)
    if len(mk):
        sp, mk_ok = mask_spans(L[mk], cfg, rng, specials.mask, max_len)
        parts.append(Spans(mk[sp.sample], sp.start, sp.length, sp.mask_id))
        ok[mk[~mk_ok]] = False
    spans = Spans.concat(parts) if parts else Spans.empty()
    return spans, ok, kinds


def build_glm(tokens: np.ndarray, offsets: np.ndarray, spans: Spans, kinds: np.ndarray, keep: np.ndarray,
              cfg: ObjectiveConfig, specials: SpecialIds, rng: np.random.Generator,
              start: np.ndarray | None = None, size: int | None = None,
              force_suffix: np.ndarray | None = None) -> Samples:
    """Build the samples `keep` (indices, increasing) of a window: draws the [gMASK] spans (suffix
    forced where force_suffix, aligned with keep), the Part B order, and writes Part A / Part B."""
    L = np.diff(offsets)
    sub_L = L[keep]
    remap = np.full(len(L), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    sel = remap[spans.sample] >= 0
    parts = [Spans(remap[spans.sample[sel]], spans.start[sel], spans.length[sel], spans.mask_id[sel])] if len(spans.sample) else []
    sub_kinds = kinds[keep]
    g = np.flatnonzero(sub_kinds == GMASK)
    if len(g):
        sp = gmask_spans(sub_L[g], cfg, rng, specials.gmask, None if force_suffix is None else force_suffix[g])
        parts.append(Spans(g[sp.sample], sp.start, sp.length, sp.mask_id))
    sub_spans = Spans.concat(parts) if parts else Spans.empty()
    sub_tok, sub_off = take_samples(tokens, offsets, keep)
    rank = span_ranks(sub_spans, len(keep), cfg.shuffle_spans, rng)
    return build_infill(sub_tok, sub_off, sub_spans, rank, specials, cfg.layout, start, size, sub_kinds)

