"""KV cache: prefill + token-by-token decode equals the full forward with the reference mask, for every
family, with prompts of different lengths in one batch."""

import numpy as np
import pytest
import torch

from glmkit.batch import Batch
from glmkit.model.config import GLMConfig
from glmkit.errors import GlmkitError
from glmkit.model.kv_cache import KVCache, decode_layout, decode_one_token, prefill
from glmkit.model.glm import GLM

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


@pytest.mark.parametrize("used", [False, True], ids=["whole-cache", "filled-slots"])
@pytest.mark.parametrize("name", FAMILIES)
def test_decode_equals_full_forward(name, used):
    c = GLMConfig.from_name(name)
    model = GLM(c).eval()
    rng = np.random.default_rng(0)
    lengths, seps = [7, 5], [7, 4]             # row 1: a prompt with a causal tail after its Part A
    prompts = [rng.integers(0, c.vocab_size, n) for n in lengths]
    new = [rng.integers(0, c.vocab_size, 4) for _ in lengths]
    mask_pos = [3, 2]
    P, T = max(lengths), 12
    ref = _reference_rows(prompts, seps, new, mask_pos, T)
    with torch.no_grad():
        h = model(ref.input_ids, ref.position_ids, ref.block_position_ids, model.attention_mask(ref, "sdpa"))
        want = model.logits(h)                                                   # (B, T, V)

    def pad(rows_of):
        out = torch.zeros(2, P, dtype=torch.long)
        for b, n in enumerate(lengths):
            out[b, :n] = rows_of[b, :n]
        return out

    cache = KVCache.for_model(model, batch_size=2, max_len=P + 4)
    with torch.no_grad():
        logits = prefill(model, cache, pad(ref.input_ids), pad(ref.position_ids), pad(ref.block_position_ids),
                         lengths=torch.tensor(lengths), sep=torch.tensor(seps))
        for b, n in enumerate(lengths):
            torch.testing.assert_close(logits[b], want[b, n - 1], atol=1e-4, rtol=1e-4)
        for i in range(4):
            cols = torch.tensor(lengths) + i                                     # the token's column in ref
            rows = torch.arange(2)
            tok = ref.input_ids[rows, cols][:, None]
            logits = decode_one_token(model, cache, tok, ref.position_ids[rows, cols][:, None],
                                      ref.block_position_ids[rows, cols][:, None], torch.tensor([P + i]),
                                      used=P + i + 1 if used else None)
            torch.testing.assert_close(logits, want[rows, cols], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("used", [None, 5])
def test_decode_several_tokens_at_once(used):
    c = GLMConfig.from_name("tiny")
    model = GLM(c).eval()
    ids = torch.randint(0, c.vocab_size, (1, 9))
    pos = torch.arange(9)[None]
    zero = torch.zeros_like(pos)
    with torch.no_grad():
        want = model.logits(model(ids, pos, zero))          # causal everywhere (sep = 0 after prompt of 1)
        cache = KVCache.for_model(model, 1, 9)
        prefill(model, cache, ids[:, :1], pos[:, :1], zero[:, :1])
        got = decode_one_token(model, cache, ids[:, 1:5], pos[:, 1:5], zero[:, 1:5], torch.arange(1, 5), used=used)
        torch.testing.assert_close(got, want[:, 4], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "tiny-glm", "tiny-chatglm"])
def test_unpadded_rows_decode_without_a_mask(name):
    """Rows of one prompt length, one token a step: the eager step reads only the filled slots with no
    mask at all; it must give what the whole-cache masked step and a full causal forward give."""
    c = GLMConfig.from_name(name)
    model = GLM(c).eval()
    ids = torch.randint(0, c.vocab_size, (3, 10))
    pos = torch.arange(10)[None].expand(3, -1)
    zero = torch.zeros_like(pos)
    with torch.no_grad():
        want = model.logits(model(ids, pos, zero))                                  # causal, (B, T, V)
        whole, filled = KVCache.for_model(model, 3, 14), KVCache.for_model(model, 3, 14)
        for cache in (whole, filled):
            prefill(model, cache, ids[:, :4], pos[:, :4], zero[:, :4], sep=torch.zeros(3, dtype=torch.long))
        assert not filled.padded
        for t in range(4, 10):
            args = (ids[:, t:t + 1], pos[:, t:t + 1], zero[:, t:t + 1], torch.tensor([t]))
            a = decode_one_token(model, whole, *args)
            b = decode_one_token(model, filled, *args, used=t + 1)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b, want[:, t], atol=1e-4, rtol=1e-4)


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


def test_cache_errors_name_the_fix():
    model = GLM(GLMConfig.from_name("tiny"))
    cache = KVCache.for_model(model, 1, 4)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(GlmkitError, match="batch_size=2"):
        prefill(model, cache, ids, ids, ids)
    with pytest.raises(GlmkitError, match="max_len"):
        prefill(model, cache, torch.zeros(1, 6, dtype=torch.long), *(torch.zeros(1, 6, dtype=torch.long),) * 2)
