"""Corruption + packing speed of each objective, against pure Python (`glmkit bench data`).

Times `glmkit.data.batches.BatchIterator` (vectorised numpy: span sampling, Part A / Part B layout, first-fit
packing into `Batch` rows) for each objective preset, and in the same run `python_glm_batches`, a
plain pure-Python implementation of the same GLM [MASK] corruption and packing (lists and the
`random` module, one token at a time), kept here as the baseline. One thread throughout (numpy's
element-wise kernels are single-threaded; BLAS is not used) and CPU time of this process (not wall
time, which other load on a shared machine inflates), so the rates are per core.

Text: the default corpus's training documents when `data/default` exists, else synthetic Zipfian
tokens (the result says which). `bench_data` returns the numbers as a dict.
"""

from __future__ import annotations

import bisect
import math
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from glmkit.errors import GlmkitError

PRESETS = ("glm-large", "glm-10b", "glm-130b", "bert", "gpt")


@dataclass
class DataBench:
    """What `bench_data` measures (the options of `glmkit bench data`)."""
    corpus: str = "data/default"      # corpus folder; synthetic Zipfian tokens when it does not exist
    batch_size: int = 16
    seq_len: int = 1024
    tokens: int = 6_000_000           # text tokens pushed through each objective, over all rounds
    baseline_tokens: int = 900_000    # text tokens for the slower pure-Python baseline, over all rounds
    rounds: int = 3                   # timed rounds per objective; the best counts
    seed: int = 0


# ---------------------------------------------------------------- the pure-Python baseline

def python_glm_batches(documents: list[list[int]], specials, batch_size: int, seq_len: int, chunk_len: int,
                       seed: int, ratio: float = 0.15, lam: float = 3.0, max_span: int = 39):
    """Yield (rows, text_tokens) batches, each row a dict of the eight Batch fields as lists: the
    same [MASK] corruption as glmkit.data.objectives (Poisson(lam) lengths in 1..max_span until int(ratio*L)
    is reached, non-touching placement, shuffled Part B) and the same first-fit packing, in plain Python."""
    rnd = random.Random(seed)
    weights = [lam ** k * math.exp(-lam) / math.factorial(k) for k in range(1, max_span + 1)]
    cdf = [sum(weights[:k + 1]) / sum(weights) for k in range(max_span)]
    pieces = [doc[i:i + chunk_len] for doc in documents for i in range(0, len(doc), chunk_len)]
    next_piece, pending = 0, None
    while next_piece < len(pieces) or pending:
        rows = [_empty_row(seq_len, specials.pad) for _ in range(batch_size)]
        free, segments, text = [seq_len] * batch_size, [0] * batch_size, 0
        while next_piece < len(pieces) or pending:
            if pending is None:
                pending = _python_sample(pieces[next_piece], specials, rnd, cdf, ratio, seq_len)
                next_piece += 1
                if pending is None:
                    continue
            sample, n = pending, len(pending["input_ids"])
            r = next((r for r in range(batch_size) if free[r] >= n), -1)
            if r < 0:
                break                              # the sample opens the next batch
            _place_row(rows[r], sample, seq_len - free[r], segments[r])
            free[r] -= n
            segments[r] += 1
            text += sample["text"]
            pending = None
        yield rows, text


def _python_sample(tokens: list[int], sp, rnd: random.Random, cdf: list[float], ratio: float, seq_len: int):
    L = len(tokens)
    target = int(ratio * L)
    if target < 1:
        return None
    for _ in range(8):
        lengths, total = [], 0
        while total < target:
            n = bisect.bisect_right(cdf, rnd.random()) + 1
            lengths.append(min(n, len(cdf)))
            total += lengths[-1]
        slack = L - total - (len(lengths) - 1)
        if slack >= 0 and L + 2 * len(lengths) <= seq_len:
            break
    else:
        return None
    rnd.shuffle(lengths)
    places = sorted(rnd.randint(0, slack) for _ in lengths)
    spans, offset = [], 0
    for place, n in zip(places, lengths):
        spans.append((place + offset, n))
        offset += n + 1
    # Part A, one token at a time
    inp, pos, mask_pos = [], [], []
    i, j = 0, 0
    while i < L:
        if j < len(spans) and i == spans[j][0]:
            mask_pos.append(len(inp))
            inp.append(sp.mask)
            i += spans[j][1]
            j += 1
        else:
            inp.append(tokens[i])
            i += 1
        pos.append(len(pos))
    sep = len(inp)
    tgt, loss, bpos, span_ids = [0] * sep, [False] * sep, [0] * sep, [0] * sep
    order = list(range(len(spans)))
    rnd.shuffle(order)
    for s in order:
        start, n = spans[s]
        for k in range(n + 1):
            inp.append(sp.sop if k == 0 else tokens[start + k - 1])
            tgt.append(tokens[start + k] if k < n else sp.eop)
            loss.append(True)
            pos.append(mask_pos[s])
            bpos.append(k + 1)
            span_ids.append(1)
    return dict(input_ids=inp, targets=tgt, loss_mask=loss, position_ids=pos, block_position_ids=bpos,
                span_ids=span_ids, sep=sep, text=L)


def _empty_row(seq_len: int, pad: int) -> dict:
    return dict(input_ids=[pad] * seq_len, targets=[0] * seq_len, loss_mask=[False] * seq_len,
                position_ids=[0] * seq_len, block_position_ids=[0] * seq_len, segment_ids=[-1] * seq_len,
                sep=[seq_len] * seq_len, span_ids=[0] * seq_len)


def _place_row(row: dict, sample: dict, col: int, segment: int) -> None:
    for k in ("input_ids", "targets", "loss_mask", "position_ids", "block_position_ids", "span_ids"):
        for i, v in enumerate(sample[k]):
            row[k][col + i] = v
    for i in range(len(sample["input_ids"])):
        row["segment_ids"][col + i] = segment
        row["sep"][col + i] = col + sample["sep"]


# ---------------------------------------------------------------- text

def _documents(path: str, seed: int, log: Callable[[str], None]) -> tuple[list[np.ndarray], object, str]:
    """(documents, SpecialIds, description): the corpus's training split, or synthetic Zipfian text."""
    from glmkit.data.objective_config import SpecialIds
    if os.path.isdir(path):
        try:
            from glmkit.data.corpus import Corpus
            corpus = Corpus.open(path)
            docs = corpus.documents("train")
            return docs, SpecialIds.from_tokenizer(corpus.tokenizer), f"corpus {path} (train split, {len(docs)} documents)"
        except (ImportError, AttributeError, GlmkitError) as e:
            log(f"could not read {path} ({e}); using synthetic text")
    rng = np.random.default_rng(seed)
    vocab = 32000
    lengths = rng.integers(20, 2000, size=4000)
    tokens = (rng.zipf(1.2, size=int(lengths.sum())) % (vocab - 16)) + 16
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    docs = [tokens[bounds[i]:bounds[i + 1]] for i in range(len(lengths))]
    sp = SpecialIds(mask=1, smask=2, gmask=3, sop=4, eop=5, eot=0, pad=6, vocab_size=vocab,
                    sentence_ends=(16, 17))   # the two most frequent Zipf ids stand in for "." and "。"
    return docs, sp, f"synthetic Zipfian tokens (a=1.2, vocab {vocab}, {len(docs)} documents of 20..2000)"


def _iterator_rounds(docs, cfg, sp, bench):
    """Yield (text tokens, CPU seconds) of successive rounds of about tokens/rounds text each."""
    from glmkit.data.batches import BatchIterator
    it = BatchIterator(docs, cfg, sp, bench.batch_size, bench.seq_len, seed=bench.seed)
    next(it)                                     # warm up: first epoch's piece list, allocations
    while True:
        start_tokens, t0 = it.stats.text_tokens, time.process_time()
        while it.stats.text_tokens - start_tokens < bench.tokens // bench.rounds:
            next(it)
        yield it.stats.text_tokens - start_tokens, time.process_time() - t0, it.stats.efficiency


def _baseline_rounds(docs, sp, bench):
    """Yield (text tokens, CPU seconds) of the pure-Python pipeline over fresh documents each round,
    drawn in the same random order as the iterator's (the same mix of long and short documents)."""
    from glmkit.data.objective_config import ObjectiveConfig
    from glmkit.data.objectives import chunk_length
    chunk = chunk_length(ObjectiveConfig(), bench.seq_len)
    order = iter(np.random.default_rng(bench.seed).permutation(len(docs)).tolist() * 100)
    while True:
        lists, total = [], 0
        while total < bench.baseline_tokens // bench.rounds:
            d = docs[next(order)]
            lists.append(d.tolist())
            total += len(d)
        t0, n = time.process_time(), 0
        for _, text in python_glm_batches(lists, sp, bench.batch_size, bench.seq_len, chunk, bench.seed):
            n += text
        yield n, time.process_time() - t0


def bench_data(bench: DataBench, log: Callable[[str], None] | None = None) -> dict:
    """Text tokens per CPU-second of each objective preset and of the pure-Python baseline; returns the
    result dict (`glmkit bench data` prints it as its last line). `log` gets the human-readable lines."""
    from glmkit.data.objective_config import ObjectiveConfig
    log = log or (lambda line: None)
    if bench.batch_size < 1 or bench.seq_len < 64 or bench.tokens < 1 or bench.rounds < 1:
        raise GlmkitError("need --batch-size >= 1, --seq-len >= 64, --tokens >= 1 and --rounds >= 1")
    docs, sp, what = _documents(bench.corpus, bench.seed, log)
    log(f"text: {what}")
    log(f"rows {bench.batch_size} x {bench.seq_len}; one thread; text tokens per CPU-second of this process "
        f"(other load on the machine does not count), best of {bench.rounds} rounds, the GLM [MASK] rounds "
        f"interleaved with the baseline's; {platform.machine()}, {os.cpu_count()} logical CPUs")
    rates, effs, base_rates = {}, {}, []
    baseline = _baseline_rounds(docs, sp, bench)
    for name in PRESETS:
        rounds = _iterator_rounds(docs, ObjectiveConfig.from_name(name), sp, bench)
        best = 0.0
        for _ in range(bench.rounds):
            n, dt, effs[name] = next(rounds)
            best = max(best, n / dt)
            if name == "glm-large":
                bn, bdt = next(baseline)
                base_rates.append(bn / bdt)
        rates[name] = best
        log(f"  {name:10s} {best / 1e6:6.2f} M text tokens/s   packing efficiency {100 * effs[name]:.1f}%")
    base = max(base_rates)
    log(f"  {'python':10s} {base / 1e6:6.2f} M text tokens/s   pure-Python [MASK] corruption + packing "
        f"(rounds: {', '.join(f'{r / 1e6:.2f}' for r in base_rates)})")
    glm = rates["glm-large"]
    log(f"glm-large ([MASK]) vs pure Python: {glm / base:.1f}x")
    out = {"glm_tokens_per_s_per_core": round(glm), "python_baseline_tokens_per_s_per_core": round(base),
           "ratio": round(glm / base, 2), "text": "corpus" if what.startswith("corpus") else "synthetic",
           "batch_size": bench.batch_size, "seq_len": bench.seq_len, "timer": "process_time",
           "rounds": bench.rounds}
    for name in PRESETS:
        out[f"{name}_tokens_per_s_per_core"] = round(rates[name])
        out[f"{name}_packing_efficiency"] = round(effs[name], 4)
    return out
