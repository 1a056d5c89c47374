"""GLMConfig: presets, validation errors that name the field, JSON round trip, parameter counts of the
published shapes computed without building them."""

import json

import pytest

from glmkit.errors import GlmkitError
from glmkit.model.config import PRESETS, GLMConfig


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate_and_round_trip(name, tmp_path):
    c = GLMConfig.from_name(name)
    assert c.name == name
    assert GLMConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    path = c.save(tmp_path / name)
    assert path.name == "config.json"
    assert GLMConfig.load(tmp_path / name) == c


def test_config_holds_the_architecture_only_and_reads_old_files_with_a_backend(tmp_path):
    """attention_backend is a run-time choice: not saved; an older config.json that has it still loads."""
    c = GLMConfig.from_name("tiny")
    assert "attention_backend" not in c.to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**c.to_dict(), "attention_backend": "split"}))
    assert GLMConfig.load(tmp_path) == c
    with pytest.raises(GlmkitError, match="unknown GLMConfig key 'attention_kernel'"):
        GLMConfig.from_dict({**c.to_dict(), "attention_kernel": "split"})


# (preset, published total, published active or None, tolerance). Active counts exclude the embedding
# and output matrices, as the GLM-4.5 release's "A12B" / "A32B" do.
PUBLISHED = [
    ("glm-base", 110e6, None, 0.02),
    ("glm-large", 335e6, None, 0.02),
    ("glm-130b", 130e9, None, 0.02),
    ("chatglm-6b", 6.2e9, None, 0.02),
    ("glm-4-9b", 9.4e9, None, 0.01),
    ("glm-4-9b-0414", 9.4e9, None, 0.01),
    ("glm-4.5-air", 106e9, 12e9, 0.02),
    ("glm-4.5", 355e9, 32e9, 0.02),
    ("glm-4.6", 355e9, 32e9, 0.02),
    ("bench-338m", 338e6, None, 0.01),
    ("bench-1.9b", 1.87e9, None, 0.01),
]


@pytest.mark.parametrize("name,total,active,tol", PUBLISHED)
def test_parameter_counts_match_published(name, total, active, tol):
    c = GLMConfig.from_name(name)
    assert abs(c.num_params() / total - 1) < tol, c.num_params()
    if active:
        assert abs(c.num_params(active=True, exclude_embeddings=True) / active - 1) < 0.03
        assert c.num_params(active=True) < c.num_params() / 5


def test_exact_shapes_of_released_moe_configs():
    air, big = GLMConfig.from_name("glm-4.5-air"), GLMConfig.from_name("glm-4.6")
    assert (air.hidden_size, air.num_layers, air.num_heads, air.num_kv_heads, air.head_dim) == (4096, 46, 96, 8, 128)
    assert (air.n_routed_experts, air.moe_intermediate_size, air.first_k_dense_replace, air.qk_norm) == (128, 1408, 1, False)
    assert (big.hidden_size, big.num_layers, big.n_routed_experts, big.moe_intermediate_size) == (5120, 92, 160, 1536)
    assert (big.first_k_dense_replace, big.routed_scaling_factor, big.qk_norm) == (3, 2.5, True)
    assert big.max_position_embeddings == 202752 and air.rope_theta == 1e6


def test_flops_formula():
    c = GLMConfig.from_name("bench-338m")
    T = 1024
    assert c.flops_per_token(T) == 6 * c.matmul_params() + 12 * 24 * 16 * 64 * T


def test_training_flops_exact_on_tiny():
    # tiny: hidden 64, 2 layers, 4 heads of 16, 2 KV heads, SwiGLU 128, vocab 128
    c = GLMConfig.from_name("tiny")
    attn, mlp, head = 64 * (64 + 2 * 32) + 64 * 64, 3 * 64 * 128, 128 * 64       # 12288, 24576, 8192
    assert c.matmul_params() == 2 * (attn + mlp) + head == 81920
    assert c.loss_position_matmul_params() == head + mlp == 32768               # projection + last MLP
    # 2 rows of 32 positions, 10 loss positions: 6 x (49152 x 64 + 32768 x 10) + 12·2·4·16·32 x 64
    assert c.training_flops(positions=64, loss_positions=10, seq_len=32) == 20840448 + 3145728 == 23986176
    # every position a loss position: the textbook 6N + 12·L·H·Q·T per token
    assert c.training_flops(64, 64, 32) == 64 * c.flops_per_token(32)


def test_training_flops_moe_last_layer_runs_everywhere():
    c = GLMConfig.from_name("tiny-moe")
    assert c.is_moe_layer(c.num_layers - 1)
    assert c.loss_position_matmul_params() == c.vocab_size * c.hidden_size


@pytest.mark.parametrize("overrides,field", [
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(norm="batchnorm"), "norm"),
    (dict(residual="post"), "residual"),
    (dict(mlp="relu"), "mlp"),
    (dict(position_embedding="alibi"), "position_embedding"),
    (dict(head_dim=15), "head_dim"),
    (dict(partial_rotary_factor=0.0), "partial_rotary_factor"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(GlmkitError, match=field):
        GLMConfig.from_name("tiny", **overrides)


def test_bad_moe_values_name_the_field():
    with pytest.raises(GlmkitError, match="num_experts_per_tok"):
        GLMConfig.from_name("tiny-moe", num_experts_per_tok=9)
    with pytest.raises(GlmkitError, match="n_group"):
        GLMConfig.from_name("tiny-moe", n_group=3)
    with pytest.raises(GlmkitError, match="topk_group"):
        GLMConfig.from_name("tiny-moe", topk_group=3)


def test_heads_not_dividing_hidden_for_learned_positions():
    with pytest.raises(GlmkitError, match="num_heads"):
        GLMConfig.from_name("tiny-glm", num_heads=5, head_dim=None)


def test_unknown_key_and_preset_are_named(tmp_path):
    d = GLMConfig.from_name("tiny").to_dict()
    d["hidden_sise"] = 3
    with pytest.raises(GlmkitError, match="hidden_sise"):
        GLMConfig.from_dict(d)
    with pytest.raises(GlmkitError, match="unknown model preset 'glm-5'"):
        GLMConfig.from_name("glm-5")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GlmkitError, match="not valid JSON"):
        GLMConfig.load(tmp_path)
    with pytest.raises(GlmkitError, match="no config"):
        GLMConfig.load(tmp_path / "missing")
