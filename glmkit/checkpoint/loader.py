"""The one way to read a model from disk: `load(path) -> Loaded`.

    loaded = load("runs/glm")                              # its latest checkpoint, ready to decode
    loaded.model, loaded.tokenizer, loaded.objective        # GLM (eval mode), GLMTokenizer, "glm"
    load("GLM-4-9B-0414", device="cuda", dtype=torch.bfloat16)          # an HF folder
    load("runs/glm/checkpoints/step-000200", for_inference=False)       # as stored, e.g. to fine-tune

`path` may be any of these folders (checked in this order):
- an HF GLM folder: `config.json` holding `model_type` (GLM-4, GLM-4-0414, GLM-4.5/4.6), read by
  `glmkit.checkpoint.hf.from_hf`; `format` "hf", objective "clm" (released GLM-4 models are decoders
  read causally after `[gMASK]<sop>`);
- a glmkit folder: `config.json` (`GLMConfig.save`) + `model.safetensors` (+ `tokenizer.json`), with
  `manifest.json` (a training checkpoint `step-NNNNNN/`, or a folder written by `glmkit convert
  --from-hf`); every file is checked against the manifest's checksums first;
- a run folder, or its `checkpoints/` folder: its latest checkpoint (`glmkit.checkpoint.store.resolve`).

The objective is the one the weights were trained with, read from the manifest's fingerprint (a
converted HF model counts as "clm"). `dtype` casts every floating weight except the MoE router, which
stays fp32 (as transformers keeps it). `quantize="int8" | "int4"` replaces the blocks' linear and
expert weights by weight-only quantized ones (`glmkit.model.quantize`; inference only, checked before
anything is read). `for_inference=True` (the default) puts the model in eval mode
and lays its weights out for decoding (`glmkit.model.kv_cache.decode_layout`); False returns the module
as built, in training mode. `tokenizer=False` skips the tokenizer (weight conversion needs none); with
True a folder without one is an error. Run-time choices (attention backend, Flex kernel options, MoE
implementation) are not stored with the weights: set them with `model.set_runtime(...)` after loading.

Every problem is a `GlmkitError` that names the path and what to do: a missing path, a folder that is
none of the above, a config.json that does not match the weights (each tensor named with both shapes),
a corrupted file, a missing tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from glmkit.errors import GlmkitError

OBJECTIVES = ("glm", "mlm", "clm")
FORMATS = ("glmkit", "hf")


@dataclass
class Loaded:
    model: torch.nn.Module          # glmkit.model.glm.GLM
    tokenizer: object | None        # glmkit.data.tokenizer.GLMTokenizer (None only with tokenizer=False)
    objective: str                  # glm | mlm | clm: how the weights were trained
    format: str                     # glmkit | hf: what was on disk
    path: Path                      # the folder the weights were read from (a run's latest checkpoint)


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         for_inference: bool = True, tokenizer: bool = True, quantize: str | None = None) -> Loaded:
    """Read the model (and tokenizer) in `path`; see the module docstring for what `path` may be."""
    if quantize is not None:
        from glmkit.model.quantize import SCHEMES

        if quantize not in SCHEMES:
            raise GlmkitError(f"unknown quantization {quantize!r}; choose one of {', '.join(SCHEMES)}")
        if not for_inference:
            raise GlmkitError("quantize is for inference: load with for_inference=True (the default)")
    folder, fmt = locate(path)
    if fmt == "hf":
        from glmkit.checkpoint.hf import from_hf

        model, objective = from_hf(folder, dtype=dtype, device=device), "clm"
    else:
        model, objective = _load_glmkit(folder, dtype, device)
    tok = _load_tokenizer(folder) if tokenizer else None
    if quantize is not None:
        from glmkit.model.quantize import quantize as quantize_weights

        model = quantize_weights(model, quantize)
    if for_inference:
        from glmkit.model.kv_cache import decode_layout

        model = decode_layout(model.eval())
    return Loaded(model, tok, objective, fmt, folder)


def locate(path: str | Path) -> tuple[Path, str]:
    """(the folder holding the weights, "glmkit" | "hf") for any folder `load` accepts."""
    from glmkit.checkpoint.store import latest_checkpoint

    p = Path(path)
    if not p.exists():
        raise GlmkitError(f"{p} does not exist; give a glmkit checkpoint or run folder, or an HF GLM folder")
    if not p.is_dir():
        raise GlmkitError(f"{p} is a file; give the folder that holds it (a glmkit checkpoint or run folder, or "
                          "an HF GLM folder)")
    config = p / "config.json"
    if config.is_file() and "model_type" in _read_json(config):
        return p, "hf"
    if (p / "manifest.json").is_file() or (config.is_file() and (p / "model.safetensors").is_file()):
        return p, "glmkit"
    for root in (p, p / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found, "glmkit"
    raise GlmkitError(f"{p} is not a model folder: expected a glmkit checkpoint (config.json + model.safetensors "
                      f"+ manifest.json), a run folder with checkpoints/ (train one with `glmkit train`), or an "
                      f"HF GLM folder (config.json with model_type; `glmkit convert` reads those too)")


def _read_json(file: Path) -> dict:
    try:
        d = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise GlmkitError(f"{file} is not readable JSON ({e}); restore it from the original checkpoint") from None
    if not isinstance(d, dict):
        raise GlmkitError(f"{file} holds {type(d).__name__}, not a JSON object; restore it from the original "
                          "checkpoint")
    return d


def _load_glmkit(folder: Path, dtype: torch.dtype | None, device) -> tuple[torch.nn.Module, str]:
    """The GLM in a glmkit folder, and its training objective. The tensors are read once and become the
    parameters (built on `meta` first, then assigned): one copy of the weights in memory."""
    from glmkit.checkpoint.hf import meta_parameters
    from glmkit.checkpoint.store import load_weights, verify
    from glmkit.model.config import GLMConfig
    from glmkit.model.glm import GLM

    manifest = verify(folder) if (folder / "manifest.json").is_file() else {}
    if not (folder / "model.safetensors").is_file():
        raise GlmkitError(f"{folder} has no model.safetensors; it is not a complete glmkit checkpoint")
    config = GLMConfig.load(folder / "config.json")
    with meta_parameters():
        model = GLM(config)
    state = load_weights(folder / "model.safetensors")
    check_state(state, model.state_dict(), folder)
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        cast(model, dtype)
    return model.to(device), objective_of(manifest)


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: Path) -> None:
    """Raise a GlmkitError listing every tensor of `state` that the model (`expected`) has no place for,
    is missing, or has another shape."""
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    problems = [f"missing tensor {k} (expected shape {list(s)})" for k, s in shapes.items() if k not in state]
    problems += [f"unexpected tensor {k} (shape {list(state[k].shape)})" for k in state if k not in shapes]
    problems += [f"tensor {k} has shape {list(state[k].shape)}, but the config implies {list(s)}"
                 for k, s in shapes.items() if k in state and tuple(state[k].shape) != s]
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise GlmkitError(f"checkpoint {where} does not match its config.json:\n  " + "\n  ".join(problems[:12])
                          + more)


def cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating weights to `dtype` in place, keeping the MoE router in fp32; returns the model."""
    from glmkit.checkpoint.hf import keep_fp32

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not keep_fp32(name):
            t.data = t.data.to(dtype)
    return model


def objective_of(manifest: dict) -> str:
    """The objective recorded in a manifest's fingerprint; converted HF weights are causal (clm);
    a folder without one is read as GLM."""
    fingerprint = manifest.get("fingerprint") or {}
    kind = (fingerprint.get("objective") or {}).get("kind")
    if kind is None:
        kind = "clm" if "converted_from" in fingerprint else "glm"
    if kind not in OBJECTIVES:
        raise GlmkitError(f"the manifest names objective {kind!r}, not one of {', '.join(OBJECTIVES)}")
    return kind


def _load_tokenizer(folder: Path):
    from glmkit.data.tokenizer import GLMTokenizer

    if not (folder / "tokenizer.json").is_file():
        raise GlmkitError(f"{folder} has no tokenizer.json: copy the tokenizer.json of the model (or of the "
                          f"corpus it was trained on) into it, or load with tokenizer=False for the weights only")
    return GLMTokenizer.load(folder)
