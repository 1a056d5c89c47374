"""HF transformers checkpoints of GLM-4, GLM-4-0414 and GLM-4.5/4.6, loaded into and saved from glmkit.

    model = from_hf("GLM-4-9B-0414", dtype=torch.bfloat16, device="cuda")   # -> glmkit.model.glm.GLM
    to_hf(model, "out", max_shard_size="5GB")                              # from_pretrained reads it
    config = config_from_hf(json.load(open("config.json")));  hf_dict = config_to_hf(config)

Three architectures (`../shared/DESIGN.md` §2), read from `config.json` → `architectures` / `model_type`:

| HF architecture | model_type | glmkit family |
|---|---|---|
| `GlmForCausalLM` | glm | GLM-4 / ChatGLM2-3: pre-RMSNorm, SwiGLU, GQA, interleaved partial RoPE |
| `Glm4ForCausalLM` | glm4 | GLM-4-0414: GLM-4 plus an RMSNorm on each sublayer output |
| `Glm4MoeForCausalLM` | glm4_moe | GLM-4.5/4.6: MoE with shared expert, rotate-half partial RoPE, QK norm |

Checkpoint layout (what `save_pretrained` writes): `config.json` plus either `model.safetensors` or
shards `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`
(`{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}`). MoE experts are
stored one module per expert (`mlp.experts.{e}.gate_proj.weight`, as released), whatever layout
transformers uses in memory.

Streaming: `from_hf` builds the model on the `meta` device, then reads one checkpoint tensor at a
time with `safe_open` (memory-mapped) straight into its final, preallocated glmkit tensor (fused
tensors are filled slice by slice), and hands those tensors to the model with
`load_state_dict(assign=True)`: a 9B checkpoint needs one copy of the weights in memory, not two.
`to_hf` plans the shards from the tensor sizes first, then writes them one at a time, so at most one
shard of copies exists besides the model.

Every tensor is checked before anything is read: a missing, unexpected or wrongly shaped tensor is a
`GlmkitError` naming it, its shape and the shape the config implies.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from glmkit.errors import GlmkitError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# Reading: one safetensors file or an index of shards, opened lazily, tensors read one at a time.

class CheckpointReader:
    """The tensors of an HF checkpoint directory, by name; use as a context manager.

    Each shard is memory-mapped while it is in use and unmapped once every tensor in it has been read
    with `get`, so the mapped pages of finished shards do not stay resident next to the model."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.weight_map = _weight_map(self.path)  # tensor name -> shard file name
        self._files: dict[str, object] = {}
        self._unread = Counter(self.weight_map.values())  # shard -> tensors not yet read with `get`

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        for fname in list(self._files):
            self._close(fname)

    def _file(self, name: str):
        from safetensors import safe_open

        fname = self.weight_map[name]
        if fname not in self._files:
            handle = safe_open(self.path / fname, framework="pt")
            self._files[fname] = handle.__enter__()
        return self._files[fname]

    def _close(self, fname: str) -> None:
        self._files.pop(fname).__exit__(None, None, None)

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return tuple(self._file(name).get_slice(name).get_shape())
        except Exception as e:  # safetensors raises its own error type for a name the file lacks
            raise GlmkitError(f"{self.path / INDEX_FILE} maps tensor {name} to {self.weight_map[name]}, "
                              f"which cannot provide it ({e})") from None

    def dtype(self, name: str) -> torch.dtype | None:
        return _ST_DTYPES.get(self._file(name).get_slice(name).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        tensor = self._file(name).get_tensor(name)
        fname = self.weight_map[name]
        self._unread[fname] -= 1
        if self._unread[fname] == 0:
            self._close(fname)
        return tensor


def _weight_map(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    if not path.is_dir():
        raise GlmkitError(f"{path} is not a directory; point at an HF checkpoint folder (config.json + *.safetensors)")
    index = path / INDEX_FILE
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise GlmkitError(f"{index} has no 'weight_map' object; it is not a safetensors index")
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise GlmkitError(f"{index} names shard files that are not in {path}: {', '.join(missing)}")
        return dict(weight_map)
    single = path / SINGLE_FILE
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
    hint = f" (found {', '.join(found)}; only safetensors is read — re-save with safe_serialization)" if found else ""
    raise GlmkitError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise GlmkitError(f"{path} not found")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise GlmkitError(f"{path} is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Writing: shards planned from sizes, then written one at a time.

def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500·2^20, an int is bytes (the units transformers accepts)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise GlmkitError(f"max_shard_size {size!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a byte count")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# Configs: HF config.json <-> GLMConfig.

ARCHITECTURES = {"GlmForCausalLM": "glm", "Glm4ForCausalLM": "glm4", "Glm4MoeForCausalLM": "glm4_moe"}
_ARCH_OF = {v: k for k, v in ARCHITECTURES.items()}
# What the HF config classes assume for a key that config.json leaves out (transformers 5.x defaults).
_HF_DEFAULTS = {
    "glm": dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                num_attention_heads=32, num_key_value_heads=2, head_dim=128, hidden_act="silu",
                max_position_embeddings=131072, rms_norm_eps=1.5625e-07, tie_word_embeddings=False,
                attention_bias=True, initializer_range=0.02),
    "glm4_moe": dict(vocab_size=151552, hidden_size=4096, intermediate_size=10944, num_hidden_layers=46,
                     num_attention_heads=96, num_key_value_heads=8, hidden_act="silu",
                     max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     attention_bias=False, initializer_range=0.02, moe_intermediate_size=1408,
                     num_experts_per_tok=8, n_shared_experts=1, n_routed_experts=128, routed_scaling_factor=1.0,
                     n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True, use_qk_norm=False,
                     num_nextn_predict_layers=1),
}
_HF_DEFAULTS["glm4"] = _HF_DEFAULTS["glm"]


def _unsupported(what: str) -> GlmkitError:
    supported = ", ".join(f"{a} (model_type {t!r})" for a, t in ARCHITECTURES.items())
    return GlmkitError(f"{what} is not supported; glmkit reads and writes {supported}")


def hf_model_type(hf: dict) -> str:
    """The model_type of an HF config dict, checked against `architectures` and the supported set."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type is None:
        known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
        if not known:
            raise _unsupported(f"HF config with architectures {archs} and no model_type")
        model_type = known[0]
    if model_type not in _ARCH_OF:
        raise _unsupported(f"HF model_type {model_type!r} (architectures {archs})")
    for a in archs:
        if a != _ARCH_OF[model_type]:
            raise _unsupported(f"HF architecture {a!r} (model_type {model_type!r})")
    return model_type


def _rope(hf: dict) -> tuple[float, float, dict | None]:
    """(rope_theta, partial_rotary_factor, rope_scaling) with transformers' precedence: `rope_parameters`
    (or the legacy `rope_scaling`), then top-level keys, then defaults (10000, and 0.5 for all three).
    GLM-4's `rope_ratio` (ChatGLM's remote code: base = rope_theta · rope_ratio) scales the base."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
        raise GlmkitError(f"HF rope_parameters {rope!r}: per-layer-type RoPE settings are not supported")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))) * float(hf.get("rope_ratio") or 1)
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
    if rope.get("rope_type", rope.get("type")) == "yarn" and "original_max_position_embeddings" in hf:
        rope = {**rope, "original_max_position_embeddings": hf["original_max_position_embeddings"]}
    return theta, float(factor), rope


def config_from_hf(hf: dict, name: str | None = None):
    """GLMConfig for an HF `config.json` dict of a supported architecture (else GlmkitError)."""
    from glmkit.model.config import GLMConfig

    model_type = hf_model_type(hf)
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise GlmkitError(f"quantized HF checkpoints ({method}) are not supported; use the bf16/fp32 release")
    c = {**_HF_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    if "num_key_value_heads" in hf and hf["num_key_value_heads"] is None:
        c["num_key_value_heads"] = c["num_attention_heads"]      # null: one KV head per query head
    if c["hidden_act"] != "silu":
        raise GlmkitError(f"HF hidden_act {c['hidden_act']!r} is not supported: GLM-4 MLPs are SwiGLU ('silu')")
    theta, factor, scaling = _rope(hf)
    heads = c["num_attention_heads"]
    kw = dict(name=name or f"hf-{model_type}", vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
              num_layers=c["num_hidden_layers"], num_heads=heads, num_kv_heads=c["num_key_value_heads"],
              head_dim=c.get("head_dim") or c["hidden_size"] // heads, intermediate_size=c["intermediate_size"],
              norm="rmsnorm", norm_eps=float(c["rms_norm_eps"]), residual="sandwich" if model_type == "glm4" else "pre",
              mlp="swiglu", mlp_bias=False, qkv_bias=bool(c["attention_bias"]), out_bias=False,
              position_embedding="rope", rope_interleaved=model_type != "glm4_moe", partial_rotary_factor=factor,
              rope_theta=theta, rope_scaling=scaling, max_position_embeddings=c["max_position_embeddings"],
              tie_word_embeddings=bool(c["tie_word_embeddings"]), initializer_range=c["initializer_range"])
    if model_type == "glm4_moe" and c["first_k_dense_replace"] >= c["num_hidden_layers"]:
        kw.update(qk_norm=bool(c["use_qk_norm"]))     # every layer dense: no experts anywhere
    elif model_type == "glm4_moe":
        kw.update(qk_norm=bool(c["use_qk_norm"]), n_routed_experts=c["n_routed_experts"],
                  num_experts_per_tok=c["num_experts_per_tok"], moe_intermediate_size=c["moe_intermediate_size"],
                  n_shared_experts=c["n_shared_experts"], first_k_dense_replace=c["first_k_dense_replace"],
                  routed_scaling_factor=float(c["routed_scaling_factor"]), norm_topk_prob=bool(c["norm_topk_prob"]),
                  n_group=c["n_group"], topk_group=c["topk_group"])
    return GLMConfig(**kw).validate()


def config_to_hf(config, dtype: torch.dtype | None = None) -> dict:
    """The HF `config.json` dict for a GLMConfig that one of the three HF architectures can express."""
    model_type = _hf_family(config)
    hf = dict(architectures=[_ARCH_OF[model_type]], model_type=model_type, vocab_size=config.vocab_size,
              hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
              num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
              num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, hidden_act="silu",
              attention_bias=config.qkv_bias, attention_dropout=0.0, rms_norm_eps=config.norm_eps,
              max_position_embeddings=config.max_position_embeddings,
              tie_word_embeddings=config.tie_word_embeddings, initializer_range=config.initializer_range,
              rope_parameters={"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta,
                               "partial_rotary_factor": config.partial_rotary_factor},
              use_cache=True,
              # token ids belong to the tokenizer, not to GLMConfig; None keeps HF from assuming GLM-4's
              # 151k vocabulary (its default pad id would not fit a smaller embedding)
              pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if model_type == "glm4_moe":
        dense_only = not config.is_moe    # a dense rotate-half model: every layer is a "first k dense" one
        hf.update(use_qk_norm=config.qk_norm, n_routed_experts=config.n_routed_experts if not dense_only else 1,
                  num_experts_per_tok=config.num_experts_per_tok if not dense_only else 1,
                  moe_intermediate_size=config.moe_intermediate_size or config.intermediate_size,
                  n_shared_experts=config.n_shared_experts,
                  first_k_dense_replace=config.num_layers if dense_only else config.first_k_dense_replace,
                  routed_scaling_factor=config.routed_scaling_factor, norm_topk_prob=config.norm_topk_prob,
                  n_group=config.n_group, topk_group=config.topk_group,
                  num_nextn_predict_layers=0)     # glmkit has no multi-token-prediction layers to save
    if dtype is not None:
        hf["dtype"] = str(dtype).removeprefix("torch.")
    return hf


def _hf_family(config) -> str:
    """Which HF architecture expresses this config; GlmkitError naming the first field none can."""
    def no(field, why):
        return GlmkitError(f"config {config.name!r} cannot be saved as an HF checkpoint: {field} = "
                           f"{getattr(config, field)!r}; {why}")

    expect = dict(norm="rmsnorm", mlp="swiglu", position_embedding="rope", mlp_bias=False, out_bias=False)
    for field, value in expect.items():
        if getattr(config, field) != value:
            raise no(field, f"the HF GLM-4 architectures need {field} = {value!r}")
    if config.residual == "deepnorm":
        raise no("residual", "the HF GLM-4 architectures are pre-norm ('pre') or sandwich ('sandwich', Glm4)")
    if config.rope_interleaved:
        if config.is_moe or config.qk_norm:
            field = "qk_norm" if config.qk_norm else "n_routed_experts"
            raise no(field, "only Glm4Moe has MoE layers and QK norm, and it uses rotate-half RoPE "
                     "(rope_interleaved = False)")
        return "glm4" if config.residual == "sandwich" else "glm"
    if config.residual == "sandwich":
        raise no("residual", "sandwich norms (Glm4) come with interleaved RoPE (rope_interleaved = True)")
    return "glm4_moe"


# ---------------------------------------------------------------------------------------------------
# Tensor names: glmkit tensor -> the HF tensors that fill it, each with the index of its part.
#
# glmkit fuses q/k/v (`self_attn.qkv_proj`, rows q | k | v) and gate/up (`gate_up_proj`, gate first)
# and stacks MoE experts as (E, 2I, h) / (E, h, I); HF checkpoints keep q/k/v apart, fuse gate/up only
# in the Glm/Glm4 dense MLP, and store Glm4Moe's MLPs and experts as separate gate/up/down modules.

def tensor_plan(config) -> dict[str, list[tuple[str, tuple]]]:
    """glmkit state-dict name -> [(HF tensor name, index into the glmkit tensor), ...], in HF order.
    An empty index is the whole tensor."""
    plan = {"embed_tokens.weight": [("model.embed_tokens.weight", ())]}
    for i in range(config.num_layers):
        plan.update(_layer_plan(config, i))
    plan["norm.weight"] = [("model.norm.weight", ())]
    if not config.tie_word_embeddings:
        plan["lm_head.weight"] = [("lm_head.weight", ())]
    return plan


def _layer_plan(config, i: int) -> dict[str, list[tuple[str, tuple]]]:
    ours, theirs = f"layers.{i}.", f"model.layers.{i}."
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    rows = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
    plan = {ours + "self_attn.qkv_proj.weight": [(f"{theirs}self_attn.{n}.weight", (r,)) for n, r in rows.items()]}
    if config.qkv_bias:
        plan[ours + "self_attn.qkv_proj.bias"] = [(f"{theirs}self_attn.{n}.bias", (r,)) for n, r in rows.items()]
    names = ["self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]
    names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] if config.qk_norm else []
    names += ["post_self_attn_layernorm.weight", "post_mlp_layernorm.weight"] if config.residual == "sandwich" else []
    plan.update({ours + n: [(theirs + n, ())] for n in names})
    f = config.intermediate_size
    if config.is_moe_layer(i):
        plan.update(_moe_plan(config, ours + "mlp.", theirs + "mlp."))
    elif config.rope_interleaved:         # Glm / Glm4: fused gate_up_proj on disk too
        plan.update({ours + n: [(theirs + n, ())] for n in ("mlp.gate_up_proj.weight", "mlp.down_proj.weight")})
    else:                                 # Glm4Moe dense layers: separate gate and up
        plan.update(_split_mlp(ours + "mlp.", theirs + "mlp.", f))
    return plan


def _split_mlp(ours: str, theirs: str, f: int) -> dict[str, list[tuple[str, tuple]]]:
    return {ours + "gate_up_proj.weight": [(theirs + "gate_proj.weight", (slice(0, f),)),
                                           (theirs + "up_proj.weight", (slice(f, 2 * f),))],
            ours + "down_proj.weight": [(theirs + "down_proj.weight", ())]}


def _moe_plan(config, ours: str, theirs: str) -> dict[str, list[tuple[str, tuple]]]:
    f, experts = config.moe_intermediate_size, range(config.n_routed_experts)
    plan = {ours + "gate.weight": [(theirs + "gate.weight", ())],
            ours + "gate.e_score_correction_bias": [(theirs + "gate.e_score_correction_bias", ())],
            ours + "experts.gate_up_proj": [p for e in experts for p in (
                (f"{theirs}experts.{e}.gate_proj.weight", (e, slice(0, f))),
                (f"{theirs}experts.{e}.up_proj.weight", (e, slice(f, 2 * f))))],
            ours + "experts.down_proj": [(f"{theirs}experts.{e}.down_proj.weight", (e,)) for e in experts]}
    if config.n_shared_experts > 0:
        plan.update(_split_mlp(ours + "shared_experts.", theirs + "shared_experts.",
                               f * config.n_shared_experts))
    return plan


# ---------------------------------------------------------------------------------------------------
# Loading and saving whole models.

@contextmanager
def meta_parameters():
    """Modules created inside put their parameters on the `meta` device (no memory, no init cost)
    while buffers (RoPE frequencies, router bias) are computed for real. Patches
    `nn.Module.register_parameter` for the duration, as accelerate's `init_empty_weights` does."""
    import torch.nn as nn

    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def keep_fp32(name: str) -> bool:
    """The MoE router stays fp32 in every dtype (as in transformers: `_keep_in_fp32_modules_strict`)."""
    return name.endswith((".gate.weight", ".gate.e_score_correction_bias"))


def _ignorable(hf_name: str, config) -> bool:
    """Checkpoint tensors glmkit does not use and transformers ignores too: a tied head's copy, RoPE
    caches of old exports, GLM-4.5's multi-token-prediction layers (numbered after the last layer)."""
    if hf_name == "lm_head.weight" and config.tie_word_embeddings:
        return True
    if hf_name.endswith("rotary_emb.inv_freq"):
        return True
    m = re.match(r"model\.layers\.(\d+)\.", hf_name)
    return bool(m) and int(m.group(1)) >= config.num_layers and config.is_moe


def _check(plan, targets: dict[str, torch.Tensor], ckpt: CheckpointReader, config) -> None:
    problems = []
    expected = {}
    for name, pieces in plan.items():
        for hf_name, index in pieces:
            expected[hf_name] = tuple(targets[name][index].shape)
    present = set(ckpt.names())
    for hf_name, shape in expected.items():
        if hf_name not in present:
            problems.append(f"missing tensor {hf_name} (expected shape {list(shape)})")
        elif ckpt.shape(hf_name) != shape:
            problems.append(f"tensor {hf_name} has shape {list(ckpt.shape(hf_name))}, but the config implies "
                            f"{list(shape)}")
    for hf_name in sorted(present - set(expected)):
        if not _ignorable(hf_name, config) and math.prod(ckpt.shape(hf_name)) > 0:
            problems.append(f"unexpected tensor {hf_name} (shape {list(ckpt.shape(hf_name))}) that the config "
                            "has no place for")
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise GlmkitError(f"checkpoint {ckpt.path} does not match its config.json ({len(problems)} problem"
                          f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems[:12]) + more)


def _default_dtype(hf: dict, ckpt: CheckpointReader) -> torch.dtype:
    name = hf.get("dtype") or hf.get("torch_dtype")
    if name in _DTYPES:
        return _DTYPES[name]
    embed = "model.embed_tokens.weight"
    return (ckpt.dtype(embed) if embed in ckpt.weight_map else None) or torch.float32


def from_hf(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """A glmkit `GLM` (eval mode) from an HF checkpoint folder of a supported architecture.

    dtype: the weights' dtype (default: the checkpoint's `dtype`); the MoE router stays fp32.
    """
    from glmkit.model.glm import GLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise GlmkitError(f"{path} is not an HF checkpoint folder: it has no config.json")
    hf = _read_json(path / "config.json")
    config = config_from_hf(hf, name=path.name or None)
    with CheckpointReader(path) as ckpt:
        dtype = dtype or _default_dtype(hf, ckpt)
        with meta_parameters():
            model = GLM(config)
        targets = model.state_dict()       # meta parameters and real buffers: the shapes to fill
        plan = tensor_plan(config)
        _plan_covers(plan, targets, model)
        _check(plan, targets, ckpt, config)
        state = {}
        for name, pieces in plan.items():
            meta = targets[name]
            t = torch.empty(meta.shape, dtype=torch.float32 if keep_fp32(name) else dtype, device=device)
            for hf_name, index in pieces:
                t[index].copy_(ckpt.get(hf_name))      # one checkpoint tensor in memory at a time
            state[name] = t
    model.load_state_dict(state, strict=True, assign=True)      # the filled tensors become the parameters
    return model.to(device).eval()


def _plan_covers(plan, targets, model) -> None:
    """The plan fills exactly the model's tensors (a mismatch is a glmkit bug, not a user error)."""
    missing = set(targets) - set(plan)
    extra = set(plan) - set(targets)
    if missing or extra:
        raise RuntimeError(f"glmkit.checkpoint.hf tensor plan out of sync with {type(model).__name__}: "
                           f"unfilled {sorted(missing)[:5]}, unknown {sorted(extra)[:5]}")


def to_hf(model, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> list[Path]:
    """Save a glmkit `GLM` as an HF checkpoint folder (config.json + safetensors, sharded with an
    index when larger than `max_shard_size`); transformers' `from_pretrained` reads it. Returns the
    files written."""
    config = model.config
    hf = config_to_hf(config, dtype=model.embed_tokens.weight.dtype)
    state = model.state_dict()
    where = {hf_name: (name, index) for name, ps in tensor_plan(config).items() for hf_name, index in ps}
    sizes = [(hf_name, state[name][index].numel() * state[name].element_size())
             for hf_name, (name, index) in where.items()]
    shards = plan_shards(sizes, parse_size(max_shard_size))
    files = shard_names(len(shards))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for fname, names in zip(files, shards):
        _write_shard(path / fname, {hf_name: (state[where[hf_name][0]], where[hf_name][1]) for hf_name in names})
    written = [path / "config.json", *(path / f for f in files)]
    if len(files) > 1:
        weight_map = {hf_name: fname for fname, names in zip(files, shards) for hf_name in names}
        index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.append(path / INDEX_FILE)
    return written


def _write_shard(file: Path, parts: dict[str, tuple[torch.Tensor, tuple]]) -> None:
    """Write one shard: HF name -> (glmkit tensor, index of the part). Only this shard's copies exist."""
    from safetensors.torch import save_file

    tensors = {}
    for hf_name, (t, index) in parts.items():
        # a slice of a fused tensor shares its storage, which safetensors refuses: copy it
        tensors[hf_name] = t.detach()[index].to("cpu", copy=bool(index)).contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})
