"""The grouped (loop-free) expert path against the reference loop: outputs, gradients, dtypes, the
path switch, and that the grouped path traces into one graph."""

import pytest
import torch
import torch._dynamo

from glmkit.errors import GlmkitError
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM
from glmkit.model.moe import Experts, MoE, expert_counts, grouped_unsupported, set_moe_impl


def moe_config(experts=16, top_k=2, shared=1, hidden=64, inter=32, **kw):
    return GLMConfig.from_name("tiny-moe", hidden_size=hidden, n_routed_experts=experts, num_experts_per_tok=top_k,
                               moe_intermediate_size=inter, n_shared_experts=shared, n_group=1, topk_group=1, **kw)


def random_moe(config, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return moe.to(dtype)


def run(moe, impl, x, target=None):
    """Output and the gradients of a real loss (not `.sum()`) w.r.t. the input and every parameter."""
    moe.experts.impl = impl
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = moe(x)
    if target is not None:
        ((out.float() - target) ** 2).mean().backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in moe.named_parameters()}}
    return out.detach(), grads


@pytest.mark.parametrize("top_k,shared", [(1, 0), (2, 1), (4, 0), (3, 2)])
def test_grouped_matches_loop_fp32_forward_and_backward(top_k, shared):
    moe = random_moe(moe_config(top_k=top_k, shared=shared)).train()
    x = torch.randn(2, 5, 64)                 # 10 tokens * top_k slots over 16 experts: some get none
    assert (expert_counts(moe.gate(x.view(-1, 64))[1], 16) == 0).any()
    target = torch.randn(2, 5, 64)
    out_loop, g_loop = run(moe, "loop", x, target)
    out_grouped, g_grouped = run(moe, "grouped", x, target)
    torch.testing.assert_close(out_grouped, out_loop, rtol=1e-5, atol=1e-5)
    assert g_loop.keys() == g_grouped.keys()
    for name in g_loop:
        torch.testing.assert_close(g_grouped[name], g_loop[name], rtol=1e-5, atol=1e-5, msg=name)


def test_unused_experts_get_zero_weight_grads():
    moe = random_moe(moe_config(experts=16, top_k=1, shared=0))
    x = torch.randn(3, 64)
    used = expert_counts(moe.gate(x)[1], 16) > 0
    _, grads = run(moe, "grouped", x, torch.randn(3, 64))
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        g = grads[name]
        assert torch.all(g[~used] == 0) and torch.all(g[used].flatten(1).abs().amax(1) > 0), name


def test_grouped_backward_of_an_expanded_grad():
    """`.sum().backward()` hands back a stride-0 gradient that grouped_mm's backward rejects; the
    index_add_ combine must hand it a real one."""
    moe = random_moe(moe_config())
    x = torch.randn(7, 64, requires_grad=True)
    moe.experts.impl = "grouped"
    moe(x).sum().backward()
    ref = x.grad.clone()
    x.grad = None
    moe.zero_grad()
    moe.experts.impl = "loop"
    moe(x).sum().backward()
    torch.testing.assert_close(x.grad, ref, rtol=1e-5, atol=1e-5)


def test_grouped_bf16_forward_close_to_loop_and_to_fp32():
    moe32 = random_moe(moe_config(top_k=4))
    moe16 = random_moe(moe_config(top_k=4), dtype=torch.bfloat16)
    assert moe16.gate.weight.dtype == torch.float32        # the router stays fp32: same routing
    x = torch.randn(64, 64)
    ref, _ = run(moe32, "loop", x)
    loop, _ = run(moe16, "loop", x.bfloat16())
    grouped, _ = run(moe16, "grouped", x.bfloat16())
    assert grouped.dtype == torch.bfloat16
    scale = ref.abs().mean()
    assert (grouped.float() - loop.float()).abs().mean() < 0.01 * scale
    assert (grouped.float() - ref).abs().mean() < 1.5 * (loop.float() - ref).abs().mean() + 1e-3 * scale


def test_grouped_under_autocast_computes_in_the_autocast_dtype_like_the_loop():
    """bf16-autocast training hands the experts an fp32 residual stream and fp32 weights: the loop's
    F.linear runs in bf16 (autocast casts it), so the grouped path casts itself to match. On CUDA this is
    what lets such a step take the grouped, sync-free path."""
    moe = random_moe(moe_config(top_k=4))
    x, target = torch.randn(64, 64), torch.randn(64, 64)
    ref, ref_grads = run(moe, "grouped", x, target)                    # fp32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe.experts.compute_dtype(x) == torch.bfloat16 and moe.experts.use_grouped(x)
        loop, loop_grads = run(moe, "loop", x, target)
        grouped, grouped_grads = run(moe, "grouped", x, target)
    assert moe.experts.compute_dtype(x) == torch.float32
    scale = ref.abs().mean()
    assert (grouped.float() - loop.float()).abs().mean() < 0.01 * scale
    # the routed experts alone: the grouped path's bf16 result is the loop's, not the fp32 one
    with torch.no_grad():
        _, idx, weights = moe.gate(x)
        fp32 = moe.experts.forward_grouped(x, idx, weights)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loop = moe.experts.forward_loop(x, idx, weights)
            grouped = moe.experts.forward_grouped(x, idx, weights)
    assert (grouped - loop).abs().mean() < 0.1 * (fp32 - loop).abs().mean()
    for name in ("x", "experts.gate_up_proj", "experts.down_proj"):
        g, want = grouped_grads[name].float(), loop_grads[name].float()
        assert (g - want).abs().mean() < 0.02 * want.abs().mean(), name
        assert grouped_grads[name].dtype == ref_grads[name].dtype == torch.float32


def test_expert_load_and_aux_loss_do_not_depend_on_the_path():
    moe = random_moe(moe_config(top_k=3, router_aux_loss_coef=0.01)).train()
    x = torch.randn(4, 6, 64)
    results = {}
    for impl in ("loop", "grouped"):
        moe.expert_load.zero_()
        run(moe, impl, x)
        results[impl] = (moe.expert_load.clone(), moe.aux_loss.detach().clone())
    idx = moe.gate(x.view(-1, 64))[1]
    assert torch.equal(results["loop"][0], torch.bincount(idx.flatten(), minlength=16).float())
    assert torch.equal(results["grouped"][0], results["loop"][0])
    assert torch.equal(results["grouped"][1], results["loop"][1])
    assert torch.equal(expert_counts(idx, 16), torch.bincount(idx.flatten(), minlength=16))


def test_path_switch(monkeypatch):
    moe = random_moe(moe_config())
    x = torch.randn(5, 64)
    assert moe.experts.impl == "auto"
    with monkeypatch.context() as m:            # auto on aligned fp32 CPU shapes: grouped
        m.setattr(Experts, "forward_loop", lambda *a: pytest.fail("loop path used"))
        moe(x)
    moe.experts.impl = "loop"
    with monkeypatch.context() as m:
        m.setattr(Experts, "forward_grouped", lambda *a: pytest.fail("grouped path used"))
        moe(x)
    model = GLM(moe_config(num_layers=3))
    assert {m.experts.impl for m in model.moe_layers()} == {"auto"}
    assert model.set_runtime(moe_impl="loop") is model
    assert {m.experts.impl for m in model.moe_layers()} == {"loop"}
    set_moe_impl(model, "grouped")
    assert {m.experts.impl for m in model.moe_layers()} == {"grouped"}
    with pytest.raises(GlmkitError, match="unknown MoE impl"):
        set_moe_impl(model, "fast")


def test_unaligned_shapes_fall_back_to_the_loop_and_forcing_grouped_explains_why():
    moe = random_moe(moe_config(inter=6))                 # 6 fp32 = 24 bytes: not a multiple of 16
    x = torch.randn(5, 64)
    assert "moe_intermediate_size" in grouped_unsupported(x.device, x.dtype, 64, 6)
    auto, _ = run(moe, "auto", x)
    loop, _ = run(moe, "loop", x)
    assert torch.equal(auto, loop)
    with pytest.raises(GlmkitError, match="moe_intermediate_size = 6"):
        run(moe, "grouped", x)
    moe.double()
    assert "fp32/bf16/fp16" in grouped_unsupported(x.device, torch.float64, 64, 32)
    run(moe, "auto", x.double())                          # float64 runs, on the loop


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [16, 8])
def test_the_hf_parity_shapes_take_the_grouped_path(dtype, inter):
    """tests/test_hf.py's MoE cases (hidden 32, moe_intermediate 16 and 8) check the grouped path."""
    assert grouped_unsupported(torch.device("cpu"), dtype, 32, inter) is None


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
def test_grouped_path_compiles_without_graph_breaks(train):
    moe = random_moe(moe_config(top_k=2), dtype=torch.bfloat16).train(train)
    moe.experts.impl = "grouped"
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(moe)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
    out, ref = compiled(x), moe(x)
    torch.testing.assert_close(out, ref)
    torch._dynamo.reset()


@pytest.mark.slow
def test_fp32_under_compile_falls_back_to_the_loop():
    """torch 2.13 traces grouped_mm in bf16 only, so compiled fp32 runs the loop (with graph breaks)."""
    moe = random_moe(moe_config())
    x = torch.randn(2, 5, 64)
    torch._dynamo.reset()
    out = torch.compile(moe, backend="aot_eager")(x)
    torch.testing.assert_close(out, moe(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="grouped_mm on CUDA needs compute capability >= 9.0")
def test_grouped_on_cuda_bf16_matches_the_loop_and_compiles():
    moe = random_moe(moe_config(experts=64, top_k=8, hidden=256, inter=128), dtype=torch.bfloat16).cuda()
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    target = torch.randn(4, 64, 256, device="cuda")
    assert moe.experts.use_grouped(x)
    out_loop, g_loop = run(moe, "loop", x, target)
    out_grouped, g_grouped = run(moe, "grouped", x, target)
    assert (out_grouped.float() - out_loop.float()).abs().mean() < 0.01 * out_loop.float().abs().mean()
    for name in g_loop:
        a, b = g_grouped[name].float(), g_loop[name].float()
        assert (a - b).abs().mean() <= 0.02 * b.abs().mean() + 1e-6, name
    few = x[:1, :2]                                      # 2 tokens x 8 slots: most experts get none
    used = expert_counts(moe.gate(few.reshape(-1, 256))[1], 64) > 0
    _, g = run(moe, "grouped", few, target[:1, :2])
    assert torch.all(g["experts.down_proj"][~used] == 0)
    moe.experts.impl = "grouped"
    compiled = torch.compile(moe, fullgraph=True)
    out, ref = compiled(x).float(), moe(x).float()
    assert (out - ref).abs().mean() < 0.01 * ref.abs().mean()
