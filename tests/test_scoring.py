"""Cloze scoring against full-forward references built independently of glmkit.eval.scoring."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import blank_logits, greedy_fill

from glmkit.batch import Batch
from glmkit.data.objective_config import SpecialIds
from glmkit.data.objectives import glm_sample
from glmkit.errors import GlmkitError
from glmkit.eval.scoring import fill_token_accuracy, score_choices
from glmkit.eval.tasks import Choice
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM

SP = SpecialIds(mask=120, smask=121, gmask=122, sop=123, eop=124, eot=125, pad=126, vocab_size=128)
CHOICES = [Choice([1, 2, 3, 4], [5, 6], [[7], [8, 9], [10, 11, 12]], 1),
           Choice([3, 4, 5, 6, 7, 8], [9], [[1], [2]], 0)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GLM(GLMConfig.from_name("tiny")).eval()


def _loss_sum(model, s: dict) -> float:
    """Sum of -log p over a single sample's loss positions, full forward with the reference mask."""
    T = len(s["input_ids"])
    t = lambda x: torch.as_tensor(np.asarray(x, dtype=np.int64))[None]
    b = Batch(input_ids=t(s["input_ids"]), targets=t(s["targets"]), loss_mask=t(s["loss_mask"]).bool(),
              position_ids=t(s["position_ids"]), block_position_ids=t(s["block_position_ids"]),
              segment_ids=t([0] * T), sep=t([s["sep"]] * T), span_ids=t(s["span_ids"]))
    return float(model.loss(b)) * int(np.sum(s["loss_mask"]))


def test_glm_scores_equal_one_sample_per_candidate(model):
    """Packing every candidate after one Part A gives each candidate's own GLM-sample likelihood,
    built by the objectives' sample builder (a blank = a span of the document holding the candidate)."""
    got = score_choices(model, CHOICES, "glm", SP)
    with torch.no_grad():
        for ch, scores in zip(CHOICES, got):
            for c, s in zip(ch.candidates, scores):
                doc = ch.left + c + ch.right
                ref = -_loss_sum(model, glm_sample(doc, [(len(ch.left), len(c))], SP))
                assert s == pytest.approx(ref, abs=1e-4)


def test_clm_and_mlm_scores_equal_direct_forward(model):
    with torch.no_grad():
        for obj in ("clm", "mlm"):
            got = score_choices(model, CHOICES, obj, SP)
            for ch, scores in zip(CHOICES, got):
                for c, s in zip(ch.candidates, scores):
                    if obj == "clm":
                        ids = torch.tensor([ch.left + c + ch.right])
                        h = model(ids, torch.arange(ids.shape[1])[None], torch.zeros_like(ids))   # causal
                        logp = F.log_softmax(model.logits(h[0, :-1]), -1).gather(1, ids[0, 1:, None])[:, 0]
                        ref = float(logp[len(ch.left) - 1:].sum())
                    else:
                        ids = torch.tensor([ch.left + [SP.mask] * len(c) + ch.right])
                        T = ids.shape[1]
                        from glmkit.model.attention import AttentionMask
                        full = AttentionMask("sdpa", dense=torch.ones(1, 1, T, T, dtype=torch.bool))
                        h = model(ids, torch.arange(T)[None], torch.zeros_like(ids), full)
                        lp = F.log_softmax(model.logits(h[0]), -1)
                        ref = float(sum(lp[len(ch.left) + i, t] for i, t in enumerate(c)))
                    assert s == pytest.approx(ref, abs=1e-4), obj


def test_batching_does_not_change_scores(model):
    one = [score_choices(model, [c], "glm", SP)[0] for c in CHOICES]
    assert np.allclose(np.concatenate(one), np.concatenate(score_choices(model, CHOICES, "glm", SP, batch_size=2)),
                       atol=1e-5)


def _fill_hits(model, ch: Choice, objective: str) -> list[bool]:
    """Teacher-forced argmax == token, at each token of the true filling, by the dense reference."""
    fill = ch.candidates[ch.label]
    logits = blank_logits(model, ch.left, ch.right, fill, objective, SP)[:len(fill)]
    return (logits.argmax(-1) == torch.tensor(fill)).tolist()


@pytest.mark.parametrize("objective", ["glm", "mlm", "clm"])
def test_token_accuracy_equals_a_dense_reference(model, objective):
    """Exact (correct, total) against a full forward per blank. The last blank's filling is the
    model's own greedy fill, so at least its tokens are correct and a count of 0 cannot pass."""
    left, right = [3, 4, 5, 6], [7, 8]
    own = greedy_fill(model, left, right, 3, objective, SP)
    choices = CHOICES + [Choice(left, right, [[9, 10, 11], own], 1)] if len(own) else CHOICES
    hits = [h for ch in choices for h in _fill_hits(model, ch, objective)]
    assert fill_token_accuracy(model, choices, objective, SP, batch_size=2) == (sum(hits), len(hits))
    assert len(own) == 0 or all(_fill_hits(model, choices[-1], objective))


@pytest.mark.parametrize("objective", ["glm", "mlm", "clm"])
def test_token_accuracy_of_a_model_that_always_predicts_token_0(model, objective):
    """A zero final norm makes every logit 0, and argmax takes the first of equal values: token 0 is
    predicted everywhere, so exactly the 0s of the true fillings count as correct."""
    import copy
    zero = copy.deepcopy(model)
    with torch.no_grad():
        zero.norm.weight.zero_()
    choices = [Choice([1, 2, 3], [4], [[5], [0, 9]], 1), Choice([6, 7], [8, 9], [[0, 0, 5], [1]], 0),
               Choice([2, 3], [], [[0]], 0)]
    assert fill_token_accuracy(zero, choices, objective, SP) == (4, 6)


def test_bad_candidates(model):
    with pytest.raises(GlmkitError, match="empty candidate"):
        score_choices(model, [Choice([1, 2], [3], [], 0)], "glm", SP)
    with pytest.raises(GlmkitError, match="empty candidate"):
        score_choices(model, [Choice([1, 2], [3], [[4], []], 0)], "mlm", SP)
    with pytest.raises(GlmkitError, match="no choices"):
        score_choices(model, [], "glm", SP)
    with pytest.raises(GlmkitError, match="unknown objective"):
        score_choices(model, CHOICES, "xlnet", SP)
