"""RL episodes from the tool-use task suite: each attempt at a task is the real agent loop on the model being
trained, rewarded by its checked outcome (`glmkit rl`; the algorithm is `glmkit.train.rl`).

    source = ToolEpisodes.from_folder("data/tooltasks", "train", fmt="glm45", temperature=1.0)
    train(cfg, episodes=source)                                  # what `glmkit rl` runs

An attempt: a fresh `glmkit.chat.agent.Agent` with the task's tools (`glmkit.eval.tooleval.toolbox_for`, as
`glmkit eval tools` offers them: `python` for arithmetic and counting, the browser over the suite's
`facts.sqlite` for lookups, the three user functions) asks the task's question and runs until the model
answers, at most `max_rounds` replies of at most `max_new_tokens` tokens, sampled at `temperature` with
the attempt's seed. The `python` tool is `ExactPython` (the suite's own arithmetic and `str.count`,
computed in-process; other code gets an error observation), so an attempt needs no sandbox and is
reproducible. All attempts at one task share one engine built over the current weights (its prefix reuse
serves the shared prompt), never an older one. With `concurrency` > 1 that many attempts run at once in
threads on the engine (`glmkit.infer.shared.SharedEngine`), their decode steps batched together: faster,
and the same samples up to float rounding (a batched matmul may round differently from a single row, so
in rare ties a sampled token can differ; with 1, a resumed run samples bit for bit the same).

Reward (one number per attempt), from the attempt's transcript scored by `glmkit.eval.tooleval.score_episode`,
the scoring of `glmkit eval tools`:
- 1 when the answer is right (`answer_ok`: it ended with an answer that `check_answer` accepts, and a
  lookup's citations name only the task's document and quote what the browser showed), else 0;
- plus `format_reward` when every call the model attempted parsed cleanly and it ended with an answer.
An attempt whose conversation outgrows the row (`max_len` tokens) ends there, wrong.
Measurements per attempt (the step's metrics average them): `correct`, `parsed`, `calls_right` (the tool
names are the task's, in order), `calls` (attempted), `rounds`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from glmkit.chat.agent import Agent
from glmkit.chat.docstore import DocStore
from glmkit.errors import GlmkitError
from glmkit.eval.tooleval import read_tasks, score_episode, toolbox_for
from glmkit.eval.tooltasks import ExactPython, ToolTask
from glmkit.train.rl import Episode


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
    concurrency: int = 1                # attempts of a task run at once on one engine

    @classmethod
    def from_folder(cls, folder: str | Path, split: str = "train", **options) -> ToolEpisodes:
        """The tasks of `split` in a folder written by `glmkit tooltasks`, with its document store."""
        folder = Path(folder)
        if not (folder / f"{split}_tasks.jsonl").is_file():
            raise GlmkitError(f"{folder} has no {split}_tasks.jsonl; write the task suite with "
                              f"`glmkit tooltasks --out {folder}`")
        tasks = read_tasks(folder / f"{split}_tasks.jsonl")
        if not tasks:
            raise GlmkitError(f"{folder / f'{split}_tasks.jsonl'} holds no task")
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
        workers = max(1, min(self.concurrency, len(seeds)))
        engine = Engine(model, tokenizer, max_batch=workers, max_len=max_len)
        if workers == 1:
            return [self._attempt(engine, tokenizer, task, seed, causal) for seed in seeds]
        import threading

        from glmkit.infer.shared import SharedEngine
        shared, results, failures, lock = SharedEngine(engine), [None] * len(seeds), [], threading.Lock()
        todo = iter(range(len(seeds)))

        def work():
            view = shared.view()
            while not failures:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                try:
                    results[i] = self._attempt(view, tokenizer, task, seeds[i], causal)
                except BaseException as e:  # handed to the caller
                    failures.append(e)

        threads = [threading.Thread(target=work, name=f"glmkit-rl-{k}", daemon=True) for k in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise failures[0]
        return results

    def _attempt(self, engine, tokenizer, task: ToolTask, seed: int, causal: bool) -> Episode:
        from glmkit.infer.sampling import SamplingConfig
        tools = toolbox_for(task, "task", store=self.store, python=ExactPython())
        sampling = SamplingConfig(temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=seed)
        agent = Agent(engine, tokenizer, fmt=self.fmt, tools=tools, causal=causal, sampling=sampling,
                      max_rounds=self.max_rounds, logits_processor=self.logits_processor)
        error = None
        try:
            for _ in agent.send(task.question):
                pass
        except GlmkitError as e:     # the conversation outgrew the engine's row: the attempt ends there
            if not agent.rounds:     # ... unless not even the question fits
                raise GlmkitError(f"task {task.id}: the question does not fit a row: {e}; raise --seq-len") from None
            error = str(e)
        finally:
            tools.close()
        scored = score_episode(task, agent.transcript.events, tools=True, browser=tools.browser, error=error)
        parsed = scored.parse_failures == 0 and scored.end == "answer"
        reward = float(scored.answer_ok) + (self.format_reward if parsed else 0.0)
        rounds = [(r.prompt, r.generated) for r in agent.rounds]
        return Episode(rounds, reward, {"correct": float(scored.answer_ok), "parsed": float(parsed),
                                        "calls_right": float(scored.names_ok), "calls": float(scored.attempts),
                                        "rounds": float(len(rounds))})
