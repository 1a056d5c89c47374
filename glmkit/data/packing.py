"""Packing samples into fixed-length rows: a window of document pieces -> one `glmkit.batch.Batch`.

`pack` takes a window of samples (document pieces, flat tokens + offsets, in stream order), corrupts
them with the configured objective, and places them first-fit into `batch_size` rows of `seq_len`
tokens, in order, until one does not fit anywhere; the rest of the window is left for the next batch
(`PackResult.consumed`). Samples never see each other (segment ids); the rest of a row is padding
(segment -1, sep = T, as batch.py says). Every sample is written straight into its row, so packing
costs no extra copy.

Long documents are cut by `chunk_documents` into pieces of `chunk_length(cfg, seq_len)` tokens,
which leaves room for GLM's two extra tokens per span; each piece is its own sample.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from glmkit.batch import Batch
from glmkit.data.objective_config import ObjectiveConfig, SpecialIds
from glmkit.data.objectives import (
    GMASK,
    INT,
    KIND_NAMES,
    Samples,
    build_glm,
    chunk_length,
    clm_samples,
    draw_kinds,
    fill_runs,
    glm_spans,
    mlm_samples,
    take_samples,
)
from glmkit.data.spans import offsets_of
from glmkit.errors import GlmkitError


@dataclass
class PackStats:
    """Counts over one or more batches. Efficiency = share of row positions that hold a sample."""
    rows: int = 0
    positions: int = 0          # rows * seq_len
    samples: int = 0            # samples placed
    text_tokens: int = 0        # original document tokens placed
    processed: int = 0          # non-padding positions (Part A + Part B)
    loss_tokens: int = 0
    skipped_short: int = 0      # pieces shorter than the objective's minimum (counted, not used)
    skipped_unplaced: int = 0   # [MASK] spans could not be placed in max_tries draws
    smask_fallback: int = 0     # [sMASK] samples with no maskable sentence, built as [MASK]
    skipped_tokens: int = 0
    kind_counts: tuple[int, ...] = (0, 0, 0, 0, 0)   # samples per kind, KIND_NAMES order

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.processed / self.positions if self.positions else 0.0

    @property
    def efficiency(self) -> float:
        return 1.0 - self.padding_fraction

    def __add__(self, other: PackStats) -> PackStats:
        vals = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            vals[f.name] = tuple(x + y for x, y in zip(a, b)) if f.name == "kind_counts" else a + b
        return PackStats(**vals)

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {c}" for n, c in zip(KIND_NAMES, self.kind_counts) if c)
        return (f"{self.samples} samples ({kinds}) in {self.rows} rows: {self.text_tokens} text tokens -> "
                f"{self.processed} positions, {self.loss_tokens} loss tokens; padding "
                f"{100 * self.padding_fraction:.1f}% (packing efficiency {100 * self.efficiency:.1f}%); "
                f"skipped {self.skipped_short} too short, {self.skipped_unplaced} unplaceable "
                f"({self.skipped_tokens} tokens); {self.smask_fallback} [sMASK]->[MASK]")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["kind_counts"] = dict(zip(KIND_NAMES, self.kind_counts))
        d.update(padding_fraction=self.padding_fraction, efficiency=self.efficiency)
        return d


@dataclass
class PackResult:
    batch: Batch
    consumed: int               # samples of the window used up (placed or skipped); the rest is for later
    stats: PackStats
    samples: Samples            # the placed samples (their arrays are the flattened batch rows)
    index: np.ndarray           # (n,) window index of each placed sample (increasing)
    row: np.ndarray             # (n,) its row
    col: np.ndarray             # (n,) its first column


def chunk_documents(documents: list[np.ndarray], chunk_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut documents into pieces of at most chunk_len tokens -> flat tokens, offsets (S+1,)."""
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    tokens = np.concatenate(documents).astype(np.int64, copy=False) if len(documents) else np.zeros(0, np.int64)
    return tokens, offsets_of(chunk_lengths(lengths, chunk_len))


def chunk_lengths(lengths: np.ndarray, chunk_len: int) -> np.ndarray:
    """Piece lengths of documents cut into chunk_len pieces (the last piece of each keeps the rest)."""
    n = -(-lengths // chunk_len)
    pieces = np.full(int(n.sum()), chunk_len, dtype=np.int64)
    last = np.cumsum(n)[n > 0] - 1
    pieces[last] = lengths[n > 0] - (n[n > 0] - 1) * chunk_len
    return pieces


def first_fit(lengths: np.ndarray, usable: np.ndarray, batch_size: int,
              seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Place samples in order into the first row with room; stop at the first that fits nowhere.
    Unusable samples are consumed without a place (row -1). Returns row, col (n,), consumed."""
    if len(lengths) and int(lengths[usable].max(initial=0)) > seq_len:
        raise GlmkitError(f"a {int(lengths[usable].max())}-token sample cannot fit seq_len={seq_len}; "
                          "chunk documents with chunk_length()")
    # plain Python lists: a scan over a few open rows beats a numpy call per sample
    free = [seq_len] * batch_size
    rows, cols = [-1] * len(lengths), [0] * len(lengths)
    consumed, lo = len(lengths), 0
    smallest = int(lengths[usable].min(initial=seq_len))
    for i, (n, use) in enumerate(zip(lengths.tolist(), usable.tolist())):
        if not use:
            continue
        while lo < batch_size and free[lo] < smallest:        # rows nothing can fit any more
            lo += 1
        r = lo
        while r < batch_size and free[r] < n:
            r += 1
        if r == batch_size:
            consumed = i
            break
        rows[i], cols[i] = r, seq_len - free[r]
        free[r] -= n
    return np.array(rows[:consumed], dtype=np.int64), np.array(cols[:consumed], dtype=np.int64), consumed


def pack(tokens: np.ndarray, offsets: np.ndarray, cfg: ObjectiveConfig, specials: SpecialIds,
         rng: np.random.Generator, batch_size: int, seq_len: int) -> PackResult:
    """Corrupt a window of samples with `cfg` and pack them first-fit into a (batch_size, seq_len) Batch.

    tokens/offsets: the window (pieces no longer than chunk_length(cfg, seq_len)), in stream order."""
    L = np.diff(offsets)
    if cfg.kind == "glm":
        drawn = draw_kinds(len(L), cfg, rng)
        spans, ok, kinds = glm_spans(tokens, offsets, drawn, cfg, specials, rng, max_len=seq_len)
        n_spans = np.bincount(spans.sample, minlength=len(L))
        out_len = L + 2 * np.where(kinds == GMASK, 1, n_spans)
    else:
        ok = L >= cfg.min_length
        out_len = L
    row, col, consumed = first_fit(out_len, ok, batch_size, seq_len)
    keep = np.flatnonzero(row >= 0)
    row, col = row[keep], col[keep]
    start, size = row * seq_len + col, batch_size * seq_len
    if cfg.kind == "glm":
        several = np.bincount(row, minlength=batch_size)[row] > 1   # gMASK is the suffix in a shared row
        samples = build_glm(tokens, offsets, spans, kinds, keep, cfg, specials, rng, start, size, several)
    else:
        sub_tok, sub_off = take_samples(tokens, offsets, keep)
        samples = (mlm_samples(sub_tok, sub_off, cfg, specials, rng, start, size) if cfg.kind == "mlm"
                   else clm_samples(sub_tok, sub_off, specials, start, size))
    batch = to_batch(samples, batch_size, seq_len)
    fallback = int(((drawn != kinds)[keep]).sum()) if cfg.kind == "glm" else 0
    stats = _stats(samples, L, ok, keep, consumed, batch, cfg, fallback)
    return PackResult(batch, consumed, stats, samples, keep, row, col)


def to_batch(samples: Samples, batch_size: int, seq_len: int) -> Batch:
    """The Batch whose flattened rows are the sample arrays; adds segment ids (samples numbered left
    to right in each row, padding -1) and the absolute sep (padding: seq_len)."""
    size = batch_size * seq_len
    order = np.argsort(samples.start)
    start = samples.start[order]
    row = start // seq_len
    seg = np.arange(len(order)) - offsets_of(np.bincount(row, minlength=batch_size))[row]
    at = np.stack([start, start + samples.length[order]], 1).ravel()      # sample starts and ends, in order
    with_pad = lambda v, pad: np.stack([v, np.full(len(v), pad)], 1).ravel()
    segment = fill_runs(size, at, with_pad(seg, -1), before=-1, dtype=INT)
    sep = fill_runs(size, at, with_pad(start % seq_len + samples.part_a[order], seq_len), before=seq_len, dtype=INT)
    shape = (batch_size, seq_len)
    return Batch(input_ids=samples.input_ids.reshape(shape), targets=samples.targets.reshape(shape),
                 loss_mask=samples.loss_mask.reshape(shape), position_ids=samples.position_ids.reshape(shape),
                 block_position_ids=samples.block_position_ids.reshape(shape),
                 segment_ids=segment.reshape(shape), sep=sep.reshape(shape),
                 span_ids=samples.span_ids.reshape(shape))


def _stats(samples: Samples, L, ok, keep, consumed, batch: Batch, cfg: ObjectiveConfig, fallback: int) -> PackStats:
    used = np.arange(len(L)) < consumed
    short = used & (L < cfg.min_length)
    unplaced = used & ~ok & ~short
    return replace(_batch_stats(samples, batch), skipped_short=int(short.sum()), skipped_unplaced=int(unplaced.sum()),
                   smask_fallback=fallback, skipped_tokens=int(L[short | unplaced].sum()))


def _batch_stats(samples: Samples, batch: Batch) -> PackStats:
    return PackStats(
        rows=batch.shape[0], positions=batch.shape[0] * batch.shape[1], samples=len(samples),
        text_tokens=int((samples.length - 2 * samples.n_spans).sum()), processed=int(samples.length.sum()),
        loss_tokens=batch.num_loss_tokens, kind_counts=tuple(int(c) for c in np.bincount(samples.kind, minlength=5)))


def split_rows(res: PackResult, batch_size: int) -> list[PackResult]:
    """Cut a result packed into k * batch_size rows into k batches of batch_size rows. Counts of
    skipped pieces stay with the first; `consumed` is the whole window's on each."""
    rows, seq_len = res.batch.shape
    if rows == batch_size:
        return [res]
    out = []
    for b in range(rows // batch_size):
        mine = (res.row >= b * batch_size) & (res.row < (b + 1) * batch_size)
        samples = res.samples.select(np.flatnonzero(mine), b * batch_size * seq_len, batch_size * seq_len)
        batch = res.batch[b * batch_size:(b + 1) * batch_size]
        stats = _batch_stats(samples, batch)
        if b == 0:
            stats = replace(stats, skipped_short=res.stats.skipped_short, skipped_unplaced=res.stats.skipped_unplaced,
                            smask_fallback=res.stats.smask_fallback, skipped_tokens=res.stats.skipped_tokens)
        out.append(PackResult(batch, res.consumed, stats, samples, res.index[mine], res.row[mine] - b * batch_size,
                              res.col[mine]))
    return out


def pack_documents(documents: list[np.ndarray], cfg: ObjectiveConfig, specials: SpecialIds,
                   rng: np.random.Generator, batch_size: int, seq_len: int) -> PackResult:
    """Chunk documents and pack as many as fit into one batch (the rest is dropped): a convenience
    for tests and examples; training uses `glmkit.data.batches.BatchIterator`."""
    cfg.check(specials)
    tokens, offsets = chunk_documents(documents, chunk_length(cfg, seq_len))
    return pack(tokens, offsets, cfg, specials, rng, batch_size, seq_len)

