"""Every bad input to a verb ends with one line naming the option and the fix, exit status 2, and no
traceback (issue 15 §3); legal but suspicious input gets a warning and status 0.

The table runs each case in-process through `glmkit.cli.main` (what a subprocess runs, minus the
interpreter start-up); `test_end_to_end_in_a_subprocess` runs a few as real processes to prove the
exit status and the absence of a traceback on the way out. New verbs join the table when they are added.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glmkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()

# (id, argv with {placeholders}, text the one-line error must contain). Placeholders: run (a tiny
# trained run), corpus (its corpus), file (a UTF-8 text file), bad (a file that is not UTF-8), missing
# (a path that does not exist), empty (an empty file), emptydir (an empty folder), full (a folder
# holding a file), tmp (a scratch folder).
CASES = [
    # train
    ("train-hf-override-name", ["train", "--corpus", "{corpus}", "--model-overrides", "num_attention_heads=2"], "num_heads"),
    ("train-unknown-override", ["train", "--corpus", "{corpus}", "--model-overrides", "foo=1"], "--model-overrides"),
    ("train-override-type", ["train", "--corpus", "{corpus}", "--model-overrides", "hidden_size=abc"], "hidden_size"),
    ("train-override-not-kv", ["train", "--corpus", "{corpus}", "--model-overrides", "hidden_size"], "--model-overrides"),
    ("train-out-dir-file", ["train", "--corpus", "{corpus}", "--out-dir", "{file}"], "--out-dir"),
    ("train-save-every-negative", ["train", "--corpus", "{corpus}", "--save-every", "-1"], "--save-every"),
    ("train-eval-every-negative", ["train", "--corpus", "{corpus}", "--eval-every", "-1"], "--eval-every"),
    ("train-max-steps-zero", ["train", "--corpus", "{corpus}", "--max-steps", "0"], "--max-steps"),
    ("train-batch-size-type", ["train", "--corpus", "{corpus}", "--batch-size", "abc"], "--batch-size"),
    ("train-lr-type", ["train", "--corpus", "{corpus}", "--lr", "fast"], "--lr"),
    ("train-keep-zero", ["train", "--corpus", "{corpus}", "--keep", "0"], "--keep"),
    ("train-warmup-negative", ["train", "--corpus", "{corpus}", "--warmup-steps", "-2"], "--warmup-steps"),
    ("train-corpus-missing", ["train", "--corpus", "{missing}"], "--corpus"),
    ("train-corpus-file", ["train", "--corpus", "{file}"], "--corpus"),
    ("train-corpus-not-corpus", ["train", "--corpus", "{emptydir}"], "--corpus"),
    ("train-model-unknown", ["train", "--corpus", "{corpus}", "--model", "huge-9000"], "--model"),
    ("train-objective-unknown", ["train", "--corpus", "{corpus}", "--objective", "magic"], "--objective"),
    ("train-mixture-type", ["train", "--corpus", "{corpus}", "--mixture", "a,b,c"], "--mixture"),
    ("train-dtype", ["train", "--corpus", "{corpus}", "--dtype", "fp64"], "--dtype"),
    ("train-device-name", ["train", "--corpus", "{corpus}", "--device", "tpu"], "--device"),
    ("train-resume-overwrite", ["train", "--corpus", "{corpus}", "--resume", "--overwrite"], "--resume"),
    # sft
    ("sft-init-missing", ["sft", "--init", "{missing}", "--chat-data", "{file}"], "--init"),
    ("sft-data-missing", ["sft", "--init", "{run}", "--chat-data", "{missing}"], "--chat-data"),
    ("sft-format", ["sft", "--init", "{run}", "--chat-data", "{file}", "--chat-format", "chatml"], "--chat-format"),
    ("sft-data-not-jsonl", ["sft", "--init", "{run}", "--chat-data", "{file}", "--out-dir", "{tmp}/sft"], "not JSON"),
    ("sft-no-init", ["sft", "--chat-data", "{file}"], "--init"),
    ("sft-lora-rank-negative", ["sft", "--init", "{run}", "--chat-data", "{file}", "--lora-rank", "-1"], "--lora-rank"),
    ("sft-lora-fsdp", ["sft", "--init", "{run}", "--chat-data", "{file}", "--lora-rank", "4", "--parallel", "fsdp"],
     "--parallel fsdp"),
    # rl
    ("rl-init-missing", ["rl", "--init", "{missing}", "--rl-tasks", "{emptydir}"], "--init"),
    ("rl-tasks-not-suite", ["rl", "--init", "{run}", "--rl-tasks", "{emptydir}"], "train_tasks.jsonl"),
    ("rl-no-init", ["rl", "--rl-tasks", "{emptydir}"], "--init"),
    ("rl-group-one", ["rl", "--init", "{run}", "--rl-tasks", "{emptydir}", "--rl-group", "1"], "--rl-group"),
    ("rl-prefetch", ["rl", "--init", "{run}", "--rl-tasks", "{emptydir}", "--prefetch", "2"], "--prefetch"),
    ("rl-temperature-zero", ["rl", "--init", "{run}", "--rl-tasks", "{emptydir}", "--rl-temperature", "0"],
     "--rl-temperature"),
    ("rl-fsdp", ["rl", "--init", "{run}", "--rl-tasks", "{emptydir}", "--parallel", "fsdp"], "fsdp"),
    # tooltasks
    ("tooltasks-family", ["tooltasks", "--out", "{tmp}/tt", "--families", "poetry"], "unknown task families"),
    ("tooltasks-out-file", ["tooltasks", "--out", "{file}"], "--out"),
    ("tooltasks-train-negative", ["tooltasks", "--out", "{tmp}/tt", "--train", "-1"], "--train"),
    # infill / generate
    ("infill-file-missing", ["infill", "{run}", "--file", "{missing}"], "--file"),
    ("infill-file-not-utf8", ["infill", "{run}", "--file", "{bad}"], "--file"),
    ("infill-file-folder", ["infill", "{run}", "--file", "{emptydir}"], "--file"),
    ("infill-checkpoint-missing", ["infill", "{missing}", "a [MASK] b"], "checkpoint"),
    ("infill-checkpoint-file", ["infill", "{file}", "a [MASK] b"], "checkpoint"),
    ("infill-no-blank", ["infill", "{run}", "no blank here"], "[MASK]"),
    ("infill-no-prompt", ["infill", "{run}"], "--file"),
    ("generate-mask-in-prompt", ["generate", "{run}", "In the beginning [MASK] was"], "glmkit infill"),
    ("generate-max-new-tokens-zero", ["generate", "{run}", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("generate-temperature-negative", ["generate", "{run}", "x", "--temperature", "-1"], "--temperature"),
    ("generate-quantize-unknown", ["generate", "{run}", "x", "--quantize", "int3"], "--quantize"),
    ("generate-kv-dtype-unknown", ["generate", "{run}", "x", "--kv-dtype", "int8"], "--kv-dtype"),
    ("chat-quantize-unknown", ["chat", "{run}", "--prompt", "x", "--quantize", "fp8"], "--quantize"),
    ("serve-kv-dtype-unknown", ["serve", "{run}", "--kv-dtype", "e5m2"], "--kv-dtype"),
    ("generate-top-p-zero", ["generate", "{run}", "x", "--top-p", "0"], "--top-p"),
    ("generate-top-k-type", ["generate", "{run}", "x", "--top-k", "abc"], "--top-k"),
    ("generate-repetition-penalty-zero", ["generate", "{run}", "x", "--repetition-penalty", "0"], "--repetition-penalty"),
    ("generate-device-name", ["generate", "{run}", "x", "--device", "gpu0"], "--device"),
    ("generate-stop-empty", ["generate", "{run}", "x", "--stop", ""], "--stop"),
    ("generate-prefill-chunk-zero", ["generate", "{run}", "x", "--prefill-chunk", "0"], "--prefill-chunk"),
    ("generate-prompt-beyond-max-len", ["generate", "{run}", "the cat sat on the mat " * 4, "--max-len", "8"],
     "--max-len"),
    # chat
    ("chat-checkpoint-missing", ["chat", "{missing}", "--prompt", "x"], "checkpoint"),
    ("chat-tools-unknown", ["chat", "{run}", "--tools", "python,shell", "--prompt", "x"], "--tools"),
    ("chat-browse-dir-no-browser", ["chat", "{run}", "--browse-dir", "{emptydir}", "--prompt", "x"], "--browse-dir"),
    ("chat-browse-dir-missing", ["chat", "{run}", "--tools", "browser", "--browse-dir", "{missing}"], "--browse-dir"),
    ("chat-workspace-no-python", ["chat", "{run}", "--workspace", "{tmp}/ws", "--prompt", "x"], "--workspace"),
    ("chat-functions-missing", ["chat", "{run}", "--functions", "{missing}", "--prompt", "x"], "--functions"),
    ("chat-functions-not-py", ["chat", "{run}", "--functions", "{file}", "--prompt", "x"], "--functions"),
    ("chat-format-unknown", ["chat", "{run}", "--format", "chatml", "--prompt", "x"], "--format"),
    ("chat-thinking", ["chat", "{run}", "--thinking", "maybe", "--prompt", "x"], "--thinking"),
    ("chat-max-new-tokens-zero", ["chat", "{run}", "--max-new-tokens", "0", "--prompt", "x"], "--max-new-tokens"),
    ("chat-max-calls-type", ["chat", "{run}", "--max-calls", "many", "--prompt", "x"], "--max-calls"),
    ("chat-top-p-zero", ["chat", "{run}", "--top-p", "0", "--prompt", "x"], "--top-p"),
    ("chat-transcript-folder", ["chat", "{run}", "--transcript", "{emptydir}", "--prompt", "x"], "--transcript"),
    ("chat-prompt-empty", ["chat", "{run}", "--prompt", " "], "--prompt"),
    ("chat-device-name", ["chat", "{run}", "--device", "tpu", "--prompt", "x"], "--device"),
    ("chat-prefill-chunk-zero", ["chat", "{run}", "--prefill-chunk", "0", "--prompt", "x"], "--prefill-chunk"),
    ("chat-max-len-type", ["chat", "{run}", "--max-len", "long", "--prompt", "x"], "--max-len"),
    # eval
    ("eval-val-tokens-negative", ["eval", "{run}", "--corpus", "{corpus}", "--val-tokens", "-5"], "--val-tokens"),
    ("eval-nothing", ["eval", "{run}", "--corpus", "{corpus}", "--val-tokens", "0", "--infill-n", "0",
                      "--cloze-n", "0", "--sentiment-test", "0"], "--val-tokens"),
    ("eval-batch-size-zero", ["eval", "{run}", "--corpus", "{corpus}", "--batch-size", "0"], "--batch-size"),
    ("eval-window-type", ["eval", "{run}", "--window", "wide"], "--window"),
    ("eval-out-missing-folder", ["eval", "{run}", "--corpus", "{corpus}", "--out", "{missing}/eval.json"], "--out"),
    ("eval-out-folder", ["eval", "{run}", "--corpus", "{corpus}", "--out", "{emptydir}"], "--out"),
    ("eval-corpus-missing", ["eval", "{run}", "--corpus", "{missing}"], "--corpus"),
    ("eval-checkpoint-missing", ["eval", "{missing}"], "checkpoint"),
    # eval passkey
    ("eval-passkey-checkpoint-missing", ["eval", "passkey", "{missing}"], "checkpoint"),
    ("eval-passkey-lengths-type", ["eval", "passkey", "{run}", "--lengths", "long"], "--lengths"),
    ("eval-passkey-lengths-zero", ["eval", "passkey", "{run}", "--lengths", "0"], "--lengths"),
    ("eval-passkey-kv-dtype", ["eval", "passkey", "{run}", "--kv-dtype", "int8"], "--kv-dtype"),
    ("eval-passkey-too-long", ["eval", "passkey", "{run}", "--lengths", "100K"], "--lengths 102400 needs"),
    ("eval-passkey-too-short", ["eval", "passkey", "{run}", "--lengths", "16"], "--lengths 16 is shorter"),
    ("eval-passkey-depths-range", ["eval", "passkey", "{run}", "--depths", "0,1.5"], "--depths"),
    ("eval-passkey-depths-type", ["eval", "passkey", "{run}", "--depths", "deep"], "--depths"),
    ("eval-passkey-trials-zero", ["eval", "passkey", "{run}", "--trials", "0"], "--trials"),
    ("eval-passkey-digits-many", ["eval", "passkey", "{run}", "--digits", "40"], "--digits"),
    ("eval-passkey-filler", ["eval", "passkey", "{run}", "--filler", "lorem"], "--filler"),
    ("eval-passkey-objective", ["eval", "passkey", "{run}", "--objective", "mlm"], "--objective"),
    ("eval-passkey-out-folder", ["eval", "passkey", "{run}", "--out", "{emptydir}"], "--out"),
    ("eval-passkey-plot-suffix", ["eval", "passkey", "{run}", "--plot", "{tmp}/heat.txt"], "--plot"),
    # eval tools
    ("eval-tools-checkpoint-missing", ["eval", "tools", "{missing}"], "checkpoint"),
    ("eval-tools-suite-and-seed", ["eval", "tools", "{run}", "--suite", "{emptydir}", "--seed", "1"], "--suite"),
    ("eval-tools-suite-empty", ["eval", "tools", "{run}", "--suite", "{emptydir}"], "heldout_tasks.jsonl"),
    ("eval-tools-suite-missing", ["eval", "tools", "{run}", "--suite", "{missing}"], "--suite"),
    ("eval-tools-families", ["eval", "tools", "{run}", "--families", "poetry"], "--families"),
    ("eval-tools-langs", ["eval", "tools", "{run}", "--langs", ","], "--langs"),
    ("eval-tools-count-zero", ["eval", "tools", "{run}", "--count", "0"], "--count"),
    ("eval-tools-python", ["eval", "tools", "{run}", "--python", "maybe"], "--python"),
    ("eval-tools-toolset", ["eval", "tools", "{run}", "--toolset", "some"], "--toolset"),
    ("eval-tools-concurrency-zero", ["eval", "tools", "{run}", "--concurrency", "0"], "--concurrency"),
    ("eval-tools-max-rounds-type", ["eval", "tools", "{run}", "--max-rounds", "many"], "--max-rounds"),
    ("eval-tools-out-folder", ["eval", "tools", "{run}", "--out", "{emptydir}"], "--out"),
    ("eval-tools-transcripts-missing-folder", ["eval", "tools", "{run}", "--transcripts", "{missing}/t.jsonl"],
     "--transcripts"),
    ("eval-tools-device", ["eval", "tools", "{run}", "--device", "tpu"], "--device"),
    # tokenizer
    ("tokenizer-decode-negative", ["tokenizer", "decode", "-1", "--tokenizer", "{corpus}"], "ID"),
    ("tokenizer-decode-too-big", ["tokenizer", "decode", "999999", "--tokenizer", "{corpus}"], "ID"),
    ("tokenizer-decode-type", ["tokenizer", "decode", "abc", "--tokenizer", "{corpus}"], "ID"),
    ("tokenizer-missing", ["tokenizer", "info", "--tokenizer", "{missing}"], "--tokenizer"),
    ("tokenizer-emptydir", ["tokenizer", "info", "--tokenizer", "{emptydir}"], "--tokenizer"),
    ("tokenizer-not-json", ["tokenizer", "info", "--tokenizer", "{file}"], "--tokenizer"),
    ("tokenizer-train-empty", ["tokenizer", "train", "{empty}", "--out", "{tmp}/tk1"], "no document"),
    ("tokenizer-train-missing", ["tokenizer", "train", "{missing}", "--out", "{tmp}/tk2"], "{missing}"),
    ("tokenizer-train-not-utf8", ["tokenizer", "train", "{bad}", "--out", "{tmp}/tk3"], "UTF-8"),
    ("tokenizer-train-vocab-zero", ["tokenizer", "train", "{file}", "--vocab-size", "0"], "--vocab-size"),
    ("tokenizer-train-val-fraction", ["tokenizer", "train", "{file}", "--val-fraction", "1.5"], "--val-fraction"),
    ("tokenizer-train-out-file", ["tokenizer", "train", "{file}", "--out", "{file}"], "--out"),
    # corpus
    ("corpus-build-empty-file", ["corpus", "build", "{empty}", "--out", "{tmp}/c1"], "no document"),
    ("corpus-build-empty-folder", ["corpus", "build", "{emptydir}", "--out", "{tmp}/c2"], "no document"),
    ("corpus-build-missing", ["corpus", "build", "{missing}", "--out", "{tmp}/c3"], "{missing}"),
    ("corpus-build-not-utf8", ["corpus", "build", "{bad}", "--out", "{tmp}/c4"], "UTF-8"),
    ("corpus-build-out-file", ["corpus", "build", "{file}", "--out", "{file}"], "--out"),
    ("corpus-build-val-fraction", ["corpus", "build", "{file}", "--val-fraction", "-0.1"], "--val-fraction"),
    ("corpus-build-vocab-type", ["corpus", "build", "{file}", "--vocab-size", "many"], "--vocab-size"),
    ("corpus-build-tokenizer-missing", ["corpus", "build", "{file}", "--out", "{tmp}/c5", "--tokenizer", "{missing}"],
     "--tokenizer"),
    ("corpus-info-not-corpus", ["corpus", "info", "{emptydir}"], "corpus"),
    # samples
    ("samples-per-language-zero", ["samples", "--corpus", "{corpus}", "--per-language", "0"], "--per-language"),
    ("samples-length-negative", ["samples", "--corpus", "{corpus}", "--length", "-5"], "--length"),
    ("samples-length-short", ["samples", "--corpus", "{corpus}", "--length", "4"], "--length"),
    ("samples-corpus-missing", ["samples", "--corpus", "{missing}"], "--corpus"),
    # convert
    ("convert-to-hf-nonempty", ["convert", "--to-hf", "{run}", "--out", "{full}"], "--overwrite"),
    ("convert-to-hf-missing", ["convert", "--to-hf", "{missing}", "--out", "{tmp}/hf1"], "--to-hf"),
    ("convert-from-hf-file", ["convert", "--from-hf", "{file}", "--out", "{tmp}/gk1"], "--from-hf"),
    ("convert-from-hf-not-hf", ["convert", "--from-hf", "{emptydir}", "--out", "{tmp}/gk2"], "config.json"),
    ("convert-out-file", ["convert", "--to-hf", "{run}", "--out", "{file}"], "--out"),
    ("convert-shard-size", ["convert", "--to-hf", "{run}", "--out", "{tmp}/hf2", "--max-shard-size", "big"],
     "--max-shard-size"),
    ("convert-dtype", ["convert", "--to-hf", "{run}", "--out", "{tmp}/hf3", "--dtype", "fp64"], "--dtype"),
    # plot
    ("plot-out-suffix", ["plot", "{run}", "--out", "{tmp}/loss.txt"], "--out"),
    ("plot-smooth-negative", ["plot", "{run}", "--smooth", "-3"], "--smooth"),
    ("plot-out-missing-folder", ["plot", "{run}", "--out", "{missing}/loss.png"], "--out"),
    ("plot-run-missing", ["plot", "{missing}"], "RUN_DIR"),
    ("plot-no-metrics", ["plot", "{emptydir}"], "metrics"),
    # experiment
    ("experiment-steps-zero", ["experiment", "compare", "--steps", "0"], "--steps"),
    ("experiment-lr-type", ["experiment", "compare", "--lr", "fast"], "--lr"),
    ("experiment-variants", ["experiment", "compare", "--variants", "glm,gpt5"], "--variants"),
    ("experiment-device", ["experiment", "compare", "--device", "tpu"], "--device"),
    # bench
    ("bench-data-rounds-zero", ["bench", "data", "--rounds", "0"], "--rounds"),
    ("bench-data-seq-len-short", ["bench", "data", "--seq-len", "32", "--corpus", "{missing}"], "--seq-len"),
    ("bench-generate-batches", ["bench", "generate", "--batches", "a,b"], "--batches"),
    ("bench-generate-new-tokens", ["bench", "generate", "--new-tokens", "-4"], "--new-tokens"),
    ("bench-engine-requests", ["bench", "engine", "--requests", "0"], "--requests"),
    ("bench-engine-patterns", ["bench", "engine", "--patterns", "rush"], "--patterns"),
    ("bench-engine-prompt-range", ["bench", "engine", "--min-prompt", "40", "--max-prompt", "20"], "--min-prompt"),
    ("bench-serve-concurrency", ["bench", "serve", "--concurrency", "0,8"], "--concurrency"),
    ("bench-serve-concurrency-type", ["bench", "serve", "--concurrency", "many"], "--concurrency"),
    ("bench-serve-requests", ["bench", "serve", "--requests", "0"], "--requests"),
    ("bench-serve-new-range", ["bench", "serve", "--min-new", "64", "--max-new", "8"], "--min-new"),
    ("bench-serve-threads", ["bench", "serve", "--threads", "-1"], "--threads"),
    ("bench-serve-timeout", ["bench", "serve", "--timeout", "0"], "--timeout"),
    ("bench-serve-model-missing", ["bench", "serve", "--model", "{missing}"], "--model"),
    ("bench-serve-model-empty", ["bench", "serve", "--model", "{emptydir}"], "--model"),
    ("bench-serve-too-long", ["bench", "serve", "--model", "{run}", "--max-prompt", "4000", "--no-hf"], "--max-prompt"),
    ("bench-train-steps", ["bench", "train", "--steps", "-1"], "--steps"),
    ("bench-quantize-missing", ["bench", "quantize", "{missing}"], "checkpoint"),
    ("bench-quantize-variants", ["bench", "quantize", "{run}", "--variants", "int2"], "--variants"),
    ("bench-quantize-window", ["bench", "quantize", "{run}", "--window", "0"], "--window"),
    ("bench-context-lengths", ["bench", "context", "--lengths", "1k,2k"], "--lengths"),
    ("bench-context-lengths-short", ["bench", "context", "--lengths", "8"], "--lengths"),
    ("bench-context-preset", ["bench", "context", "--preset", "huge-9000"], "--preset"),
    ("bench-context-chunk-zero", ["bench", "context", "--prefill-chunk", "0"], "--prefill-chunk"),
    ("bench-context-time-budget", ["bench", "context", "--time-budget", "0"], "--time-budget"),
    ("bench-context-device", ["bench", "context", "--device", "tpu"], "--device"),
    ("bench-train-flex-options", ["bench", "train", "--device", "cpu", "--flex-options", "{{", "--flex-options", "{{"],
     "--flex-options"),
    # serve
    ("serve-checkpoint-missing", ["serve", "{missing}"], "checkpoint"),
    ("serve-port-type", ["serve", "{run}", "--port", "http"], "--port"),
    ("serve-max-concurrency-zero", ["serve", "{run}", "--max-concurrency", "0"], "--max-concurrency"),
    ("serve-max-queue-negative", ["serve", "{run}", "--max-queue", "-1"], "--max-queue"),
    ("serve-format-unknown", ["serve", "{run}", "--format", "chatml"], "--format"),
    ("serve-tools-unknown", ["serve", "{run}", "--tools", "python,shell"], "--tools"),
    ("serve-device-name", ["serve", "{run}", "--device", "tpu"], "--device"),
    ("serve-prefill-chunk-zero", ["serve", "{run}", "--prefill-chunk", "0"], "--prefill-chunk"),
    # plan
    ("plan-model-unknown", ["plan", "huge-9000"], "huge-9000"),
    ("plan-model-not-a-model", ["plan", "{emptydir}"], "is not a model folder"),
    ("plan-rows-zero", ["plan", "tiny", "--rows", "0"], "--rows"),
    ("plan-max-len-type", ["plan", "tiny", "--max-len", "long"], "--max-len"),
    ("plan-chunk-longer", ["plan", "tiny", "--max-len", "64", "--chunk", "128"], "--chunk"),
    ("plan-memory-size", ["plan", "tiny", "--memory", "lots"], "--memory"),
    ("plan-dtype", ["plan", "tiny", "--dtype", "fp8"], "--dtype"),
    ("plan-kv-dtype", ["plan", "tiny", "--kv-dtype", "int4"], "--kv-dtype"),
    # demo (its own checks of the run are the demo's; a wrong type is refused before any work)
    ("demo-max-steps-type", ["demo", "--max-steps", "many"], "--max-steps"),
    ("demo-tool-steps-type", ["demo", "--tool-steps", "many"], "--tool-steps"),
    # the command itself
    ("unknown-verb", ["trian"], "trian"),
]
CUDA_CASES = [   # on a machine without CUDA
    ("train-cuda", ["train", "--corpus", "{corpus}", "--device", "cuda"], "--device"),
    ("infill-cuda", ["infill", "{run}", "a [MASK] b", "--device", "cuda"], "--device"),
    ("generate-cuda", ["generate", "{run}", "x", "--device", "cuda"], "--device"),
    ("chat-cuda", ["chat", "{run}", "--prompt", "x", "--device", "cuda"], "--device"),
    ("eval-cuda", ["eval", "{run}", "--corpus", "{corpus}", "--device", "cuda"], "--device"),
    ("eval-passkey-cuda", ["eval", "passkey", "{run}", "--device", "cuda"], "--device"),
    ("eval-tools-cuda", ["eval", "tools", "{run}", "--device", "cuda"], "--device"),
    ("experiment-cuda", ["experiment", "compare", "--device", "cuda"], "--device"),
    ("bench-generate-cuda", ["bench", "generate", "--device", "cuda"], "--device"),
    ("bench-train-cuda", ["bench", "train", "--device", "cuda"], "--device"),
    ("serve-cuda", ["serve", "{run}", "--device", "cuda"], "--device"),
]


@pytest.fixture(scope="module")
def paths(tiny_run, toy_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_errors")
    run = shutil.copytree(tiny_run.directory, tmp / "run")      # the commands below write into it
    (tmp / "notes.txt").write_text("The cat sat on the mat. 北京是中国的首都。\n" * 20, encoding="utf-8")
    (tmp / "gb.txt").write_bytes("北京是中国的首都".encode("gb18030"))
    (tmp / "empty.txt").write_text("")
    (tmp / "emptydir").mkdir()
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("do not overwrite me")
    return {"run": run, "corpus": toy_corpus.directory, "file": tmp / "notes.txt", "bad": tmp / "gb.txt",
            "missing": tmp / "missing", "empty": tmp / "empty.txt", "emptydir": tmp / "emptydir",
            "full": tmp / "full", "tmp": tmp}


def _argv(argv: list[str], paths: dict) -> list[str]:
    return [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]


@pytest.fixture
def in_tmp(paths, monkeypatch):
    """Run in the scratch folder: a case that got past its check must not touch the checkout (data/, runs/)."""
    monkeypatch.chdir(paths["tmp"])


def _check_error(rc: int, out: str, err: str, expected: str) -> None:
    assert "Traceback" not in out + err
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines, "no message"
    last = lines[-1]
    assert last.startswith("glmkit") and "error:" in last, err
    assert expected in last, f"{expected!r} not in {last!r}"


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_2(argv, expected, paths, in_tmp, capsys):
    rc = main(_argv(argv, paths))
    out, err = capsys.readouterr()
    _check_error(rc, out, err, expected.format(**{k: str(v) for k, v in paths.items()}))


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("argv, expected", [c[1:] for c in CUDA_CASES], ids=[c[0] for c in CUDA_CASES])
def test_cuda_without_cuda_is_refused(argv, expected, paths, in_tmp, capsys):
    rc = main(_argv(argv, paths))
    out, err = capsys.readouterr()
    _check_error(rc, out, err, expected)
    assert "CUDA is not available" in err


def test_nothing_lost(paths, in_tmp, capsys):
    """The refused commands above left what they were pointed at as it was."""
    assert (paths["full"] / "keep.txt").read_text() == "do not overwrite me"
    assert sorted(p.name for p in paths["full"].iterdir()) == ["keep.txt"]
    assert not any(paths["tmp"].glob("c[1-5]")) and not any(paths["tmp"].glob(".c*"))
    assert not (paths["tmp"] / "data").exists() and not (paths["tmp"] / "runs").exists()


def test_absurd_lr_stops_without_pointing_at_missing_checkpoints(paths, in_tmp, capsys):
    out_dir = paths["tmp"] / "lr_run"
    rc = main(["train", "--corpus", str(paths["corpus"]), "--out-dir", str(out_dir), "--model", "tiny", "--lr", "1e9",
               "--warmup-steps", "0", "--max-steps", "5", "--seq-len", "64", "--batch-size", "2", "--save-every", "100",
               "--eval-every", "0", "--no-progress", "--no-tensorboard", "--device", "cpu"])
    out, err = capsys.readouterr()
    _check_error(rc, out, err, "--lr")
    assert not (out_dir / "checkpoints").exists() and "checkpoints" not in err.splitlines()[-1]
    assert "no checkpoint" in err


def test_legal_but_suspicious_input_warns(paths, in_tmp, capsys):
    tiny = paths["tmp"] / "tiny.txt"
    tiny.write_text("One short document, the only one. 只有一篇。", encoding="utf-8")
    assert main(["corpus", "build", str(tiny), "--out", str(paths["tmp"] / "small"), "--vocab-size", "600"]) == 0
    err = capsys.readouterr().err
    assert "warning: 0 of 1 documents went to the validation split" in err
    assert "--val-fraction" in err
    assert main(["tokenizer", "train", str(paths["file"]), "--out", str(paths["tmp"] / "tk"), "--vocab-size", "600"]) == 0
    err = capsys.readouterr().err
    from glmkit.data.tokenizer import GLMTokenizer
    n = GLMTokenizer.load(paths["tmp"] / "tk").vocab_size
    assert n < 600 and f"the tokenizer has {n} tokens, fewer than --vocab-size 600" in err


def test_inputs_refused_before_are_accepted_now(paths, in_tmp, capsys):
    """What the issue found refused or misplaced: a run folder as --tokenizer, the plot's default place,
    an evaluation with only some tasks, --version."""
    assert main(["tokenizer", "info", "--tokenizer", str(paths["run"])]) == 0
    assert "hash" in capsys.readouterr().out
    assert main(["plot", str(paths["run"])]) == 0
    assert (paths["run"] / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not (paths["tmp"] / "loss.png").exists()
    out = paths["tmp"] / "eval.json"
    assert main(["eval", str(paths["run"]), "--corpus", str(paths["corpus"]), "--val-tokens", "100", "--infill-n", "0",
                 "--cloze-n", "0", "--sentiment-test", "0", "--out", str(out)]) == 0
    import json
    res = json.loads(out.read_text())
    assert res["val"]["tokens"] >= 100 and not {"infill", "cloze", "sentiment"} & set(res)
    capsys.readouterr()
    assert main(["--version"]) == 0
    import glmkit
    assert capsys.readouterr().out.strip() == f"glmkit {glmkit.__version__}"


@pytest.mark.slow
@pytest.mark.parametrize("argv, expected", [
    (["train", "--corpus", "{corpus}", "--save-every", "-1"], "--save-every"),
    (["tokenizer", "decode", "-1", "--tokenizer", "{corpus}"], "ID"),
    (["infill", "{run}", "--file", "{bad}"], "--file"),
    (["generate", "{run}", "In the beginning [MASK] was"], "glmkit infill"),
    (["tokenizer", "encode", "-", "--tokenizer", "{corpus}"], "UTF-8"),
], ids=["argparse-check", "tokenizer-range", "file-not-utf8", "generate-mask", "stdin-not-utf8"])
def test_end_to_end_in_a_subprocess(argv, expected, paths):
    proc = subprocess.run([sys.executable, "-m", "glmkit", *_argv(argv, paths)], capture_output=True,
                          input="北京".encode("gb18030"), cwd=paths["tmp"], timeout=120)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    _check_error(proc.returncode, proc.stdout, proc.stderr, expected)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_every_verb_and_bench_is_in_the_table():
    """A new verb (or bench) joins CASES with at least one bad input of each option type it has."""
    from glmkit.cli import COMMANDS
    from glmkit.cli.bench import BENCHES
    covered = {argv[0] for _, argv, _ in CASES} | {" ".join(argv[:2]) for _, argv, _ in CASES}
    assert set(COMMANDS) <= covered, f"add rows to CASES for {sorted(set(COMMANDS) - covered)}"
    benches = {argv[1] for _, argv, _ in CASES if argv[0] == "bench"}
    assert set(BENCHES) <= benches, f"add rows to CASES for bench {sorted(set(BENCHES) - benches)}"
