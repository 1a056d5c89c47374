"""Baselines: what a model that ignores the context scores on each evaluation task.

An evaluation number means little alone: 0.62 sentiment accuracy is no learning when 62% of the test
reviews are positive. Every task of `glmkit.eval.evaluate` is read against one of these, computed on
exactly the examples the model is scored on:

| task | metric | baseline |
|---|---|---|
| val | bits per byte (lower is better) | unigram: each token scored by its training-corpus frequency, add-one smoothed over the vocabulary, over the same tokens and the same bytes |
| infill | token accuracy, exact match | unigram: always the training corpus's most frequent token (a span is an exact match when it is that one token) |
| cloze | accuracy | chance: 1 / number of candidates |
| sentiment | zero-shot / fine-tuned accuracy | majority class of the test reviews |

`baseline_rows(results)` lines every model number up with its baseline and says whether the model
beats it; `format_baseline_table(rows)` renders them for a terminal. Token ids and counts only: no
model, no printing.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np


def unigram_log2probs(counts: Counter, vocab_size: int) -> np.ndarray:
    """(vocab_size,) log2 p(token) of the add-one smoothed unigram model of `counts` (training token
    counts): p(t) = (count(t) + 1) / (total + vocab_size), so an unseen token costs finite bits."""
    c = np.ones(vocab_size, dtype=np.float64)
    for t, n in counts.items():
        if t < vocab_size:
            c[t] += n
    return np.log2(c / c.sum())


def scored_bytes(decode, windows: list[list[int]]) -> int:
    """UTF-8 bytes of the tokens x_2..x_n of each window (the ones a bits-per-byte score predicts)."""
    return sum(len(decode(w).encode()) - len(decode(w[:1]).encode()) for w in windows)


def unigram_bits_per_byte(windows: list[list[int]], counts: Counter, vocab_size: int, decode) -> float:
    """Bits per byte of the unigram model on tokens x_2..x_n of each window, per `scored_bytes`."""
    logp = unigram_log2probs(counts, vocab_size)
    bits = -sum(float(logp[np.asarray(w[1:], dtype=np.int64)].sum()) for w in windows)
    return bits / scored_bytes(decode, windows)


def unigram_infill(answers: list[list[int]], counts: Counter) -> dict:
    """Scores of always filling with the most frequent training token: {"token": that id,
    "token_accuracy", "exact_match"} over the spans `answers`."""
    top = counts.most_common(1)[0][0]
    n_tokens = sum(len(a) for a in answers)
    hits = sum(t == top for a in answers for t in a)
    return {"token": top, "token_accuracy": hits / max(1, n_tokens),
            "exact_match": sum(a == [top] for a in answers) / max(1, len(answers))}


def majority_share(labels: list[int]) -> float:
    """Accuracy of always answering the most frequent label."""
    return max(Counter(labels).values()) / len(labels) if labels else math.nan


# ------------------------------------------------------------------------ model vs baseline

def baseline_rows(res: dict) -> list[dict]:
    """Every scored number of an evaluation result (`glmkit.eval.evaluate.evaluate`) beside its
    baseline: dicts {"task", "metric", "model", "baseline", "basis", "lower_is_better", "beats"}.
    `beats` is False when the model is no better than the baseline (equal counts as no better)."""
    rows = []

    def add(task, metric, model, baseline, basis, lower=False):
        beats = model < baseline if lower else model > baseline
        rows.append({"task": task, "metric": metric, "model": model, "baseline": baseline, "basis": basis,
                     "lower_is_better": lower, "beats": bool(beats)})

    if "val" in res:
        v = res["val"]
        add("val", "bits/byte", v["bits_per_byte"], v["unigram_bits_per_byte"], "unigram", lower=True)
    if "infill" in res:
        f, u = res["infill"], res["infill"]["unigram"]
        add("infill", "token accuracy", f["token_accuracy"], u["token_accuracy"], "most frequent token")
        add("infill", "exact match", f["exact_match"], u["exact_match"], "most frequent token")
    if "cloze" in res:
        add("cloze", "accuracy", res["cloze"]["accuracy"], res["cloze"]["chance"], "chance")
    if "sentiment" in res:
        s = res["sentiment"]
        add("sentiment", "zero-shot accuracy", s["zero_shot"], s["majority"], "majority class")
        if "finetuned" in s:
            add("sentiment", "fine-tuned accuracy", s["finetuned"], s["majority"], "majority class")
    return rows


def format_baseline_table(rows: list[dict]) -> str:
    """The rows as an aligned text table; a model no better than its baseline is flagged."""
    head = f"{'task':<10} {'metric':<20} {'model':>8} {'baseline':>9}  {'(basis)':<22}"
    lines = [head, "-" * len(head)]
    for r in rows:
        flag = "" if r["beats"] else "  <- no better than the baseline"
        lines.append(f"{r['task']:<10} {r['metric']:<20} {r['model']:>8.3f} {r['baseline']:>9.3f}  "
                     f"{'(' + r['basis'] + ')':<22}{flag}")
    return "\n".join(lines)
