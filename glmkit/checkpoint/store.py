"""Checkpoint directories, written atomically and verified on load.

Layout of a run's checkpoints (`RUN/checkpoints/`):

    step-000200/
        model.safetensors   the weights (fp32 as trained; tied tensors stored once, see `tied` below)
        config.json         the model config (`GLMConfig.save`)
        tokenizer.json      the tokenizer (`GLMTokenizer.save`)
        train_state.pt      optimizer, LR scheduler, RNG states, data-iterator states, step, TrainConfig
        manifest.json       sha256 + size of every file above, the step, and the run's fingerprint
    latest                  one line: the name of the newest complete checkpoint directory

Atomicity: a checkpoint is first written into `.tmp-step-000200-<pid>/`, every file fsync'ed, then the
directory is renamed to its final name (a rename within one filesystem is atomic) and only then is
`latest` replaced (write `latest.tmp`, fsync, `os.replace`). A process killed at any moment therefore
leaves `latest` naming a complete, verified checkpoint: either the previous one or the new one.
Leftover `.tmp-*` directories are deleted by the next save.

Loading verifies the manifest's checksums and refuses a corrupted checkpoint with a `GlmkitError`;
the trainer additionally compares the manifest's fingerprint (model config, tokenizer hash, objective,
batch shape) with the run it is asked to continue.

`train_state.pt` holds Python objects (RNG states, data-iterator states) and is read with
`torch.load(weights_only=False)`: resume only from checkpoints you wrote. A model for inference is
read by `glmkit.checkpoint.loader.load`, which reads just the weights, the config and the tokenizer.
`write_manifest` is the one writer of `manifest.json` (checkpoints here, converted folders in
`glmkit.checkpoint.convert`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from glmkit.errors import GlmkitError

FORMAT = "glmkit-checkpoint/1"
FILES = ("model.safetensors", "config.json", "tokenizer.json", "train_state.pt")
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# ---------------------------------------------------------------------------------------------- writing

def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _split_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory (a tied LM head is the embedding): keep the
    first name of each storage and record the others as aliases."""
    seen: dict[tuple, str] = {}
    unique, tied = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) \
            if t.device.type != "meta" else (name,)
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t.detach().contiguous()
    return unique, tied


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    unique, tied = _split_tied(state)
    save_file(unique, str(path), metadata={"format": "pt", "tied": json.dumps(tied)})


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        tied = json.loads((f.metadata() or {}).get("tied", "{}"))
    state = load_file(str(path), device=str(device))
    for alias, source in tied.items():
        state[alias] = state[source]
    return state


def _publish(tmp: Path, final: Path) -> None:
    """Move a complete temporary checkpoint directory to its final name (atomic rename)."""
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _point_latest(root: Path, name: str) -> None:
    tmp = root / "latest.tmp"
    tmp.write_text(name + "\n")
    _fsync_file(tmp)
    os.replace(tmp, root / "latest")
    _fsync_dir(root)


def save_checkpoint(root: str | Path, step: int, *, model_state: dict[str, torch.Tensor],
                    save_config: Callable[[Path], None], save_tokenizer: Callable[[Path], None],
                    train_state: dict, fingerprint: dict, keep: int = 3) -> Path:
    """Write checkpoint `step` under `root` atomically, point `latest` at it, keep the newest `keep`.

    `save_config(path)` / `save_tokenizer(path)` write config.json / tokenizer.json (the objects' own
    `save`), so this module does not depend on the model or tokenizer classes.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_partial(root)
    name = step_dir_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(model_state, tmp / "model.safetensors")
    save_config(tmp / "config.json")
    save_tokenizer(tmp / "tokenizer.json")
    torch.save(train_state, tmp / "train_state.pt")
    write_manifest(tmp, FILES, step=step, fingerprint=fingerprint)
    _fsync_dir(tmp)
    _publish(tmp, root / name)
    _point_latest(root, name)
    prune(root, keep)
    return root / name


def write_manifest(folder: str | Path, files, *, step: int, fingerprint: dict) -> dict:
    """Write `folder/manifest.json` describing `files` (names inside `folder`) and return it.

    The one place a manifest is made, for training checkpoints and converted folders alike:
    `{"format", "step", "created" (UTC, ISO 8601), "files": {name: {"sha256", "bytes"}}, "fingerprint"}`.
    Every listed file is fsync'ed before it is hashed and the manifest after it is written, so a
    manifest never describes data that is not yet on disk.
    """
    folder = Path(folder)
    entries = {}
    for name in files:
        _fsync_file(folder / name)
        entries[name] = {"sha256": sha256(folder / name), "bytes": (folder / name).stat().st_size}
    manifest = {"format": FORMAT, "step": step, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": entries, "fingerprint": fingerprint}
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _fsync_file(path)
    return manifest


def remove_partial(root: Path) -> None:
    """Delete directories left by a save that was killed before its rename."""
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".old-*"):
        shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(out)


def prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    latest = latest_checkpoint(root)
    for _, p in list_checkpoints(root)[:-keep]:
        if p != latest:
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- reading

def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory `latest` names; if it is missing (deleted by hand), the newest step directory."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        p = root / pointer.read_text().strip()
        if p.is_dir():
            return p
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve(path: str | Path) -> Path:
    """Accept a checkpoint directory, a run's `checkpoints/` directory or a run directory."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise GlmkitError(f"no checkpoint found at {path}: expected a directory holding manifest.json, "
                      f"or a run directory with checkpoints/ (train one with `glmkit train`)")


def verify(ckpt: Path) -> dict:
    """Check every file against the manifest; return the manifest. Raises GlmkitError if corrupted."""
    manifest_path = ckpt / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise GlmkitError(f"checkpoint {ckpt} has no readable manifest.json ({e}); it is incomplete or "
                          f"corrupted: delete it to fall back to an earlier checkpoint") from e
    if manifest.get("format") != FORMAT:
        raise GlmkitError(f"checkpoint {ckpt} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [name for name in manifest["files"] if not (ckpt / name).is_file()]
    if missing:
        raise GlmkitError(f"checkpoint {ckpt} is missing {', '.join(missing)}: delete the directory to fall "
                          f"back to an earlier checkpoint")
    for name, want in manifest["files"].items():
        p = ckpt / name
        if p.stat().st_size != want["bytes"] or sha256(p) != want["sha256"]:
            raise GlmkitError(f"checkpoint {ckpt} is corrupted: {name} does not match its checksum in "
                              f"manifest.json; delete the directory to fall back to an earlier checkpoint")
    return manifest


@dataclass
class Checkpoint:
    path: Path
    step: int
    manifest: dict
    model_state: dict[str, torch.Tensor]
    train_state: dict


def load_checkpoint(path: str | Path, with_train_state: bool = True, verify_files: bool = True) -> Checkpoint:
    """Verify and read a checkpoint (CPU tensors). `path` as in `resolve`."""
    ckpt = resolve(path)
    manifest = verify(ckpt) if verify_files else json.loads((ckpt / "manifest.json").read_text())
    model_state = load_weights(ckpt / "model.safetensors")
    train_state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=False) \
        if with_train_state else {}
    return Checkpoint(ckpt, int(manifest["step"]), manifest, model_state, train_state)

