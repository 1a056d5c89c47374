"""The objectives of DESIGN.md §1: the worked example, and properties over random documents."""

import numpy as np
import pytest
import torch
from helpers import MASK_IDS, SP, reconstruct
from hypothesis import given, settings
from hypothesis import strategies as st

from glmkit.batch import Batch, dense_mask
from glmkit.data.objective_config import ObjectiveConfig, SpecialIds
from glmkit.data.objectives import (
    CLM,
    GMASK,
    MASK,
    SMASK,
    chunk_length,
    clm_samples,
    glm_sample,
    mlm_samples,
    random_glm_samples,
)
from glmkit.data.spans import gmask_spans, mask_spans, offsets_of, span_length_moments, truncated_poisson
from glmkit.errors import GlmkitError

docs_strategy = st.lists(st.lists(st.integers(0, 49), min_size=1, max_size=120), min_size=1, max_size=8)


def _one_sample_batch(s) -> Batch:
    n = len(s["input_ids"])
    row = lambda a: np.asarray(a)[None]
    return Batch(input_ids=row(s["input_ids"]), targets=row(s["targets"]), loss_mask=row(s["loss_mask"]),
                 position_ids=row(s["position_ids"]), block_position_ids=row(s["block_position_ids"]),
                 segment_ids=np.zeros((1, n), np.int32), sep=np.full((1, n), s["sep"]), span_ids=row(s["span_ids"]))


def check_layout(s, layout):
    """Positions, block positions, loss mask, targets and span ids per DESIGN.md §1."""
    sep, n = s["sep"], len(s["input_ids"])
    assert list(s["position_ids"][:sep]) == list(range(sep))
    assert not s["block_position_ids"][:sep].any() and not s["loss_mask"][:sep].any()
    assert not s["targets"][:sep].any() and not s["span_ids"][:sep].any()
    assert s["loss_mask"][sep:].all() and (s["block_position_ids"][sep:] >= 1).all()
    span_no = np.cumsum(s["block_position_ids"][sep:] == 1)
    expect = span_no if layout == "span" else np.ones(n - sep)
    assert list(s["span_ids"][sep:]) == list(expect)


def test_worked_example_exactly():
    t = [10, 11, 12, 13, 14, 15, 16]   # t0..t6
    s = glm_sample(t, [(2, 1), (5, 2)], SP, order=[1, 0])
    M, sop, eop = SP.mask, SP.sop, SP.eop
    assert s["input_ids"].tolist() == [10, 11, M, 13, 14, M, sop, 15, 16, sop, 12]
    assert s["targets"].tolist() == [0, 0, 0, 0, 0, 0, 15, 16, eop, 12, eop]
    assert s["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 5, 2, 2]
    assert s["block_position_ids"].tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert s["loss_mask"].astype(int).tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert s["sep"] == 6 and len(s["input_ids"]) == 7 + 2 * 2
    # glm layout: prefix-LM; span layout: the second Part B span (t2) no longer sees the first
    glm = dense_mask(_one_sample_batch(s))[0]
    q, k = torch.arange(11)[:, None], torch.arange(11)[None]
    assert torch.equal(glm, (k < 6) | (k <= q))
    span = dense_mask(_one_sample_batch(glm_sample(t, [(2, 1), (5, 2)], SP, order=[1, 0], layout="span")))[0]
    diff = (glm != span).nonzero().tolist()
    assert diff == [[q, k] for q in (9, 10) for k in (6, 7, 8)]


def test_glm_sample_rejects_touching_spans():
    with pytest.raises(GlmkitError, match="touch"):
        glm_sample(list(range(8)), [(1, 2), (3, 1)], SP)
    with pytest.raises(GlmkitError, match="permutation"):
        glm_sample(list(range(8)), [(1, 2), (4, 1)], SP, order=[0, 0])


@settings(max_examples=60, deadline=None)
@given(docs=docs_strategy, seed=st.integers(0, 2**32 - 1), kind=st.sampled_from([MASK, SMASK, GMASK]),
       layout=st.sampled_from(["glm", "span"]), shuffle=st.booleans())
def test_infilling_properties(docs, seed, kind, layout, shuffle):
    docs = [np.array(d, dtype=np.int64) for d in docs]
    cfg = ObjectiveConfig(layout=layout, shuffle_spans=shuffle)
    rng = np.random.default_rng(seed)
    samples, index = random_glm_samples(docs, cfg, SP, rng, kinds=np.full(len(docs), kind, dtype=np.int8))
    assert len(samples) == len(index)
    # only documents too short to mask are left out ([sMASK] falls back to [MASK])
    assert set(index) == {i for i, d in enumerate(docs) if len(d) >= cfg.min_length}
    for i in range(len(samples)):
        s = samples.sample(i)
        doc = docs[index[i]].tolist()
        check_layout(s, layout)
        text, spans = reconstruct(s, MASK_IDS[s["kind"]])
        assert text == doc
        assert len(s["input_ids"]) == len(doc) + 2 * len(spans)
        left_to_right = sorted(spans)
        if not shuffle:
            assert spans == left_to_right
        for (s0, l0), (s1, _) in zip(left_to_right, left_to_right[1:]):
            assert s0 + l0 < s1                                       # never touch, never overlap
        masked = sum(n for _, n in spans)
        if s["kind"] == MASK:
            assert masked >= int(0.15 * len(doc)) and max(n for _, n in spans) <= 39
        if s["kind"] == SMASK:
            ends = set(SP.sentence_ends)
            for a, n in spans:                                         # whole sentences
                assert a == 0 or doc[a - 1] in ends
                assert a + n == len(doc) or doc[a + n] in ends
                assert not ends & set(doc[a:a + n])
            assert masked < len(doc)
        if s["kind"] == GMASK:
            (a, n), = spans
            assert 0.5 * len(doc) - 1e-9 <= n <= len(doc) - 1


def test_span_statistics():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, size=n) for n in rng.integers(200, 600, size=400)]
    samples, index = random_glm_samples(docs, ObjectiveConfig(), SP, rng)
    lengths = samples.length - samples.part_a - samples.n_spans          # masked tokens per sample
    text = np.array([len(docs[i]) for i in index])
    mean_span = lengths.sum() / samples.n_spans.sum()
    mean_ref, _ = span_length_moments(3.0, 39)
    assert abs(mean_ref - 3.157) < 0.01 and abs(mean_span - mean_ref) < 0.1
    frac = lengths.sum() / text.sum()
    assert 0.15 <= frac < 0.16                                           # reaches 15%, overshoots slightly
    draws = truncated_poisson(rng, 200_000, 3.0, 39)
    assert draws.min() == 1 and draws.max() <= 39 and abs(draws.mean() - mean_ref) < 0.02


def test_span_placement_is_spread_over_the_document():
    # how often each position of a 60-token document is masked: every position can be, none is favoured
    rng = np.random.default_rng(1)
    L = np.full(20000, 60)
    sp, ok = mask_spans(L, ObjectiveConfig(), rng, SP.mask)
    assert ok.all() and (sp.start >= 0).all() and (sp.start + sp.length <= 60).all()
    delta = np.zeros(61)
    np.add.at(delta, sp.start, 1)
    np.add.at(delta, sp.start + sp.length, -1)
    coverage = np.cumsum(delta)[:60] / len(L)
    assert 0.15 < coverage.mean() < 0.18                    # int(0.15 * 60) = 9 tokens plus the overshoot
    inner = coverage[5:-5]                                   # the edges are covered less by any placement
    assert inner.min() > 0.85 * inner.mean() and inner.max() < 1.15 * inner.mean()
    assert coverage[0] > 0.02 and abs(coverage[0] - coverage[-1]) < 0.02   # both ends, symmetric


def test_gmask_suffix_is_prefix_lm():
    rng = np.random.default_rng(2)
    L = np.array([2, 5, 40, 100])
    sp = gmask_spans(L, ObjectiveConfig(), rng, SP.gmask, force_suffix=np.ones(4, bool))
    assert (sp.start + sp.length == L).all()
    docs = [np.arange(n) % 50 for n in L]
    cfg = ObjectiveConfig(mixture=(0, 0, 1), gmask_suffix_prob=1.0)
    samples, index = random_glm_samples(docs, cfg, SP, rng)
    assert index.tolist() == [2, 3]                          # 2 and 5 tokens are too short to mask
    for i in range(len(samples)):
        s = samples.sample(i)
        n, sep = len(s["input_ids"]), s["sep"]
        assert s["input_ids"][sep - 1] == SP.gmask and s["input_ids"][sep] == SP.sop
        # 1-D positions run straight through: source [gMASK] <sop> target
        assert (s["position_ids"] + s["block_position_ids"] == np.arange(n)).all()
        m = dense_mask(_one_sample_batch(s))[0]
        q, k = torch.arange(n)[:, None], torch.arange(n)[None]
        assert torch.equal(m, (k < sep) | (k <= q))
        assert s["targets"][-1] == SP.eop and list(s["targets"][sep:-1]) == list(docs[index[i]][sep - 1:])
    middle = gmask_spans(np.full(2000, 50), ObjectiveConfig(gmask_suffix_prob=0.0), rng, SP.gmask)
    assert (middle.start + middle.length < 50).all() and middle.start.min() == 0
    mixed = gmask_spans(np.full(4000, 50), ObjectiveConfig(), rng, SP.gmask)
    assert abs((mixed.start + mixed.length == 50).mean() - 0.5) < 0.05


def test_mlm_rates_and_structure():
    rng = np.random.default_rng(3)
    L = rng.integers(20, 200, size=300)
    tokens = rng.integers(0, 50, size=int(L.sum()))
    offsets = offsets_of(L)
    s = mlm_samples(tokens, offsets, ObjectiveConfig(kind="mlm"), SP, rng)
    sel = s.loss_mask
    per_sample = np.add.reduceat(sel, offsets[:-1])
    assert (per_sample == np.maximum(1, np.rint(0.15 * L))).all()
    assert (s.targets[sel] == tokens[sel]).all() and not s.targets[~sel].any()
    assert (s.input_ids[~sel] == tokens[~sel]).all()
    masked = (s.input_ids[sel] == SP.mask).mean()
    changed = ((s.input_ids[sel] != SP.mask) & (s.input_ids[sel] != tokens[sel])).mean()
    kept = (s.input_ids[sel] == tokens[sel]).mean()
    p_same = 1 / len(SP.random_pool())                      # a random draw can hit the original token
    assert abs(masked - 0.8) < 0.02 and abs(changed - 0.1 * (1 - p_same)) < 0.015
    assert abs(kept - 0.1 - 0.1 * p_same) < 0.015
    assert not np.isin(s.input_ids[sel], SP.specials[SP.specials != SP.mask]).any()
    assert (s.part_a == L).all() and (s.kind == 3).all()
    # the selected positions are spread over the sample, not bunched at its start
    pos = s.position_ids[sel]
    first20 = np.bincount(pos[pos < 20], minlength=20) / len(L)
    assert first20.max() < 0.3 and first20.min() > 0.05


def test_clm_is_causal_next_token():
    tokens = np.array([5, 6, 7, 8, 9, 10])
    s = clm_samples(tokens, np.array([0, 4, 6]), SP)
    assert s.targets.tolist() == [6, 7, 8, 0, 10, 0]
    assert s.loss_mask.tolist() == [True, True, True, False, True, False]
    assert s.position_ids.tolist() == [0, 1, 2, 3, 0, 1] and (s.kind == CLM).all()
    b = _one_sample_batch(s.sample(0))
    q, k = torch.arange(4)[:, None], torch.arange(4)[None]
    assert torch.equal(dense_mask(b)[0], k <= q)


def test_config_validation_names_the_fix():
    with pytest.raises(GlmkitError, match="strictly between 0 and 1"):
        ObjectiveConfig(mask_ratio=1.5)
    with pytest.raises(GlmkitError, match="summing to 1"):
        ObjectiveConfig(mixture=(0.5, 0.5, 0.5))
    with pytest.raises(GlmkitError, match="use 'glm', 'mlm' or 'clm'"):
        ObjectiveConfig(kind="t5")
    with pytest.raises(GlmkitError, match="choose one of"):
        ObjectiveConfig.from_name("glm-7b")
    with pytest.raises(GlmkitError, match="seq_len >= "):
        chunk_length(ObjectiveConfig(), 8)
    with pytest.raises(GlmkitError, match="sentence_end_ids"):
        ObjectiveConfig.from_name("glm-10b").check(SpecialIds(1, 2, 3, 4, 5, 6, 7, 10))
    assert ObjectiveConfig.from_name("glm-130b").mixture == (0.3, 0.0, 0.7)
    assert ObjectiveConfig.from_name("glm-10b").mixture == (0.5, 0.3, 0.2)
    assert chunk_length(ObjectiveConfig(), 1024) < 1024 and chunk_length(ObjectiveConfig(kind="clm"), 64) == 64


def test_from_tokenizer():
    class Tok:
        mask_id, smask_id, gmask_id, sop_id, eop_id, eot_id, pad_id = 1, 2, 3, 4, 5, 0, 6
        vocab_size = 20
        sentence_end_ids = [11, 12]
    sp = SpecialIds.from_tokenizer(Tok())
    assert sp.sentence_ends == (11, 12) and sp.gmask == 3
    assert set(sp.random_pool()) == set(range(7, 20))


@settings(max_examples=40, deadline=None)
@given(docs=docs_strategy, seed=st.integers(0, 2**32 - 1), kind=st.sampled_from([MASK, SMASK, GMASK]))
def test_span_layout_differs_only_between_spans_of_part_b(docs, seed, kind):
    docs = [np.array(d, dtype=np.int64) for d in docs]
    kinds = np.full(len(docs), kind, dtype=np.int8)
    made = {layout: random_glm_samples(docs, ObjectiveConfig(layout=layout), SP, np.random.default_rng(seed), kinds)[0]
            for layout in ("glm", "span")}
    for i in range(len(made["glm"])):
        g, s = made["glm"].sample(i), made["span"].sample(i)
        assert all(np.array_equal(g[f], s[f]) for f in ("input_ids", "targets", "position_ids", "block_position_ids"))
        mg, ms = dense_mask(_one_sample_batch(g))[0], dense_mask(_one_sample_batch(s))[0]
        n, sep = len(g["input_ids"]), g["sep"]
        q, k = torch.arange(n)[:, None], torch.arange(n)[None]
        span = torch.as_tensor(s["span_ids"])
        other_span_b = (q >= sep) & (k >= sep) & (k <= q) & (span[:, None] != span[None])
        assert torch.equal(mg & ~ms, other_span_b) and not (ms & ~mg).any()
