"""HF checkpoint interop: tiny random transformers models saved with `save_pretrained`, loaded into
glmkit (and back), logits compared in fp32 (max abs diff <= 1e-4) and greedy generations compared.

Every parameter of the reference model is randomised (norm weights, biases and the router's
correction bias too), so a tensor mapped to the wrong place cannot hide behind an all-ones init.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    HF_CASES,
    HF_VOCAB,
    build_hf,
    glmkit_greedy,
    glmkit_greedy_cached,
    glmkit_logits,
    hf_logits,
    random_glmkit,
)

from glmkit.checkpoint.hf import (
    INDEX_FILE,
    config_from_hf,
    config_to_hf,
    from_hf,
    parse_size,
    plan_shards,
    to_hf,
)
from glmkit.errors import GlmkitError
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM

transformers = pytest.importorskip("transformers")

def save_hf(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """case -> (saved directory, the HF model) built once per module."""
    out = {}
    for case in HF_CASES:
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


# config.json of released checkpoints (THUDM/glm-4-9b-chat-hf, THUDM/GLM-4-9B-0414, zai-org/GLM-4.5-Air),
# in the pre-transformers-5 form with top-level rope keys
_GLM4_COMMON = dict(attention_bias=True, attention_dropout=0.0, eos_token_id=[151329, 151336, 151338],
                    head_dim=128, hidden_act="silu", hidden_size=4096, initializer_range=0.02,
                    intermediate_size=13696, num_attention_heads=32, num_hidden_layers=40, num_key_value_heads=2,
                    pad_token_id=151329, partial_rotary_factor=0.5, rope_theta=10000.0, tie_word_embeddings=False,
                    torch_dtype="bfloat16", use_cache=True, vocab_size=151552)
RELEASED = {
    "glm-4-9b": dict(_GLM4_COMMON, architectures=["GlmForCausalLM"], model_type="glm",
                     max_position_embeddings=131072, rms_norm_eps=1.5625e-07),
    "glm-4-9b-0414": dict(_GLM4_COMMON, architectures=["Glm4ForCausalLM"], model_type="glm4",
                          max_position_embeddings=32768, rms_norm_eps=1e-05),
    "glm-4.5-air": dict(architectures=["Glm4MoeForCausalLM"], attention_bias=True, attention_dropout=0.0,
                        pad_token_id=151329, eos_token_id=[151329, 151336, 151338], head_dim=128, hidden_act="silu",
                        hidden_size=4096, partial_rotary_factor=0.5, initializer_range=0.02, intermediate_size=10944,
                        max_position_embeddings=131072, model_type="glm4_moe", moe_intermediate_size=1408,
                        norm_topk_prob=True, num_attention_heads=96, n_group=1, topk_group=1, n_routed_experts=128,
                        n_shared_experts=1, routed_scaling_factor=1.0, num_experts_per_tok=8,
                        first_k_dense_replace=1, num_hidden_layers=46, num_key_value_heads=8,
                        num_nextn_predict_layers=1, rms_norm_eps=1e-05, rope_scaling=None, rope_theta=1000000,
                        tie_word_embeddings=False, torch_dtype="bfloat16", use_cache=True, use_qk_norm=False,
                        vocab_size=151552),
}


@pytest.mark.parametrize("preset", list(RELEASED))
def test_released_config_maps_to_preset(preset):
    """A released config.json gives the preset's shape, and the HF tensors the plan expects add up to
    the preset's parameter count (model built on the meta device: nothing allocated)."""
    from glmkit.checkpoint.hf import meta_parameters, tensor_plan

    config = config_from_hf(RELEASED[preset], name=preset)
    want = GLMConfig.from_name(preset)
    assert config.with_(max_position_embeddings=want.max_position_embeddings) == want
    with meta_parameters():
        model = GLM(config)
    shapes = model.state_dict()
    hf_numel = sum(shapes[name][index].numel() for name, parts in tensor_plan(config).items() for _, index in parts)
    router_bias = sum(b.numel() for name, b in shapes.items() if name.endswith("e_score_correction_bias"))
    assert hf_numel - router_bias == config.num_params()


@pytest.mark.parametrize("case", list(HF_CASES))
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
    (dict(model_type="glm4", rope_parameters=dict(rope_type="longrope", factor=4.0, rope_theta=1e4)), "longrope"),
    (dict(model_type="glm", rope_scaling=dict(type="linear", factor=0.5)), "linear.*factor = 0.5"),
    (dict(model_type="glm", rope_scaling=dict(type="dynamic", factor=2.0, beta_fast=4)), "unknown key.*beta_fast"),
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


# ------------------------------------------------------------------------------------------- helpers

def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def load_with_transformers(path: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


# ------------------------------------------------------------------------------ HF -> glmkit parity

@pytest.mark.parametrize("case", list(HF_CASES))
def test_from_hf_matches_transformers(case, hf_dirs):
    path, hf = hf_dirs[case]
    model = from_hf(path)
    torch.manual_seed(1)
    ids = torch.randint(0, HF_VOCAB, (3, 20))
    diff = (glmkit_logits(model, ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff <= 1e-4, f"{case}: max abs logit diff {diff}"
    prompt = ids[:, :6]
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(glmkit_greedy(model, prompt, 8), want)
    assert torch.equal(glmkit_greedy_cached(model, prompt, 8), want)


@pytest.mark.parametrize("case", ["glm4-gqa", "moe-qknorm"])
def test_from_hf_prefix_lm_mask_matches_transformers_float_mask(case, hf_dirs):
    """A [gMASK]-style prefix-LM row (bidirectional prefix, causal rest) through glmkit's mask and
    through HF with the same rule as a 4D float 0/-inf mask."""
    from glmkit.batch import Batch
    from glmkit.model.attention import make_attention_mask

    path, hf = hf_dirs[case]
    model = from_hf(path)
    B, T, sep = 2, 16, 7
    ids = torch.randint(0, HF_VOCAB, (B, T))
    zeros = torch.zeros(B, T, dtype=torch.long)
    batch = Batch(input_ids=ids, targets=zeros, loss_mask=zeros.bool(), position_ids=torch.arange(T).expand(B, T),
                  block_position_ids=zeros, segment_ids=zeros, sep=torch.full((B, T), sep), span_ids=zeros)
    ours = glmkit_logits(model, ids, attn=make_attention_mask(batch.to("cpu"), "sdpa"))
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (k < sep) | (k <= q)
    mask = torch.zeros(B, 1, T, T).masked_fill(~visible, float("-inf"))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
    assert (ours - ref).abs().max().item() <= 1e-4


def test_from_hf_dtype_keeps_router_fp32(hf_dirs):
    path, hf = hf_dirs["moe-qknorm"]
    model = from_hf(path, dtype=torch.bfloat16)
    gate = model.layers[1].mlp.gate
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert all(p.device.type == "cpu" for p in model.parameters())
    ids = torch.randint(0, HF_VOCAB, (1, 12))
    assert glmkit_logits(model, ids).isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["glm4-gqa", "moe-qknorm"])
def test_from_hf_on_cuda(case, hf_dirs):
    """Straight onto the GPU: fp32 logits as on the CPU; bf16 weights with the router kept fp32."""
    path, hf = hf_dirs[case]
    ids = torch.randint(0, HF_VOCAB, (2, 16))
    ref = hf_logits(hf, ids)
    model = from_hf(path, device="cuda")
    assert all(t.device.type == "cuda" for t in list(model.parameters()) + list(model.buffers()))
    assert (glmkit_logits(model, ids.cuda()).cpu() - ref).abs().max() <= 1e-4
    model = from_hf(path, dtype=torch.bfloat16, device="cuda")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    diff = glmkit_logits(model, ids.cuda()).cpu() - ref       # bf16 rounding: compare on average
    assert diff.abs().mean() <= 0.05 * ref.abs().mean()


# ------------------------------------------------------------------------------ glmkit -> HF parity

REVERSE = {
    "tiny": GLMConfig.from_name("tiny"),
    "tiny-tied-mha": GLMConfig.from_name("tiny", num_kv_heads=4, tie_word_embeddings=True, qkv_bias=False,
                                         partial_rotary_factor=1.0),
    "tiny-0414": GLMConfig.from_name("tiny-0414"),
    "tiny-moe": GLMConfig.from_name("tiny-moe"),
    "dense-rotate-half": GLMConfig.from_name("tiny-moe", n_routed_experts=0, num_experts_per_tok=0,
                                             moe_intermediate_size=0, n_shared_experts=0, first_k_dense_replace=0,
                                             qk_norm=False, partial_rotary_factor=0.25, n_group=1,
                                             routed_scaling_factor=1.0),
}


@pytest.mark.parametrize("name", list(REVERSE))
def test_to_hf_read_by_transformers(name, tmp_path):
    model = random_glmkit(REVERSE[name])
    to_hf(model, tmp_path)
    hf = load_with_transformers(tmp_path)
    assert type(hf).__name__ == json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    diff = (glmkit_logits(model, ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs logit diff {diff}"
    back = from_hf(tmp_path)
    assert back.config == REVERSE[name].with_(name=back.config.name)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


@pytest.mark.parametrize("case", ["glm-mha-tied", "moe-qknorm"])
def test_hf_round_trip_is_lossless(case, hf_dirs, tmp_path):
    """HF -> glmkit -> HF gives the same tensor names and values as save_pretrained wrote."""
    path, _ = hf_dirs[case]
    to_hf(from_hf(path), tmp_path)
    before, after = tensors(path), tensors(tmp_path)
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sharded_save_and_load(hf_dirs, tmp_path):
    path, hf = hf_dirs["moe-qknorm"]
    model = from_hf(path)
    files = to_hf(model, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists() and set(files) >= {tmp_path / s for s in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(tmp_path).values())
    ids = torch.randint(0, HF_VOCAB, (2, 12))
    assert torch.equal(glmkit_logits(from_hf(tmp_path), ids), glmkit_logits(model, ids))
    assert (hf_logits(load_with_transformers(tmp_path), ids) - hf_logits(hf, ids)).abs().max() <= 1e-5
    # transformers' own sharded save is read too
    hf.save_pretrained(tmp_path / "hf-sharded", max_shard_size="20KB")
    assert (tmp_path / "hf-sharded" / INDEX_FILE).exists()
    assert torch.equal(glmkit_logits(from_hf(tmp_path / "hf-sharded"), ids), glmkit_logits(model, ids))


# ------------------------------------------------------------------------------------------ bad input

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(24, 32)}),
     r"tensor model\.layers\.1\.self_attn\.k_proj\.weight has shape \[24, 32\], but the config implies \[16, 32\]"),
    (lambda s: s.pop("lm_head.weight"), r"missing tensor lm_head\.weight \(expected shape \[96, 32\]\)"),
    (lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(3)}),
     r"unexpected tensor model\.layers\.0\.mlp\.extra\.weight \(shape \[3\]\)"),
])
def test_checkpoint_tensor_errors(edit, match, hf_dirs, tmp_path):
    import torch.nn as nn

    path = _copy(hf_dirs["glm-gqa"][0], tmp_path / "ckpt")
    _edit_tensors(path, edit)
    register = nn.Module.register_parameter
    with pytest.raises(GlmkitError, match=match):
        from_hf(path)
    assert nn.Module.register_parameter is register      # the meta-device patch is undone on errors


def test_checkpoint_config_mismatch_lists_problems(hf_dirs, tmp_path):
    path = _copy(hf_dirs["glm4-gqa"][0], tmp_path / "ckpt")
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf, "intermediate_size": 64}))
    with pytest.raises(GlmkitError, match=r"(?s)\(6 problems\).*gate_up_proj\.weight has shape \[96, 32\], but the "
                                          r"config implies \[128, 32\]"):
        from_hf(path)


def test_moe_multi_token_prediction_layers_are_skipped(hf_dirs, tmp_path):
    """GLM-4.5 releases carry an MTP layer numbered after the last layer; transformers ignores it too."""
    path = _copy(hf_dirs["moe-qknorm"][0], tmp_path / "ckpt")
    _edit_tensors(path, lambda s: s.update({"model.layers.3.eh_proj.weight": torch.zeros(32, 64)}))
    ids = torch.randint(0, HF_VOCAB, (1, 8))
    assert torch.equal(glmkit_logits(from_hf(path), ids), glmkit_logits(from_hf(hf_dirs["moe-qknorm"][0]), ids))


def test_checkpoint_folder_errors(hf_dirs, tmp_path):
    path = _copy(hf_dirs["glm-gqa"][0], tmp_path / "llama")
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(GlmkitError, match="model_type 'llama'.*supported|Glm4ForCausalLM"):
        from_hf(path)
    with pytest.raises(GlmkitError, match="no config.json"):
        from_hf(tmp_path)
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(hf))
    (bare / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(GlmkitError, match="pytorch_model.bin; only safetensors"):
        from_hf(bare)
    sharded = tmp_path / "sharded"
    to_hf(from_hf(hf_dirs["glm-gqa"][0]), sharded, max_shard_size="20KB")
    index = json.loads((sharded / INDEX_FILE).read_text())
    first, *_, last = sorted(set(index["weight_map"].values()))
    moved = next(name for name, f in index["weight_map"].items() if f == last)
    index["weight_map"][moved] = first                                     # an index that lies
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(GlmkitError, match=f"maps tensor {moved} to {first}, which cannot provide it"):
        from_hf(sharded)
    second = sorted(sharded.glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(GlmkitError, match=f"names shard files that are not in .*{second.name}"):
        from_hf(sharded)


# ------------------------------------------------------------------------------------- glmkit convert

def _tokenizer_json(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from glmkit.data.tokenizer import GLM_SPECIALS

    specials = list(GLM_SPECIALS.values())
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(HF_VOCAB - len(specials))}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(path / "tokenizer.json"))


def test_convert_cli_round_trip(hf_dirs, tmp_path):
    from glmkit.checkpoint.loader import load
    from glmkit.cli import main

    src_dir, hf = hf_dirs["moe-groups"]
    src = _copy(src_dir, tmp_path / "hf")
    _tokenizer_json(src)
    assert main(["convert", "--from-hf", str(src), "--out", str(tmp_path / "gk")]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"} <= {
        p.name for p in (tmp_path / "gk").iterdir()}
    loaded = load(tmp_path / "gk")                                   # the one loader reads it
    model, tokenizer = loaded.model, loaded.tokenizer
    assert (loaded.format, loaded.objective) == ("glmkit", "clm")    # converted HF weights are causal
    ids = torch.tensor([tokenizer.encode("w5 w7 w9 w11 w3 w2 w40 w41")])
    assert (glmkit_logits(model, ids) - hf_logits(hf, ids)).abs().max() <= 1e-4
    assert main(["convert", "--to-hf", str(tmp_path / "gk"), "--out", str(tmp_path / "back"),
                 "--max-shard-size", "20KB"]) == 0
    assert (tmp_path / "back" / INDEX_FILE).exists() and (tmp_path / "back" / "tokenizer.json").exists()
    before, after = tensors(src), tensors(tmp_path / "back")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    # into the same folder again: refused, then with --overwrite one file replaces the shards and index
    assert main(["convert", "--to-hf", str(tmp_path / "gk"), "--out", str(tmp_path / "back")]) == 2
    assert main(["convert", "--to-hf", str(tmp_path / "gk"), "--out", str(tmp_path / "back"), "--overwrite"]) == 0
    assert sorted(p.name for p in (tmp_path / "back").glob("model*")) == ["model.safetensors"]
    again = tensors(tmp_path / "back")
    assert sorted(before) == sorted(again) and all(torch.equal(before[k], again[k]) for k in before)


def test_convert_cli_dtype_and_errors(hf_dirs, tmp_path, capsys):
    from glmkit.cli import main

    src = hf_dirs["glm4-gqa"][0]
    assert main(["convert", "--from-hf", str(src), "--out", str(tmp_path / "gk"), "--dtype", "bf16"]) == 0
    from glmkit.checkpoint.store import load_weights

    assert load_weights(tmp_path / "gk" / "model.safetensors")["embed_tokens.weight"].dtype == torch.bfloat16
    assert main(["convert", "--to-hf", str(tmp_path / "gk"), "--out", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"
    capsys.readouterr()
    assert main(["convert", "--from-hf", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "glmkit convert: error:" in capsys.readouterr().err
    bad = _copy(tmp_path / "gk", tmp_path / "gk-bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    (bad / "manifest.json").unlink()
    assert main(["convert", "--to-hf", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "embed_tokens.weight has shape [96, 32], but the config implies [96, 48]" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ streaming

_PEAK_SCRIPT = """
import sys, threading, time, torch
from glmkit.model.config import GLMConfig
from glmkit.checkpoint.hf import from_hf, meta_parameters
from glmkit.model.glm import GLM

def anon():  # resident anonymous memory (file pages of the memory-mapped checkpoint are not counted)
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

with meta_parameters():          # warm up torch's one-time allocations before the baseline
    GLM(GLMConfig.from_name("tiny"))
GLM(GLMConfig.from_name("tiny"))
base, peak, done = anon(), [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.0002)
thread = threading.Thread(target=sample)
thread.start()
model = from_hf(sys.argv[1])
done.append(1)
thread.join()
print(max(peak[0], anon()) - base)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
def test_from_hf_holds_one_copy_of_the_weights(tmp_path):
    """Peak resident memory of from_hf on a ~40 MB checkpoint stays near one copy of the weights."""
    import subprocess
    import sys

    config = GLMConfig.from_name("tiny", vocab_size=16000, hidden_size=256, num_heads=4, num_kv_heads=2,
                                 head_dim=64, intermediate_size=704, num_layers=4)
    model = GLM(config)
    to_hf(model, tmp_path)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.strip().splitlines()[-1])
    assert 0.9 * size < growth < 1.25 * size, f"peak growth {growth / 1e6:.1f} MB for {size / 1e6:.1f} MB of weights"
