"""Evaluation baselines: exact values on hand-checked cases, and the same tokens and bytes as the model."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from glmkit.data.tokenizer import GLMTokenizer
from glmkit.eval import tasks
from glmkit.eval.baselines import (
    baseline_rows,
    format_baseline_table,
    majority_share,
    unigram_bits_per_byte,
    unigram_infill,
    unigram_log2probs,
)
from glmkit.eval.evaluate import bits_per_byte, infill_accuracy
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM


def _decode(ids):  # token i is the one-byte letter "abcd"[i]
    return "".join("abcd"[i] for i in ids)


def test_unigram_is_add_one_smoothed():
    # counts 3, 0, 1, 0 -> (4, 1, 2, 1) / 8
    assert unigram_log2probs(Counter({0: 3, 2: 1}), 4).tolist() == [-1.0, -3.0, -2.0, -3.0]


def test_unigram_bits_per_byte_scores_tokens_after_the_first():
    # window [0, 2, 1]: tokens 2 and 1 are predicted, 2 + 3 bits over 2 bytes
    assert unigram_bits_per_byte([[0, 2, 1]], Counter({0: 3, 2: 1}), 4, _decode) == 2.5
    assert unigram_bits_per_byte([[0, 2, 1], [3, 0]], Counter({0: 3, 2: 1}), 4, _decode) == (5 + 1) / 3


def test_unigram_infill_always_writes_the_most_frequent_token():
    got = unigram_infill([[0], [0, 1], [2]], Counter({0: 3, 2: 1}))
    assert got == {"token": 0, "token_accuracy": 0.5, "exact_match": 1 / 3}


def test_majority_share():
    assert majority_share([1, 1, 0]) == 2 / 3 and majority_share([0, 1]) == 0.5


def test_baseline_rows_flag_results_no_better_than_the_baseline():
    res = {"val": {"bits_per_byte": 2.4, "unigram_bits_per_byte": 3.1},
           "infill": {"token_accuracy": 0.1, "exact_match": 0.0, "unigram": {"token_accuracy": 0.05, "exact_match": 0.0}},
           "cloze": {"accuracy": 0.25, "chance": 0.25},
           "sentiment": {"zero_shot": 0.55, "majority": 0.62, "finetuned": 0.7}}
    rows = baseline_rows(res)
    assert [(r["task"], r["metric"], r["beats"]) for r in rows] == [
        ("val", "bits/byte", True), ("infill", "token accuracy", True), ("infill", "exact match", False),
        ("cloze", "accuracy", False), ("sentiment", "zero-shot accuracy", False),
        ("sentiment", "fine-tuned accuracy", True)]
    table = format_baseline_table(rows).splitlines()
    assert len(table) == 2 + 6 and sum("no better than the baseline" in line for line in table) == 3
    assert table[2].split()[:4] == ["val", "bits/byte", "2.400", "3.100"]


TEXT = "In the beginning God created the heaven and the earth. 北京是中国的首都。" * 4


@pytest.fixture(scope="module")
def tok():
    return GLMTokenizer.train([TEXT] * 4, vocab_size=300)


def test_evaluate_carries_the_baselines_on_the_model_s_own_examples(tok):
    torch.manual_seed(0)
    model = GLM(GLMConfig.from_name("tiny", vocab_size=tok.vocab_size)).eval()
    doc = tok.encode(TEXT)
    counts = tasks.token_counts([doc])
    res = bits_per_byte(model, tok, [doc], "glm", window=32, budget=62, counts=counts)
    wins = [doc[:32], doc[32:64]]       # 31 + 31 predicted tokens reach the budget of 62
    logp = np.log2((np.bincount(doc, minlength=tok.vocab_size) + 1) / (len(doc) + tok.vocab_size))
    bits = -sum(logp[w[1:]].sum() for w in wins)
    assert res["bytes"] == sum(len(tok.decode(w).encode()) - len(tok.decode(w[:1]).encode()) for w in wins)
    assert res["unigram_bits_per_byte"] == pytest.approx(bits / res["bytes"], rel=1e-12)
    blanks = tasks.infill_examples([doc], 4, window=32, seed=0)
    r = infill_accuracy(model, tok, blanks, "glm", batch_size=4, counts=counts)
    assert r["unigram"] == unigram_infill([b.answer for b in blanks], counts)
    assert not math.isnan(r["unigram"]["token_accuracy"])
