"""`glmkit eval tools`: how well a model uses its tools, on the held-out tasks of the tool-use suite.

    glmkit eval tools runs/sft --suite data/tooltasks --out runs/sft/tools.json
    glmkit eval tools runs/sft --seed 0 --count 10 --families arithmetic,lookup --transcripts episodes.jsonl

Each held-out task is run through the real agent loop with the real tools (python, the browser over the
suite's documents, the suite's functions), then again with no tools offered (unless
--no-without-tools). Progress goes to standard error, one line per episode; standard output gets a table
(overall, per family, per language) and, as its last line, the summary as one JSON object
(`parse_rate`, `answer_em_with_tools`, `answer_em_without_tools`, ...). Metrics: docs/tools.md.

Tasks: `--suite DIR` reads a folder written by `glmkit tooltasks` (heldout_tasks.jsonl, facts.sqlite);
otherwise the suite is drawn here from --seed with --count held-out tasks per family and language (the
same tasks and documents as `glmkit tooltasks --seed S --heldout N` with its default --train 40).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from glmkit.cli.options import (
    check_device,
    check_output_file,
    existing_dir,
    nonnegative_int,
    positive_int,
    warn,
)
from glmkit.errors import GlmkitError
from glmkit.eval.tooltasks import FAMILIES, LANGS

PYTHON_MODES = ("auto", "sandbox", "exact", "unsafe")
SUITE_TRAIN = 40           # `glmkit tooltasks`' default --train: the drawn suite's store holds its places too


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=existing_dir,
                        help="a glmkit run / checkpoint folder (e.g. a `glmkit sft` run), or an HF GLM folder")
    parser.add_argument("--suite", type=existing_dir,
                        help="a folder written by `glmkit tooltasks` (default: draw the suite from --seed)")
    parser.add_argument("--seed", type=nonnegative_int, default=None, help="draws the suite (default: 0)")
    parser.add_argument("--count", type=positive_int, default=None,
                        help="held-out tasks per family and language when drawing the suite (default: 10)")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated task families (default: {','.join(FAMILIES)})")
    parser.add_argument("--langs", default=",".join(LANGS), help=f"comma-separated languages (default: {','.join(LANGS)})")
    parser.add_argument("--format", default="auto", choices=("auto", "glm4", "glm45"),
                        help="chat format; auto: the one the checkpoint was fine-tuned with (`glmkit sft "
                             "--chat-format`), else as `glmkit chat` chooses")
    parser.add_argument("--toolset", default="task", choices=("task", "all"),
                        help="task: offer the tools of the task's family, as the suite's SFT conversations do; "
                             "all: offer every tool to every task")
    parser.add_argument("--python", default="auto", choices=PYTHON_MODES,
                        help="the python tool: sandbox (the sandboxed interpreter), exact (the suite's own code "
                             "computed in-process, other code refused), unsafe (an interpreter without isolation), "
                             "auto: sandbox where one can be built, else exact")
    parser.add_argument("--max-rounds", type=positive_int, default=4, help="model replies per task (default: 4)")
    parser.add_argument("--max-calls", type=positive_int, default=8, help="tool calls per task (default: 8)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="per model reply (default: 256)")
    parser.add_argument("--concurrency", type=positive_int, default=8,
                        help="episodes decoded together on one engine (default: 8)")
    parser.add_argument("--no-without-tools", action="store_true",
                        help="skip the run with tools disabled (answer_em_without_tools is then null)")
    parser.add_argument("--out", help="write the summary and the per-episode records (no transcripts) as JSON here")
    parser.add_argument("--transcripts", help="write every episode with its transcript events here, JSON Lines")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")


def _names(text: str, known: tuple[str, ...], option: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in known]
    if bad or not names:
        raise GlmkitError(f"{option} {text!r}: {'unknown ' + repr(bad[0]) if bad else 'nothing given'}; "
                          f"choose from {', '.join(known)}")
    return names


def check(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Option checks that need no model; returns (families, languages)."""
    check_device(args.device)
    if args.suite is not None:
        if args.seed is not None or args.count is not None:
            raise GlmkitError("--seed and --count draw a suite, --suite reads one: give --suite or --seed/--count")
        for name in ("heldout_tasks.jsonl", "facts.sqlite"):
            if not (Path(args.suite) / name).is_file():
                raise GlmkitError(f"--suite {args.suite} has no {name}; write the suite with "
                                  f"`glmkit tooltasks --out {args.suite}`")
    for option, path in (("--out", args.out), ("--transcripts", args.transcripts)):
        if path:
            check_output_file(path, option)
    if args.python == "sandbox":
        from glmkit.chat.sandbox import sandbox_problem
        problem = sandbox_problem()
        if problem is not None:
            raise GlmkitError(f"--python sandbox: cannot sandbox the interpreter: {problem}. Fix that, or use "
                              "--python exact (the suite's own code only) or --python unsafe")
    return _names(args.families, FAMILIES, "--families"), _names(args.langs, LANGS, "--langs")


def load_tasks(args, families, langs, scratch: Path):
    """(the held-out tasks asked for, the document store)."""
    from glmkit.chat.docstore import DocStore, build_store
    from glmkit.eval.tooleval import read_tasks
    from glmkit.eval.tooltasks import ToolSuite

    if args.suite is not None:
        tasks = read_tasks(Path(args.suite) / "heldout_tasks.jsonl")
        store = DocStore(Path(args.suite) / "facts.sqlite")
    else:
        suite = ToolSuite(seed=args.seed or 0, per_split={"train": SUITE_TRAIN, "heldout": args.count or 10})
        tasks = suite.tasks("heldout")
        store = build_store(suite.documents(), scratch / "facts.sqlite")
    tasks = [t for t in tasks if t.family in families and t.lang in langs]
    if not tasks:
        raise GlmkitError(f"no held-out task of families {','.join(families)} in languages {','.join(langs)} "
                          "in the suite; widen --families / --langs")
    return tasks, store


def python_tool(mode: str, scratch: Path):
    """(what `evaluate_tools` takes as `python`: an interpreter factory or ExactPython, the mode used)."""
    from glmkit.eval.tooltasks import ExactPython

    if mode == "auto":
        from glmkit.chat.sandbox import sandbox_problem
        problem = sandbox_problem()
        if problem is not None:
            _log(f"[python: no sandbox here ({problem}); the suite's own code is computed exactly, other code "
                 "is refused]")
        mode = "exact" if problem is not None else "sandbox"
    if mode == "exact":
        return ExactPython(), mode
    from glmkit.chat.sandbox import Limits, Sandbox

    def make():
        return Sandbox(Path(tempfile.mkdtemp(prefix="ws-", dir=scratch)), Limits(timeout_s=10),
                       allow_unsandboxed=mode == "unsafe")
    return make, mode


def chat_format(requested: str, loaded):
    """--format auto: what `glmkit sft` recorded in the checkpoint's manifest, else the chat's choice."""
    from glmkit.chat.agent import choose_format, read_chat_template

    if requested == "auto":
        manifest = loaded.path / "manifest.json"
        if manifest.is_file():
            try:
                trained = json.loads(manifest.read_text())["fingerprint"]["objective"].get("chat")
            except (ValueError, KeyError, TypeError, AttributeError):
                trained = None
            if trained in ("glm4", "glm45"):
                return choose_format(trained, loaded.tokenizer)
    return choose_format(requested, loaded.tokenizer, template=read_chat_template(loaded.path))


def run(args: argparse.Namespace, logits_processor=None) -> int:
    """`logits_processor(task, tools)`: one per episode (a `ScriptedModel` in tests)."""
    from glmkit.checkpoint.loader import load
    from glmkit.eval.tooleval import evaluate_tools
    from glmkit.infer.engine import Engine

    families, langs = check(args)
    with tempfile.TemporaryDirectory(prefix="glmkit-eval-tools-") as tmp:
        scratch = Path(tmp)
        tasks, store = load_tasks(args, families, langs, scratch)
        python, python_mode = python_tool(args.python, scratch)
        loaded = load(args.checkpoint, args.device)
        fmt = chat_format(args.format, loaded)
        limit = loaded.model.config.max_position_embeddings
        engine = Engine(loaded.model, loaded.tokenizer, max_batch=args.concurrency, max_len=min(limit, 4096))
        _log(f"[{loaded.path}: format {fmt.name}; {len(tasks)} held-out tasks; python: "
             f"{python_mode}]")
        common = dict(fmt=fmt, store=store, python=python, toolset=args.toolset, max_rounds=args.max_rounds,
                      max_calls=args.max_calls, max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
                      causal=loaded.objective == "clm", logits_processor=logits_processor, log=_log)
        report = evaluate_tools(engine, loaded.tokenizer, tasks, tools=True, **common)
        if not args.no_without_tools:
            report += evaluate_tools(engine, loaded.tokenizer, tasks, tools=False, **common)
        store.close()
    summary = report.summary()
    summary["format"] = fmt.name
    failed = [e for e in report.episodes if e.error is not None]
    if failed:
        warn("eval tools", f"{len(failed)} of {len(report.episodes)} episodes failed (scored as wrong), e.g. "
                           f"{failed[0].task.id}: {failed[0].error}")
    if args.out:
        record = {"checkpoint": str(loaded.path), "summary": summary,
                  "episodes": [e.to_dict(events=False) for e in report.episodes]}
        Path(args.out).write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    if args.transcripts:
        report.write_transcripts(args.transcripts)
    print(report.format_table())
    print(f"{summary['episodes']} episodes in {summary['seconds']:.1f} s "
          f"({summary['seconds'] / max(summary['episodes'], 1):.2f} s per episode)")
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
