"""Checkpoint directories: round trip, tied weights, keep-K, corruption refused, and the atomic-save
guarantee (a save interrupted at its worst moment leaves the previous checkpoint as `latest`)."""

import json

import pytest
import torch

from glmkit.checkpoint import store as C
from glmkit.errors import GlmkitError


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(16, 4, generator=g)
    return {"embed.weight": emb, "head.weight": emb, "norm.weight": torch.randn(4, generator=g),
            "layers.0.w": torch.randn(4, 4, generator=g)}


def _save(root, step, seed=0, keep=3):
    return C.save_checkpoint(
        root, step, model_state=_state(seed),
        save_config=lambda p: p.write_text(json.dumps({"hidden": 4})),
        save_tokenizer=lambda p: p.write_text('{"tok": 1}'),
        train_state={"step": step, "optimizer": {"m": torch.ones(3) * step}, "data": {0: {"pos": step}}},
        fingerprint={"tokenizer": "abc"}, keep=keep)


def test_round_trip_and_tied_weights(tmp_path):
    path = _save(tmp_path, 5, seed=1)
    assert path.name == "step-000005" and (tmp_path / "latest").read_text().strip() == "step-000005"
    ck = C.load_checkpoint(tmp_path)
    want = _state(1)
    assert ck.step == 5 and ck.manifest["fingerprint"] == {"tokenizer": "abc"}
    for k, v in want.items():
        assert torch.equal(ck.model_state[k], v), k
    # the tied head is stored once and comes back as the same tensor
    assert ck.model_state["head.weight"] is ck.model_state["embed.weight"]
    assert torch.equal(ck.train_state["optimizer"]["m"], torch.ones(3) * 5)
    assert ck.train_state["data"] == {0: {"pos": 5}}
    # resolve accepts the run dir (parent of checkpoints/), the checkpoints dir and the step dir
    assert C.resolve(path) == path and C.resolve(tmp_path) == path


def test_keep_last_k(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in C.list_checkpoints(tmp_path)] == [4, 5]
    assert C.latest_checkpoint(tmp_path).name == "step-000005"


def test_corrupted_checkpoint_is_refused(tmp_path):
    path = _save(tmp_path, 3)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(GlmkitError, match="corrupted: model.safetensors"):
        C.load_checkpoint(tmp_path)
    (path / "train_state.pt").unlink()
    with pytest.raises(GlmkitError, match="missing train_state.pt"):
        C.verify(path)


@pytest.mark.parametrize("moment", ["publish", "point_latest"])
def test_interrupted_save_keeps_previous_latest(tmp_path, monkeypatch, moment):
    """Kill the save after every file of step 2 is written and fsync'ed: before its directory is
    renamed into place (`publish`), or after that but before `latest` moves (`point_latest`)."""
    _save(tmp_path, 1, seed=1)

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(C, f"_{moment}", die)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, seed=2)
    monkeypatch.undo()
    ck = C.load_checkpoint(tmp_path)  # verifies checksums
    assert ck.step == 1 and torch.equal(ck.model_state["layers.0.w"], _state(1)["layers.0.w"])
    # the next save cleans up the partial directory and goes on normally
    _save(tmp_path, 3, seed=3)
    assert not list(tmp_path.glob(".tmp-*"))
    assert C.load_checkpoint(tmp_path).step == 3


def test_latest_pointer_missing_falls_back_to_newest(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / "latest").unlink()
    assert C.latest_checkpoint(tmp_path).name == "step-000002"
    with pytest.raises(GlmkitError, match="no checkpoint found"):
        C.resolve(tmp_path / "nothing")
