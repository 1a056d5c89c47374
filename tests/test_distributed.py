"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 take the same steps as one process over the
same global batch, and a checkpoint written by one mode resumes in another.

One process with `--data-shards 2 --grad-accum 2` sees exactly the rows that two processes with one
micro-batch each see (see glmkit/train.py), so the losses must agree to fp32 rounding. The warmup is
longer than the run, so the learning rate of step s does not depend on --max-steps and a run stopped
at step 3 and resumed to step 6 follows the same schedule as a 6-step run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmkit.checkpoint import store as C
from glmkit.train import loop as T

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(model="tiny", seq_len=64, batch_size=2, lr=5e-3, warmup_steps=100, eval_every=3, eval_batches=2,
              save_every=3, progress=False, tensorboard=False, prefetch=0, seed=7, device="cpu")


def _records(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _torchrun(corpus_dir, out_dir, max_steps, parallel, *extra):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items() if not isinstance(v, bool)]
    args += ["--no-progress", "--no-tensorboard", f"--corpus={corpus_dir}", f"--out-dir={out_dir}",
             f"--max-steps={max_steps}", f"--parallel={parallel}", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "glmkit", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_and_fsdp2_match_one_process_and_resume_across_modes(toy_corpus, tmp_path):
    ref_dir = tmp_path / "one"
    T.train(T.TrainConfig(**COMMON, corpus=str(toy_corpus.directory), out_dir=str(ref_dir), max_steps=6,
                          data_shards=2, grad_accum=2))
    ref = _records(ref_dir)
    ref_loss = {r["step"]: r["loss"] for r in ref if r["kind"] == "train"}
    ref_val = {r["step"]: r["val_loss"] for r in ref if r["kind"] == "val"}

    run = tmp_path / "two"
    _torchrun(toy_corpus.directory, run, 3, "ddp")                # steps 1-3 with DDP, checkpoint at 3
    _torchrun(toy_corpus.directory, run, 6, "fsdp", "--resume")   # steps 4-6 with FSDP2 from DDP's checkpoint
    recs = _records(run)
    loss = {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}
    val = {r["step"]: r["val_loss"] for r in recs if r["kind"] == "val"}
    assert sorted(loss) == list(range(1, 7)) and sorted(val) == [3, 6]
    assert [e["parallel"] for e in recs if e.get("event") == "start"] == ["ddp"]
    for step in ref_loss:
        assert loss[step] == pytest.approx(ref_loss[step], rel=1e-5, abs=1e-6), step
    for step in ref_val:
        assert val[step] == pytest.approx(ref_val[step], rel=1e-5, abs=1e-6), step
    assert ref_loss[6] < ref_loss[1]

    # FSDP2's checkpoint at step 6, gathered on rank 0, matches the single process's weights
    a, b = C.load_checkpoint(ref_dir), C.load_checkpoint(run)
    assert a.step == b.step == 6 and set(b.train_state["data"]) == {0, 1}
    for k, v in a.model_state.items():
        torch.testing.assert_close(b.model_state[k], v, rtol=1e-4, atol=1e-6, msg=k)
