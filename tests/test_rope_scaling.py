"""RoPE scaling against HF transformers: tiny random Glm / Glm4 / Glm4Moe models with linear, dynamic
NTK and YaRN `rope_parameters`, saved with `save_pretrained`, loaded by glmkit, logits compared in fp32
(max abs diff <= 1e-4) at 48 tokens, beyond the 32-token window the scaling stretches; greedy decoding
on glmkit's engine (KV cache) equals HF's `generate` past the window, which for dynamic NTK checks the
per-call frequency rule (`glmkit/model/rope_scaling.py`). Also: GLM-4's `rope_ratio`, the config
mapping both ways, and the errors.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import HF_VOCAB, build_hf, glmkit_greedy_cached, glmkit_logits, hf_logits

from glmkit.checkpoint.hf import config_from_hf, config_to_hf, from_hf
from glmkit.errors import GlmkitError
from glmkit.model import rope_scaling
from glmkit.model.config import GLMConfig

transformers = pytest.importorskip("transformers")

WINDOW = 32
SCALINGS = {
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=3.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=WINDOW // 2,
                 beta_fast=8.0, beta_slow=1.0),
    "yarn-mscale": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=WINDOW // 4,
                        mscale=1.0, mscale_all_dim=0.5, truncate=False),
}
# every scaling on Glm; each family once
CASES = [(s, "glm-gqa") for s in SCALINGS] + [("yarn", "glm4-gqa"), ("dynamic", "glm4-mha"),
                                               ("yarn", "moe-qknorm"), ("dynamic", "moe-groups")]


def build(case: str, scaling: str):
    from helpers import HF_CASES

    rope = {**HF_CASES[case][1]["rope_parameters"], **SCALINGS[scaling]}
    return build_hf(case, rope_parameters=rope, max_position_embeddings=WINDOW)


@pytest.mark.parametrize("scaling, case", CASES)
def test_scaled_rope_matches_transformers_beyond_the_window(scaling, case, tmp_path):
    hf = build(case, scaling)
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    assert model.config.rope_scaling["rope_type"] == SCALINGS[scaling]["rope_type"]
    torch.manual_seed(1)
    ids = torch.randint(0, HF_VOCAB, (2, 48))
    diff = (glmkit_logits(model, ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff <= 1e-4, f"{scaling} on {case}: max abs logit diff {diff}"
    # the scaling changes the logits (so the comparison above is not plain RoPE against plain RoPE)
    plain = from_hf(tmp_path)
    plain.rotary.__init__(plain.config.with_(rope_scaling=None))
    assert (glmkit_logits(plain, ids) - hf_logits(hf, ids)).abs().max().item() > 1e-2


def cached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding through the KV cache pool and the engine's runner (one row): a prefill, then one
    token per forward. (The engine itself stops at max_position_embeddings.)"""
    from glmkit.infer.runner import forward_rows
    from glmkit.model.kv_cache import KVCache

    pool = KVCache.for_model(model, rows=1, max_len=len(prompt) + n)
    ids, fed = list(prompt), 0
    with torch.no_grad():
        while len(ids) < len(prompt) + n:
            new = ids[fed:]
            slots = list(range(fed, len(ids)))
            h = forward_rows(model, pool, 0, [new], [slots], [[0] * len(new)], [slots], [0])
            fed = len(ids)
            ids.append(int(model.logits(h[:, -1]).argmax(-1)))
    return ids


@pytest.mark.parametrize("scaling, case", [("dynamic", "glm-gqa"), ("dynamic", "moe-groups"),
                                           ("yarn", "moe-qknorm"), ("linear", "glm4-gqa")])
def test_scaled_rope_decoding_matches_transformers_generate(scaling, case, tmp_path):
    """Prefill 28 tokens, decode 12 past the 32-token window through the KV cache: each decode step's
    dynamic base grows with its position, as in transformers (keys in the cache keep theirs)."""
    hf = build(case, scaling)
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    torch.manual_seed(2)
    prompt = torch.randint(0, HF_VOCAB, (1, 28))
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                               pad_token_id=0)
    assert cached_greedy(model, prompt[0].tolist(), 12) == want[0].tolist()


def test_yarn_decoding_on_the_engine(tmp_path):
    """YaRN as released (max_position_embeddings = factor x the original window): the engine decodes
    past the original window and agrees with transformers' generate."""
    hf = build_hf("glm4-gqa", max_position_embeddings=64, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16, rope_theta=10000.0,
        partial_rotary_factor=0.5))
    hf.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    torch.manual_seed(3)
    prompt = torch.randint(0, HF_VOCAB, (2, 20))
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(glmkit_greedy_cached(model, prompt, 10), want)


def test_dynamic_ntk_frequencies_per_row():
    """A row within the window gets plain RoPE; a longer row the base theta·(f·L/M − (f−1))^(R/(R−2))."""
    got = rope_scaling.dynamic_inv_freq(2.0, 10000.0, 8, 32, torch.tensor([10, 32, 64]))
    plain = rope_scaling.plain_inv_freq(10000.0, 8)
    assert torch.equal(got[0], plain) and torch.equal(got[1], plain)
    base = 10000.0 * (2.0 * 64 / 32 - 1) ** (8 / 6)
    torch.testing.assert_close(got[2], 1.0 / base ** (torch.arange(0, 8, 2).float() / 8))


def test_rope_ratio_scales_the_base():
    """GLM-4's `rope_ratio` (ChatGLM's code: base = 10000 · rope_ratio; 500 for GLM-4-9B-chat-1M)."""
    hf = dict(architectures=["GlmForCausalLM"], model_type="glm", rope_theta=10000.0, rope_ratio=500,
              hidden_size=64, num_attention_heads=4, head_dim=16)
    config = config_from_hf(hf)
    assert config.rope_theta == 5e6 and config.rope_scaling is None
    assert config_to_hf(config)["rope_parameters"]["rope_theta"] == 5e6


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_config_round_trip_and_transformers_reads_it(scaling):
    config = GLMConfig.from_name("tiny", max_position_embeddings=WINDOW, rope_scaling=SCALINGS[scaling])
    hf = json.loads(json.dumps(config_to_hf(config)))
    assert config_from_hf(hf, name="tiny") == config
    assert GLMConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    reread = transformers.GlmConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    assert reread.rope_parameters["rope_type"] == SCALINGS[scaling]["rope_type"]
    assert reread.rope_parameters["factor"] == config.rope_scaling["factor"]


def test_yarn_normal_form():
    """Defaults filled in as transformers does: beta 32/1, attention factor 0.1·ln(f) + 1, the original
    window = max_position_embeddings; mscale / mscale_all_dim folded into attention_factor."""
    s = rope_scaling.normalize({"type": "yarn", "factor": 4}, 64)
    assert s == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
                 "beta_slow": 1.0, "attention_factor": pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1),
                 "truncate": True}
    s = rope_scaling.normalize({"rope_type": "yarn", "factor": 4, "mscale": 1.0, "mscale_all_dim": 1.0}, 64)
    assert s["attention_factor"] == 1.0 and "mscale" not in s
    assert rope_scaling.normalize({"rope_type": "yarn", "original_max_position_embeddings": 16}, 64)["factor"] == 4.0
    assert rope_scaling.normalize({"rope_type": "default", "rope_theta": 1e4}, 64) is None


@pytest.mark.parametrize("scaling, match", [
    ({"rope_type": "longrope", "factor": 2.0}, "'longrope' is not implemented"),
    ({"rope_type": "linear"}, "factor = None must be a number >= 1"),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": 1, "beta_slow": 4}, "beta_fast = 1 must be >= beta_slow"),
    ({"rope_type": "dynamic", "factor": 2.0, "mscale": 1.0}, "unknown key.*mscale"),
    ("yarn", "must be a dict"),
])
def test_rope_scaling_errors(scaling, match):
    with pytest.raises(GlmkitError, match=match):
        GLMConfig.from_name("tiny", rope_scaling=scaling)


def test_rope_scaling_needs_1d_rope():
    with pytest.raises(GlmkitError, match="rope_scaling needs position_embedding = 'rope'"):
        GLMConfig.from_name("tiny-chatglm", rope_scaling={"rope_type": "linear", "factor": 2.0})
