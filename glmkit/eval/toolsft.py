"""SFT conversations from the tool-use task suite: each task played out with the real tools.

    store = build_store(suite.documents(), "runs/tools/facts.sqlite")
    rows = conversations(suite.tasks("train"), dialect="glm45", store=store, python=ExactPython())
    write_jsonl(rows, "runs/tools/train.jsonl")

One row per task, `{"id", "family", "lang", "messages", "tools"}` in the OpenAI shape that
`glmkit.chat.messages` validates (and `glmkit sft` reads): the user's question, the assistant's
expected calls, one tool message per call and the final answer. Every observation is what the agent
loop would show the model: the calls run through a `glmkit.chat.agent.Toolbox` in the chosen dialect
(`glm4`: the built-in `python` and `simple_browser` tools; `glm45`: function tools `python`,
`browser_search`, `browser_open`, `browser_find`), on a fresh browser over the suite's document
store per conversation, capped as the agent caps them. `python` runs on what is given: a
`glmkit.chat.sandbox.Sandbox` for the real interpreter, or `ExactPython`, which computes the same
observation for the suite's code without one. A lookup answer cites the id under which the browser
showed the task's document; a conversation whose observation is an error, or whose answer fails the
task's own checks, raises (the suite would be teaching a wrong episode).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from glmkit.chat.agent import Toolbox, cap_observation
from glmkit.chat.browser import Browser
from glmkit.chat.docstore import DocStore
from glmkit.chat.functions import function_tool
from glmkit.chat.messages import ToolSpec, messages_from_dicts, tools_from_dicts
from glmkit.errors import GlmkitError
from glmkit.eval.tooltasks import WORLD_FUNCTIONS, Call, ToolTask, check_answer, check_calls, cited_sources

DIALECTS = ("glm4", "glm45")


def dialect_call(call: Call, dialect: str, browser_ids: dict[str, int]) -> tuple[str, dict]:
    """A dialect-neutral call as (tool name, arguments) in `dialect`; `open` needs the id under which
    the browser showed the document (`browser_ids`: source -> id)."""
    if call.tool == "search":
        q = call.args["query"]
        return ("simple_browser", {"command": f"search({json.dumps(q, ensure_ascii=False)})"}) if dialect == "glm4" \
            else ("browser_search", {"query": q})
    if call.tool == "open":
        source = call.args["source"]
        if source not in browser_ids:
            raise GlmkitError(f"the search did not show {source}; the suite's store does not match its tasks")
        i = browser_ids[source]
        return ("simple_browser", {"command": f"open({i})"}) if dialect == "glm4" else ("browser_open", {"id": i})
    return call.tool, dict(call.args)


_RESULT = re.compile(r"【(\d+)†[^†】]*†([^†】]*)】")


def conversation(task: ToolTask, dialect: str, *, store: DocStore | None = None, python=None,
                 max_observation_chars: int = 4000) -> dict:
    """The task played out with its expected calls on the real tools; see the module docstring."""
    if dialect not in DIALECTS:
        raise GlmkitError(f"unknown dialect {dialect!r}; use one of {', '.join(DIALECTS)}")
    toolbox = _toolbox(task, store, python)
    toolbox.use_dialect(dialect)
    messages: list[dict] = [{"role": "user", "content": task.question}]
    shown: dict[str, int] = {}
    observations: list[str] = []
    calls: list[tuple[str, dict]] = []
    for k, call in enumerate(task.calls):
        name, args = dialect_call(call, dialect, shown)
        (result, _), = toolbox.run([(name, json.dumps(args, ensure_ascii=False))], clock=lambda: 0.0)
        if not result.ok:
            raise GlmkitError(f"task {task.id}: {name} failed while writing its conversation: {result.content}")
        text, _ = cap_observation(result.content, max_observation_chars)
        shown.update({source: int(i) for i, source in _RESULT.findall(text)})
        observations.append(text)
        calls.append((name, args))
        call_id = f"call_{k}"
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
    answer = task.reply.replace("{}", str(shown.get(task.source, ""))) if task.source else task.reply
    messages.append({"role": "assistant", "content": answer})
    _check(task, answer, calls, observations, toolbox)
    tools = [t.to_dict() if isinstance(t, ToolSpec) else t for t in toolbox.specs()]
    return {"id": task.id, "family": task.family, "lang": task.lang, "messages": messages, "tools": tools}


def _toolbox(task: ToolTask, store: DocStore | None, python) -> Toolbox:
    if task.family in ("arithmetic", "counting"):
        if python is None:
            raise GlmkitError(f"task {task.id} needs the python tool: pass python=Sandbox(...) or ExactPython()")
        return Toolbox(sandbox=python)
    if task.family == "lookup":
        if store is None:
            raise GlmkitError(f"task {task.id} needs the suite's document store: "
                              "build_store(suite.documents(), path)")
        return Toolbox(browser=Browser(store))
    return Toolbox([function_tool(f) for f in WORLD_FUNCTIONS])


def _check(task: ToolTask, answer: str, calls, observations: list[str], toolbox: Toolbox) -> None:
    problems = []
    if not check_answer(task, answer):
        problems.append(f"the answer {answer!r} does not state {task.answer!r}")
    if check_calls(task, calls, observations) != (True, True):
        problems.append(f"the calls {calls} are not the expected ones")
    if task.source:
        if cited_sources(answer, observations) != [task.source]:
            problems.append(f"the answer does not cite {task.source}")
        bad = [c.reason for c in toolbox.browser.check_citations(answer) if not c.valid]
        problems += bad
    if problems:
        raise GlmkitError(f"task {task.id}: " + "; ".join(problems))


def conversations(tasks: Iterable[ToolTask], dialect: str, *, store: DocStore | None = None, python=None,
                  max_observation_chars: int = 4000) -> list[dict]:
    return [conversation(t, dialect, store=store, python=python, max_observation_chars=max_observation_chars)
            for t in tasks]


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """One conversation per line (UTF-8, non-ASCII kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """Conversations back, each validated by the message model (a bad line raises naming its number)."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages_from_dicts(row["messages"], where=f"{path}:{n}: messages")
            tools_from_dicts(row.get("tools") or [], where=f"{path}:{n}: tools")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise GlmkitError(f"{path}:{n}: not a conversation ({e}); each line is "
                              '{"messages": [...], "tools": [...]}') from None
        rows.append(row)
    return rows


def task_record(task: ToolTask) -> dict:
    """A task as JSON: what an evaluation needs to pose it and check the episode."""
    return {"id": task.id, "family": task.family, "lang": task.lang, "split": task.split, "key": task.key,
            "question": task.question, "answer": task.answer, "source": task.source, "quote": task.quote,
            "calls": [{"tool": c.tool, "args": c.args} for c in task.calls]}


def write_suite(suite, out_dir: str | Path, dialect: str, python=None) -> dict[str, Path]:
    """The suite on disk: `facts.sqlite` (the document store of both splits), `train.jsonl` (SFT
    conversations in `dialect`) and `train_tasks.jsonl` / `heldout_tasks.jsonl` (`task_record`s)."""
    from glmkit.chat.docstore import build_store
    from glmkit.eval.tooltasks import ExactPython

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = build_store(suite.documents(), out / "facts.sqlite")
    rows = conversations(suite.tasks("train"), dialect, store=store, python=python or ExactPython())
    paths = {"store": out / "facts.sqlite", "train": write_jsonl(rows, out / "train.jsonl")}
    for split in ("train", "heldout"):
        paths[f"{split}_tasks"] = write_jsonl(map(task_record, suite.tasks(split)), out / f"{split}_tasks.jsonl")
    return paths
