"""`glmkit convert`: HF transformers checkpoints <-> glmkit checkpoints.

    glmkit convert --from-hf HF_DIR --out DIR [--dtype bf16]         # HF -> glmkit
    glmkit convert --to-hf CKPT --out HF_DIR [--max-shard-size 5GB]   # glmkit -> HF

A glmkit checkpoint here is the inference part of `glmkit.checkpoint.store`'s layout: `config.json`
(`GLMConfig.save`), `model.safetensors`, `tokenizer.json` when the source has one, and a
`manifest.json` with checksums (step 0, written by `glmkit.checkpoint.store.write_manifest`), so
`glmkit.checkpoint.loader.load` and every command that takes a checkpoint read it. `--to-hf` accepts
such a folder, a training step directory or a run directory (its latest checkpoint). The tokenizer
files found next to the source weights are copied.

Both directions hold one copy of the weights in memory (see `glmkit.checkpoint.hf`).
"""

from __future__ import annotations

import argparse
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
        from glmkit.checkpoint.hf import to_hf
        from glmkit.checkpoint.loader import load, locate
        src, fmt = locate(args.to_hf)
        if fmt == "hf":
            raise GlmkitError(f"--to-hf {args.to_hf} is already an HF checkpoint folder; give a glmkit checkpoint "
                              "or run folder")
        _check_out(src, out)
        model = load(src, dtype=dtype, for_inference=False, tokenizer=False).model
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
    """Write `model` as a glmkit folder into `out`: config.json, model.safetensors, the side files found
    in `source` (tokenizer.json, ...) and the manifest (step 0, objective clm: HF models are causal)."""
    from glmkit.checkpoint.store import save_weights, write_manifest

    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.state_dict(), out / "model.safetensors")
    model.config.save(out / "config.json")
    files = ["model.safetensors", "config.json"]
    if source is not None:
        files += _copy_side_files(source, out)
    write_manifest(out, files, step=0, fingerprint={"converted_from": str(source) if source else None,
                                                    "objective": {"kind": "clm"}})
    return out
