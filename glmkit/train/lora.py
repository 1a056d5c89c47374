"""LoRA on glmkit's model through `peft`: adapters on the attention and MLP projections, merged on export.

    add_lora(model, rank=8, alpha=16, targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    parameter_counts(model)               # (trainable, total)
    merged_state_dict(model.state_dict(), scaling)   # plain GLM keys, W + scaling * B @ A

`add_lora` injects peft's LoRA layers in place (`peft.inject_adapter_in_model`: the module stays a
`GLM`, each targeted `nn.Linear` becomes a `peft` LoRA layer wrapping it) and freezes every other
parameter. Targets are the leaf names of the model's linear layers: `qkv_proj`, `o_proj` (attention),
`gate_up_proj`, `down_proj` (dense MLPs and MoE shared experts; routed experts are not `nn.Linear` and
are not adapted). `scaling` is peft's `alpha / rank`.

A LoRA checkpoint stores the merged weights under the plain keys (`model.safetensors` loads like any
glmkit checkpoint, for inference or further training) and the adapter itself in the training state
(`adapter_state_dict`), from which a run resumes: the frozen base is `--init`'s weights again.
"""

from __future__ import annotations

import torch

from glmkit.errors import GlmkitError

DEFAULT_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
_A, _B, _BASE = ".lora_A.default.weight", ".lora_B.default.weight", ".base_layer."


def linear_names(model: torch.nn.Module) -> set[str]:
    return {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None = None,
             targets: tuple[str, ...] = DEFAULT_TARGETS, dropout: float = 0.0,
             init_lora_weights: bool = True) -> torch.nn.Module:
    """Adapters of `rank` on the `targets` linear layers (in place); everything else frozen. `alpha`
    defaults to 2 x rank. `init_lora_weights=False` starts B random too (tests: a non-zero adapter)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise GlmkitError("LoRA needs peft: pip install 'glmkit[lora]' (or pip install peft)") from None
    if rank < 1:
        raise GlmkitError(f"--lora-rank must be >= 1 for LoRA (got {rank}); 0 means full fine-tuning")
    known = linear_names(model) - {"lm_head"}
    unknown = [t for t in targets if t not in known]
    if unknown or not targets:
        raise GlmkitError(f"--lora-targets {','.join(unknown) or '(none)'}: not a linear layer of this model; "
                          f"choose from {', '.join(sorted(known))}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=list(targets),
                        lora_dropout=dropout, init_lora_weights=init_lora_weights)
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name
    return model


def has_lora(state: dict) -> bool:
    return any(_A in k for k in state)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def adapter_state_dict(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".lora_" in k}


def merged_state_dict(state: dict, scaling: float) -> dict:
    """A LoRA model's full state dict as the plain model's: each adapted weight is W + scaling * B @ A
    (in fp32, cast back), its base layer's keys renamed, the adapter dropped."""
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        plain = key.replace(_BASE, ".")
        if _BASE in key and key.endswith(".weight"):
            prefix = key[: key.index(_BASE)]
            a, b = state[prefix + _A].float(), state[prefix + _B].float()
            value = (value.float() + scaling * (b @ a)).to(value.dtype)
        out[plain] = value
    return out


def load_adapter(model: torch.nn.Module, adapter: dict) -> None:
    """Copy a saved adapter into a model with the same LoRA layers (names as `adapter_state_dict` gives)."""
    params = dict(model.named_parameters())
    missing = [k for k in params if ".lora_" in k and k not in adapter]
    if missing or any(k not in params for k in adapter):
        raise GlmkitError(f"the checkpoint's LoRA adapter does not match this model ({len(missing)} adapter weights "
                          "missing); resume with the same --lora-rank and --lora-targets")
    with torch.no_grad():
        for k, v in adapter.items():
            params[k].copy_(v)
