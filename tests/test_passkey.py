"""Passkey retrieval (`glmkit.eval.passkey`, `glmkit eval passkey`): the prompts are what the module
says, and the harness is proven both ways: a model that can copy the key scores 1.0 on every cell, a
random model 0.0.

The copying model is constructed: a one-layer GLM whose weights find the number token in the context
(its key vector is large for numbers only) and add that token's embedding to the residual stream
(value and output maps are the identity on numbers), with a word-level tokenizer in which every
two-digit key is one token. Its answers go through everything the harness does with a real model:
the prompt built at the depth, the engine's prefill and greedy decoding (a GLM Part A with [gMASK],
or causal text), the number read back from the decoded text, the per-cell accuracy. (A tiny model
trained on the same prompts needed ~400 AdamW steps, 30-40 s on this machine, to copy reliably: too
slow and too seed-dependent for a unit test.)
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from glmkit.errors import GlmkitError
from glmkit.eval.passkey import (
    FILLER,
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    Filler,
    PasskeyConfig,
    answer_of,
    build_prompt,
    parse_depths,
    parse_lengths,
    passkey_eval,
    plot_heatmap,
    sentences,
)
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM


class WordTokenizer:
    """Words, numbers and punctuation of the passkey texts as single tokens; specials after them."""

    def __init__(self):
        words = sorted(set(re.findall(r"[A-Za-z]+|[^\w\s]", INSTRUCTION + FILLER + NEEDLE + QUESTION)))
        self.vocab = words + [str(n) for n in range(10, 100)]
        self.id = {w: i for i, w in enumerate(self.vocab)}
        n = len(self.vocab)
        self.mask_id, self.smask_id, self.gmask_id, self.sop_id, self.eop_id, self.eot_id, self.pad_id = range(n, n + 7)
        self.vocab_size = n + 7

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return [self.id[w] for w in re.findall(r"\d+|[A-Za-z]+|[^\w\s]", text)]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] if i < len(self.vocab) else "<special>" for i in ids)


TOK = WordTokenizer()


def untrained(seed: int = 0, max_positions: int = 4096, **kw) -> GLM:
    torch.manual_seed(seed)
    return GLM(GLMConfig.from_name("tiny", vocab_size=TOK.vocab_size, max_position_embeddings=max_positions,
                                   **kw)).eval()


def copier(max_positions: int = 4096) -> GLM:
    """A one-layer GLM-4-shaped model that answers with the number token it sees (module docstring).

    Embeddings are one-hot, so the normed input at token t is 12 (= sqrt(hidden)) in dim t. One head of
    192 dims, the first half rotated: q and k meet in dim 96, which RoPE leaves alone, so the score is
    content only (beta for a number key, 0 else: at 20 a number outweighs 10^8 other keys); v writes
    number t into dim t - first number, o_proj back to dim t, times 10. The MLP is zero. The tied head
    then reads 1 for the token itself and 10 for the number attended to."""
    V, first = TOK.vocab_size, TOK.id["10"]
    cfg = GLMConfig.from_name("tiny", vocab_size=V, hidden_size=144, num_layers=1, num_heads=1, num_kv_heads=1,
                              head_dim=192, intermediate_size=8, qkv_bias=False, tie_word_embeddings=True,
                              max_position_embeddings=max_positions)
    model = GLM(cfg).eval()
    numbers = torch.arange(first, first + 90)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed_tokens.weight[torch.arange(V), torch.arange(V)] = 1.0
        for norm in (model.layers[0].input_layernorm, model.layers[0].post_attention_layernorm, model.norm):
            norm.weight.fill_(1.0)
        w = model.layers[0].self_attn.qkv_proj.weight                 # rows: q 0..191, k 192..383, v 384..575
        w[96, :] = 1 / 12
        w[192 + 96, numbers] = 20 * 192 ** 0.5 / 12
        w[384 + numbers - first, numbers] = 1 / 12
        model.layers[0].self_attn.o_proj.weight[numbers, numbers - first] = 10.0
    return model


GRID = PasskeyConfig(lengths=(64, 300, 1200), depths=(0.0, 0.5, 1.0), trials=4, digits=2, batch=6)


@pytest.mark.parametrize("objective", ["glm", "clm"])
def test_a_model_that_copies_finds_every_key(objective):
    report = passkey_eval(copier(), TOK, objective, GRID)
    assert report["accuracy"] == [[1.0] * 3] * 3, [t for t in report["trials"] if not t["correct"]]
    assert report["mean_accuracy"] == 1.0
    assert len(report["trials"]) == 3 * 3 * 4
    assert len({t["key"] for t in report["trials"]}) > 20          # one key per trial, not one per run


def test_the_copying_model_with_an_fp8_kv_cache():
    """Keys and values stored as float8_e4m3fn (glmkit.model.kv_cache) keep every key retrievable."""
    from dataclasses import replace
    report = passkey_eval(copier(), TOK, "glm", replace(GRID, kv_dtype="fp8"))
    assert report["accuracy"] == [[1.0] * 3] * 3 and report["config"]["kv_dtype"] == "fp8"


@pytest.mark.parametrize("objective", ["glm", "clm"])
def test_a_random_model_finds_none(objective):
    report = passkey_eval(untrained(), TOK, objective, GRID)
    assert report["accuracy"] == [[0.0] * 3] * 3
    assert report["mean_accuracy"] == 0.0


def test_prompt_is_exactly_the_length_with_the_needle_at_the_depth():
    filler = Filler(TOK, "repeat", 200, seed=0)
    head, question = TOK.encode(INSTRUCTION), TOK.encode(QUESTION)
    needle = TOK.encode(NEEDLE.format(key="42"))
    for length in (54, 61, 200):          # 54: the fixed parts alone (no filler)
        for depth in (0.0, 0.3, 1.0):
            p = build_prompt(TOK, filler, length, depth, "42")
            assert len(p.ids) == length
            assert p.ids[:len(head)] == head and p.ids[-len(question):] == question
            assert p.ids[p.needle_at:p.needle_at + len(needle)] == needle
            budget = length - len(head) - len(needle) - len(question)
            before = p.needle_at - len(head)
            assert before == round(p.depth * budget)
            # at a sentence boundary (a filler sentence here is 5 or 6 words and its full stop) nearest the depth
            assert abs(before - depth * budget) <= 3.5
    at_start = build_prompt(TOK, filler, 200, 0.0, "42")
    assert at_start.needle_at == len(head)
    at_end = build_prompt(TOK, filler, 200, 1.0, "42")
    assert at_end.ids[at_end.needle_at + len(needle):] == question
    with pytest.raises(GlmkitError, match="shorter than the instruction"):
        build_prompt(TOK, filler, 30, 0.5, "42")


def test_real_filler_is_whole_sentences_without_numbers(bilingual_tokenizer):
    filler = Filler(bilingual_tokenizer, "kjv", 300, seed=3)
    text = bilingual_tokenizer.decode([t for p in filler.ids for t in p])
    assert not re.search(r"\d", text)
    assert text.startswith("In the beginning God created the heavens and the earth.")   # Genesis 1; "Genesis 1" dropped
    assert all(re.search(r"[.!?:;,]\s*$|\n$", bilingual_tokenizer.decode(p)) for p in filler.ids)
    p = build_prompt(bilingual_tokenizer, filler, 300, 0.5, "71432")
    assert len(p.ids) == 300
    assert "The pass key is 71432. Remember it. 71432 is the pass key." in bilingual_tokenizer.decode(p.ids)


def test_sentences_and_answers():
    assert sentences("One. Two!  Three? 四。五") == ["One. ", "Two!  ", "Three? ", "四。"]
    assert sentences(FILLER) == ["The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
                                 "There and back again. "]
    assert answer_of(" 71432. Remember") == "71432"
    assert answer_of("the key 12 or 34") == "12"
    assert answer_of("no number") is None
    assert parse_lengths("512, 2K,8k") == (512, 2048, 8192)
    assert parse_depths("5") == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert parse_depths("0,0.5") == (0.0, 0.5)


def test_lengths_beyond_the_context_are_refused_before_any_work():
    model = untrained(max_positions=256)
    with pytest.raises(GlmkitError, match=r"--lengths 300 needs .* reads at most 256 .*; use lengths up to \d+"):
        passkey_eval(model, TOK, "glm", PasskeyConfig(lengths=(64, 300), depths=(0.5,), trials=1, digits=2))
    stretched = untrained(max_positions=256, rope_scaling={"rope_type": "linear", "factor": 2.0})   # reads 512
    grid = PasskeyConfig(lengths=(400,), depths=(0.5,), trials=1, digits=2)
    assert passkey_eval(stretched, TOK, "glm", grid)["context_limit"] == 512
    with pytest.raises(GlmkitError, match=r"reads at most 512 \(max_position_embeddings 256, rope_scaling"):
        passkey_eval(stretched, TOK, "glm", PasskeyConfig(lengths=(600,), depths=(0.5,), trials=1, digits=2))
    with pytest.raises(GlmkitError, match="--lengths 40 is shorter than the instruction"):
        passkey_eval(model, TOK, "glm", PasskeyConfig(lengths=(100, 40), depths=(0.5,), trials=1, digits=2))
    with pytest.raises(GlmkitError, match="objective 'mlm'"):
        passkey_eval(model, TOK, "mlm", GRID)


def test_heatmap_and_report_are_written(tmp_path):
    report = {"lengths": [1024, 2048], "depths": [0.0, 1.0], "accuracy": [[1.0, 0.5], [0.0, 0.25]],
              "mean_accuracy": 0.4375}
    out = plot_heatmap(report, tmp_path / "p.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    json.dumps(report)


def test_cli_end_to_end(tiny_run, tmp_path, capsys):
    from glmkit.cli import main
    out = tmp_path / "pk.json"
    rc = main(["eval", "passkey", str(tiny_run.directory), "--lengths", "200,240", "--depths", "0,1", "--trials", "2",
               "--digits", "3", "--out", str(out)])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["lengths"] == [200, 240] and last["depths"] == [0.0, 1.0]
    assert len(last["accuracy"]) == 2 and all(len(r) == 2 for r in last["accuracy"])
    assert (tmp_path / "pk.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads(out.read_text())
    assert len(report["trials"]) == 8 and report["objective"] == "glm"
    assert last["mean_accuracy"] == report["mean_accuracy"] == sum(t["correct"] for t in report["trials"]) / 8
