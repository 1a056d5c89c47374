"""`glmkit bench serve`: both servers as subprocesses on a tiny model, few requests (slow), and the
parts that decide what is measured and that every server is stopped whatever happens (fast)."""

import importlib.util
import subprocess
import sys
import time

import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from glmkit.bench.serve import (  # noqa: E402
    Reply,
    ServeBench,
    Server,
    bench_serve,
    levels,
    running,
    summary,
    table,
    wait_ready,
    workload,
)
from glmkit.errors import GlmkitError  # noqa: E402

HF = all(importlib.util.find_spec(m) for m in ("transformers", "accelerate"))


def test_levels_and_summary():
    assert levels("1, 8,32") == [1, 8, 32]
    with pytest.raises(GlmkitError, match="--concurrency"):
        levels("0,2")
    replies = [Reply(latency=0.1 * (i + 1), ttft=0.01 * (i + 1), tokens=4, wanted=4 + (i == 3)) for i in range(4)]
    r = summary(replies, wall=2.0)
    assert r["tokens_per_s"] == 8.0 and r["tokens"] == 16 and r["exact"] is False
    assert r["p50_ms"] == pytest.approx(250.0) and r["p99_ms"] == pytest.approx(397.0)     # numpy's linear
    assert r["ttft_p50_ms"] == pytest.approx(25.0)


def test_table():
    g = {"tokens_per_s": 300.0, "p50_ms": 1000.4, "p99_ms": 2500.6, "ttft_p50_ms": 50.0, "ttft_p99_ms": 80.2}
    h = {"tokens_per_s": 100.0, "p50_ms": 3000.0, "p99_ms": 9000.0, "ttft_p50_ms": 70.0, "ttft_p99_ms": 99.0}
    rows = table([(32, 64, {"glmkit": g, "hf": h}), (1, 8, {"glmkit": g})])
    assert rows[2:] == ["| 32 | 64 | 300.0 | 100.0 | 3.00x | 1,000 / 2,501 | 3,000 / 9,000 | 50 / 80 | 70 / 99 |",
                        "| 1 | 8 | 300.0 | - | - | 1,000 / 2,501 | - | 50 / 80 | - |"]
    assert rows[0].count("|") == rows[1].count("|") == rows[2].count("|")


def test_workload_is_the_same_for_a_seed_and_new_per_level(bilingual_tokenizer):
    b = ServeBench(min_prompt=5, max_prompt=9, min_new=3, max_new=4, seed=1)
    w = workload(bilingual_tokenizer, [3, 3], b)
    assert w.texts == workload(bilingual_tokenizer, [3, 3], b).texts
    assert not set(w.texts[0]) & set(w.texts[1])
    assert all(3 <= n <= 4 for ns in w.max_tokens for n in ns)


def _sleeper(tmp_path, name: str, code: str = "import time; time.sleep(60)") -> Server:
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    return Server(name, proc, "http://127.0.0.1:9/v1", name, log, {})


def test_servers_are_stopped_when_the_bench_fails(tmp_path):
    started = []

    def start(name):
        started.append(_sleeper(tmp_path, name))
        return started[-1]
    with pytest.raises(GlmkitError, match="did not answer"):
        with running([lambda: start("a"), lambda: start("b")], deadline=time.monotonic() + 0.5):
            pass
    assert [s.proc.poll() is not None for s in started] == [True, True]


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_server_dies_with_a_killed_bench(tmp_path):
    """SIGKILL skips every clean-up of the bench's process: its servers go with it all the same."""
    import os
    import signal
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from glmkit.bench.serve import _spawn\n"
        f"p = _spawn('s', [sys.executable, '-c', 'import time; time.sleep(60)'], Path({str(tmp_path)!r}) / 'log', 1)\n"
        "print(p.pid, flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(child, 0)                                   # alive
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)                           # gone (a zombie of init at most, reaped at once)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail("the server outlived the bench's process")


def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    s = _sleeper(tmp_path, "broken", "print('no model here'); raise SystemExit(3)")
    with pytest.raises(GlmkitError, match="(?s)exited with status 3.*no model here"):
        wait_ready(s, deadline=time.monotonic() + 30)


@pytest.mark.slow
def test_bench_serve_end_to_end(tiny_run):
    """Both servers on the tiny run's model (exported with `glmkit convert --to-hf`), c = 1 and 2: every
    reply has exactly its max_tokens tokens on each server, and no server outlives the bench."""
    psutil = pytest.importorskip("psutil")
    from glmkit.data.tokenizer import GLMTokenizer
    b = ServeBench(model=str(tiny_run.directory), concurrency="1,2", requests=3, min_prompt=8, max_prompt=24,
                   min_new=3, max_new=6, hf=HF, timeout=240)
    out = bench_serve(b)
    from glmkit.checkpoint.loader import locate
    wanted = workload(GLMTokenizer.load(locate(tiny_run.directory)[0]), [3, 3], b).max_tokens
    for i, c in enumerate((1, 2)):
        assert out[f"glmkit_tokens_c{c}"] == sum(wanted[i]) and out[f"glmkit_exact_c{c}"] is True
        assert out[f"glmkit_p99_ms_c{c}"] >= out[f"glmkit_p50_ms_c{c}"] >= out[f"glmkit_ttft_p50_ms_c{c}"] > 0
        if HF:
            assert out[f"hf_tokens_c{c}"] == sum(wanted[i]) and out[f"hf_exact_c{c}"] is True
            assert out[f"ratio_c{c}"] == out[f"glmkit_tokens_per_s_c{c}"] / out[f"hf_tokens_per_s_c{c}"]
            assert out[f"same_prompts_c{c}"] is True          # the exported template renders glmkit's prompt
    assert out["hf_tokens_per_s_c32"] is None and out["ratio_c32"] is None
    assert [p for p in psutil.Process().children(recursive=True) if "serve" in " ".join(p.cmdline())] == []
