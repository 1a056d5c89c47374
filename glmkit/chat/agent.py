"""The agent loop: a conversation with a model that calls tools, on the inference engine.

    tools = Toolbox(functions=[get_weather], sandbox=Sandbox(ws), browser=Browser(default_store()))
    chat = Agent(engine, tok, fmt="glm45", tools=tools, transcript="chat.jsonl")
    for event in chat.send("Weather in Beijing?"):
        ...     # Delta (content / reasoning / tool-call pieces as generated), ToolRun (a call's result), TurnEnd

One `send(text)` appends the user message and runs rounds until the model answers without a call:
1. render the conversation (`glmkit.chat.render`, or the checkpoint's own Jinja template through
   `glmkit.chat.template`) with the generation prompt, and generate on the engine with the format's stop
   ids (`Request.chat` for GLM-trained models, `Request.causal` for CLM / converted HF models, which read
   `[gMASK]<sop>...` as plain text); the engine's prefix reuse makes a round cost only its new tokens;
2. feed each generated id to the format's incremental parser and yield its `Delta`s as they come;
3. run the turn's tool calls (`Toolbox.run`: parallel threads, results in call order), cap each
   observation at `max_observation_chars` (with a note saying how much was cut), append the assistant
   message and one tool message per call, and go back to 1.

It ends (`TurnEnd.reason`) with `answer` (a reply without calls), `length` (the reply hit
`max_new_tokens`; its calls are not run), `max_rounds` (that many generations in this send) or
`max_calls` (the calls of this send reached the cap: those beyond it are answered with an error
observation, so the conversation stays well formed, and the loop stops).

Nothing the model writes raises. A tool's failure (unknown name, bad arguments, an exception, a
timeout) is the registry's `error: ...` observation. A call whose arguments are not a JSON object is run
(the observation says why it failed) and kept in the history as text, since the message model only
holds calls with object arguments. Other parse errors of a reply without calls (e.g. an undeclared tool
name) come back as one `error: ...` observation and the loop goes on.

The transcript (`transcript=` a path or a text file) is JSON Lines, one object per event, flushed as it
is written and read back by `read_transcript`:
    {"event": "user", "content"}                           {"event": "reset"}
    {"event": "prompt", "round", "tokens"}                  the rendered prompt's size in tokens
    {"event": "assistant", "round", "message", "finish_reason", "tokens", "parse_errors"}
    {"event": "tool", "round", "id", "name", "arguments", "result", "error", "duration_s", "truncated"}
    {"event": "end", "reason", "rounds", "calls"}
Durations come from `clock` (default `time.monotonic`), so tests can make them exact.

The token ids of every round of the latest `send` are kept in `Agent.rounds` (`Round`: the prompt as
the engine read it and the ids it generated, ending with the stop id that ended the reply, if one did):
exactly what the model was conditioned on and sampled, for training on its own samples
(`glmkit.train.rl`) where re-rendering the parsed messages could tokenize differently.

Tools (`Toolbox`): the user's functions (a `FunctionRegistry`, or functions / `Tool`s), the `python`
interpreter (any object with `run(code) -> result` whose result has `as_observation(max_chars)`, e.g.
`glmkit.chat.sandbox.Sandbox`) and the browser (`glmkit.chat.browser.Browser`). They are declared in the
style of the model family ("dialect"): for `glm4`, GLM-4's built-in tools `python` and `simple_browser`
(called with raw code and browser commands such as `search("...")`); for `glm45`, function tools
`python(code)` and `browser_search` / `browser_open` / `browser_find`.

`ScriptedModel` is a logits processor that makes the real engine generate fixed token ids, one list per
generation round: the agent loop, parsers, tools and transcript run for real with a model whose replies
are known (tests, demos of a tool).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from glmkit.chat.functions import FunctionRegistry, Tool, ToolResult, function_tool
from glmkit.chat.messages import (
    AssistantMessage,
    Message,
    SystemMessage,
    ToolCall,
    ToolMessage,
    ToolSpec,
    UserMessage,
    messages_from_dicts,
)
from glmkit.chat.render import FORMATS, make_parser, render, stop_ids
from glmkit.chat.stream import Delta
from glmkit.errors import GlmkitError

END_REASONS = ("answer", "length", "max_rounds", "max_calls")
GLM45_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                "</arg_value>", "<tool_response>", "</tool_response>")


# ---------------------------------------------------------------------------------------- format
@dataclass(frozen=True)
class ChatFormat:
    """How a conversation is rendered: `template` (a checkpoint's Jinja chat template) or glmkit's
    renderer of `dialect`; `dialect` (glm4 | glm45) also picks the parser and the tool style."""
    dialect: str
    template: str | None = None

    @property
    def name(self) -> str:
        return "template" if self.template is not None else self.dialect


def read_chat_template(folder: str | Path) -> str | None:
    """The chat template a checkpoint ships (`chat_template.jinja`, else `tokenizer_config.json`'s
    `chat_template`), or None."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError) as e:
            raise GlmkitError(f"{config} is not readable JSON ({e}); restore it from the original checkpoint") from None
        if isinstance(template, list):  # HF's named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None
    return None


def choose_format(fmt: str, tokenizer, *, template: str | None = None) -> ChatFormat:
    """`fmt` glm4 | glm45 | auto. auto: the checkpoint's `template` when it has one (except a template that
    reads GLM-4's own message layout, `metadata` items, rather than OpenAI messages, as GLM-4-9B-chat's does:
    glm4 renders that exactly), else glm45
    when the tokenizer has GLM-4.5's structural tokens (GLM-4.5 / 4.6 MoE checkpoints and every
    glmkit-trained tokenizer do), else glm4 (GLM-4-9B's tokenizer cannot spell the glm45 format)."""
    has45 = all(tokenizer.special_id(t) is not None for t in GLM45_TOKENS)
    if fmt in FORMATS:
        return ChatFormat(fmt)
    if fmt != "auto":
        raise GlmkitError(f"unknown chat format {fmt!r}; use glm4, glm45 or auto")
    if template is not None:
        if "metadata" in template:           # GLM-4's own message layout (GLM-4-9B-chat's template)
            return ChatFormat("glm4")
        return ChatFormat("glm45" if "<tool_call>" in template and has45 else "glm4", template)
    return ChatFormat("glm45" if has45 else "glm4")


# ---------------------------------------------------------------------------------------- tools
class Toolbox:
    """What one conversation can call (see the module docstring). `sandbox` / `browser` None: that tool is
    not offered. `timeout`: seconds for a user function that sets none (a `FunctionRegistry` given keeps its own)."""

    def __init__(self, functions: FunctionRegistry | Iterable[Tool | Callable] = (), *, sandbox=None,
                 browser=None, timeout: float | None = 30.0):
        if isinstance(functions, FunctionRegistry):
            self.user, timeout = [functions[n] for n in functions.names], functions.timeout
        else:
            self.user = list(functions)
        self.sandbox = sandbox
        self.browser = browser
        self.timeout = timeout
        self.dialect = "glm4"
        self._registry = self._build()

    def use_dialect(self, dialect: str) -> None:
        self.dialect = dialect
        self._registry = self._build()

    def _build(self) -> FunctionRegistry:
        registry = FunctionRegistry(timeout=self.timeout)
        if self.sandbox is not None:
            sandbox = self.sandbox
            limits = getattr(sandbox, "limits", None)
            # the sandbox enforces its own wall time (and restarts a stuck kernel): wait for that
            wait = (limits.timeout_s + limits.interrupt_grace_s + limits.startup_timeout_s) if limits else None

            def python(code: str) -> str:
                """Run Python code in a stateful interpreter (variables persist between calls); returns its
                output, the last expression's value, errors and saved figures."""
                return sandbox.run(code).as_observation(max_chars=1 << 30)

            registry.add(function_tool(python, timeout=wait))
        if self.browser is not None:
            if self.dialect == "glm4":
                browser = self.browser

                def simple_browser(command: str) -> str:
                    """Browse: search("query"), open(id), find("text"), open_url("https://...")."""
                    return browser.run(command)

                registry.add(function_tool(simple_browser))
            else:
                for tool in self.browser.tools():
                    registry.add(tool)
        for tool in self.user:
            registry.add(tool)
        return registry

    @property
    def names(self) -> list[str]:
        return self._registry.names

    def specs(self) -> list[ToolSpec | dict]:
        """The declarations the model reads, in this toolbox's dialect."""
        builtin = set()
        if self.dialect == "glm4":       # GLM-4's own declarations of its built-in tools
            builtin = {n for n, on in (("python", self.sandbox), ("simple_browser", self.browser)) if on is not None}
        return [ToolSpec(type=name) if name in builtin else self._registry[name].spec()
                for name in self._registry.names]

    def run(self, calls: list[tuple[str, str]], clock: Callable[[], float]) -> list[tuple[ToolResult, float]]:
        """Run (name, arguments) calls in parallel; (result, seconds) in call order. Never raises."""
        def timed(name: str, arguments: str) -> tuple[ToolResult, float]:
            start = clock()
            result = self._registry.call(name, arguments)
            return result, clock() - start

        if len(calls) <= 1:
            return [timed(*c) for c in calls]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=min(8, len(calls)), thread_name_prefix="glmkit-agent") as pool:
            return list(pool.map(lambda c: timed(*c), calls))

    def reset(self) -> None:
        """A fresh start for `/reset`: a new interpreter (files kept) and a browser that has shown nothing."""
        if self.sandbox is not None and hasattr(self.sandbox, "reset"):
            self.sandbox.reset()
        if self.browser is not None:
            b = self.browser
            self.browser = type(b)(b.store, b.fetcher, results=b.results, page_chars=b.page_chars,
                                   snippet_chars=b.snippet_chars, find_matches=b.find_matches)
        self._registry = self._build()

    def close(self) -> None:
        if self.sandbox is not None and hasattr(self.sandbox, "close"):
            self.sandbox.close()


def cap_observation(text: str, max_chars: int) -> tuple[str, bool]:
    """`text` cut to `max_chars` characters with a note saying so; (text, whether it was cut)."""
    if len(text) <= max_chars:
        return text, False
    return text[:max_chars] + f"\n[observation cut: {max_chars} of {len(text)} characters shown]", True


# ---------------------------------------------------------------------------------------- events
@dataclass
class ToolRun:
    """One tool call of the model and what came of it."""
    id: str
    name: str
    arguments: str
    result: str            # the observation the model reads (capped)
    error: str | None      # what went wrong (None: the tool ran and returned)
    duration_s: float
    truncated: bool


@dataclass
class Round:
    """One generation round's token ids: `prompt` (with the generation prompt) and `generated` (the sampled
    ids, then the stop id that ended the reply when one did; none after a `length` finish)."""
    prompt: list[int]
    generated: list[int]


@dataclass
class TurnEnd:
    reason: str            # answer | length | max_rounds | max_calls
    message: AssistantMessage
    rounds: int
    calls: int


class Transcript:
    """JSON Lines, one object per event; `target` a path (appended to) or a text file; None: kept in
    memory only (`events`)."""

    def __init__(self, target: str | Path | IO[str] | None = None):
        self.events: list[dict] = []
        self._own = isinstance(target, (str, Path))
        self._file = open(target, "a", encoding="utf-8") if self._own else target

    def write(self, event: str, **fields) -> None:
        record = {"event": event, **fields}
        self.events.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._own and self._file is not None:
            self._file.close()
            self._file = None


def read_transcript(path: str | Path) -> list[dict]:
    """The events of a transcript file, in order."""
    events = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                events.append(json.loads(line))
            except ValueError as e:
                raise GlmkitError(f"{path}:{n}: not a JSON line ({e}); is this a glmkit chat transcript?") from None
    return events


# ---------------------------------------------------------------------------------------- agent
class Agent:
    """One conversation (see the module docstring). `engine`: a `glmkit.infer.engine.Engine` this agent
    drives (other requests on it are served but their outputs are not returned to anyone); `causal`: read
    the prompt as plain text (CLM-trained and converted HF models). `logits_processor`: passed to every
    request (e.g. a `ScriptedModel`)."""

    def __init__(self, engine, tokenizer, *, fmt: str | ChatFormat = "glm4", tools: Toolbox | None = None,
                 system: str | None = None, causal: bool = False, sampling=None, enable_thinking: bool = True,
                 max_rounds: int = 8, max_calls: int = 16, max_observation_chars: int = 4000,
                 transcript: str | Path | IO[str] | Transcript | None = None, logits_processor=None,
                 clock: Callable[[], float] = time.monotonic):
        from glmkit.infer.sampling import SamplingConfig

        if max_rounds < 1 or max_calls < 1 or max_observation_chars < 1:
            raise GlmkitError(f"max_rounds ({max_rounds}), max_calls ({max_calls}) and max_observation_chars "
                              f"({max_observation_chars}) must all be >= 1")
        self.engine, self.tok = engine, tokenizer
        self.format = fmt if isinstance(fmt, ChatFormat) else choose_format(fmt, tokenizer)
        self.tools = tools or Toolbox()
        self.tools.use_dialect(self.format.dialect)
        self.system = system
        self.causal = causal
        self.sampling = sampling or SamplingConfig(max_new_tokens=512)
        self.enable_thinking = enable_thinking
        self.max_rounds, self.max_calls = max_rounds, max_calls
        self.max_observation_chars = max_observation_chars
        self.transcript = transcript if isinstance(transcript, Transcript) else Transcript(transcript)
        self.logits_processor = logits_processor
        self.clock = clock
        self.stops = tuple(stop_ids(self.format.dialect, tokenizer))
        self._n_ids = 0
        self.messages: list[Message] = []
        self.rounds: list[Round] = []
        self.reset(log=False)

    # -------------------------------------------------------------------------------- public
    def reset(self, log: bool = True) -> None:
        """Forget the conversation (the system prompt stays); the tools start afresh too."""
        self.messages = [SystemMessage(self.system)] if self.system else []
        if log:
            self.tools.reset()
            self.transcript.write("reset")

    def save(self, path: str | Path) -> Path:
        """The conversation as a JSON list of OpenAI messages."""
        path = Path(path)
        path.write_text(json.dumps([m.to_dict() for m in self.messages], ensure_ascii=False, indent=1) + "\n",
                        encoding="utf-8")
        return path

    def load(self, messages) -> None:
        """Continue a saved conversation (OpenAI message dicts or message objects)."""
        self.messages = messages_from_dicts(list(messages))

    def prompt_ids(self) -> list[int]:
        """The conversation rendered with the generation prompt (what the next round reads)."""
        specs = self.tools.specs()
        if self.format.template is not None:
            from glmkit.chat.template import render_template
            return render_template(self.format.template, self.messages, specs or None, tokenizer=self.tok,
                                   enable_thinking=self.enable_thinking).ids
        return render(self.messages, specs, self.format.dialect, tokenizer=self.tok,
                      enable_thinking=self.enable_thinking).ids

    def send(self, text: str) -> Iterator[Delta | ToolRun | TurnEnd]:
        """Add a user message and run the loop; yields deltas, tool runs and, last, the `TurnEnd`."""
        self.messages.append(UserMessage(text))
        self.transcript.write("user", content=text)
        self.rounds = []
        calls = 0
        for round_ in range(1, self.max_rounds + 1):
            message, finish, n_tokens = yield from self._generate(round_)
            self.transcript.write("assistant", round=round_, message=message.to_dict(), finish_reason=finish,
                                  tokens=n_tokens, parse_errors=message.parse_errors)
            if finish == "length":
                self.messages.append(_as_history(message, []))
                return (yield from self._end("length", message, round_, calls))
            bad = _unreadable(message.tool_calls)
            self.messages.append(_as_history(message, bad))
            if not message.tool_calls:
                if not message.parse_errors:
                    return (yield from self._end("answer", message, round_, calls))
                problem = "error: your reply could not be read: " + "; ".join(message.parse_errors)
                self.messages.append(ToolMessage(problem, "parse_error"))
                self.transcript.write("tool", round=round_, id="parse_error", name=None, arguments=None,
                                      result=problem, error="parse error", duration_s=0.0, truncated=False)
                continue
            allowed = max(self.max_calls - calls, 0)
            ordered = message.tool_calls
            runs = self.tools.run([(c.function.name, c.function.arguments) for c in ordered[:allowed]], self.clock)
            for i, call in enumerate(ordered):
                if i < allowed:
                    result, seconds = runs[i]
                    content, error = result.content, result.error
                else:
                    error = f"not run: the limit of {self.max_calls} tool calls per message was reached"
                    content, seconds = f"error: {error}", 0.0
                content, cut = cap_observation(content, self.max_observation_chars)
                run = ToolRun(call.id, call.function.name, call.function.arguments, content, error, seconds, cut)
                self.messages.append(ToolMessage(content, call.id))
                self.transcript.write("tool", round=round_, id=run.id, name=run.name, arguments=run.arguments,
                                      result=run.result, error=run.error, duration_s=run.duration_s,
                                      truncated=run.truncated)
                yield run
            calls += min(len(ordered), allowed)
            if len(ordered) > allowed or calls >= self.max_calls:
                return (yield from self._end("max_calls", message, round_, calls))
        return (yield from self._end("max_rounds", message, self.max_rounds, calls))

    def close(self) -> None:
        self.transcript.close()

    # -------------------------------------------------------------------------------- internals
    def _end(self, reason: str, message: AssistantMessage, rounds: int, calls: int):
        self.transcript.write("end", reason=reason, rounds=rounds, calls=calls)
        yield TurnEnd(reason, message, rounds, calls)

    def _call_id(self, index: int) -> str:
        self._n_ids += 1
        return f"call_{self._n_ids}"

    def _generate(self, round_: int):
        """One generation round: yields the parser's deltas; returns (message, finish reason, tokens)."""
        from glmkit.infer.engine import Request

        ids = self.prompt_ids()
        self.transcript.write("prompt", round=round_, tokens=len(ids))
        make = Request.causal if self.causal else Request.chat
        rid = self.engine.add(make(ids, self.sampling, stop_ids=self.stops, logits_processor=self.logits_processor))
        parser = make_parser(self.format.dialect, self.tok, self.tools.specs(), make_id=self._call_id)
        finished, generated, n = None, [], 0
        self.rounds.append(Round(list(ids), generated))
        try:
            while finished is None and self.engine.has_work():
                for out in self.engine.step():
                    if out.request != rid:
                        continue
                    if out.token is not None:
                        n += 1
                        generated.append(out.token)
                        yield from parser.feed(out.token)
                    if out.stop_id is not None:
                        generated.append(out.stop_id)
                    finished = out.finished or finished
        finally:
            if finished is None:            # the caller stopped reading (Ctrl-C): free the engine's row
                self.engine.cancel(rid)
                while self.engine.has_work():
                    self.engine.step()
        yield from parser.finish("length" if finished == "length" else "stop")
        return parser.message(), parser.finish_reason, n


def _unreadable(calls: list[ToolCall]) -> list[ToolCall]:
    """The calls whose arguments are not a JSON object."""
    bad = []
    for c in calls:
        try:
            ok = isinstance(json.loads(c.function.arguments), dict)
        except ValueError:
            ok = False
        if not ok:
            bad.append(c)
    return bad


def _as_history(message: AssistantMessage, bad: list[ToolCall]) -> AssistantMessage:
    """The message as the conversation keeps it: calls with unreadable arguments become text."""
    if not bad:
        return message
    text = message.text
    for c in bad:
        text += ("\n" if text else "") + f"{c.function.name}\n{c.function.arguments}"
    return AssistantMessage(content=text or None, tool_calls=[c for c in message.tool_calls if c not in bad],
                            reasoning_content=message.reasoning_content, parse_errors=message.parse_errors)


# ---------------------------------------------------------------------------------------- scripted model
class ScriptedModel:
    """A logits processor that makes the engine generate `turns[k]` in its k-th request: at each step every
    logit but the scripted token's is -inf (so greedy and sampled decoding both pick it). A turn should end
    with a stop id; past its end, and after the last turn, `<|endoftext|>`-like `end_id` is forced.
    Requests must run one at a time (the k-th request is counted at its first sampled token)."""

    def __init__(self, turns: Iterable[Iterable[int]], end_id: int):
        self.turns = [list(t) for t in turns]
        self.end_id = end_id
        self.turn = -1

    @classmethod
    def from_texts(cls, tokenizer, texts: Iterable[str]) -> ScriptedModel:
        """Turns written as text; special-token spellings (`<|observation|>`, `<tool_call>`) become their ids."""
        return cls([tokenizer.encode(t, allow_special=True) for t in texts], tokenizer.special_id("<|endoftext|>"))

    def __call__(self, produced: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not produced:
            self.turn += 1
        script = self.turns[self.turn] if self.turn < len(self.turns) else []
        token = script[len(produced)] if len(produced) < len(script) else self.end_id
        forced = torch.full_like(logits, float("-inf"))
        forced[token] = 0.0
        return forced

    @property
    def done(self) -> bool:
        return self.turn + 1 >= len(self.turns)

