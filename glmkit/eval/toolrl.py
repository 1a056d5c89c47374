"""RL episodes from the tool-use task suite: each attempt at a task is the real agent loop on the model being
trained, rewarded by its checked outcome (`glmkit rl`; the algorithm is `glmkit.train.rl`).

    source = ToolEpisodes.from_folder("data/tooltasks", "train", fmt="glm4", temperature=1.0)
    train(cfg, episodes=source)                                  # what `glmkit rl` runs
    score = score_tasks(model, tok, ToolEpisodes.from_folder("data/tooltasks", "heldout", fmt="glm4"))

An attempt: a fresh `glmkit.chat.agent.Agent` with the task's tools (`glmkit.eval.toolsft`: `python` for
arithmetic and counting, the browser over the suite's `facts.sqlite` for lookups, the three user functions)
asks the task's question and runs until the model answers, at most `max_rounds` replies of at most
`max_new_tokens` tokens, sampled at `temperature` with the attempt's seed. The `python` tool is
`ExactPython` (the suite's own arithmetic and `str.count`, computed in-process; other code gets an error
observation), so an episode needs no sandbox and is reproducible. All attempts at one task share one
engine built over the current weights (its prefix reuse serves the shared prompt), never an older one.

Reward (one number per attempt):
- 1 when the final answer is right: `check_answer` on the last reply, and for a lookup the reply cites the
  task's document through an id the browser showed (`cited_sources` == [the task's source]); else 0;
- plus `format_reward` when every reply parsed (no parse errors, not cut at `max_new_tokens`) and every
  call's arguments were a JSON object.
An attempt whose conversation outgrows the row (`max_len` tokens) ends there with what it has.
Measurements per attempt (the step's metrics average them): `correct`, `parsed`, `calls_right` (the tool
names are the task's, in order: `check_calls`), `calls`, `rounds`.

`score_tasks` plays every task of a source once, greedily (temperature 0), and reports the share right
overall and per family: the same check as the reward, for a before/after comparison on held-out tasks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from glmkit.chat.agent import Agent, ToolRun, TurnEnd
from glmkit.chat.docstore import DocStore
from glmkit.errors import GlmkitError
from glmkit.eval.toolsft import _toolbox
from glmkit.eval.tooltasks import Call, ExactPython, ToolTask, check_answer, check_calls, cited_sources
from glmkit.train.rl import Episode


def read_tasks(path: str | Path) -> list[ToolTask]:
    """The tasks of a `*_tasks.jsonl` written by `glmkit tooltasks` (`glmkit.eval.toolsft.task_record`)."""
    path = Path(path)
    if not path.is_file():
        raise GlmkitError(f"{path} does not exist; write the task suite with `glmkit tooltasks --out {path.parent}`")
    tasks = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            tasks.append(ToolTask(id=r["id"], family=r["family"], lang=r["lang"], split=r["split"], key=r["key"],
                                  question=r["question"], answer=r["answer"], reply="",
                                  calls=tuple(Call(c["tool"], c["args"]) for c in r["calls"]),
                                  source=r.get("source", ""), quote=r.get("quote", "")))
        except (ValueError, KeyError, TypeError) as e:
            raise GlmkitError(f"{path}:{n}: not a task record ({e}); rewrite the folder with glmkit tooltasks") from None
    if not tasks:
        raise GlmkitError(f"{path} holds no task")
    return tasks


@dataclass
class ToolEpisodes:
    """An `glmkit.train.rl.EpisodeSource` over tool-use tasks; see the module docstring."""
    tasks: list[ToolTask]
    store: DocStore | None
    fmt: str = "glm4"
    temperature: float = 1.0
    max_new_tokens: int = 96
    max_rounds: int = 4
    format_reward: float = 0.0
    fingerprint: str = ""
    logits_processor: object = None     # passed to every request (tests: a `glmkit.chat.agent.ScriptedModel`)

    @classmethod
    def from_folder(cls, folder: str | Path, split: str = "train", **options) -> ToolEpisodes:
        """The tasks of `split` in a folder written by `glmkit tooltasks`, with its document store."""
        folder = Path(folder)
        tasks = read_tasks(folder / f"{split}_tasks.jsonl")
        store_path = folder / "facts.sqlite"
        store = DocStore(store_path) if store_path.is_file() else None
        if store is None and any(t.family == "lookup" for t in tasks):
            raise GlmkitError(f"{folder} has lookup tasks but no facts.sqlite; rewrite it with glmkit tooltasks")
        h = hashlib.sha256((folder / f"{split}_tasks.jsonl").read_bytes())
        if store is not None:
            h.update(store_path.read_bytes())
        return cls(tasks, store, fingerprint=h.hexdigest()[:16], **options)

    def play(self, model, tokenizer, task: ToolTask, seeds: list[int], *, causal: bool,
             max_len: int) -> list[Episode]:
        from glmkit.infer.engine import Engine
        engine = Engine(model, tokenizer, max_batch=1, max_len=max_len)
        return [self._attempt(engine, tokenizer, task, seed, causal) for seed in seeds]

    def _attempt(self, engine, tokenizer, task: ToolTask, seed: int, causal: bool) -> Episode:
        from glmkit.infer.sampling import SamplingConfig
        tools = _toolbox(task, self.store, ExactPython())
        sampling = SamplingConfig(temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=seed)
        agent = Agent(engine, tokenizer, fmt=self.fmt, tools=tools, causal=causal, sampling=sampling,
                      max_rounds=self.max_rounds, logits_processor=self.logits_processor)
        runs, end = [], None
        try:
            for event in agent.send(task.question):
                if isinstance(event, ToolRun):
                    runs.append(event)
                elif isinstance(event, TurnEnd):
                    end = event
        except GlmkitError as e:     # the conversation outgrew the engine's row: the attempt ends there
            if not agent.rounds:     # ... unless not even the question fits
                raise GlmkitError(f"task {task.id}: the question does not fit a row: {e}; raise --seq-len") from None
            end = None
        finally:
            tools.close()
        return self._score(task, agent, runs, end)

    def _score(self, task: ToolTask, agent: Agent, runs: list[ToolRun], end: TurnEnd | None) -> Episode:
        answer = end.message.text if end is not None and end.reason == "answer" else ""
        correct = bool(answer) and check_answer(task, answer)
        if correct and task.source:
            correct = cited_sources(answer, [r.result for r in runs]) == [task.source]
        replies = [e for e in agent.transcript.events if e["event"] == "assistant"]
        parsed = end is not None and end.reason != "length" and all(
            not e["parse_errors"] and e["finish_reason"] != "length" for e in replies) and all(
            _is_object(r.arguments) for r in runs)
        calls = [(r.name, json.loads(r.arguments)) for r in runs if _is_object(r.arguments)]
        names_right, _ = check_calls(task, calls)
        reward = float(correct) + (self.format_reward if parsed else 0.0)
        rounds = [(r.prompt, r.generated) for r in agent.rounds]
        return Episode(rounds, reward, {"correct": float(correct), "parsed": float(parsed),
                                        "calls_right": float(names_right), "calls": float(len(runs)),
                                        "rounds": float(len(rounds))})


def _is_object(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments), dict)
    except ValueError:
        return False


def score_tasks(model, tokenizer, source: ToolEpisodes, *, causal: bool = False, max_len: int = 1024) -> dict:
    """Every task of `source` played once, greedily: {"tasks", "correct", "parsed", "calls_right",
    "by_family": {family: correct share}} (shares in [0, 1])."""
    greedy = replace(source, temperature=0.0)
    was_training = model.training
    model.eval()
    try:
        episodes = [(t, greedy.play(model, tokenizer, t, [0], causal=causal, max_len=max_len)[0])
                    for t in source.tasks]
    finally:
        model.train(was_training)
    share = lambda rows, key: sum(e.info[key] for _, e in rows) / max(1, len(rows))  # noqa: E731
    families = sorted({t.family for t in source.tasks})
    return {"tasks": len(episodes), "correct": share(episodes, "correct"), "parsed": share(episodes, "parsed"),
            "calls_right": share(episodes, "calls_right"),
            "by_family": {f: share([x for x in episodes if x[0].family == f], "correct") for f in families}}
