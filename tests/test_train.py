"""The training loop on a toy corpus and the tiny model: each objective learns, checkpoints round-trip,
SIGKILL + --resume logs the same losses bit for bit, Ctrl-C saves, and bad input is refused clearly."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import build_toy_corpus, tiny_train_config
from helpers import train_losses as losses

from glmkit.checkpoint import store as C
from glmkit.checkpoint.loader import load
from glmkit.errors import GlmkitError
from glmkit.train import loop as T
from glmkit.train import setup as S

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("objective", ["glm", "mlm", "clm"])
def test_each_objective_learns_a_repeated_batch(toy_corpus, tmp_path, objective):
    run, _ = S.setup(tiny_train_config(toy_corpus.directory, tmp_path, objective=objective, lr=2e-2, warmup_steps=1,
                              max_steps=12))
    batch = next(run.iterators[0])
    curve = [T.train_step(run, T.prepare_batches(run, [batch]))["loss"] for _ in range(12)]
    assert math.isfinite(curve[0]) and curve[-1] < 0.6 * curve[0], (objective, curve)


def test_activation_checkpointing_changes_nothing_but_memory(toy_corpus, tmp_path):
    runs = [S.setup(tiny_train_config(toy_corpus.directory, tmp_path / str(ac), activation_checkpointing=ac))[0]
            for ac in (False, True)]
    batch = next(runs[0].iterators[0])
    a, b = (T.train_step(r, T.prepare_batches(r, [batch])) for r in runs)
    assert a["loss"] == b["loss"] and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)


def test_moe_model_trains_and_balances_its_router(toy_corpus, tmp_path):
    run, _ = S.setup(tiny_train_config(toy_corpus.directory, tmp_path, model="tiny-moe", router_bias_rate=1e-2))
    batch = next(run.iterators[0])
    res = T.train_step(run, T.prepare_batches(run, [batch]))
    biases = [m.gate.e_score_correction_bias for m in run.model.moe_layers()]
    assert math.isfinite(res["loss"]) and biases and all(b.abs().max() > 0 for b in biases)


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = [S.lr_factor(s, 10, 100, 0.05) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.05, abs=1e-3)


def test_weight_decay_skips_norms_biases_embeddings(toy_corpus, tmp_path):
    run, _ = S.setup(tiny_train_config(toy_corpus.directory, tmp_path))
    decay, rest = (g["params"] for g in run.optimizer.param_groups)
    names = {id(p): n for n, p in run.model.named_parameters()}
    assert all(p.ndim == 2 and "embed" not in names[id(p)] for p in decay)
    assert any("embed" in names[id(p)] for p in rest) and any(p.ndim == 1 for p in rest)


def test_train_writes_metrics_and_loadable_checkpoints(tiny_run, toy_corpus):
    run_dir, res = tiny_run
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["step"] for r in recs if r["kind"] == "val"] == [6, 12]
    assert res["step"] == 12 and res["loss"] == train[-1]["loss"] and 0 <= res["data_share"] <= 1
    assert train[-1]["loss"] < train[0]["loss"]
    assert [s for s, _ in C.list_checkpoints(run_dir / "checkpoints")] == [8, 12]  # keep=2
    loaded = load(run_dir)
    model, tok = loaded.model, loaded.tokenizer
    assert loaded.objective == "glm" and loaded.format == "glmkit" and loaded.path.name == "step-000012"
    assert tok.hash == toy_corpus.tokenizer.hash
    ck = C.load_checkpoint(run_dir)
    assert ck.step == 12 and set(ck.train_state["data"]) == {0}
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck.model_state[k]), k


def test_in_process_resume_logs_only_the_new_steps_and_plot_draws_them(toy_corpus, tiny_run_copy):
    T.train(tiny_train_config(toy_corpus.directory, tiny_run_copy, max_steps=14, resume=True))
    assert sorted(losses(tiny_run_copy)) == list(range(1, 15))
    from glmkit.cli import main
    assert main(["plot", str(tiny_run_copy), "--out", str(tiny_run_copy / "loss.png")]) == 0
    assert (tiny_run_copy / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cli(corpus_dir, out_dir, *extra):
    args = ["--out-dir", str(out_dir), "--model", "tiny", "--corpus", str(corpus_dir), "--seq-len", "64",
            "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "5", "--eval-every", "10",
            "--eval-batches", "2", "--save-every", "5", "--keep", "3", "--no-progress", "--no-tensorboard",
            "--prefetch", "2", "--device", "cpu", *extra]
    return [sys.executable, "-m", "glmkit", "train", *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_sigkill_and_resume_logs_identical_losses(toy_corpus, tmp_path):
    steps = "40"
    full = subprocess.Popen(_cli(toy_corpus.directory, tmp_path / "full", "--max-steps", steps), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(toy_corpus.directory, killed, "--max-steps", steps), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step-000010":
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    resumed_from = C.load_checkpoint(killed, with_train_state=False).step
    assert 10 <= resumed_from < int(steps)
    again = subprocess.run(_cli(toy_corpus.directory, killed, "--max-steps", steps, "--resume"), env=_env(),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert full.wait(timeout=120) == 0, full.stderr.read()
    a, b = losses(tmp_path / "full"), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, int(steps) + 1))
    assert a == b  # bit for bit: the floats in the JSONL are equal
    va = [r for r in map(json.loads, (tmp_path / "full" / "metrics.jsonl").read_text().splitlines())
          if r["kind"] == "val"]
    vb = [r for r in map(json.loads, (killed / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]
    assert va == vb


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_exits_cleanly(toy_corpus, tmp_path):
    proc = subprocess.Popen(_cli(toy_corpus.directory, tmp_path, "--max-steps", "100000", "--save-every", "100000"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").is_file():
        time.sleep(0.05)
    while time.time() < deadline and len(losses(tmp_path)) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted at step" in out + err and "Traceback" not in err
    step = C.load_checkpoint(tmp_path, with_train_state=False).step
    assert step == max(losses(tmp_path)) >= 3


def test_nonfinite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(toy_corpus, tmp_path, monkeypatch):
    from glmkit.model.glm import GLM
    real, calls = GLM.loss, {"n": 0}

    def loss(self, batch, attn=None, loss_index=None):
        calls["n"] += 1
        out = real(self, batch, attn, loss_index)
        return out * float("nan") if calls["n"] == 6 else out

    monkeypatch.setattr(GLM, "loss", loss)
    with pytest.raises(GlmkitError, match="non-finite loss nan at step 6"):
        T.train(tiny_train_config(toy_corpus.directory, tmp_path, eval_every=0))
    ck = C.load_checkpoint(tmp_path)
    assert ck.step == 4 and all(torch.isfinite(v).all() for v in ck.model_state.values())
    assert max(losses(tmp_path)) == 5


def test_out_of_memory_gives_advice(toy_corpus, tmp_path, monkeypatch):
    from glmkit.model.glm import GLM

    def loss(self, batch, attn=None, loss_index=None):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(GLM, "loss", loss)
    with pytest.raises(GlmkitError, match=r"smaller --batch-size \(e.g. 2\) with more --grad-accum"):
        T.train(tiny_train_config(toy_corpus.directory, tmp_path))


def test_corpus_with_another_tokenizer_is_refused_on_resume(toy_corpus, tiny_run_copy, tmp_path):
    other = build_toy_corpus(tmp_path / "other", seed=1)
    assert other.tokenizer.hash != toy_corpus.tokenizer.hash
    with pytest.raises(GlmkitError, match="another tokenizer"):
        T.train(tiny_train_config(other.directory, tiny_run_copy, max_steps=14, resume=True))


def test_resume_under_another_attention_backend_continues(toy_corpus, tmp_path):
    """The attention backend, Flex options and MoE path are run-time choices, not part of the run's
    fingerprint: a run trained with sdpa resumes under flex (setup) and auto (trained on), and a checkpoint
    whose fingerprint still holds the backend inside the model config (older runs) resumes too."""
    cfg = tiny_train_config(toy_corpus.directory, tmp_path, max_steps=2, save_every=2, eval_every=0,
                            attention_backend="sdpa")
    T.train(cfg)
    run, found = S.setup(replace(cfg, max_steps=4, resume=True, attention_backend="flex",
                                 flex_options='{"BLOCK_M": 64}', moe_impl="loop"))
    assert found.name == "step-000002" and run.model.attention_backend == "flex"
    assert run.model.flex_options == {"BLOCK_M": 64}
    assert T.train(replace(cfg, max_steps=4, resume=True, attention_backend="auto"))["step"] == 4
    manifest_path = tmp_path / "checkpoints" / "step-000004" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert "attention_backend" not in manifest["fingerprint"]["model"]
    manifest["fingerprint"]["model"]["attention_backend"] = "split"
    manifest_path.write_text(json.dumps(manifest))
    assert T.train(replace(cfg, max_steps=5, resume=True))["step"] == 5
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5]
    with pytest.raises(GlmkitError, match="--attention-backend must be one of auto, sdpa, flex, split"):
        replace(cfg, attention_backend="fast").validate()


def test_fingerprint_of_a_config_saved_before_a_field_was_added_matches():
    """A run saved before GLMConfig gained a field (e.g. rope_scaling) resumes: the missing key counts
    as its default; a real change of that field is still reported."""
    from glmkit.model.config import GLMConfig
    from glmkit.train.setup import _fingerprint_diff

    new = {"tokenizer": "h", "model": GLMConfig.from_name("tiny").to_dict()}
    old = {"tokenizer": "h", "model": {k: v for k, v in new["model"].items() if k != "rope_scaling"}}
    assert _fingerprint_diff(old, new) == ""
    scaled = {**new, "model": {**new["model"], "rope_scaling": {"rope_type": "linear", "factor": 2.0}}}
    assert _fingerprint_diff(old, scaled).startswith("model.rope_scaling: None -> {'rope_type': 'linear'")


def test_out_dir_holding_another_run_needs_resume_or_overwrite(toy_corpus, tmp_path):
    cfg = tiny_train_config(toy_corpus.directory, tmp_path, max_steps=2, save_every=0, eval_every=0)
    T.train(cfg)
    with pytest.raises(GlmkitError, match=r"already holds a training run with a different configuration "
                                          r"\(train.seq_len: 64 -> 32"):
        T.train(replace(cfg, seq_len=32))
    T.train(replace(cfg, batch_size=2, save_every=1, overwrite=True))
    with pytest.raises(GlmkitError, match=r"different setup \(train.batch_size: 2 -> 3\)"):
        T.train(replace(cfg, batch_size=3, resume=True))
    assert T.train(replace(cfg, overwrite=True))["step"] == 2


def test_help_text_comes_from_field_docstrings():
    from glmkit.cli import main
    from glmkit.cli.train import field_help
    helps = field_help()
    assert set(helps) == {f for f in T.TrainConfig.__dataclass_fields__}
    assert "GLM-Large" in helps["beta2"]
    assert main(["train", "--help"]) == 0




@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_training_checkpoint_and_resume(toy_corpus, tmp_path):
    cfg = tiny_train_config(toy_corpus.directory, tmp_path, device="cuda", max_steps=8, save_every=4, eval_every=4,
                   seq_len=256)
    res = T.train(cfg)
    assert res["step"] == 8 and math.isfinite(res["loss"]) and res["mfu_vs_measured_peak"] > 0
    T.train(replace(cfg, max_steps=10, resume=True))
    assert sorted(losses(tmp_path)) == list(range(1, 11))
    model = load(tmp_path, device="cuda").model
    assert next(model.parameters()).dtype == torch.float32   # bf16 autocast, fp32 master weights
