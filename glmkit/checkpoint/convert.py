"""`glmkit convert`: HF transformers checkpoints <-> glmkit checkpoints.

    glmkit convert --from-hf HF_DIR --out DIR [--dtype bf16]         # HF -> glmkit
    glmkit convert --to-hf CKPT --out HF_DIR [--max-shard-size 5GB]   # glmkit -> HF

A glmkit checkpoint here is the inference part of `glmkit.checkpoint.store`'s layout: `config.json`
(`GLMConfig.save`), `model.safetensors`, `tokenizer.json` when the source has one, and a
`manifest.json` with checksums (step 0), so `glmkit.checkpoint.store.load_model` and every command that
takes a checkpoint read it. `--to-hf` accepts such a folder, a training step directory or a run
directory (its latest checkpoint). The tokenizer files found next to the source weights are copied.

Both directions hold one copy of the weights in memory (see `glmkit.checkpoint.hf`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from glmkit.errors import GlmkitError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Files that travel with the weights (an HF folder's tokenizer and generation settings).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="HF checkpoint folder (GlmForCausalLM, Glm4ForCausalLM "
                     "or Glm4MoeForCausalLM: config.json + safetensors) to convert into a glmkit checkpoint")
    src.add_argument("--to-hf", metavar="DIR", help="glmkit checkpoint (or run) directory to convert into an "
                     "HF checkpoint folder")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weight dtype of the output (default: that of the source; the MoE router stays fp32)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="--to-hf: largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    dtype = DTYPES[args.dtype] if args.dtype else None
    t0 = time.perf_counter()
    if args.from_hf:
        src = Path(args.from_hf)
        _check_out(src, out)
        from glmkit.checkpoint.hf import from_hf
        model = from_hf(src, dtype=dtype)
        save_glmkit(model, out, source=src)
        direction = "HF -> glmkit"
    else:
        src = _glmkit_dir(Path(args.to_hf))
        _check_out(src, out)
        from glmkit.checkpoint.hf import to_hf
        model = load_glmkit(src)
        if dtype is not None:
            model = _cast(model, dtype)
        to_hf(model, out, max_shard_size=args.max_shard_size)
        _copy_side_files(src, out)
        direction = "glmkit -> HF"
    from glmkit.model.config import human

    n = sum(p.numel() for p in model.parameters())
    print(f"{direction}: {model.config.name} ({human(n)} parameters, {model.embed_tokens.weight.dtype}) "
          f"from {src} to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _check_out(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve():
        raise GlmkitError(f"--out {out} is the source folder; choose another folder")
    if out.is_file():
        raise GlmkitError(f"--out {out} is a file; give a folder")


def _cast(model, dtype):
    """Cast weights to `dtype`, keeping the MoE router in fp32."""
    from glmkit.checkpoint.hf import keep_fp32

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not keep_fp32(name):
            t.data = t.data.to(dtype)
    return model


def _copy_side_files(src: Path, out: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


# ---------------------------------------------------------------------------------------------------
# The glmkit side: config.json + model.safetensors (+ tokenizer.json) + manifest.json.

def save_glmkit(model, out: Path, source: Path | None = None) -> Path:
    """Write `model` as a glmkit inference checkpoint into `out` (see the module docstring)."""
    from glmkit.checkpoint.store import FORMAT, save_weights, sha256

    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), out / "model.safetensors")
    model.config.save(out / "config.json")
    files = ["model.safetensors", "config.json"]
    if source is not None:
        files += _copy_side_files(source, out)
    manifest = {"format": FORMAT, "step": 0, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": {f: {"sha256": sha256(out / f), "bytes": (out / f).stat().st_size} for f in files},
                "fingerprint": {"converted_from": str(source) if source else None}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return out


def _glmkit_dir(path: Path) -> Path:
    """A folder holding config.json + model.safetensors: given directly, or a checkpoint/run directory."""
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    from glmkit.checkpoint.store import resolve

    return resolve(path)


def load_glmkit(path: Path):
    """A GLM from a glmkit checkpoint folder, weights verified against the manifest when there is one;
    the tensors are read once and become the parameters (no second copy)."""
    from glmkit.checkpoint.store import load_weights, verify
    from glmkit.model.config import GLMConfig
    from glmkit.checkpoint.hf import meta_parameters
    from glmkit.model.glm import GLM

    if (path / "manifest.json").is_file():
        verify(path)
    config = GLMConfig.load(path / "config.json")
    with meta_parameters():
        model = GLM(config)
    state = load_weights(path / "model.safetensors")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing tensor {k} (expected shape {list(s)})" for k, s in expected.items() if k not in state]
    problems += [f"unexpected tensor {k} (shape {list(state[k].shape)})" for k in state if k not in expected]
    problems += [f"tensor {k} has shape {list(state[k].shape)}, but the config implies {list(s)}"
                 for k, s in expected.items() if k in state and tuple(state[k].shape) != s]
    if problems:
        raise GlmkitError(f"checkpoint {path} does not match its config.json:\n  " + "\n  ".join(problems[:12]))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
