"""`glmkit bench quantize` (`glmkit.bench.quantize`) on the tiny trained run: what it reports is what
it measured.

- memory: each variant's weight bytes equal the bytes of the model `load_variant` builds; the blocks'
  weights in bf16 are exactly half of fp32's; KV bytes per token are layers x 2 x kv heads x head dim
  x 4 / 2 / 1 bytes for fp32 / bf16 / fp8;
- bits/byte through the engine (fp32 weights and cache) equals `glmkit eval`'s
  (`glmkit.eval.evaluate.bits_per_byte`, a full forward without a cache) on the same windows to 1e-5;
- the command prints the Markdown table and, last, the result as one JSON object.
"""

from __future__ import annotations

import json

import pytest
import torch

from glmkit.bench.quantize import QuantizeBench, bench_quantize, load_variant, validation_windows
from glmkit.cli import main
from glmkit.data.corpus import Corpus
from glmkit.errors import GlmkitError
from glmkit.eval.evaluate import bits_per_byte
from glmkit.model.quantize import weight_nbytes


@pytest.fixture(scope="module")
def result(tiny_run, toy_corpus):
    bench = QuantizeBench(checkpoint=str(tiny_run.directory), corpus=str(toy_corpus.directory),
                          variants="fp32,bf16,int8,bf16+fp8kv", val_tokens=300, window=64, new_tokens=4, repeats=1)
    return bench_quantize(bench)


def test_memory_is_what_the_models_hold(result, tiny_run):
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == ["fp32", "bf16", "int8", "bf16+fp8kv"]
    for name, r in rows.items():
        assert r["weight_bytes"] == weight_nbytes(load_variant(str(tiny_run.directory), name).model)
    assert rows["bf16"]["block_weight_bytes"] * 2 == rows["fp32"]["block_weight_bytes"]
    assert rows["int8"]["block_weight_bytes"] < 0.56 * rows["bf16"]["block_weight_bytes"]    # + fp32 row scales
    c = load_variant(str(tiny_run.directory), "fp32").model.config
    per_value = c.num_layers * 2 * c.num_kv_heads * c.head_dim
    assert [rows[n]["kv_bytes_per_token"] for n in ("fp32", "bf16", "int8", "bf16+fp8kv")] == \
        [4 * per_value, 2 * per_value, 2 * per_value, per_value]
    assert rows["bf16"]["greedy_match"] == 1.0 and rows["bf16"]["bits_per_byte_vs_bf16"] == 1.0
    assert result["int8_bits_per_byte_vs_bf16"] == rows["int8"]["bits_per_byte"] / rows["bf16"]["bits_per_byte"]


def test_engine_bits_per_byte_equals_eval(result, tiny_run, toy_corpus):
    loaded = load_variant(str(tiny_run.directory), "fp32")
    docs = Corpus.open(toy_corpus.directory).documents("val")
    assert sum(len(w) - 1 for w in validation_windows(docs, 64, 300)) == result["val_tokens"]
    want = bits_per_byte(loaded.model, loaded.tokenizer, docs, loaded.objective, window=64, budget=300)
    got = next(r for r in result["variants"] if r["variant"] == "fp32")["bits_per_byte"]
    assert got == pytest.approx(want["bits_per_byte"], rel=1e-5)


def test_the_command_prints_the_table_then_json(tiny_run, toy_corpus, capsys):
    assert main(["bench", "quantize", str(tiny_run.directory), "--corpus", str(toy_corpus.directory),
                 "--variants", "bf16,int4", "--val-tokens", "100", "--window", "32", "--new-tokens", "3",
                 "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert [r["variant"] for r in out["variants"]] == ["bf16", "int4"]
    assert out["torch"] == torch.__version__ and out["threads"] == 1
    assert lines[-5].startswith("| variant |") and lines[-2].startswith("| int4 |")


def test_bad_variants_are_refused(tiny_run):
    with pytest.raises(GlmkitError, match="--variants 'int2': choose from fp32, bf16, int8, int4"):
        bench_quantize(QuantizeBench(checkpoint=str(tiny_run.directory), variants="int2"))
