"""Weight-only int8 / int4 quantization (`glmkit.model.quantize`) on every family.

- the quantizer: every dequantized weight lies within half a quantization step of the float weight
  (|W - q·s| <= s/2), int4 packs two weights per byte, and the CPU int8 kernel path equals
  dequantize-then-matmul to rounding;
- logits of the quantized model against the float model (default init, fp32, 2 x 24 tokens):
  relative error ||Δ|| / ||logits|| <= 3% for int8 and <= 30% for int4 on every family (random
  weights have no structure for a 4-bit grid to exploit: this bounds the arithmetic, not the quality
  on a trained model, which BENCHMARKS.md measures in bits/byte);
- memory: int8 weights take <= 0.52x the bf16 bytes they replace (scales included), int4 <= 0.33x;
- decoding: a quantized model decodes through the engine (KV cache) exactly as with full recomputes;
  `load(..., quantize=)` and `glmkit generate --quantize` run; an unknown scheme is refused up front.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import glmkit_greedy, glmkit_greedy_cached, glmkit_logits

from glmkit.checkpoint.loader import load
from glmkit.cli import main
from glmkit.errors import GlmkitError
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM
from glmkit.model.quantize import QuantizedLinear, QuantizedWeight, quantize, weight_nbytes

FAMILIES = ["tiny", "tiny-0414", "tiny-moe", "tiny-glm", "tiny-glm130b", "tiny-chatglm"]
TOLERANCE = {"int8": 0.03, "int4": 0.30}


def model_of(name: str, dtype=torch.float32) -> GLM:
    torch.manual_seed(0)
    return GLM(GLMConfig.from_name(name)).eval().to(dtype)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_dequantized_weight_within_half_a_step(scheme):
    torch.manual_seed(0)
    w = torch.randn(3, 40, 64) * torch.rand(3, 40, 1)        # rows of different ranges, 3 "experts"
    q = QuantizedWeight(w, scheme)
    deq = q.dequantize(torch.float32)
    step = q.scale[..., None] if scheme == "int8" else q.scale.repeat_interleave(32, -1)
    assert (w - deq).abs().le(step / 2 + 1e-6).all()
    assert torch.equal(q[1], deq[1])
    assert q.qweight.shape == ((3, 40, 64) if scheme == "int8" else (3, 40, 32))
    # int4: a width that is not a multiple of 32 stays int8
    assert QuantizedWeight(torch.randn(4, 48), "int4").scheme == "int8"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_equals_dequantize_then_matmul(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(dtype)
    q = QuantizedLinear(linear, "int8")
    x = torch.randn(2, 5, 64, dtype=dtype)
    want = torch.nn.functional.linear(x.float(), q.weight.dequantize(torch.float32), linear.bias.float())
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(q(x).float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("name", FAMILIES)
def test_quantized_logits_close_to_float(name, scheme):
    model = model_of(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = glmkit_logits(model, ids)
    q = quantize(copy.deepcopy(model), scheme)
    n_quantized = sum(isinstance(m, QuantizedWeight) for m in q.modules())
    assert n_quantized >= 4 * model.config.num_layers - 2 * model.config.is_moe   # qkv, o, MLP in/out (+experts)
    rel = ((glmkit_logits(q, ids) - ref).norm() / ref.norm()).item()
    assert rel <= TOLERANCE[scheme], f"{name} {scheme}: relative logit error {rel:.4f}"


@pytest.mark.parametrize("name, scheme, bound", [("small", "int8", 0.52), ("small", "int4", 0.33),
                                                 ("tiny-moe", "int8", 0.55), ("tiny-moe", "int4", 0.40)])
def test_weights_shrink(name, scheme, bound):
    """Quantized bytes (codes + fp32 scales) against the bf16 weights they replace. The bound is looser
    for tiny-moe: its experts' rows are 32 wide, so a 4-byte scale per row (int8) or per 32 weights
    (int4) weighs more than at real widths (GLM-4.5-Air's narrowest rows are 1408 wide)."""
    model = model_of(name, torch.bfloat16)
    replaced = sum(t.numel() * t.element_size() for n, t in model.layers.named_parameters()
                   if t.dim() >= 2 and not n.endswith("gate.weight"))     # linear and expert weights; not the router
    q = quantize(copy.deepcopy(model), scheme)
    after = sum(w.nbytes() for w in q.modules() if isinstance(w, QuantizedWeight))
    assert after <= bound * replaced, (after, replaced)
    assert weight_nbytes(q) == weight_nbytes(model) - replaced + after


@pytest.mark.parametrize("name, scheme", [("tiny", "int8"), ("tiny-moe", "int4"), ("tiny-0414", "int8")])
def test_quantized_model_decodes_on_the_engine(name, scheme):
    q = quantize(model_of(name), scheme)
    prompt = torch.randint(0, q.config.vocab_size - 4, (2, 6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(glmkit_greedy_cached(q, prompt, 6), glmkit_greedy(q, prompt, 6))


def test_load_and_generate_quantized(tiny_run, capsys):
    float_model = load(tiny_run.directory).model
    loaded = load(tiny_run.directory, quantize="int8")
    assert any(isinstance(m, QuantizedLinear) for m in loaded.model.modules())
    assert sum(isinstance(m, torch.nn.Linear) for m in loaded.model.modules()) <= 1      # the head at most
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = glmkit_logits(float_model, ids)
    assert ((glmkit_logits(loaded.model, ids) - ref).norm() / ref.norm()).item() <= TOLERANCE["int8"]
    assert main(["generate", str(tiny_run.directory), "The cat", "--max-new-tokens", "4", "--quantize", "int4",
                 "--no-stream"]) == 0
    assert capsys.readouterr().err == ""


def test_unknown_scheme_is_refused_before_loading(tmp_path):
    with pytest.raises(GlmkitError, match="unknown quantization 'int3'; choose one of int8, int4"):
        load(tmp_path / "missing", quantize="int3")
    with pytest.raises(GlmkitError, match="quantize is for inference"):
        load(tmp_path / "missing", quantize="int8", for_inference=False)
    with pytest.raises(GlmkitError, match="unknown quantization"):
        quantize(model_of("tiny"), "fp8")


@pytest.mark.parametrize("name, scheme", [("tiny", "int8"), ("tiny-moe", "int4"), ("tiny-glm", "int8")])
def test_plan_counts_quantized_weights_exactly(name, scheme):
    from glmkit.infer.plan import plan_memory

    model = model_of(name, torch.bfloat16)
    for n, t in model.named_parameters():       # the router in fp32, as the loaders keep it
        if n.endswith((".gate.weight", ".gate.e_score_correction_bias")):
            t.data = t.data.float()
    plan = plan_memory(model.config, torch.bfloat16, max_len=64, quantize=scheme)
    assert plan.weights == weight_nbytes(quantize(model, scheme))
