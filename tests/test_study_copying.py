"""scripts/study_copying.py (the copy-learning study behind BENCHMARKS.md's demo tool-use section): the
drill's samples put the loss exactly on the repeat, and the script runs end to end on a tiny model."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "study_copying.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study_copying", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_drill_sample_scores_exactly_the_repeat(study, chat_tok):
    digits = [chat_tok.encode(str(d))[0] for d in range(10)]
    rng = np.random.default_rng(3)
    for _ in range(20):
        ids, loss = study.drill_sample(rng, chat_tok, digits, 4, 12)
        n = (len(ids) - 3) // 2
        assert ids[0] == chat_tok.gmask_id and ids[1] == chat_tok.sop_id and ids[n + 2] == chat_tok.eop_id
        assert list(ids[2:n + 2]) == list(ids[n + 3:]) and 4 <= n <= 12
        # position i predicts token i + 1: the loss positions predict the n repeated digits, nothing else
        assert list(ids[np.flatnonzero(loss) + 1]) == list(ids[n + 3:])


def test_the_study_runs_end_to_end_and_prints_one_json_line(study, chat_tok, tmp_path, capsys, monkeypatch):
    from glmkit.checkpoint import store as ckpt_io

    model = tiny_model(vocab_size=chat_tok.vocab_size, max_position_embeddings=4096)
    ckpt = ckpt_io.save_checkpoint(
        tmp_path / "checkpoints", 1, model_state=model.state_dict(), save_config=model.config.save,
        save_tokenizer=lambda p: chat_tok.save(p.parent), train_state={"step": 1},
        fingerprint={"objective": {"kind": "glm"}, "tokenizer": chat_tok.hash}, keep=1)
    monkeypatch.setattr(sys, "argv", ["study_copying.py", "--init", str(ckpt), "--drill-steps", "2",
                                      "--sft-steps", "2", "--sft-train", "4", "--sft-seq-len", "4096",
                                      "--eval-every", "1"])
    study.main()
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(e["stage"], e["step"]) for e in last["evaluations"]] == [
        ("drill", 1), ("drill", 2), ("tool-sft", 1), ("tool-sft", 2)]
    assert all(0 <= e["turn_exact"] <= 1 and 0 <= e["token_accuracy"] <= 1 for e in last["evaluations"])
