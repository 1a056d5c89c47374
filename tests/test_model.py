"""The GLM model: every family runs, the loss projects only at loss positions, backends agree inside the
model, parameter counts agree with the config, MoE routing follows its definition."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ROWS, make_batch

from glmkit.model.attention import make_attention_mask
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM, MLP
from glmkit.model.moe import MoE

FAMILIES = ["tiny", "tiny-0414", "tiny-moe", "tiny-glm", "tiny-glm130b", "tiny-chatglm"]


def _full_logits_loss(model, batch):
    h = model(batch.input_ids, batch.position_ids, batch.block_position_ids, model.attention_mask(batch, "sdpa"))
    logits = model.logits(h)                                             # (B, T, V) at every position
    per_token = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none")
    m = batch.loss_mask.flatten()
    return per_token[m].mean()


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_forward_and_loss(name):
    c = GLMConfig.from_name(name)
    model = GLM(c)
    batch = make_batch(ROWS["packed"], T=24, vocab=c.vocab_size)
    loss = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(c.vocab_size)) < 1.0                 # near-uniform at init
    torch.testing.assert_close(loss, _full_logits_loss(model, batch))
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "expert" not in n and "gate." not in n)


@pytest.mark.parametrize("name", FAMILIES)
def test_num_params_agrees_with_config(name):
    c = GLMConfig.from_name(name)
    model = GLM(c)
    assert model.num_params() == c.num_params()
    assert model.num_params(exclude_embeddings=True) == c.num_params(exclude_embeddings=True)
    assert model.flops_per_token(64) == c.flops_per_token(64)


@pytest.mark.parametrize("name", ["tiny", "tiny-glm", "tiny-chatglm"])
def test_training_flops_count_the_matmuls_the_loss_runs(name):
    """GLMConfig.training_flops against torch's FLOP counter over a real loss forward + backward (the
    counter sees the matmuls, not the CPU attention kernel: that term is added as the config counts it)."""
    from torch.utils.flop_counter import FlopCounterMode
    c = GLMConfig.from_name(name)
    model = GLM(c)
    batch = make_batch(ROWS["packed"], T=24, vocab=c.vocab_size)
    B, T = batch.input_ids.shape
    counter = FlopCounterMode(display=False)
    with counter:
        model.loss(batch, model.attention_mask(batch, "sdpa")).backward()
    attention = 12 * c.num_layers * c.num_heads * c.head_dim * T * B * T
    assert counter.get_total_flops() + attention == c.training_flops(B * T, int(batch.loss_mask.sum()), T)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "tiny-chatglm"])
def test_flex_matches_sdpa_inside_the_model(name):
    c = GLMConfig.from_name(name)
    model = GLM(c).eval()
    for layout in ("glm", "span"):
        batch = make_batch(ROWS["packed"], T=24, vocab=c.vocab_size, layout=layout)
        args = (batch.input_ids, batch.position_ids, batch.block_position_ids)
        with torch.no_grad():
            ref = model(*args, make_attention_mask(batch, "sdpa"))
            got = model(*args, make_attention_mask(batch, "flex"))
        torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-4)


def test_packed_samples_do_not_leak():
    """A sample's outputs do not depend on its neighbours in the row (segment isolation)."""
    c = GLMConfig.from_name("tiny")
    model = GLM(c).eval()
    packed = make_batch([[("glm", 6, [2]), ("clm", 5)]], T=16, seed=1)
    alone = make_batch([[("glm", 6, [2])]], T=16, seed=1)
    alone.input_ids[:, :9] = packed.input_ids[:, :9]
    with torch.no_grad():
        h1 = model(packed.input_ids, packed.position_ids, packed.block_position_ids, model.attention_mask(packed))
        h2 = model(alone.input_ids, alone.position_ids, alone.block_position_ids, model.attention_mask(alone))
    torch.testing.assert_close(h1[:, :9], h2[:, :9], atol=1e-5, rtol=1e-5)


def test_part_a_does_not_see_part_b():
    c = GLMConfig.from_name("tiny-0414")
    model = GLM(c).eval()
    batch = make_batch([[("glm", 8, [3, 2])]], T=16)
    changed = make_batch([[("glm", 8, [3, 2])]], T=16)
    changed.input_ids[:, 8:] = (changed.input_ids[:, 8:] + 1) % c.vocab_size
    with torch.no_grad():
        h1 = model(batch.input_ids, batch.position_ids, batch.block_position_ids, model.attention_mask(batch))
        h2 = model(changed.input_ids, changed.position_ids, changed.block_position_ids, model.attention_mask(changed))
    torch.testing.assert_close(h1[:, :8], h2[:, :8])
    assert not torch.allclose(h1[:, 8:], h2[:, 8:])


def test_activation_checkpointing_gives_the_same_gradients():
    c = GLMConfig.from_name("tiny")
    model = GLM(c)
    batch = make_batch(ROWS["one_sample"], T=24)
    model.loss(batch).backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.checkpointing = True
    model.loss(batch).backward()
    for a, p in zip(g1, model.parameters()):
        torch.testing.assert_close(p.grad, a)


def _std_close(t: torch.Tensor, want: float, name: str):
    """std of >= 16k draws: the estimate's relative error is < 1/sqrt(2n) ~ 0.6%, so 4% is ~7 sigma
    while a wrong scale (0.02 instead of 0.02/sqrt(2L), a gain dropped) is off by far more."""
    assert t.numel() >= 16384, name
    assert abs(t.float().std().item() / want - 1) < 0.04, (name, t.float().std().item(), want)
    assert abs(t.float().mean().item()) < 0.05 * want, name


def test_init_scales_normal_with_residual_projections_scaled():
    """normal(0, 0.02) everywhere; the residual output projections (attention o_proj, the dense MLP's
    and the routed experts' down_proj) normal(0, 0.02/sqrt(2L)); biases 0, norms 1, router bias 0."""
    for name in ("tiny", "tiny-moe"):
        c = GLMConfig.from_name(name, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, num_layers=8,
                                intermediate_size=512, vocab_size=512, **({"moe_intermediate_size": 128}
                                                                          if name == "tiny-moe" else {}))
        model = GLM(c)
        small = 0.02 / math.sqrt(2 * 8)
        _std_close(model.embed_tokens.weight, 0.02, "embed")
        _std_close(model.lm_head.weight, 0.02, "lm_head")
        for i, block in enumerate(model.layers):
            _std_close(block.self_attn.qkv_proj.weight, 0.02, f"{i}.qkv")
            _std_close(block.self_attn.o_proj.weight, small, f"{i}.o_proj")
            assert torch.all(block.self_attn.qkv_proj.bias == 0)
            if isinstance(block.mlp, MoE):
                _std_close(block.mlp.experts.gate_up_proj, 0.02, f"{i}.experts.gate_up")
                _std_close(block.mlp.experts.down_proj, small, f"{i}.experts.down")
                assert torch.all(block.mlp.gate.e_score_correction_bias == 0)
            else:
                _std_close(block.mlp.gate_up_proj.weight, 0.02, f"{i}.gate_up")
                _std_close(block.mlp.down_proj.weight, small, f"{i}.down")
        norms = [m for m in model.modules() if "Norm" in type(m).__name__]
        assert norms and all(torch.all(m.weight == 1) for m in norms)


def test_deepnorm_init_gains_and_alpha():
    """GLM-130B: alpha = sqrt(2N) on the residual; Xavier normal (std = gain*sqrt(2/(fan_in+fan_out)))
    with gain 1 on q and k and beta = (2N)^-1/2 on v, the output projection and both MLP matrices."""
    N, h, heads, inter = 6, 256, 4, 512
    model = GLM(GLMConfig.from_name("tiny-glm130b", hidden_size=h, num_heads=heads, head_dim=h // heads, num_layers=N,
                                    intermediate_size=inter, vocab_size=512))
    beta = (2 * N) ** -0.5
    xavier = lambda fan_in, fan_out, gain=1.0: gain * math.sqrt(2 / (fan_in + fan_out))
    for i, block in enumerate(model.layers):
        assert block.alpha == math.sqrt(2 * N)
        w = block.self_attn.qkv_proj.weight                  # rows: q (h), k (h), v (h)
        _std_close(w[:2 * h], xavier(h, 2 * h), f"{i}.qk")
        _std_close(w[2 * h:], xavier(h, h, beta), f"{i}.v")
        _std_close(block.self_attn.o_proj.weight, xavier(h, h, beta), f"{i}.o_proj")
        _std_close(block.mlp.gate_up_proj.weight, xavier(h, 2 * inter, beta), f"{i}.gate_up")
        _std_close(block.mlp.down_proj.weight, xavier(inter, h, beta), f"{i}.down")
    assert GLM(GLMConfig.from_name("tiny")).layers[0].alpha == 1.0


def test_tied_head_shares_the_embedding():
    model = GLM(GLMConfig.from_name("tiny-glm"))
    assert model.lm_head is None
    h = torch.randn(3, 64)
    torch.testing.assert_close(model.logits(h), h @ model.embed_tokens.weight.T)


def test_mlp_flavours():
    for kind, ref in [("swiglu", lambda a, b: F.silu(a) * b), ("geglu", lambda a, b: a * F.gelu(b))]:
        c = GLMConfig.from_name("tiny", mlp=kind, gelu_approximate="none")
        mlp = MLP(c)
        x = torch.randn(5, 64)
        a, b = (x @ mlp.gate_up_proj.weight.T).chunk(2, -1)
        torch.testing.assert_close(mlp(x), ref(a, b) @ mlp.down_proj.weight.T)


def test_moe_routing_definition():
    """Pick by score + bias (within the best group), weight by the score alone, normalised, scaled."""
    c = GLMConfig.from_name("tiny-moe")
    moe = MoE(c)
    with torch.no_grad():
        torch.nn.init.normal_(moe.gate.weight, 0, 0.5)
        torch.nn.init.normal_(moe.experts.gate_up_proj, 0, 0.1)
        torch.nn.init.normal_(moe.experts.down_proj, 0, 0.1)
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    x = torch.randn(10, 64)
    scores, idx, w = moe.gate(x)
    choice = scores + moe.gate.e_score_correction_bias
    for t in range(10):
        groups = choice[t].view(2, 4).topk(2, -1).values.sum(-1)
        g = int(groups.argmax())
        eligible = torch.full((8,), float("-inf"))
        eligible[4 * g:4 * g + 4] = choice[t, 4 * g:4 * g + 4]
        want = set(eligible.topk(2).indices.tolist())
        assert set(idx[t].tolist()) == want
        ws = scores[t, idx[t]]
        torch.testing.assert_close(w[t], ws / ws.sum() * 2.5)
    # the layer output is the weighted sum of the chosen experts plus the shared expert
    out = moe(x[None])[0]
    want = moe.shared_experts(x)
    for t in range(10):
        for j in range(2):
            e = int(idx[t, j])
            gate, up = (x[t] @ moe.experts.gate_up_proj[e].T).chunk(2)
            want[t] += w[t, j] * ((F.silu(gate) * up) @ moe.experts.down_proj[e].T)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_moe_bias_update_moves_each_bias_against_its_load():
    """A router whose scores are all equal (zero weights) picks by its correction bias alone: with
    biases favouring experts 0 and 1, every token goes to those two, which are overloaded (load = all
    tokens, mean = 2/8 of that) while 2..7 get nothing. One update lowers exactly the biases of 0 and 1
    by `rate` and raises the six others by `rate`, in every MoE layer; the load is then reset."""
    c = GLMConfig.from_name("tiny-moe", n_group=1, topk_group=1)
    model = GLM(c).train()
    start = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2])
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.weight.zero_()
            moe.gate.e_score_correction_bias.copy_(start)
    batch = make_batch(ROWS["packed"], T=24)
    model.loss(batch)
    n = batch.input_ids.numel()
    for moe in model.moe_layers():
        assert moe.expert_load.tolist() == [n, n, 0, 0, 0, 0, 0, 0]
    model.update_router_bias(0.01)
    want = start + 0.01 * torch.tensor([-1.0, -1, 1, 1, 1, 1, 1, 1])
    assert len(model.moe_layers()) == 2
    for moe in model.moe_layers():
        torch.testing.assert_close(moe.gate.e_score_correction_bias, want, rtol=0, atol=1e-7)
        assert moe.expert_load.sum() == 0
    model.update_router_bias(0.01)                  # nothing routed since: the biases stay
    for moe in model.moe_layers():
        torch.testing.assert_close(moe.gate.e_score_correction_bias, want, rtol=0, atol=1e-7)


def test_moe_aux_loss_only_when_configured():
    batch = make_batch(ROWS["packed"], T=24)
    plain = GLM(GLMConfig.from_name("tiny-moe"))
    torch.manual_seed(0)
    with_aux = GLM(GLMConfig.from_name("tiny-moe", router_aux_loss_coef=0.01))
    with_aux.load_state_dict(plain.state_dict())
    assert all(m.aux_loss is None for m in plain.moe_layers())
    diff = with_aux.loss(batch) - plain.loss(batch)
    assert diff.item() > 0


@pytest.mark.slow
def test_bench_train_smoke(capsys):
    """`glmkit bench train` on a tiny preset: same weights and batch give the same first loss as HF."""
    import json

    pytest.importorskip("transformers")
    from glmkit.cli import main

    assert main(["bench", "train", "--device", "cpu", "--preset", "tiny", "--batch-size", "2", "--seq-len", "64",
                 "--steps", "1", "--warmup", "0", "--objective", "both", "--loop-steps", "0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("glmkit_tokens_per_s", "hf_tokens_per_s", "ratio", "mfu", "device", "glm_vs_clm"):
        assert out[key] is not None
    assert out["glmkit_tokens_per_s"] > 0 and out["hf_tokens_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["glmkit_tokens_per_s"] / out["hf_tokens_per_s"], rel=1e-3)
    # GLM rates scale the positions/s by each count's share: loss tokens are a part of the processed ones
    assert 0 < out["loss_tokens_per_s"] < out["processed_per_s"] and 0 < out["text_tokens_per_s"]
    assert (out["batch_size"], out["seq_len"], out["steps"], out["preset"]) == (2, 64, 1, "tiny")
    first = out["first_loss"]
    assert abs(first["glmkit"] - first["hf"]) < 1e-4


def test_loss_without_loss_positions_is_zero_and_differentiable():
    model = GLM(GLMConfig.from_name("tiny"))
    batch = make_batch(ROWS["one_sample"], T=24)
    batch.loss_mask[:] = False
    loss = model.loss(batch)
    loss.backward()
    assert loss.item() == 0.0


def test_learned_positions_out_of_range_is_named():
    from glmkit.errors import GlmkitError

    model = GLM(GLMConfig.from_name("tiny-glm"))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(GlmkitError, match="max_position_embeddings"):
        model(ids, torch.full((1, 4), 300), ids)


def test_casting_keeps_router_and_rope_frequencies_fp32():
    c = GLMConfig.from_name("tiny-moe")
    model = GLM(c)
    batch = make_batch(ROWS["packed"], T=24, vocab=c.vocab_size)
    with torch.no_grad():
        ref = model(batch.input_ids, batch.position_ids, batch.block_position_ids, model.attention_mask(batch))
    model.to(torch.bfloat16)
    moe = model.moe_layers()[0]
    assert moe.gate.weight.dtype == torch.float32 and moe.gate.e_score_correction_bias.dtype == torch.float32
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    cos, _ = model.rotary(batch.position_ids, batch.block_position_ids, torch.float32)
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, 8, 2, dtype=torch.float) / 8))
    torch.testing.assert_close(cos, (batch.position_ids + batch.block_position_ids)[..., None, None].float().mul(inv).cos())
    model.apply(lambda m: None)                 # nn.Module.apply still works (no name clash)
    with torch.no_grad():
        out = model(batch.input_ids, batch.position_ids, batch.block_position_ids, model.attention_mask(batch))
    assert (out.float() - ref).abs().mean() < 0.05


@pytest.mark.parametrize("name", FAMILIES)
def test_select_equals_gathering_the_full_output(name):
    c = GLMConfig.from_name(name)
    model = GLM(c).eval()
    batch = make_batch(ROWS["packed"], T=24, vocab=c.vocab_size)
    args = (batch.input_ids, batch.position_ids, batch.block_position_ids, model.attention_mask(batch))
    sel = torch.tensor([0, 5, 7, 30, 47])
    with torch.no_grad():
        full = model(*args).reshape(-1, c.hidden_size)[sel]
        torch.testing.assert_close(model(*args, select=sel), full, atol=1e-5, rtol=1e-5)
