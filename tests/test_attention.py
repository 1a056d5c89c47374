"""Attention backends against the dense SDPA reference; RoPE flavours; the split plan's bookkeeping.

Rows are written by hand in the exact layout of DESIGN.md §1 by `helpers.make_batch`.
"""

import numpy as np
import pytest
import torch
from helpers import ROWS, make_batch

from glmkit.batch import dense_mask
from glmkit.errors import GlmkitError
from glmkit.model.attention import (
    AttentionMask,
    Rotary,
    attend,
    make_attention_mask,
    resolve_backend,
    split_applies,
    split_plan,
)
from glmkit.model.config import GLMConfig


def _qkv(B, T, H=4, Hkv=2, D=16):
    return torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)


def _reference(q, k, v, batch):
    """Plain softmax attention with the dense rule, heads repeated by hand: the ground truth."""
    H, Hkv = q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    s = s.masked_fill(~dense_mask(batch)[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("layout", ["glm", "span"])
@pytest.mark.parametrize("backend", ["sdpa", "flex", "segments"])
def test_backends_match_reference(rows, layout, backend):
    batch = make_batch(ROWS[rows], T=24, layout=layout)
    q, k, v = _qkv(*batch.shape)
    out = attend(q, k, v, make_attention_mask(batch, backend))
    torch.testing.assert_close(out, _reference(q, k, v, batch), atol=2e-5, rtol=1e-4)


def test_causal_default_is_causal():
    q, k, v = _qkv(2, 10)
    batch = make_batch([[("clm", 10)], [("clm", 10)]], T=10)
    torch.testing.assert_close(attend(q, k, v, None), _reference(q, k, v, batch), atol=2e-5, rtol=1e-4)


def test_split_plan_partitions_tokens():
    batch = make_batch(ROWS["packed"], T=24)
    assert split_applies(batch)
    assert not split_applies(make_batch(ROWS["packed"], T=24, layout="span"))
    p = split_plan(batch)
    allidx = torch.cat((p.a_idx, p.b_idx))
    assert torch.equal(allidx.sort().values, torch.arange(2 * 24))
    assert torch.equal(allidx[p.inverse], torch.arange(2 * 24))
    # samples in flat order: each sample's keys span exactly its own tokens
    assert int(p.cu_k[-1]) == 48 and int(p.cu_a[-1]) + int(p.cu_b[-1]) == 48
    # the first sample of row 0: Part A 6 tokens, Part B 3
    assert p.cu_a[1] == 6 and p.cu_b[1] == 3 and p.cu_k[1] == 9
    # every Part A token is < sep of its sample, every Part B token >= it
    sep = batch.sep.reshape(-1)
    cols = torch.arange(48) % 24
    assert (cols[p.a_idx] < sep[p.a_idx]).all() and (cols[p.b_idx] >= sep[p.b_idx]).all()


def _emulated_split(q, k, v, plan):
    """The split decomposition with plain per-sample math: Part A bidirectional within itself, Part B
    causal with flash's bottom-right alignment against the whole sample (what `_split` asks of flash)."""
    B, T, H, D = q.shape
    qf, kf, vf = (x.reshape(B * T, H, D) for x in (q, k, v))
    outs_a, outs_b = [], []
    for i in range(len(plan.cu_k) - 1):
        ka = plan.a_idx[int(plan.cu_a[i]):int(plan.cu_a[i + 1])]
        kb = plan.b_idx[int(plan.cu_b[i]):int(plan.cu_b[i + 1])]
        keys = torch.cat((ka, kb))
        if len(ka):
            s = torch.einsum("qhd,khd->hqk", qf[ka], kf[ka]) / D ** 0.5
            outs_a.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vf[ka]))
        if len(kb):
            s = torch.einsum("qhd,khd->hqk", qf[kb], kf[keys]) / D ** 0.5
            nq, nk = len(kb), len(keys)
            allowed = torch.arange(nk)[None] <= torch.arange(nq)[:, None] + (nk - nq)   # bottom-right
            s = s.masked_fill(~allowed, float("-inf"))
            outs_b.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vf[keys]))
    return torch.cat(outs_a + outs_b).index_select(0, plan.inverse).view(B, T, H, D)


def test_split_emulated_with_reference_math():
    """The split decomposition itself reproduces the reference on the CPU."""
    batch = make_batch(ROWS["packed"], T=24)
    q, k, v = _qkv(*batch.shape, H=4, Hkv=4)
    out = _emulated_split(q, k, v, split_plan(batch))
    torch.testing.assert_close(out, _reference(q, k, v, batch), atol=2e-5, rtol=1e-4)


def test_auto_picks_split_only_for_long_rows(monkeypatch):
    """On CUDA in half precision `auto` takes the split for rows >= SPLIT_MIN_LEN, Flex below (the
    kernel table of DESIGN.md §4); fp32 and the span layout always get Flex. (Decided on the host: no
    GPU needed; the split's availability check is stubbed.)"""
    import glmkit.model.attention as att
    monkeypatch.setattr(att, "split_available", lambda: True)
    short = make_batch(ROWS["packed"], T=24)
    long = make_batch([[("glm", 2000, [20, 7])], [("clm", 2048)]], T=att.SPLIT_MIN_LEN)
    assert resolve_backend("auto", "cuda", torch.bfloat16, short) == "flex"
    assert resolve_backend("auto", "cuda", torch.bfloat16, long) == "split"
    assert resolve_backend("auto", "cuda", torch.float32, long) == "flex"
    assert resolve_backend("auto", "cuda", torch.bfloat16, make_batch(ROWS["packed"], T=24, layout="span")) == "flex"


def test_flex_kernel_options_are_checked_and_leave_cpu_results_alone():
    import glmkit.model.attention as att
    with pytest.raises(GlmkitError, match="BLOK_M.*BLOCK_M"):
        att.check_flex_options('{"BLOK_M": 64}')
    with pytest.raises(GlmkitError, match="not JSON"):
        att.check_flex_options("{BLOCK_M: 64}")
    assert att.check_flex_options(None) is att.check_flex_options("") is att.check_flex_options({}) is None
    batch = make_batch(ROWS["packed"], T=24)
    q, k, v = _qkv(*batch.shape)
    options = att.check_flex_options('{"BLOCK_M": 64, "BLOCK_N": 64}')
    assert options == {"BLOCK_M": 64, "BLOCK_N": 64}
    mask = make_attention_mask(batch, "flex", flex_options=options)
    assert mask.flex_options == options
    out = attend(q, k, v, mask)                                        # CPU: options are for the GPU kernel
    torch.testing.assert_close(out, _reference(q, k, v, batch), atol=2e-5, rtol=1e-4)


def test_backend_and_flex_options_are_the_models_not_the_process():
    """Two models in one process keep their own run-time choices; the config holds none of them."""
    from glmkit.model.glm import GLM
    a = GLM(GLMConfig.from_name("tiny")).set_runtime(attention_backend="flex", flex_options='{"BLOCK_M": 64}')
    b = GLM(GLMConfig.from_name("tiny"))
    batch = make_batch(ROWS["packed"], T=24)
    assert (a.attention_mask(batch).backend, a.attention_mask(batch).flex_options) == ("flex", {"BLOCK_M": 64})
    assert (b.attention_mask(batch).backend, b.attention_mask(batch).flex_options) == ("sdpa", None)   # auto, CPU
    assert "attention_backend" not in a.config.to_dict()
    with pytest.raises(GlmkitError, match="unknown attention backend 'fast'"):
        b.set_runtime(attention_backend="fast")


def _varlen_math(q, k, v, cu_q, cu_k, causal, scale=None, gqa=False):
    """What flash's varlen computes, in plain math: per sequence, softmax attention of its queries over
    its keys; causal is bottom-right aligned (query i of nq sees keys <= i + nk - nq)."""
    if k.shape[1] != q.shape[1]:
        assert gqa, "heads differ but GQA was not asked for"
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    for i in range(len(cu_q) - 1):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        nq, nk = qs.stop - qs.start, ks.stop - ks.start
        if nq == 0:
            continue
        s = torch.einsum("qhd,khd->hqk", q[qs], k[ks]) * scale
        if causal:
            allowed = torch.arange(nk)[None] <= torch.arange(nq)[:, None] + (nk - nq)
            s = s.masked_fill(~allowed, float("-inf"))
        out[qs] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[ks])
    return out


def _varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return _varlen_math(query, key, value, cu_seq_q, cu_seq_k, is_causal)


def _varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False):
    assert tuple(window_size) in ((-1, -1), (-1, 0))
    return _varlen_math(query, key, value, cu_seq_q, cu_seq_k, tuple(window_size) == (-1, 0), scale, enable_gqa)


@pytest.mark.parametrize("fake", [_varlen_2_10, _varlen_2_11], ids=["torch-2.10-signature", "torch-2.11-signature"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_split_backend_through_each_varlen_signature(monkeypatch, fake, heads):
    """`_split` itself (gathers, both varlen calls, the inverse scatter) on the CPU, with flash's varlen
    replaced by plain math of the same signature: equal to the dense reference, with or without GQA,
    whatever the torch version's varlen_attn takes."""
    import torch.nn.attention.varlen as vl

    from glmkit.model.attention import _split
    monkeypatch.setattr(vl, "varlen_attn", fake)
    batch = make_batch(ROWS["packed"], T=24)
    q, k, v = _qkv(*batch.shape, H=heads[0], Hkv=heads[1])
    out = _split(q, k, v, split_plan(batch), None)
    torch.testing.assert_close(out, _reference(q, k, v, batch), atol=2e-5, rtol=1e-4)
    q.requires_grad_()
    _split(q, k, v, split_plan(batch), None).square().sum().backward()
    q2 = q.detach().clone().requires_grad_()
    _reference(q2, k, v, batch).square().sum().backward()
    torch.testing.assert_close(q.grad, q2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_segments_gradients_match_the_dense_mask(heads):
    """The segments backend (no mask, one sample at a time) gives the dense reference's outputs and
    gradients on packed, padded rows of GLM, CLM and MLM samples."""
    batch = make_batch(ROWS["packed"], T=24)
    H, Hkv = heads
    grads = {}
    for backend in ("sdpa", "segments"):
        torch.manual_seed(0)
        q, k, v = (x.requires_grad_() for x in _qkv(*batch.shape, H=H, Hkv=Hkv))
        mask = make_attention_mask(batch, backend)
        assert mask.backend == backend
        out = attend(q, k, v, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[backend] = (out, q.grad, k.grad, v.grad)
    for a, b in zip(grads["sdpa"], grads["segments"]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_auto_on_the_cpu_takes_segments_for_long_rows():
    import glmkit.model.attention as att
    long = make_batch([[("glm", 880, [20, 7]), ("clm", 100)], [("mlm", 1000)]], T=att.SEGMENTS_MIN_LEN)
    assert resolve_backend("auto", "cpu", torch.float32, long) == "segments"
    assert resolve_backend("auto", "cpu", torch.float32, make_batch(ROWS["packed"], T=24)) == "sdpa"
    span = make_batch([[("glm", 880, [20, 7])]], T=att.SEGMENTS_MIN_LEN, layout="span")
    assert resolve_backend("auto", "cpu", torch.float32, span) == "sdpa"
    assert resolve_backend("segments", "cpu", torch.float32, span) == "sdpa"       # documented fallback


def test_backend_resolution():
    batch = make_batch(ROWS["one_sample"], T=24)
    assert resolve_backend("auto", "cpu") == "sdpa"
    with pytest.raises(GlmkitError, match="split"):
        resolve_backend("split", "cpu")
    with pytest.raises(GlmkitError, match="unknown attention backend"):
        make_attention_mask(batch, "fast")
    assert isinstance(make_attention_mask(batch, "auto"), AttentionMask)


def _hf_style_rope(x, pos, dim, theta, interleaved):
    """HF transformers' formulas, written out: cat(freqs, freqs), rotate_half / interleaved."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    emb = torch.cat([pos[..., None].float() * inv] * 2, -1)[:, :, None]       # (B, T, 1, dim)
    cos, sin = emb.cos(), emb.sin()
    xr, xp = x[..., :dim], x[..., dim:]
    if interleaved:
        cos = cos[..., : dim // 2].repeat_interleave(2, -1)
        sin = sin[..., : dim // 2].repeat_interleave(2, -1)
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
    else:
        rot = torch.cat((-xr[..., dim // 2:], xr[..., : dim // 2]), -1)
    return torch.cat((xr * cos + rot * sin, xp), -1)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_matches_hf_formula(interleaved):
    c = GLMConfig.from_name("tiny", rope_interleaved=interleaved)
    rot = Rotary(c)
    x = torch.randn(2, 7, 4, 16)
    pos, block = torch.randint(0, 50, (2, 7)), torch.randint(0, 5, (2, 7))
    got = rot.rotate(x, *rot(pos, block, x.dtype))
    torch.testing.assert_close(got, _hf_style_rope(x, pos + block, 8, c.rope_theta, interleaved))


def test_rope_2d_rotates_halves_by_each_position():
    c = GLMConfig.from_name("tiny-chatglm")
    rot = Rotary(c)
    x = torch.randn(1, 5, 4, 16)
    pos, block = torch.randint(0, 50, (1, 5)), torch.randint(0, 5, (1, 5))
    got = rot.rotate(x, *rot(pos, block, x.dtype))
    want = torch.cat((_hf_style_rope(x[..., :8], pos, 8, 10000.0, False),
                      _hf_style_rope(x[..., 8:], block, 8, 10000.0, False)), -1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_plain_rows_need_no_mask(backend):
    for rows, kind in (([[("clm", 24)], [("clm", 24)]], "causal"), ([[("mlm", 24)], [("mlm", 24)]], "full")):
        batch = make_batch(rows, T=24)
        mask = make_attention_mask(batch, backend)
        assert mask.backend == kind
        q, k, v = _qkv(*batch.shape)
        torch.testing.assert_close(attend(q, k, v, mask), _reference(q, k, v, batch), atol=2e-5, rtol=1e-4)
    assert make_attention_mask(make_batch([[("clm", 20)]], T=24), backend).backend == backend   # padded


def _random_rows(rng, B, T):
    rows = []
    for _ in range(B):
        row, used = [], 0
        while True:
            kind = rng.choice(["glm", "clm", "mlm"])
            if kind == "glm":
                spans = list(rng.integers(1, 4, size=rng.integers(1, 3)))
                need = int(rng.integers(3, 8))
                sample, size = ("glm", need, spans), need + sum(spans) + len(spans)
            else:
                size = int(rng.integers(2, 7))
                sample = (kind, size)
            if used + size > T:
                break
            row.append(sample)
            used += size
        rows.append(row)
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_random_packed_rows_every_path_matches_reference(seed):
    """Random mixtures of GLM / CLM / MLM samples packed into padded rows, both layouts."""
    rng = np.random.default_rng(seed)
    rows = _random_rows(rng, 3, 32)
    for layout in ("glm", "span"):
        batch = make_batch(rows, T=32, layout=layout, seed=seed)
        q, k, v = _qkv(*batch.shape)
        ref = _reference(q, k, v, batch)
        for backend in ("sdpa", "flex", "segments"):
            torch.testing.assert_close(attend(q, k, v, make_attention_mask(batch, backend)), ref,
                                       atol=2e-5, rtol=1e-4)
        assert split_applies(batch) == (layout == "glm" or all(
            len(s[2]) == 1 for row in rows for s in row if s[0] == "glm"))
        if layout == "glm":
            q4, k4, v4 = _qkv(*batch.shape, H=4, Hkv=4)
            torch.testing.assert_close(_emulated_split(q4, k4, v4, split_plan(batch)),
                                       _reference(q4, k4, v4, batch), atol=2e-5, rtol=1e-4)


def test_split_applies_to_batches_from_the_packing_code():
    from glmkit.bench.train import make_batch as packed_batch

    for kind in ("glm", "clm"):
        batch, _ = packed_batch(kind, 3, 128, vocab=200)
        batch = batch.to("cpu")
        assert split_applies(batch)
        p = split_plan(batch)
        assert int(p.cu_k[-1]) == 3 * 128


@pytest.mark.slow
def test_compiled_flex_inside_a_block_matches_sdpa():
    """Regression: compiled Flex (inductor CPU, torch 2.13) gave wrong outputs when v was a slice of the
    fused qkv projection and a row was shorter than the block size; `attend` and `_block_mask` avoid both."""
    from glmkit.model.glm import GLM

    c = GLMConfig.from_name("tiny")
    model = GLM(c).eval()
    batch = make_batch(ROWS["packed"], T=24)
    args = (batch.input_ids, batch.position_ids, batch.block_position_ids)
    with torch.no_grad():
        ref = model(*args, make_attention_mask(batch, "sdpa"))
        for block in model.layers:
            block.compile()
        got = model(*args, make_attention_mask(batch, "flex"))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
