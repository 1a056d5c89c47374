"""The demo's tool-use stage: the pretrained demo model fine-tuned to call tools, measured before and after.

    stage = ToolStage()                                   # the recipe (see the fields)
    suite, paths = write_stage_suite(stage, run_dir / "tools" / "suite")
    before = measure(engine, tok, tasks, stage, store=store)      # held-out, with and without tools
    metrics = train(sft_config(stage, init=run_dir, chat_data=paths["train"], out_dir=..., seq_len=n))
    after = measure(Engine(load(...).model, tok), tok, tasks, stage, store=store)
    print(before_after_table(before, after))

What it is: the task suite of `glmkit.eval.tooltasks` (the families in `ToolStage.families`, English and
Chinese), its train conversations written in the `glm45` format (`glmkit.eval.toolsft`), full fine-tuning
of the pretrained model on them with `glmkit sft`'s machinery (`glmkit.train`, the same checkpoints and
resume), and the held-out tasks run through the real agent loop by `glmkit.eval.tooleval.evaluate_tools`,
once with the family's tools and once with none, before and after fine-tuning. The `python` observations
of the scored episodes are computed exactly in-process (`ExactPython`: the suite's integer arithmetic and
`str.count`, an error for anything else), so the scores do not depend on a sandbox being installed;
`episode` runs one task with the real sandboxed interpreter for the transcript the demo prints.

The numbers are the ones `evaluate_tools` defines (docs/tools.md): parse rate (tool calls the model wrote
that parsed cleanly, over those it attempted), answer exact match with tools and without (the final
answer states the task's answer; a lookup answer must also cite the task's document).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from glmkit.errors import GlmkitError
from glmkit.eval.tooltasks import FAMILIES, LANGS, ToolSuite, ToolTask

FORMAT = "glm45"     # GLM-4.5's dialect: the demo tokenizer has its structural tokens


@dataclass
class ToolStage:
    """The recipe of the tool-use stage (what must match for a recorded stage to be the same)."""
    families: tuple[str, ...] = ("arithmetic", "lookup")
    """task families taught and measured (glmkit.eval.tooltasks.FAMILIES)"""
    train: int = 200
    """train tasks (SFT conversations) per family and language"""
    heldout: int = 20
    """held-out tasks per family and language, each run with tools and without, before and after"""
    steps: int = 80
    """fine-tuning optimizer steps"""
    batch_size: int = 4
    """rows per step"""
    seq_len: int = 0
    """tokens per row (0: the longest train conversation, rounded up to a multiple of 128)"""
    lr: float = 3e-3
    """peak learning rate (warmup 5%, cosine to 5%)"""
    seed: int = 0
    """draws the tasks"""
    max_new_tokens: int = 128
    """most tokens per model reply when measuring"""
    langs: tuple[str, ...] = LANGS
    """languages of the tasks"""

    def validate(self) -> ToolStage:
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise GlmkitError(f"--tool-families {','.join(self.families)!r}: use a comma-separated subset of "
                              f"{','.join(FAMILIES)}")
        for name in ("train", "heldout", "steps", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise GlmkitError(f"--tool-{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.seq_len < 0 or not (self.lr > 0 and math.isfinite(self.lr)):
            raise GlmkitError(f"--tool-seq-len must be 0 (auto) or more and --tool-lr positive "
                              f"(got {self.seq_len}, {self.lr})")
        return self

    def recipe(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def write_stage_suite(stage: ToolStage, folder: str | Path) -> tuple[ToolSuite, dict[str, Path]]:
    """The suite of the stage and its files (`glmkit.eval.toolsft.write_suite`: train.jsonl in glm45,
    train_tasks.jsonl, heldout_tasks.jsonl, facts.sqlite)."""
    from glmkit.eval.toolsft import write_suite

    suite = ToolSuite(seed=stage.seed, per_split={"train": stage.train, "heldout": stage.heldout},
                      families=tuple(stage.families), langs=tuple(stage.langs))
    return suite, write_suite(suite, folder, FORMAT)


def longest_conversation(chat_data: str | Path, tokenizer) -> int:
    """Tokens of the longest conversation of a chat JSONL file, rendered in the stage's format."""
    from glmkit.eval.toolsft import read_jsonl
    from glmkit.train.chat_data import render_conversation

    return max(len(render_conversation(row, FORMAT, tokenizer)[0]) for row in read_jsonl(chat_data))


def row_length(stage: ToolStage, longest: int, max_positions: int) -> int:
    """The SFT row length: `stage.seq_len`, or the longest conversation rounded up to 128; it must fit
    the model's positions."""
    n = stage.seq_len or 128 * math.ceil(longest / 128)
    if n < longest:
        raise GlmkitError(f"--tool-seq-len {n} is shorter than the longest train conversation ({longest} "
                          "tokens); raise it or pass 0 (auto)")
    if n > max_positions:
        raise GlmkitError(f"the tool-use conversations need rows of {n} tokens, more than the model's "
                          f"{max_positions} positions; raise max_position_embeddings in --model-overrides")
    return n


def sft_config(stage: ToolStage, *, init: str | Path, chat_data: str | Path, out_dir: str | Path, seq_len: int,
               progress: bool = True):
    """The `glmkit sft` run of the stage (full fine-tuning, resumable: a second call continues it)."""
    from glmkit.train.setup import TrainConfig

    return TrainConfig(out_dir=str(out_dir), init=str(init), chat_data=str(chat_data), chat_format=FORMAT,
                       seq_len=seq_len, batch_size=stage.batch_size, max_steps=stage.steps, lr=stage.lr,
                       eval_every=0, save_every=stage.steps, keep=1, resume=True, progress=progress,
                       tensorboard=False).validate()


def measure(engine, tokenizer, tasks: list[ToolTask], stage: ToolStage, *, store, log=None) -> dict:
    """The held-out tasks run with the family's tools and with none: {"summary": the joint report's
    summary, "table": its table, "episodes": per-episode records without their events}."""
    from glmkit.eval.tooleval import evaluate_tools
    from glmkit.eval.tooltasks import ExactPython

    common = {"fmt": FORMAT, "max_new_tokens": stage.max_new_tokens, "log": log}
    report = evaluate_tools(engine, tokenizer, tasks, store=store, python=ExactPython(), **common)
    report += evaluate_tools(engine, tokenizer, tasks, tools=False, **common)
    return {"summary": report.summary(), "table": report.format_table(),
            "episodes": [e.to_dict(events=False) for e in report.episodes]}


COLUMNS = (("parse rate", "parse_rate"), ("answer EM with tools", "answer_em_with_tools"),
           ("answer EM without tools", "answer_em_without_tools"))


def before_after_table(before: dict, after: dict) -> str:
    """Markdown: over all held-out tasks and per family, the pretrained and the fine-tuned model's parse
    rate and answer exact match with and without tools (percent; "-" where nothing was measured, e.g.
    a parse rate where the model never attempted a call)."""
    b, a = before["summary"], after["summary"]
    groups = [("all", b, a)] + [(f, b["families"][f], a["families"].get(f, {})) for f in b["families"]]
    lines = ["| held-out tasks | model | " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|---|---|" + "---:|" * len(COLUMNS)]
    for name, mb, ma in groups:
        for model, m in (("pretrained", mb), ("fine-tuned", ma)):
            lines.append(f"| {name} ({mb['tasks']}) | {model} | " + " | ".join(_pct(m.get(k)) for _, k in COLUMNS) + " |")
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def episode(engine, tokenizer, task: ToolTask, stage: ToolStage, *, store, python, logits_processor=None,
            clock=None) -> list[dict]:
    """One task through the agent loop with its family's real tools (`python`: e.g. a
    `glmkit.chat.sandbox.Sandbox`), greedy; the transcript's events (`glmkit.chat.agent`'s format).
    `logits_processor` and `clock` go to the `Agent` (tests)."""
    import time

    from glmkit.chat.agent import Agent, Transcript
    from glmkit.eval.tooleval import toolbox_for
    from glmkit.infer.sampling import SamplingConfig

    transcript = Transcript(None)
    agent = Agent(engine, tokenizer, fmt=FORMAT, tools=toolbox_for(task, "task", store=store, python=python),
                  sampling=SamplingConfig(max_new_tokens=stage.max_new_tokens), max_rounds=4, max_calls=8,
                  transcript=transcript, logits_processor=logits_processor, clock=clock or time.monotonic)
    for _ in agent.send(task.question):
        pass
    return transcript.events


def format_transcript(events: list[dict]) -> str:
    """A transcript as the demo prints it: the question, each call with its result, the answer."""
    out = []
    for e in events:
        if e["event"] == "user":
            out.append(f"user       {e['content']}")
        elif e["event"] == "assistant":
            m = e["message"]
            for c in m.get("tool_calls") or []:
                out.append(_cut(f"call       {c['function']['name']}({_args(c['function']['arguments'])})"))
            if m.get("content"):
                out.append(_cut(f"assistant  {m['content']}"))
            for p in e.get("parse_errors") or []:
                out.append(f"(parse error: {p})")
        elif e["event"] == "tool":
            body = e["result"].rstrip("\n").replace("\n", "\n" + " " * 11)
            out.append(f"result     {body}")
        elif e["event"] == "end":
            out.append(f"(end: {e['reason']}, {e['rounds']} rounds, {e['calls']} calls)")
    return "\n".join(out)


def _cut(line: str, limit: int = 300) -> str:
    """A generated line as printed: at most `limit` characters (a model stuck in a loop writes thousands)."""
    return line if len(line) <= limit else line[:limit] + f"… [{len(line) - limit} more characters]"


def _args(arguments: str) -> str:
    """Call arguments as `key=value, ...`; arguments that are not a JSON object as the model wrote them."""
    try:
        args = json.loads(arguments)
    except ValueError:
        args = None
    if not isinstance(args, dict):
        return repr(arguments)
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items())
