"""Cloze scoring: the log-likelihood of candidate fillings of a blank, for GLM, MLM and CLM models.

Each objective reads a blank the way it was trained to:

- `glm`: Part A = `left [MASK] right`, read once; every candidate is its own Part B run
  `<sop> c_1 .. c_n` predicting `c_1 .. c_n <eop>` at (mask position, 1..n+1). All candidates of a
  blank sit in ONE row after a single copy of Part A, each with its own span id, so by the batch rule
  (`k < sep or (k <= q and same span)`) a candidate sees Part A and its own earlier tokens only: Part A
  is computed once and each candidate scores exactly as if it were alone (the `span` layout of
  DESIGN.md §1). Score = log p(c, <eop> | A).
- `mlm`: `left [MASK]*n right`, fully bidirectional; score = sum_i log p(c_i) at the masks (BERT reads
  the candidate's length from the number of masks). One row per candidate.
- `clm`: `left c right`, causal; score = log p(c right | left) (the usual LM cloze score: the right
  context rescores each candidate). One row per candidate.

`choice_logprobs` is differentiable (PET-style fine-tuning calls it under autograd);
`score_choices` wraps it in `torch.no_grad` and batches. Rows longer than the model's context keep
the text next to the blank: `left` is cut from its start and `right` from its end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from glmkit.batch import Batch
from glmkit.errors import GlmkitError
from glmkit.eval.tasks import Choice

OBJECTIVES = ("glm", "mlm", "clm")


@dataclass
class Rows:
    """A scoring batch plus, for each loss position (row-major order), where its log-prob goes."""
    batch: Batch
    example: np.ndarray   # (N,) index of the Choice
    candidate: np.ndarray  # (N,) index of the candidate within it
    is_fill: np.ndarray   # (N,) bool: a token of the candidate itself (not <eop>, not right context)


class RowBuilder:
    """Accumulates rows as dicts of lists, then pads them into one numpy Batch."""

    def __init__(self):
        self.rows: list[dict] = []
        self.ex, self.cand, self.fill = [], [], []

    def add(self, row: dict, groups: list[tuple[int, int, bool]]):
        self.rows.append(row)
        for e, c, f in groups:
            self.ex.append(e)
            self.cand.append(c)
            self.fill.append(f)

    def build(self, pad_id: int) -> Rows:
        T = max(len(r["input_ids"]) for r in self.rows)
        B = len(self.rows)
        arr = {k: np.zeros((B, T), dtype=np.int64) for k in ("input_ids", "targets", "position_ids",
                                                             "block_position_ids", "span_ids")}
        arr["input_ids"][:] = pad_id
        loss = np.zeros((B, T), dtype=bool)
        seg = np.full((B, T), -1, dtype=np.int64)
        sep = np.full((B, T), T, dtype=np.int64)
        for i, r in enumerate(self.rows):
            n = len(r["input_ids"])
            for k in arr:
                arr[k][i, :n] = r[k]
            loss[i, :n] = r["loss_mask"]
            seg[i, :n] = 0
            sep[i, :n] = r["sep"]
        batch = Batch(loss_mask=loss, segment_ids=seg, sep=sep, **arr)
        return Rows(batch, np.array(self.ex), np.array(self.cand), np.array(self.fill, dtype=bool))


def _fit(left: list[int], right: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut `left` from its start and `right` from its end to `budget` tokens in all, keeping at least
    half of the budget for `left` when it is that long (the text next to the blank matters most)."""
    if len(left) + len(right) <= budget:
        return left, right
    if budget < 1:
        raise GlmkitError("a blank's candidates alone fill the model's context; use shorter candidates or a "
                          "model with a longer context")
    n_left = min(len(left), max(budget - len(right), (budget + 1) // 2))
    n_right = min(len(right), budget - n_left)
    return left[len(left) - n_left:], right[:n_right]


def _glm_row(ex: int, ch: Choice, sp, max_len: int, b: RowBuilder):
    part_b_len = sum(len(c) + 1 for c in ch.candidates)
    left, right = _fit(ch.left, ch.right, max_len - 1 - part_b_len)
    a = left + [sp.mask] + right
    m, sep = len(left), len(a)
    r = {"input_ids": list(a), "targets": [0] * sep, "loss_mask": [False] * sep, "position_ids": list(range(sep)),
         "block_position_ids": [0] * sep, "span_ids": [0] * sep, "sep": sep}
    groups = []
    for j, c in enumerate(ch.candidates):
        n = len(c)
        r["input_ids"] += [sp.sop] + list(c)
        r["targets"] += list(c) + [sp.eop]
        r["loss_mask"] += [True] * (n + 1)
        r["position_ids"] += [m] * (n + 1)
        r["block_position_ids"] += list(range(1, n + 2))
        r["span_ids"] += [j + 1] * (n + 1)
        groups += [(ex, j, True)] * n + [(ex, j, False)]
    b.add(r, groups)


def _mlm_row(ex: int, j: int, ch: Choice, sp, max_len: int, b: RowBuilder):
    c = ch.candidates[j]
    left, right = _fit(ch.left, ch.right, max_len - len(c))
    ids = left + [sp.mask] * len(c) + right
    n = len(ids)
    tgt = [0] * len(left) + list(c) + [0] * len(right)
    lm = [False] * len(left) + [True] * len(c) + [False] * len(right)
    b.add({"input_ids": ids, "targets": tgt, "loss_mask": lm, "position_ids": list(range(n)),
           "block_position_ids": [0] * n, "span_ids": [0] * n, "sep": n}, [(ex, j, True)] * len(c))


def _clm_row(ex: int, j: int, ch: Choice, max_len: int, b: RowBuilder):
    c = ch.candidates[j]
    left, right = _fit(ch.left, ch.right, max_len - len(c))
    if not left:
        raise GlmkitError("a causal model cannot score a blank at the very start of the text; give it left context")
    ids = left + list(c) + right
    n = len(ids)
    # position t predicts ids[t + 1]; score the candidate and the right context
    lm = [False] * (len(left) - 1) + [True] * (len(c) + len(right)) + [False]
    tgt = ids[1:] + [0]
    b.add({"input_ids": ids, "targets": tgt, "loss_mask": lm, "position_ids": list(range(n)),
           "block_position_ids": [0] * n, "span_ids": [0] * n, "sep": 0},
          [(ex, j, True)] * len(c) + [(ex, j, False)] * len(right))


def build_rows(choices: list[Choice], objective: str, specials, max_len: int, offset: int = 0) -> Rows:
    """The scoring rows of `choices` for a model trained with `objective` (glm | mlm | clm).
    `specials`: anything with `mask, sop, eop, pad` ids (`glmkit.data.objective_config.SpecialIds`)."""
    if objective not in OBJECTIVES:
        raise GlmkitError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    b = RowBuilder()
    for i, ch in enumerate(choices):
        if not ch.candidates or any(len(c) == 0 for c in ch.candidates):
            raise GlmkitError(f"choice {offset + i} has an empty candidate list or an empty candidate; "
                              "give at least one non-empty candidate per blank")
        if objective == "glm":
            _glm_row(offset + i, ch, specials, max_len, b)
        else:
            for j in range(len(ch.candidates)):
                (_mlm_row(offset + i, j, ch, specials, max_len, b) if objective == "mlm"
                 else _clm_row(offset + i, j, ch, max_len, b))
    return b.build(specials.pad)


def token_logprobs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) log p(target) and (N,) argmax == target at the batch's loss positions, row-major; the
    vocabulary projection runs only there."""
    dev = next(model.parameters()).device
    b = batch.to(dev)
    h = model(b.input_ids, b.position_ids, b.block_position_ids, model.attention_mask(b))
    sel = b.loss_mask.reshape(-1).nonzero().squeeze(-1)
    logits = model.logits(h.reshape(-1, h.shape[-1]).index_select(0, sel)).float()   # (N, V)
    targets = b.targets.reshape(-1).index_select(0, sel)
    logp = F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    return logp, logits.argmax(-1) == targets


def choice_logprobs(model, choices: list[Choice], objective: str, specials, max_len: int | None = None,
                    offset: int = 0) -> list[torch.Tensor]:
    """Per choice, a (n_candidates,) tensor of candidate log-likelihoods (differentiable)."""
    max_len = max_len or model.config.max_position_embeddings
    rows = build_rows(choices, objective, specials, max_len, offset)
    logp, _ = token_logprobs(model, rows.batch)
    out = []
    for i, ch in enumerate(choices):
        sel = torch.from_numpy(rows.example == offset + i).to(logp.device)
        idx = torch.from_numpy(rows.candidate).to(logp.device)[sel]
        out.append(torch.zeros(len(ch.candidates), device=logp.device, dtype=logp.dtype).index_add(0, idx, logp[sel]))
    return out


@torch.no_grad()
def score_choices(model, choices: list[Choice], objective: str, specials, batch_size: int = 16,
                  max_len: int | None = None) -> list[list[float]]:
    """Log-likelihood of every candidate of every choice, `batch_size` choices per forward."""
    if not choices:
        raise GlmkitError("no choices to score; give at least one blank with candidates")
    out = []
    for s in range(0, len(choices), batch_size):
        part = choices[s:s + batch_size]
        out += [t.tolist() for t in choice_logprobs(model, part, objective, specials, max_len, offset=s)]
    return out


@torch.no_grad()
def fill_token_accuracy(model, choices: list[Choice], objective: str, specials, batch_size: int = 16,
                        max_len: int | None = None) -> tuple[int, int]:
    """Teacher-forced token accuracy of the true filling (`candidates[label]`): (correct, total) over
    the filling's own tokens (not <eop>, not the right context)."""
    correct = total = 0
    max_len = max_len or model.config.max_position_embeddings
    for s in range(0, len(choices), batch_size):
        part = [Choice(c.left, c.right, [c.candidates[c.label]], 0) for c in choices[s:s + batch_size]]
        rows = build_rows(part, objective, specials, max_len)
        _, hit = token_logprobs(model, rows.batch)
        fill = torch.from_numpy(rows.is_fill).to(hit.device)
        correct += int(hit[fill].sum())
        total += int(fill.sum())
    return correct, total
