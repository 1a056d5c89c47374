"""CUDA only (skipped elsewhere): every backend's forward AND backward against the dense reference in
bf16, both layouts, packed rows, GQA; the model's loss and gradients per backend; compiled blocks;
KV-cache decoding in bf16 and with an fp8 pool. Run by scripts/gpu_check.sh."""

import pytest
import torch
from helpers import make_batch

from glmkit.batch import dense_mask
from glmkit.infer.runner import forward_rows
from glmkit.model.attention import attend, make_attention_mask, split_available
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM
from glmkit.model.kv_cache import KVCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ROWS = {
    "one_sample": [[("glm", 150, [20, 7, 3])], [("glm", 100, [40, 30])], [("glm", 180, [5])]],
    "packed": [[("glm", 60, [9, 4]), ("clm", 50), ("mlm", 40)], [("glm", 70, [12]), ("glm", 50, [20, 2])],
               [("clm", 200)]],
}


def _reference(q, k, v, batch):
    """fp32 softmax attention with the dense rule (GQA repeated by hand)."""
    H, Hkv = q.shape[2], k.shape[2]
    q, k, v = q.float(), k.float().repeat_interleave(H // Hkv, 2), v.float().repeat_interleave(H // Hkv, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    s = s.masked_fill(~dense_mask(batch)[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def _inputs(batch, H=8, Hkv=2, D=64):
    B, T = batch.shape
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(B, T, h, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
            for h in (H, Hkv, Hkv)]


def test_split_is_available_on_this_gpu():
    assert split_available(), "varlen flash attention missing or failing its self-check: auto will use flex"


@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("layout", ["glm", "span"])
@pytest.mark.parametrize("backend", ["sdpa", "flex", "split"])
def test_backend_forward_backward_matches_reference(rows, layout, backend):
    batch = make_batch(ROWS[rows], T=256, layout=layout).to("cuda")
    mask = make_attention_mask(batch, backend, torch.bfloat16)
    if backend == "split":
        assert mask.backend == ("split" if layout == "glm" else "flex")
    q, k, v = _inputs(batch)
    out = attend(q, k, v, mask)
    grad = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    ref = _reference(q, k, v, batch)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "tiny-chatglm"])
def test_model_loss_and_grads_per_backend(name):
    c = GLMConfig.from_name(name)
    model = GLM(c).cuda().to(torch.bfloat16)
    batch = make_batch(ROWS["packed"], T=256, vocab=c.vocab_size).to("cuda")
    results = {}
    for backend in ("sdpa", "flex", "split"):
        model.zero_grad()
        loss = model.loss(batch, model.attention_mask(batch, backend))
        loss.backward()
        results[backend] = (loss.detach().float(), model.embed_tokens.weight.grad.float().clone())
    for backend in ("flex", "split"):
        torch.testing.assert_close(results[backend][0], results["sdpa"][0], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(results[backend][1], results["sdpa"][1], atol=2e-3, rtol=5e-2)


@pytest.mark.parametrize("backend", ["flex", "split"])
def test_compiled_blocks(backend):
    c = GLMConfig.from_name("tiny")
    model = GLM(c).cuda().to(torch.bfloat16)
    batch = make_batch(ROWS["one_sample"], T=256, vocab=c.vocab_size).to("cuda")
    eager = model.loss(batch, model.attention_mask(batch, "sdpa")).float()      # the reference
    for block in model.layers:
        block.compile()
    compiled = model.loss(batch, model.attention_mask(batch, backend))
    compiled.backward()
    torch.testing.assert_close(compiled.float(), eager, atol=2e-2, rtol=2e-2)


def test_kv_cache_decode_bf16():
    c = GLMConfig.from_name("tiny")
    model = GLM(c).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, c.vocab_size, (2, 40), device="cuda")
    pos = torch.arange(40, device="cuda")[None].expand(2, -1)
    zero = torch.zeros_like(pos)
    with torch.no_grad():
        want = model.logits(model(ids, pos, zero)).float()           # causal
        cache = KVCache.for_model(model, 2, 40)
        for b in range(2):
            forward_rows(model, cache, b, [ids[b, :1].tolist()], [[0]], [[0]], [[0]], [0])
        for t in range(1, 40):
            h = forward_rows(model, cache, 0, ids[:, t:t + 1].tolist(), [[t]] * 2, [[0]] * 2, [[t]] * 2, [0, 0])
            torch.testing.assert_close(model.logits(h[:, -1]).float(), want[:, t], atol=5e-2, rtol=5e-2)


def test_kv_cache_fp8_on_cuda():
    """An fp8 pool on the GPU (the cast there need not saturate: KVCache clamps first): decode logits
    within the CPU tests' fp8 tolerance (tests/test_kv_dtype.py, 5% relative) of the bf16 pool's."""
    c = GLMConfig.from_name("tiny")
    model = GLM(c).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, c.vocab_size, (1, 40), device="cuda")[0].tolist()
    logits = {}
    with torch.no_grad():
        for kv in ("auto", "fp8"):
            cache = KVCache.for_model(model, 1, 40, kv)
            h = forward_rows(model, cache, 0, [ids], [list(range(40))], [[0] * 40], [list(range(40))], [8])
            logits[kv] = model.logits(h[0]).float()
    assert cache.dtype == torch.float8_e4m3fn and cache.bytes() * 2 == KVCache.for_model(model, 1, 40).bytes()
    rel = (logits["fp8"] - logits["auto"]).norm() / logits["auto"].norm()
    assert rel <= 0.05, rel


@pytest.mark.parametrize("preset,backend", [("tiny", "sdpa"), ("tiny", "flex"), ("tiny", "split"),
                                            ("tiny-moe", "flex")])
def test_training_step_does_not_wait_for_the_gpu(preset, backend):
    """What a training step runs between the prefetcher and its two deliberate reads (the loss, the
    gradient norm; see glmkit.train.loop.train_step) never makes the host wait for the GPU:
    `torch.cuda.set_sync_debug_mode("error")` turns any synchronizing call into an error."""
    from glmkit.train.prefetch import prepare

    if backend == "split" and not split_available():
        pytest.skip("split unavailable on this GPU")
    if preset == "tiny-moe" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("grouped experts need compute capability >= 9.0; the reference loop reads counts back")
    torch.manual_seed(0)
    model = GLM(GLMConfig.from_name(preset)).cuda().set_runtime(attention_backend=backend)
    batch = make_batch(ROWS["packed"], T=256)                           # numpy, as the data iterator gives

    def step(item):
        item = item.to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            attn = model.attention_mask(item.batch, plan=item.plan, dtype=torch.bfloat16)
            loss = model.loss(item.batch, attn, loss_index=item.loss_index)
        loss.float().backward()
        return attn.backend

    item = prepare(batch, backend, "cuda", torch.bfloat16)              # the prefetch thread's work
    assert step(item) == backend                                         # warm-up: compilation, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(item)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
