"""What each objective makes of real English and Chinese text, as text to read (`glmkit samples`).

For each objective ([MASK] blank infilling, [sMASK] sentences, [gMASK] generation, BERT MLM, GPT CLM)
and each language, a piece of a corpus document becomes one sample, printed as Part A (what the
model reads bidirectionally), Part B (the spans it generates, in their shuffled order, with the 2D
positions of DESIGN.md §1) and the targets; `show(..., table=True)` adds every position as a row.
"""

from __future__ import annotations

import numpy as np

from glmkit.data.objective_config import ObjectiveConfig, SpecialIds
from glmkit.data.objectives import (
    CLM,
    GMASK,
    MASK,
    MLM,
    SMASK,
    Samples,
    clm_samples,
    mlm_samples,
    random_glm_samples,
)
from glmkit.data.spans import offsets_of

TITLES = {MASK: "[MASK] blank infilling (Poisson(3) spans, 15% of tokens)",
          SMASK: "[sMASK] whole sentences (~15% of tokens)",
          GMASK: "[gMASK] one long span (50-100%): generation",
          MLM: "BERT MLM (15%: 80% [MASK], 10% random, 10% unchanged)",
          CLM: "GPT CLM (causal, next token everywhere)"}


# ---------------------------------------------------------------- picking text

def is_chinese(text: str) -> bool:
    cjk = sum("\u4e00" <= c <= "\u9fff" for c in text)
    return cjk >= 0.3 * max(1, sum(not c.isspace() for c in text))


def pick_pieces(corpus, length: int, count: int, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """{language: [token pieces]}: pieces of `length` tokens from held-out documents, starting after a
    sentence end where there is one, for English and Chinese."""
    tok = corpus.tokenizer
    ends = set(np.asarray(tok.sentence_end_ids).tolist())
    out: dict[str, list[np.ndarray]] = {"English": [], "Chinese": []}
    split = "val" if corpus.num_documents("val") else "train"
    docs = [d for d in corpus.documents(split) if len(d) > length]
    for i in rng.permutation(len(docs))[:500].tolist():          # documents in random order
        d = np.asarray(docs[i], dtype=np.int64)
        lang = "Chinese" if is_chinese(tok.decode(d[:100].tolist())) else "English"
        if len(out[lang]) < count:
            starts = [j + 1 for j in np.flatnonzero(np.isin(d[:-length], list(ends))).tolist()] or [0]
            s = starts[int(rng.integers(len(starts)))]
            out[lang].append(d[s:s + length])
    return {k: v for k, v in out.items() if v}


# ---------------------------------------------------------------- printing

def show(s: dict, tok, specials: SpecialIds, table: bool = False) -> str:
    """One sample as text: Part A, then Part B span by span with its positions and targets."""
    dec = lambda ids: tok.decode([int(i) for i in ids]).replace("\n", "⏎")
    inp, tgt, sep, kind = s["input_ids"], s["targets"], s["sep"], s["kind"]
    n = len(inp)
    lines = []
    if kind == CLM:
        lines.append(f"  causal: sep = 0; every position predicts the next token ({int(s['loss_mask'].sum())} targets)")
        lines.append(f"  input    {dec(inp)}")
    elif kind == MLM:
        sel = np.flatnonzero(s["loss_mask"])
        lines.append(f"  bidirectional: sep = {sep} (the whole sample); loss on {len(sel)} selected tokens")
        lines.append(f"  input    {dec(inp)}")
        changes = [f"{int(i)}: {dec([tgt[i]])!r}->{dec([inp[i]])!r}" for i in sel]
        lines.append(f"  targets  {'; '.join(changes)}")
    else:
        lines.append(f"  {n} positions: Part A {sep} + Part B {n - sep}; sep = {sep}")
        lines.append(f"  Part A   {dec(inp[:sep])}")
        starts = np.flatnonzero(s["block_position_ids"] == 1).tolist() + [n]
        for j, (b0, b1) in enumerate(zip(starts, starts[1:])):
            pos, bp = s["position_ids"][b0], s["block_position_ids"][b0:b1]
            lines.append(f"  Part B {j + 1}: position {pos}, block positions {bp[0]}..{bp[-1]}, span id {s['span_ids'][b0]}")
            lines.append(f"     input   {dec(inp[b0:b1])}")
            lines.append(f"     target  {dec(tgt[b0:b1])}")
    if table:
        lines.append("     #  input            target           pos  block  loss  span")
        for i in range(n):
            t = dec([tgt[i]]) if s["loss_mask"][i] else "-"
            lines.append(f"  {i:4d}  {dec([inp[i]])[:16]:16s} {t[:16]:16s} {s['position_ids'][i]:4d} {s['block_position_ids'][i]:6d}"
                         f"  {int(s['loss_mask'][i]):4d}  {s['span_ids'][i]:4d}" + ("   <- sep" if i == sep else ""))
    return "\n".join(lines)


def make(kind: int, pieces: list[np.ndarray], cfg: ObjectiveConfig, specials: SpecialIds,
         rng: np.random.Generator) -> list[dict]:
    """One sample per piece with the given objective kind."""
    if kind in (MASK, SMASK, GMASK):
        samples, _ = random_glm_samples(pieces, cfg, specials, rng, kinds=np.full(len(pieces), kind, np.int8))
    else:
        tokens = np.concatenate(pieces).astype(np.int64)
        offsets = offsets_of(np.array([len(p) for p in pieces]))
        samples: Samples = (mlm_samples(tokens, offsets, ObjectiveConfig(kind="mlm"), specials, rng) if kind == MLM
                            else clm_samples(tokens, offsets, specials))
    return [samples.sample(i) for i in range(len(samples))]
