"""HF transformers checkpoints <-> glmkit checkpoints (`glmkit convert`).

    from_hf_folder(HF_DIR, DIR, dtype=torch.bfloat16)     # HF -> glmkit
    to_hf_folder(CKPT, HF_DIR, max_shard_size="5GB")       # glmkit -> HF

A glmkit checkpoint here is the inference part of `glmkit.checkpoint.store`'s layout: `config.json`
(`GLMConfig.save`), `model.safetensors`, `tokenizer.json` when the source has one, and a
`manifest.json` with checksums (step 0, written by `glmkit.checkpoint.store.write_manifest`), so
`glmkit.checkpoint.loader.load` and every command that takes a checkpoint read it. `to_hf_folder` accepts
such a folder, a training step directory or a run directory (its latest checkpoint). The tokenizer
files found next to the source weights are copied.

Both directions hold one copy of the weights in memory (see `glmkit.checkpoint.hf`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from glmkit.errors import GlmkitError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Files that travel with the weights (an HF folder's tokenizer and generation settings).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja")


def from_hf_folder(src: str | Path, out: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False):
    """Convert the HF checkpoint folder `src` into a glmkit checkpoint at `out`; returns the model.
    A non-empty `out` is refused unless `overwrite`."""
    src, out = Path(src), Path(out)
    _check_out(src, out, overwrite)
    from glmkit.checkpoint.hf import from_hf
    model = from_hf(src, dtype=dtype)
    save_glmkit(model, out, source=src)
    return model


def to_hf_folder(src: str | Path, out: str | Path, dtype: torch.dtype | None = None, max_shard_size: str = "5GB",
                 overwrite: bool = False):
    """Convert a glmkit checkpoint (or run directory: its latest checkpoint) into an HF folder at `out`;
    returns the model. A non-empty `out` is refused unless `overwrite`."""
    from glmkit.checkpoint.hf import to_hf
    from glmkit.checkpoint.loader import load, locate
    folder, fmt = locate(src)
    if fmt == "hf":
        raise GlmkitError(f"--to-hf {src} is already an HF checkpoint folder; give a glmkit checkpoint or run folder")
    out = Path(out)
    _check_out(folder, out, overwrite)
    model = load(folder, dtype=dtype, for_inference=False, tokenizer=False).model
    to_hf(model, out, max_shard_size=max_shard_size)
    _copy_side_files(folder, out)
    return model


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == Path(src).resolve():
        raise GlmkitError(f"--out {out} is the source folder; choose another folder")
    if out.is_file():
        raise GlmkitError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise GlmkitError(f"--out {out} already holds files; choose an empty or new folder, or pass --overwrite "
                          "to write over them")
    if overwrite and out.is_dir():
        # weights of an earlier conversion must not outlive this one: a loader that finds a stale
        # model.safetensors next to a new shard index (or stale shards) would read the old weights
        for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json", out / "manifest.json"]:
            old.unlink(missing_ok=True)


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
