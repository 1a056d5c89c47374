"""Tool-use evaluation: held-out suite tasks run through the real agent loop, scored per episode.

    report = evaluate_tools(engine, tok, suite.tasks("heldout"), fmt="glm45", store=store)
    report += evaluate_tools(engine, tok, suite.tasks("heldout"), fmt="glm45", tools=False)
    report.summary()["answer_em_with_tools"]; print(report.format_table())
    print(format_comparison({"untuned": before, "SFT": report}))      # a row per model, same tasks

Each task is one episode: an `glmkit.chat.agent.Agent` on the engine is sent the task's question and
runs its rounds (generate, parse, run the calls on the real tools, generate again) until it answers or
a limit ends it. The tools are real (`toolset="task"`, the default, offers what the suite's SFT
conversations declare for the task's family; "all" offers every tool to every task):
- `python`: `python` is a shared interpreter (`run(code)`; `ExactPython()` when None, which computes the
  suite's own code exactly and answers anything else with an error), or a zero-argument factory that
  each worker calls when its first episode needs python (e.g. `lambda: Sandbox(workspace)`); a worker
  keeps its interpreter across its episodes (a fresh kernel costs ~1 s; the suite's code is
  self-contained) and closes it at the end;
- the browser: a fresh `Browser` per episode over `store` (the suite's documents, `build_store`);
- the suite's user functions (`WORLD_FUNCTIONS`).
`tools=False` poses the same questions with no tools declared (the answer comes from the model's head).

Episodes of different tasks run at once (`concurrency` threads, one `EngineView` each on one
`SharedEngine`): every engine step decodes all of them together, so the cost of a task is close to its
share of a batched step. Greedy decoding by default (`sampling` to sample, e.g. for RL groups).

What an episode records (`Episode`, computed from its transcript events, so a saved transcript can be
rescored): `attempts` (tool calls the model emitted: every call the parser produced plus every call it
rejected, e.g. an undeclared name or a call cut off before its name ended), `parse_failures` (attempts
that did not parse cleanly: rejected ones, calls whose arguments are not a JSON object, calls the parser
reported a fault in), the parsed `calls` (name, arguments), `names_ok` / `args_ok` (`check_calls`: the
expected tool names in order; and their arguments too, a python call's judged by what it returned in
the episode), `answer` and `answer_ok` (the episode ended with
an answer, `check_answer` accepts it, and for a lookup task with tools its citations name only the task's
document and quote what the browser showed), `end` (answer | length | max_rounds | max_calls | error),
`rounds`, `tokens` (generated), `seconds`, and the conversation (`messages`, OpenAI dicts: what an RL
update re-renders). The same task may appear several times in `tasks` (a group of sampled attempts);
with `sampling.seed` set every attempt is drawn alike, so leave it None for independent attempts.
The metrics over a set of episodes (`metrics`, what `ToolEvalReport.summary` gives overall, per family
and per language) are defined in docs/tools.md. An episode that raised (`GlmkitError`: e.g. the
conversation outgrew the engine's rows) ends with `error` set and counts as wrong (`errors` in the
metrics says how many).
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from glmkit.chat.agent import Agent, ChatFormat, Toolbox, Transcript, choose_format
from glmkit.chat.browser import Browser
from glmkit.chat.functions import function_tool
from glmkit.chat.messages import text_of
from glmkit.errors import GlmkitError
from glmkit.eval.tooltasks import (
    FAMILIES,
    LANGS,
    WORLD_FUNCTIONS,
    Call,
    ExactPython,
    ToolTask,
    check_answer,
    check_calls,
    cited_sources,
)
from glmkit.infer.shared import SharedEngine

TOOLSETS = ("task", "all")
# a parse error about call k of a reply (the call exists, malformed); any other parse error is one rejected call
_CALL_FAULT = re.compile(r"tool call (\d+)\b")


# ----------------------------------------------------------------------------- episodes
@dataclass
class Episode:
    """One task run once, with or without tools; see the module docstring."""
    task: ToolTask
    tools: bool
    end: str
    rounds: int
    attempts: int
    parse_failures: int
    calls: list[tuple[str, dict]]
    names_ok: bool
    args_ok: bool
    answer: str
    answer_ok: bool
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None
    events: list[dict] = field(default_factory=list, repr=False)
    messages: list[dict] = field(default_factory=list, repr=False)   # the conversation, OpenAI dicts

    @property
    def over_called(self) -> bool:
        return self.attempts > len(self.task.calls)

    @property
    def under_called(self) -> bool:
        return self.attempts < len(self.task.calls)

    def to_dict(self, events: bool = True) -> dict:
        d = {"task": self.task.id, "family": self.task.family, "lang": self.task.lang, "tools": self.tools,
             "end": self.end, "rounds": self.rounds, "attempts": self.attempts,
             "parse_failures": self.parse_failures, "calls": [{"name": n, "arguments": a} for n, a in self.calls],
             "names_ok": self.names_ok, "args_ok": self.args_ok, "over_called": self.over_called,
             "under_called": self.under_called, "answer": self.answer, "answer_ok": self.answer_ok,
             "expected_answer": self.task.answer, "tokens": self.tokens, "seconds": round(self.seconds, 3),
             "error": self.error}
        if events:
            d["events"], d["messages"] = self.events, self.messages
        return d


def score_episode(task: ToolTask, events: list[dict], *, tools: bool, browser: Browser | None = None,
                  error: str | None = None) -> Episode:
    """An episode's record from its transcript `events` (`glmkit.chat.agent` transcript format). `browser`:
    the episode's browser, to check that a lookup answer's quotes were shown (None: not checked)."""
    attempts = failures = tokens = 0
    calls: list[tuple[str, dict]] = []
    call_ids: list[str | None] = []
    results: dict[str, str] = {}
    answer, end, rounds = "", "error", 0
    for e in events:
        if e["event"] == "assistant":
            a, f, parsed = _calls_of(e["message"], e.get("parse_errors") or [])
            attempts, failures, tokens = attempts + a, failures + f, tokens + e.get("tokens", 0)
            calls += parsed
            call_ids += [c.get("id") for c in e["message"].get("tool_calls") or []]
            answer, rounds = _text(e["message"].get("content")), e["round"]
        elif e["event"] == "tool" and e.get("id") is not None:
            results[e["id"]] = e.get("result") or ""
        elif e["event"] == "end":
            end, rounds = e["reason"], e["rounds"]
    names_ok, args_ok = check_calls(task, calls, [results.get(i) for i in call_ids])
    answer_ok = end == "answer" and check_answer(task, answer)
    if answer_ok and tools and task.source:
        observations = [e["result"] for e in events if e["event"] == "tool" and e.get("result")]
        sources = cited_sources(answer, observations)
        answer_ok = bool(sources) and set(sources) == {task.source}
        if answer_ok and browser is not None:
            answer_ok = all(c.valid for c in browser.check_citations(answer))
    return Episode(task, tools, end if error is None else "error", rounds, attempts, failures, calls, names_ok,
                   args_ok, answer, answer_ok, tokens=tokens, error=error, events=list(events))


def _calls_of(message: dict, parse_errors: list[str]) -> tuple[int, int, list[tuple[str, dict]]]:
    """(attempted calls, failed ones, the parsed calls as (name, arguments)) of one reply."""
    faulty = {int(m.group(1)) for m in map(_CALL_FAULT.match, parse_errors) if m}
    rejected = sum(1 for x in parse_errors if not _CALL_FAULT.match(x))
    parsed, failed = [], rejected
    for i, call in enumerate(message.get("tool_calls") or []):
        try:
            args = json.loads(call["function"]["arguments"])
        except ValueError:
            args = None
        if not isinstance(args, dict) or i in faulty:
            failed += 1
        parsed.append((call["function"]["name"], args if isinstance(args, dict) else {}))
    return len(parsed) + rejected, failed, parsed


def _text(content) -> str:
    if isinstance(content, list):        # content parts as dicts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return text_of(content)


# ----------------------------------------------------------------------------- metrics and report
def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def metrics(episodes: Iterable[Episode]) -> dict:
    """The metrics of a set of episodes (None where no episode measures it); see docs/tools.md."""
    episodes = list(episodes)
    on = [e for e in episodes if e.tools]
    off = [e for e in episodes if not e.tools]
    attempts = sum(e.attempts for e in on)
    return {
        "tasks": len({e.task.id for e in episodes}),
        "parse_rate": (attempts - sum(e.parse_failures for e in on)) / attempts if attempts else None,
        "tool_name_accuracy": _mean([e.names_ok for e in on]),
        "argument_exact_match": _mean([e.args_ok for e in on]),
        "over_calling": _mean([e.over_called for e in on]),
        "under_calling": _mean([e.under_called for e in on]),
        "answer_em_with_tools": _mean([e.answer_ok for e in on]),
        "answer_em_without_tools": _mean([e.answer_ok for e in off]),
        "calls_per_task": _mean([e.attempts for e in on]),
        "rounds_per_task": _mean([e.rounds for e in on]),
        "errors": sum(e.error is not None for e in episodes),
    }


@dataclass
class ToolEvalReport:
    """The episodes of one or more `evaluate_tools` runs (`a + b` joins them) and the wall time spent."""
    episodes: list[Episode] = field(default_factory=list)
    seconds: float = 0.0

    def __add__(self, other: ToolEvalReport) -> ToolEvalReport:
        return ToolEvalReport(self.episodes + other.episodes, self.seconds + other.seconds)

    def summary(self) -> dict:
        """The overall metrics at the top level, then `families` and `langs`: the same per family and per
        language (in suite order, those present), `episodes` and `seconds`."""
        out = metrics(self.episodes)
        out["families"] = {f: metrics(e for e in self.episodes if e.task.family == f)
                           for f in _present(FAMILIES, (e.task.family for e in self.episodes))}
        out["langs"] = {lang: metrics(e for e in self.episodes if e.task.lang == lang)
                        for lang in _present(LANGS, (e.task.lang for e in self.episodes))}
        out["episodes"] = len(self.episodes)
        out["seconds"] = round(self.seconds, 2)
        return out

    def format_table(self) -> str:
        """One row overall, then one per family and per language; rates in percent, "-" where unmeasured."""
        s = self.summary()
        cols = [("tasks", "tasks"), ("parse", "parse_rate"), ("name", "tool_name_accuracy"),
                ("args", "argument_exact_match"), ("over", "over_calling"), ("under", "under_calling"),
                ("EM tools", "answer_em_with_tools"), ("EM none", "answer_em_without_tools"),
                ("calls", "calls_per_task")]
        rows = [("all", s)] + list(s["families"].items()) + list(s["langs"].items())
        head = "| | " + " | ".join(c for c, _ in cols) + " |"
        lines = [head, "|---" * (len(cols) + 1) + "|"]
        for name, m in rows:
            lines.append(f"| {name} | " + " | ".join(_cell(k, m[k]) for _, k in cols) + " |")
        return "\n".join(lines)

    def write_transcripts(self, path: str | Path) -> Path:
        """One episode a line (`Episode.to_dict`, its transcript events included), JSON, UTF-8."""
        path = Path(path)
        with path.open("w", encoding="utf-8") as f:
            for e in self.episodes:
                f.write(json.dumps(e.to_dict(), ensure_ascii=False) + "\n")
        return path


def format_comparison(reports: dict[str, ToolEvalReport]) -> str:
    """Several models on the same tasks (e.g. untuned, SFT, SFT + RL): one row each, the overall rates,
    then per family the answer exact match with tools / without, in percent ("-" where unmeasured)."""
    summaries = {name: r.summary() for name, r in reports.items()}
    families = _present(FAMILIES, (f for s in summaries.values() for f in s["families"]))
    cols = [("parse", "parse_rate"), ("name", "tool_name_accuracy"), ("args", "argument_exact_match"),
            ("EM tools", "answer_em_with_tools"), ("EM none", "answer_em_without_tools")]
    lines = ["| model | " + " | ".join([c for c, _ in cols] + [f"{f} (tools / none)" for f in families]) + " |",
             "|---" * (1 + len(cols) + len(families)) + "|"]
    for name, s in summaries.items():
        cells = [_cell(k, s[k]) for _, k in cols]
        for f in families:
            m = s["families"].get(f)
            cells.append("-" if m is None else f"{_cell('', m['answer_em_with_tools'])} / "
                                               f"{_cell('', m['answer_em_without_tools'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _present(order: Sequence[str], values: Iterable[str]) -> list[str]:
    seen = set(values)
    return [x for x in order if x in seen] + sorted(seen - set(order))


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "tasks":
        return str(value)
    if key == "calls_per_task":
        return f"{value:.2f}"
    return f"{100 * value:.1f}%"


# ----------------------------------------------------------------------------- running
@functools.cache
def _world_tools() -> list:
    """The suite's functions as tools, built once (their schemas take milliseconds each to build)."""
    return [function_tool(f) for f in WORLD_FUNCTIONS]


def uses_python(task: ToolTask, toolset: str) -> bool:
    """Whether an episode of `task` is offered the python tool."""
    return toolset == "all" or task.family in ("arithmetic", "counting")


def toolbox_for(task: ToolTask, toolset: str, *, store=None, python=None) -> Toolbox:
    """The tools an episode of `task` is offered: its family's (as the suite's SFT conversations declare
    them) or, `toolset="all"`, every tool of the suite."""
    families = FAMILIES if toolset == "all" else (task.family,)
    needs_python = uses_python(task, toolset)
    if needs_python and python is None:
        raise GlmkitError(f"task {task.id} needs the python tool: pass python= an interpreter or a factory")
    if "lookup" in families and store is None:
        raise GlmkitError(f"task {task.id} needs the suite's document store: pass store=build_store("
                          "suite.documents(), path) or DocStore(suite_dir / 'facts.sqlite')")
    functions = _world_tools() if "functions" in families else []
    return Toolbox(functions, sandbox=python if needs_python else None,
                   browser=Browser(store) if "lookup" in families else None)


def evaluate_tools(engine, tokenizer, tasks: Iterable[ToolTask], *, fmt: str | ChatFormat = "glm45", store=None,
                   python=None, tools: bool = True, toolset: str = "task", max_rounds: int = 4, max_calls: int = 8,
                   max_new_tokens: int = 256, sampling=None, concurrency: int = 8, causal: bool = False,
                   enable_thinking: bool = True, max_observation_chars: int = 4000,
                   logits_processor: Callable[[ToolTask, bool], object] | None = None,
                   log: Callable[[str], None] | None = None,
                   clock: Callable[[], float] = time.monotonic) -> ToolEvalReport:
    """Run every task once through the agent loop on `engine` (an `Engine`, or a `SharedEngine` other
    threads use too) and score it; episodes in task order. See the module docstring for the tools;
    `sampling` (a `SamplingConfig`, greedy when None) gets `max_new_tokens` per reply; `causal`: the model
    reads the prompt as plain text (CLM-trained / converted HF models); `logits_processor(task, tools)`:
    one per episode (a `ScriptedModel` in tests); `log(line)`: a line per finished episode."""
    from dataclasses import replace

    from glmkit.infer.sampling import SamplingConfig

    tasks = list(tasks)
    if toolset not in TOOLSETS:
        raise GlmkitError(f"unknown toolset {toolset!r}; use one of {', '.join(TOOLSETS)}")
    if concurrency < 1 or max_new_tokens < 1:
        raise GlmkitError(f"concurrency ({concurrency}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    chat_format = fmt if isinstance(fmt, ChatFormat) else choose_format(fmt, tokenizer)
    sampling = replace(sampling or SamplingConfig(), max_new_tokens=max_new_tokens)
    shared = engine if isinstance(engine, SharedEngine) else SharedEngine(engine)
    factory = python if python is not None and not hasattr(python, "run") else None
    shared_python = ExactPython() if python is None else (None if factory else python)
    if tools:
        for task in tasks:   # refuse a missing store before any work
            toolbox_for(task, toolset, store=store, python=shared_python or ExactPython())

    def episode(task: ToolTask, python_tool: Callable[[], object]) -> Episode:
        if tools:
            toolbox = toolbox_for(task, toolset, store=store,
                                  python=python_tool() if uses_python(task, toolset) else None)
        else:
            toolbox = Toolbox()
        transcript = Transcript(None)
        agent = Agent(shared.view(), tokenizer, fmt=chat_format, tools=toolbox, causal=causal, sampling=sampling,
                      enable_thinking=enable_thinking, max_rounds=max_rounds, max_calls=max_calls,
                      max_observation_chars=max_observation_chars, transcript=transcript,
                      logits_processor=logits_processor(task, tools) if logits_processor else None, clock=clock)
        start, error = clock(), None
        try:
            for _ in agent.send(task.question):
                pass
        except GlmkitError as e:         # e.g. the conversation outgrew the engine's rows: this episode fails
            error = str(e)
        result = score_episode(task, transcript.events, tools=tools, browser=toolbox.browser, error=error)
        result.seconds = clock() - start
        result.messages = [m.to_dict() for m in agent.messages]
        return result

    results: list[Episode | None] = [None] * len(tasks)
    start = clock()
    _run_workers(tasks, results, episode, min(concurrency, max(len(tasks), 1)), factory, shared_python, log)
    return ToolEvalReport([r for r in results if r is not None], clock() - start)


def _run_workers(tasks, results, episode, workers: int, factory, shared_python, log) -> None:
    """`workers` threads take the next task until none is left; the first exception is re-raised."""
    lock = threading.Lock()
    queue = iter(range(len(tasks)))
    failures: list[BaseException] = []
    done = [0]

    def work() -> None:
        made: list = []              # this worker's interpreter, made when its first episode needs one

        def python_tool():
            if factory is None:
                return shared_python
            if not made:
                made.append(factory())
            return made[0]

        try:
            while not failures:
                with lock:
                    i = next(queue, None)
                if i is None:
                    return
                results[i] = r = episode(tasks[i], python_tool)
                with lock:
                    done[0] += 1
                    n = done[0]
                if log is not None:
                    log(f"[{n}/{len(tasks)}] {r.task.id} {'tools' if r.tools else 'no tools'}: {r.end}, "
                        f"{r.attempts} call{'s' * (r.attempts != 1)}, {'right' if r.answer_ok else 'wrong'} "
                        f"({r.seconds:.1f} s)")
        except BaseException as e:       # noqa: BLE001 -- handed to the caller's thread
            failures.append(e)
        finally:
            for box in made:
                if hasattr(box, "close"):
                    box.close()

    if workers == 1:
        work()
    else:
        threads = [threading.Thread(target=work, name=f"glmkit-tooleval-{k}", daemon=True) for k in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)          # a timed join lets Ctrl-C reach the caller
    if failures:
        raise failures[0]


# ----------------------------------------------------------------------------- tasks on disk
def read_tasks(path: str | Path) -> list[ToolTask]:
    """Tasks written by `glmkit.eval.toolsft.write_suite` (`heldout_tasks.jsonl`, one `task_record` a line)."""
    tasks = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            calls = tuple(Call(c["tool"], dict(c["args"])) for c in r["calls"])
            tasks.append(ToolTask(r["id"], r["family"], r["lang"], r["split"], r["key"], r["question"],
                                  str(r["answer"]), calls, "", r.get("source", ""), r.get("quote", "")))
        except (ValueError, KeyError, TypeError) as e:
            raise GlmkitError(f"{path}:{n}: not a task record ({e}); write the suite with `glmkit tooltasks`") from None
    return tasks
