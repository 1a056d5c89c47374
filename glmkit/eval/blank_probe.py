"""The blank probe: how a GLM reads whole-word blanks cut at random from held-out text.

    blanks = word_blanks(corpus.documents("val"), tok, n_latin=100, n_cjk=100, seed=0)
    readings = read_blanks(model, tok, blanks)          # one BlankReading per blank
    summary = summarize(blanks, readings)               # aggregate numbers
    baseline = unigram_readings(blanks, counts)         # the same numbers for a unigram model

A blank is one whole word of running text: a Latin word of 3+ letters (a token that starts with a
space and a letter, plus the letter-only tokens that continue it) or one token of Chinese characters.
Blanks are drawn uniformly (seeded) from every such word of the documents given, with up to 48
tokens of left and 16 of right context from the same document: not hand-picked, so what the probe
shows is what the model does on ordinary text.

For each blank the model reads `left [MASK] right` as Part A and `<sop>` at (mask position, 1), as in
pretraining (DESIGN.md §1). `read_blanks` reports
- the probability of the true first token of the word there, and its rank among the whole
  vocabulary (1 = the model's first choice; 1 + the number of tokens given a higher probability),
- the top-k candidates with their probabilities,
- the greedy fill, decoded with the KV cache until `<eop>` (`glmkit.infer.engine.Engine`) where it
  can still match the answer or is shown (`read_blanks`).
The numbers come from a batched forward over scoring rows (`glmkit.eval.scoring.build_rows`); the
test compares them with a direct forward of one GLM sample under the dense reference mask.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from glmkit.errors import GlmkitError
from glmkit.eval.scoring import build_rows
from glmkit.eval.tasks import Choice

LEFT_CONTEXT, RIGHT_CONTEXT = 48, 16
_LATIN_START = re.compile(r" [A-Za-z]+")
_LATIN_REST = re.compile(r"[a-z]+")
_CJK = re.compile(r"[\u4e00-\u9fff]+")


@dataclass
class WordBlank:
    """`left + [blank] + right`; `answer` the ids of the word; `script` "latin" or "cjk"."""
    left: list[int]
    right: list[int]
    answer: list[int]
    script: str


@dataclass
class BlankReading:
    """What a model makes of one blank (module docstring)."""
    fill: list[int]                 # greedy fill up to <eop>
    p_first: float                  # probability of the true first token at <sop>
    rank_first: int                 # its rank among the vocabulary, 1 = most probable
    top: list[tuple[int, float]]    # the top-k (token id, probability), most probable first
    fill_complete: bool = True      # False: `fill` is only the greedy first token (see read_blanks)


def _token_kinds(tok) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per vocabulary id: starts a Latin word, continues one, is a run of Chinese characters."""
    texts = [tok.decode([i]) for i in range(tok.vocab_size)]
    start = np.array([bool(_LATIN_START.fullmatch(t)) for t in texts])
    rest = np.array([bool(_LATIN_REST.fullmatch(t)) for t in texts])
    cjk = np.array([bool(_CJK.fullmatch(t)) for t in texts])
    special = np.asarray(sorted(tok.special_ids), dtype=np.int64)
    for a in (start, rest, cjk):
        a[special[special < len(a)]] = False
    return start, rest, cjk


def _word_end(doc: np.ndarray, i: int, rest: np.ndarray) -> int:
    j = i + 1
    while j < len(doc) and rest[doc[j]]:
        j += 1
    return j


def word_blanks(docs, tok, n_latin: int, n_cjk: int, seed: int = 0, min_letters: int = 3) -> list[WordBlank]:
    """`n_latin` Latin-word and `n_cjk` Chinese-token blanks drawn uniformly without replacement from
    the words of `docs` (token arrays) that have 8+ tokens of left and 4+ of right context; Latin
    first, then Chinese, each in the drawn order. Fewer when the documents hold fewer such words."""
    start, rest, cjk = _token_kinds(tok)
    found = {"latin": [], "cjk": []}
    for d, doc in enumerate(docs):
        doc = np.asarray(doc, dtype=np.int64)
        for i in np.flatnonzero(start[doc] | cjk[doc]).tolist():
            if i < 8:
                continue
            script = "latin" if start[doc[i]] else "cjk"
            end = _word_end(doc, i, rest) if script == "latin" else i + 1
            if end + 4 > len(doc):
                continue
            if script == "latin" and len(tok.decode(doc[i:end].tolist()).strip()) < min_letters:
                continue
            found[script].append((d, i, end))
    rng = np.random.default_rng(seed)
    out = []
    for script, n in (("latin", n_latin), ("cjk", n_cjk)):
        pool = found[script]
        for k in rng.permutation(len(pool))[:n].tolist():
            d, i, end = pool[k]
            doc = [int(x) for x in docs[d]]
            out.append(WordBlank(doc[max(0, i - LEFT_CONTEXT):i], doc[end:end + RIGHT_CONTEXT], doc[i:end], script))
    if not out and (n_latin or n_cjk):
        raise GlmkitError("the held-out documents hold no whole word with 8 tokens of context before it; "
                          "use a corpus with longer validation documents")
    return out


@torch.no_grad()
def first_token_probs(model, tok, blanks: list[WordBlank]) -> torch.Tensor:
    """(len(blanks), vocab) probabilities of the first token of each blank at its `<sop>` (fp32)."""
    from glmkit.data.objective_config import SpecialIds
    sp = SpecialIds.from_tokenizer(tok)
    rows = build_rows([Choice(b.left, b.right, [b.answer], 0) for b in blanks], "glm", sp,
                      model.config.max_position_embeddings)
    batch = rows.batch.to(next(model.parameters()).device)
    h = model(batch.input_ids, batch.position_ids, batch.block_position_ids, model.attention_mask(batch))
    loss_at = batch.loss_mask.reshape(-1).nonzero().squeeze(-1)             # (N,) row-major loss positions
    first = torch.from_numpy(np.unique(rows.example, return_index=True)[1]).to(loss_at.device)
    hidden = h.reshape(-1, h.shape[-1]).index_select(0, loss_at.index_select(0, first))
    return torch.softmax(model.logits(hidden).float(), dim=-1)


def greedy_fills(model, tok, blanks: list[WordBlank], limits: list[int]) -> list[list[int]]:
    """Each blank filled greedily with the KV cache until `<eop>` or `limits[i]` tokens."""
    from glmkit.infer.engine import Engine, Request
    from glmkit.infer.sampling import SamplingConfig
    if not blanks:
        return []
    cfg = SamplingConfig(max_new_tokens=max(limits))
    reqs = [Request.infill(b.left + [tok.mask_id] + b.right, [len(b.left)], cfg, max_new_tokens=n)
            for b, n in zip(blanks, limits)]
    engine = Engine(model, tok, max_batch=len(blanks), max_len=max(len(r.prompt) for r in reqs) + max(limits) + 1)
    return [r.tokens[0] for r in engine.generate(reqs)]


def read_blanks(model, tok, blanks: list[WordBlank], top_k: int = 5, batch_size: int = 32,
                max_new_tokens: int = 8, shown: set[int] | frozenset = frozenset()) -> list[BlankReading]:
    """The model's reading of every blank (module docstring), `batch_size` blanks per forward.

    The greedy fill's first token is the argmax of the first-token distribution. The fill is decoded
    further (until `<eop>`, at most `max_new_tokens`) only where it could still be the answer (that
    first token is the answer's; then at most two tokens past the answer's length) and for the blanks
    whose indices are in `shown`; elsewhere `fill` is that first token alone and `fill_complete` False:
    decoding is most of the probe's cost, and it cannot change an exact-match count."""
    model.eval()
    out = []
    for s in range(0, len(blanks), batch_size):
        part = blanks[s:s + batch_size]
        probs = first_token_probs(model, tok, part)
        first = probs.argmax(-1).tolist()
        limits = {i: max_new_tokens if s + i in shown else min(max_new_tokens, len(b.answer) + 2)
                  for i, b in enumerate(part) if s + i in shown or first[i] == b.answer[0]}
        decoded = dict(zip(limits, greedy_fills(model, tok, [part[i] for i in limits], list(limits.values()))))
        top_p, top_i = probs.topk(top_k, dim=-1)
        for i, (b, p, tp, ti) in enumerate(zip(part, probs, top_p.tolist(), top_i.tolist())):
            p_true = p[b.answer[0]]
            out.append(BlankReading(decoded.get(i, [first[i]]), float(p_true), int((p > p_true).sum()) + 1,
                                    list(zip(ti, tp)), i in decoded))
    return out


def unigram_readings(blanks: list[WordBlank], counts: Counter, vocab_size: int, top_k: int = 5) -> list[BlankReading]:
    """What a unigram model of the training counts (add-one smoothed) makes of the same blanks: the
    same first-token probability and rank for every context, and the most frequent token as the fill."""
    c = np.ones(vocab_size, dtype=np.float64)
    for t, n in counts.items():
        if t < vocab_size:
            c[t] += n
    p = c / c.sum()
    order = np.argsort(-p, kind="stable")
    top = [(int(i), float(p[i])) for i in order[:top_k]]
    return [BlankReading([int(order[0])], float(p[b.answer[0]]), int((p > p[b.answer[0]]).sum()) + 1, top)
            for b in blanks]


def summarize(blanks: list[WordBlank], readings: list[BlankReading]) -> dict:
    """Aggregates over the blanks: exact greedy fills, first token ranked 1 / in the top 10, median
    rank and mean probability of the first token; per script too ("latin", "cjk")."""
    def agg(pairs):
        if not pairs:
            return {"n": 0}
        ranks = np.array([r.rank_first for _, r in pairs])
        return {"n": len(pairs), "exact": float(np.mean([r.fill == b.answer for b, r in pairs])),
                "top1": float(np.mean(ranks == 1)), "top10": float(np.mean(ranks <= 10)),
                "median_rank": float(np.median(ranks)), "mean_p_first": float(np.mean([r.p_first for _, r in pairs]))}
    pairs = list(zip(blanks, readings))
    return {"all": agg(pairs), **{s: agg([(b, r) for b, r in pairs if b.script == s]) for s in ("latin", "cjk")}}
