"""The memory plan (`glmkit.infer.plan`, `glmkit plan`) against what is really allocated.

- weights and KV cache: exact, against the bytes of a built model's tensors and of the engine's pool
  (`KVCache.for_model`), every family, fp32 and bf16 (the MoE router stays fp32);
- activations: the modelled peak of one prefill chunk within 25% of the measured peak of the same
  forward through the engine's runner (the last chunk of a full row), on every family in fp32 and on
  GLM-4 and MoE shapes in bf16. CPU: torch's memory profiler (`helpers.measured_cpu_peak`); CUDA:
  `torch.cuda.max_memory_allocated` for weights + pool + the forward (skipped without a GPU).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import measured_cpu_peak

from glmkit.cli import main
from glmkit.errors import GlmkitError
from glmkit.infer.plan import (
    forward_activation_bytes,
    kv_cache_bytes,
    parse_memory,
    plan_memory,
    weight_bytes,
)
from glmkit.infer.runner import forward_rows
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM
from glmkit.model.kv_cache import KVCache

FAMILIES = ["tiny", "tiny-0414", "tiny-moe", "tiny-glm", "tiny-glm130b", "tiny-chatglm"]
TOLERANCE = 0.25


def built(name: str, dtype: torch.dtype, max_len: int = 256, device: str = "cpu", **overrides) -> GLM:
    from glmkit.checkpoint.hf import keep_fp32

    config = GLMConfig.from_name(name, **overrides)
    config = config.with_(max_position_embeddings=max(config.max_position_embeddings, max_len))
    model = GLM(config).eval().to(device)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not keep_fp32(name):       # as the loaders cast
            t.data = t.data.to(dtype)
    return model


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", FAMILIES)
def test_weights_and_kv_cache_are_exact(name, dtype):
    model = built(name, dtype)
    assert weight_bytes(model.config, dtype) == nbytes(list(model.parameters()) + list(model.buffers()))
    pool = KVCache.for_model(model, rows=3, max_len=40)
    assert kv_cache_bytes(model.config, model.embed_tokens.weight.dtype, 3, 40) == pool.bytes()


def last_chunk(model, pool, chunk: int):
    """Fill the row up to max_len - chunk, then return a function running the last chunk + its logits."""
    V, S = model.config.vocab_size, pool.max_len
    first = S - chunk
    with torch.no_grad():
        if first:
            forward_rows(model, pool, 0, [[i % V for i in range(first)]], [list(range(first))], [[0] * first],
                         [list(range(first))], [0])
    slots = [list(range(first, S))]

    def run():
        with torch.no_grad():
            h = forward_rows(model, pool, 0, [[i % V for i in range(chunk)]], slots, [[0] * chunk], slots, [0])
            model.logits(h[:, -1]).float()
    return run


@pytest.mark.parametrize("name, dtype, chunk, max_len, kv", [(f, torch.float32, 128, 256, "auto") for f in FAMILIES] + [
    ("tiny", torch.bfloat16, 256, 256, "auto"), ("tiny-moe", torch.bfloat16, 64, 256, "auto"),
    ("small", torch.float32, 256, 512, "auto"),
    ("tiny", torch.float32, 128, 256, "fp8"), ("small", torch.float32, 64, 512, "bf16"), ("small", torch.bfloat16, 1, 512, "fp8")])
def test_prefill_activation_peak_matches_measured(name, dtype, chunk, max_len, kv):
    """kv: a KV cache dtype other than the model's adds the upcast copy of the keys and values read."""
    model = built(name, dtype, max_len)
    pool = KVCache.for_model(model, rows=1, max_len=max_len, kv_dtype=kv)
    run = last_chunk(model, pool, chunk)
    run()                                   # warm: one-time allocations (thread pools, caches) not counted
    measured = measured_cpu_peak(run)
    planned = forward_activation_bytes(model.config, dtype, 1, chunk, max_len, kv_upcast=kv != "auto")
    assert abs(planned - measured) <= TOLERANCE * measured, (planned, measured)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name, dtype", [("small", torch.bfloat16), ("tiny-moe", torch.bfloat16), ("small", torch.float32)])
def test_plan_total_matches_cuda_peak(name, dtype):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    max_len, chunk = 2048, 1024
    model = built(name, dtype, max_len, device="cuda")
    pool = KVCache.for_model(model, rows=1, max_len=max_len)
    run = last_chunk(model, pool, chunk)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    plan = plan_memory(model.config, dtype, 1, max_len, chunk)
    assert abs(plan.total - measured) <= TOLERANCE * measured, (plan.to_dict(), measured)


def test_plan_of_a_published_shape():
    """GLM-4-9B in bf16, 8 rows of 32K: the KV pool is 8·32768·40·2·2·128·2 bytes = 10 GiB; a one-shot
    32K prefill's activations are dominated by the 32K x 32K mask (bool + SDPA's bf16 copy: 3 GiB)."""
    plan = plan_memory(GLMConfig.from_name("glm-4-9b"), torch.bfloat16, rows=8, max_len=32768)
    assert plan.kv_cache == 10 * 2**30
    config = GLMConfig.from_name("glm-4-9b")
    assert plan.weights == (config.num_params() + config.rotary_dim // 2) * 2       # + the inv_freq buffer
    assert 3 * 2**30 < plan.prefill_activations < 6 * 2**30
    chunked = plan_memory(GLMConfig.from_name("glm-4-9b"), torch.bfloat16, rows=8, max_len=32768, chunk=2048)
    assert chunked.prefill_activations < plan.prefill_activations / 8
    assert plan.fits(parse_memory("80GiB")) and not plan.fits(parse_memory("24GiB"))


@pytest.mark.parametrize("text, value", [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("512 MiB", 512 * 2**20),
                                         ("1.5GiB", 3 * 2**29), ("1000", 1000)])
def test_parse_memory(text, value):
    assert parse_memory(text) == value


def test_plan_errors():
    with pytest.raises(GlmkitError, match="chunk = 64 is longer than max_len = 32"):
        plan_memory(GLMConfig.from_name("tiny"), max_len=32, chunk=64)
    with pytest.raises(GlmkitError, match="rows = 0"):
        plan_memory(GLMConfig.from_name("tiny"), rows=0)


def test_cli_plan(tmp_path, capsys):
    assert main(["plan", "tiny", "--dtype", "fp32", "--rows", "2", "--max-len", "128", "--memory", "1MiB",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    config = GLMConfig.from_name("tiny")
    assert out["kv_cache"] == 2 * 128 * 2 * 2 * 2 * 16 * 4
    assert out["weights"] == weight_bytes(config, torch.float32)
    assert out["total"] == out["weights"] + out["kv_cache"] + out["activations"]
    assert out["fits"] is (out["total"] <= 2**20)
    config.save(tmp_path)                   # a checkpoint folder's config.json is read the same way
    assert main(["plan", str(tmp_path), "--dtype", "fp32", "--rows", "2", "--max-len", "128"]) == 0
    assert "KV cache" in capsys.readouterr().out
