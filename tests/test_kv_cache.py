"""KV cache: prefill + token-by-token decode equals the full forward with the reference mask, for every
family, with prompts of different lengths in one batch."""

import numpy as np
import pytest
import torch

from glmkit.batch import Batch
from glmkit.infer.runner import decode_static, forward_rows
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM
from glmkit.model.kv_cache import KVCache, decode_layout

FAMILIES = ["tiny", "tiny-0414", "tiny-moe", "tiny-glm", "tiny-glm130b", "tiny-chatglm"]


def _reference_rows(prompts, seps, new, mask_pos, T):
    """Full rows [prompt][decoded tokens] in the glm layout (decoded tokens are Part B of one span)."""
    B = len(prompts)
    f = {k: np.zeros((B, T), dtype=np.int64) for k in
         ("input_ids", "targets", "position_ids", "block_position_ids", "segment_ids", "sep", "span_ids")}
    for b, (p, s) in enumerate(zip(prompts, seps)):
        n, m = len(p), len(new[b])
        f["input_ids"][b, :n + m] = np.concatenate((p, new[b]))
        f["position_ids"][b, :s] = np.arange(s)
        f["position_ids"][b, s:n] = s - 1                 # causal prompt tail ([gMASK] <sop> ...)
        f["block_position_ids"][b, s:n] = np.arange(1, n - s + 1)
        f["position_ids"][b, n:n + m] = mask_pos[b]
        f["block_position_ids"][b, n:n + m] = np.arange(1, m + 1) + (n - s)
        f["sep"][b] = s
        f["span_ids"][b, s:] = 1
        f["segment_ids"][b, n + m:] = -1
        f["sep"][b, n + m:] = T
    f["loss_mask"] = np.zeros((B, T), dtype=bool)
    return Batch(**f).to("cpu")


@pytest.mark.parametrize("compiled_shapes", [False, True], ids=["filled-slots", "whole-pool"])
@pytest.mark.parametrize("name", FAMILIES)
def test_decode_equals_full_forward(name, compiled_shapes):
    """Prompts of different lengths (one with a causal tail after its Part A) prefilled row by row, then
    decoded a token a step for both rows at once: the logits of every step equal a full forward with the
    reference mask. The eager step reads the filled slots only; the static one the whole pool."""
    c = GLMConfig.from_name(name)
    model = GLM(c).eval()
    rng = np.random.default_rng(0)
    lengths, seps = [7, 5], [7, 4]             # row 1: a prompt with a causal tail after its Part A
    prompts = [rng.integers(0, c.vocab_size, n) for n in lengths]
    new = [rng.integers(0, c.vocab_size, 4) for _ in lengths]
    mask_pos = [3, 2]
    T = 12
    ref = _reference_rows(prompts, seps, new, mask_pos, T)
    with torch.no_grad():
        h = model(ref.input_ids, ref.position_ids, ref.block_position_ids, model.attention_mask(ref, "sdpa"))
        want = model.logits(h)                                                   # (B, T, V)
    cache = KVCache.for_model(model, rows=2, max_len=T)
    col = lambda name, b, cols: [int(getattr(ref, name)[b, c]) for c in cols]
    with torch.no_grad():
        for b, n in enumerate(lengths):                                          # prefill each row alone
            cols = list(range(n))
            h = forward_rows(model, cache, b, [col("input_ids", b, cols)], [col("position_ids", b, cols)],
                             [col("block_position_ids", b, cols)], [cols], [seps[b]])
            torch.testing.assert_close(model.logits(h[0, -1]), want[b, n - 1], atol=1e-4, rtol=1e-4)
        for i in range(4):                                                       # both rows, one token a step
            cols = [[n + i] for n in lengths]
            args = [[col(f, b, cols[b]) for b in range(2)] for f in ("input_ids", "position_ids", "block_position_ids")]
            if compiled_shapes:
                t = lambda x: torch.tensor(x)
                h = decode_static(model, cache, *map(t, args), t(cols), t(seps))
            else:
                h = forward_rows(model, cache, 0, *args, cols, seps)
            got = model.logits(h[:, -1])
            torch.testing.assert_close(got, want[[0, 1], [c[0] for c in cols]], atol=1e-4, rtol=1e-4)


def test_decode_several_tokens_at_once():
    c = GLMConfig.from_name("tiny")
    model = GLM(c).eval()
    ids = torch.randint(0, c.vocab_size, (1, 9))
    pos = torch.arange(9)[None]
    zero = torch.zeros_like(pos)
    with torch.no_grad():
        want = model.logits(model(ids, pos, zero))          # causal everywhere (sep = 0)
        cache = KVCache.for_model(model, 1, 9)
        forward_rows(model, cache, 0, [ids[0, :1].tolist()], [[0]], [[0]], [[0]], [0])
        h = forward_rows(model, cache, 0, [ids[0, 1:5].tolist()], [list(range(1, 5))], [[0] * 4],
                         [list(range(1, 5))], [0])
        torch.testing.assert_close(model.logits(h[:, -1]), want[:, 4], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "tiny-glm", "tiny-chatglm"])
def test_equal_length_rows_decode_without_a_mask(name):
    """Rows at the same slot, one token a step: the step needs no mask at all (every filled slot is
    visible), and gives what a full causal forward gives."""
    c = GLMConfig.from_name(name)
    model = GLM(c).eval()
    ids = torch.randint(0, c.vocab_size, (3, 10))
    with torch.no_grad():
        pos = torch.arange(10)[None].expand(3, -1)
        want = model.logits(model(ids, pos, torch.zeros_like(pos)))                  # causal, (B, T, V)
        cache = KVCache.for_model(model, 3, 14)
        for b in range(3):
            forward_rows(model, cache, b, [ids[b, :4].tolist()], [list(range(4))], [[0] * 4], [list(range(4))], [0])
        for t in range(4, 10):
            h = forward_rows(model, cache, 0, ids[:, t:t + 1].tolist(), [[t]] * 3, [[0]] * 3, [[t]] * 3, [0] * 3)
            torch.testing.assert_close(model.logits(h[:, -1]), want[:, t], atol=1e-4, rtol=1e-4)


def test_rows_move_with_their_contents():
    """swap / copy_prefix move a row's filled slots (every layer), and its length with it."""
    model = GLM(GLMConfig.from_name("tiny")).eval()
    cache = KVCache.for_model(model, rows=3, max_len=8)
    for t in cache.k + cache.v:
        t.copy_(torch.randn_like(t))
    before = [t.clone() for t in cache.k + cache.v]
    cache.lengths = [5, 3, 0]
    cache.swap(0, 1)
    assert cache.lengths == [3, 5, 0]
    for t, old in zip(cache.k + cache.v, before):
        assert torch.equal(t[0, :3], old[1, :3]) and torch.equal(t[1, :5], old[0, :5])
    cache.copy_prefix(1, 2, 4)
    assert cache.lengths[2] == 4
    for t, old in zip(cache.k + cache.v, before):
        assert torch.equal(t[2, :4], old[0, :4])


@pytest.mark.parametrize("name", ["tiny", "tiny-glm"])          # untied; tied (the embedding is the head)
def test_decode_layout_keeps_values_and_parameters(name):
    c = GLMConfig.from_name(name)
    model = GLM(c).eval()
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    ids = torch.randint(0, c.vocab_size, (2, 6))
    pos = torch.arange(6)[None].expand(2, -1)
    with torch.no_grad():
        want = model.logits(model(ids, pos, torch.zeros_like(pos)))
        assert decode_layout(model) is model
        got = model.logits(model(ids, pos, torch.zeros_like(pos)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert dict(model.named_parameters()) == params                  # the same Parameter objects
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    w = model.layers[0].self_attn.qkv_proj.weight
    assert head.t().is_contiguous() and w.t().is_contiguous() and not w.is_contiguous()
    decode_layout(model)                                             # idempotent
    assert w.t().is_contiguous()
    bf16 = decode_layout(GLM(c).to(torch.bfloat16))                  # unmeasured dtypes stay as they are
    assert bf16.layers[0].self_attn.qkv_proj.weight.is_contiguous()


def test_fp32_rms_norm_fast_path_is_bit_equal():
    """RMSNorm's fp32 path (one F.rms_norm call) computes exactly the HF formula it replaces."""
    from glmkit.model.glm import RMSNorm
    torch.manual_seed(0)
    for dim in (16, 64, 256, 1000):
        norm = RMSNorm(dim, 1e-5)
        with torch.no_grad():
            norm.weight.normal_()
        for shape in ((1, 1, dim), (3, 7, dim), (2, 5, 4, dim)):
            x = torch.randn(shape) * 3
            want = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
            assert torch.equal(norm(x), want), (dim, shape)
