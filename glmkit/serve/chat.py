"""Chat completions: an OpenAI request -> the prompt and engine request; engine outputs -> the
response or the stream of chunks.

The prompt is glmkit's renderer's output for the request's messages and tools (`glmkit.chat.render`,
the user's system prompt kept, with or without tools), or the checkpoint's own chat template's
(`glmkit.chat.template`) when the server was given one. `tool_choice`:
- `auto` (the default with tools): the model chooses; declared functions are parsed as calls;
- `none`: the tools stay in the prompt (the conversation may refer to them) and the model is kept
  from calling: glm45 never gets `<tool_call>`; glm4's reply must open with the newline of a text
  block and never gets a further `<|assistant|>` (the start of another block, possibly a call);
- `required`: the reply is a call of one of the declared tools: glm45's prompt is prefilled up to
  `<tool_call>` (after an empty `<think></think>`), and in both formats a logits processor lets the
  model spell only a declared name and its newline;
- a named function: the prompt ends inside that call (`render(..., forced_tool=name)`), so the model
  writes only its arguments.
`parallel_tool_calls=false` ends the reply when a second call starts. `chat_template_kwargs`
`{"enable_thinking": false}` (vLLM's field) turns GLM-4.5's thinking off. `stop` strings end the content
(the text is cut before the match; calls and reasoning are not searched).

Outputs go through the format's incremental parser (`make_parser`), whose deltas are OpenAI's. Each
choice keeps what it sent (`Choice`); the non-streamed message is exactly the streamed deltas joined.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from glmkit.chat.messages import MessageError
from glmkit.chat.render import make_parser, render, stop_ids, validated
from glmkit.chat.template import render_template
from glmkit.infer.engine import Output, Request
from glmkit.infer.sampling import SamplingConfig
from glmkit.serve.protocol import (
    APIError,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceLogprobs,
    ChunkChoice,
    FunctionCall,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)

FINISH = {"stop": "stop", "stop_string": "stop", "length": "length", "cancelled": "stop"}


@dataclass
class ChatPlan:
    """What one chat request becomes: the prompt ids, the ids the parser reads before the generated
    ones (`prefill`, already part of `prompt`), the parser's tools and the engine's constraints."""
    prompt: list[int]
    prefill: list[int]
    tools: list
    parse_tools: list
    forced_tool: str | None
    stop_ids: list[int]
    processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None


def render_prompt(messages, tools, fmt: str, tok, template: str | None = None, forced: str | None = None,
                  thinking: bool = True) -> list[int]:
    """The prompt ids: glmkit's renderer of `fmt`, or the checkpoint's own Jinja `template`; a forced call
    is opened after the template's generation prompt as the renderer opens it."""
    kw = dict(tokenizer=tok, enable_thinking=thinking)
    if template is None:
        return render(messages, tools, fmt, forced_tool=forced, **kw).ids
    ids = render_template(template, messages, tools, **kw).ids
    if forced is None:
        return ids
    plain = render(messages, tools, fmt, **kw).ids
    return ids + render(messages, tools, fmt, forced_tool=forced, **kw).ids[len(plain):]


def plan_chat(req: ChatCompletionRequest, fmt: str, tok, token_table: list[bytes], template: str | None = None) -> ChatPlan:
    """Render the request's conversation; a bad message, tool or tool_choice is a 400 naming it."""
    if req.response_format is not None and req.response_format.type not in ("text",):
        raise APIError(400, f"response_format {req.response_format.type!r} is not supported by glmkit serve "
                       "(only 'text'); ask for JSON in the prompt, or declare a tool whose arguments are the object",
                       "response_format", "unsupported_parameter")
    choice = req.tool_choice or "auto"
    forced = None
    if isinstance(choice, dict):
        forced = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or not isinstance(forced, str):
            raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                           '{"type": "function", "function": {"name": ...}}', "tool_choice")
    if choice in ("required",) or forced is not None:
        if not req.tools:
            raise APIError(400, f"tool_choice {json.dumps(choice)} needs tools; declare them in `tools`", "tool_choice")
    thinking = (req.chat_template_kwargs or {}).get("enable_thinking", True)
    if not isinstance(thinking, bool):
        raise APIError(400, "chat_template_kwargs.enable_thinking must be true or false",
                       "chat_template_kwargs.enable_thinking")
    try:
        messages, tools = validated(req.messages, req.tools or [], forced)
        prompt = render_prompt(messages, tools, fmt, tok, template, forced, thinking)
    except MessageError as e:
        raise APIError(400, str(e), e.param) from None
    stops = stop_ids(fmt, tok)
    plan = ChatPlan(prompt, [], tools, tools, forced, stops)
    names = [t.name if t.type == "function" else t.type for t in tools]
    if choice == "none" and tools:
        plan.parse_tools = []
        plan.processor = _no_call(fmt, tok, token_table)
    elif choice == "required":
        if fmt == "glm45":                       # prefill up to <tool_call>: the forced render minus the name
            full = render_prompt(messages, tools, fmt, tok, template, names[0], thinking)
            cut = len(full) - 1 - full[::-1].index(tok.special_id("<tool_call>"))
            plan.prefill = full[len(prompt):cut + 1]
            plan.prompt = full[:cut + 1]
        plan.processor = _spell_one_of([n + "\n" for n in names], token_table, set(stops))
    return plan


def _no_call(fmt: str, tok, table: list[bytes]):
    if fmt == "glm45":
        banned = [tok.special_id("<tool_call>")]
        return lambda produced, row: _ban(row, banned)
    assistant = tok.special_id("<|assistant|>")
    text_start = [i for i, _ in _by_first_byte(table).get(ord("\n"), [])]

    def processor(produced: list[int], row: torch.Tensor) -> torch.Tensor:
        if not produced:                         # glm4: an empty metadata line = a text block
            keep = torch.full_like(row, float("-inf"))
            keep[text_start] = row[text_start]
            return keep
        return _ban(row, [assistant])
    return processor


def _ban(row: torch.Tensor, ids: list[int]) -> torch.Tensor:
    row = row.clone()
    row[ids] = float("-inf")
    return row


_INDEX: dict[int, tuple[list[bytes], dict[int, list[tuple[int, bytes]]]]] = {}


def _by_first_byte(table: list[bytes]) -> dict[int, list[tuple[int, bytes]]]:
    """The tokens of `table` grouped by their first byte (built once per table): a constraint looks at
    the few tokens that can continue its text, not the whole vocabulary, inside the engine's step."""
    cached = _INDEX.get(id(table))
    if cached is None or cached[0] is not table:
        index: dict[int, list[tuple[int, bytes]]] = {}
        for i, b in enumerate(table):
            if b:
                index.setdefault(b[0], []).append((i, b))
        cached = _INDEX[id(table)] = (table, index)
    return cached[1]


def _spell_one_of(targets: list[str], table: list[bytes], specials: set[int]):
    """A logits processor under which the first generated bytes spell one of `targets` (then free)."""
    wanted = [t.encode("utf-8") for t in targets]
    index = _by_first_byte(table)

    def processor(produced: list[int], row: torch.Tensor) -> torch.Tensor:
        done = b"".join(table[t] for t in produced)
        if any(done.startswith(w) for w in wanted):
            return row
        nexts = {w[len(done)] for w in wanted if w.startswith(done) and len(w) > len(done)}
        ok = [i for byte in nexts for i, b in index.get(byte, ()) if i < row.shape[0] and i not in specials
              and any(w.startswith(done + b) for w in wanted)]
        keep = torch.full_like(row, float("-inf"))
        keep[ok] = row[ok]
        return keep
    return processor


def engine_request(plan: ChatPlan, req: ChatCompletionRequest, max_tokens: int, causal: bool,
                   extra: Callable | None = None) -> Request:
    sampling = SamplingConfig(temperature=req.temperature, top_p=req.top_p, max_new_tokens=max_tokens,
                              seed=req.seed)
    processor = _compose(plan.processor, extra)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    make = Request.causal if causal else Request.chat
    return make(plan.prompt, sampling, stop_ids=tuple(plan.stop_ids), logprobs=logprobs, logits_processor=processor,
                ignore_stop=req.ignore_eos)


def _compose(a, b):
    if a is None or b is None:
        return a or b
    return lambda produced, row: b(produced, a(produced, row))


# ---------------------------------------------------------------------------------------- outputs

class StopText:
    """Cuts streamed text at the first of `stops`; holds back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.hit = [s for s in stops if s], "", False

    def push(self, text: str) -> str:
        s = self.held + text
        hits = [i for i in (s.find(x) for x in self.stops) if i >= 0]
        if hits:
            self.hit, self.held = True, ""
            return s[:min(hits)]
        keep = max((k for x in self.stops for k in range(1, len(x)) if s.endswith(x[:k])), default=0)
        self.held = s[len(s) - keep:]
        return s[:len(s) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class Choice:
    """One choice's parser and everything it has sent."""
    index: int
    parser: object
    stop: StopText
    parallel: bool
    tok: object
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, dict] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None
    tokens: int = 0
    finish: str | None = None

    def feed(self, o: Output) -> list[dict]:
        """One engine output -> the deltas to send (the finish reason is set on the last)."""
        if self.finish is not None:
            return []
        out: list[dict] = []
        if o.token is not None:
            self.tokens += 1
            if self.logprobs is not None and o.logprob is not None:
                self.logprobs.append(self._logprob(o))
            out += self._deltas(self.parser.feed(o.token))
        if o.finished and self.finish is None:
            out += self._deltas(self.parser.finish("length" if o.finished == "length" else "stop"))
            out += self._flush()
            self.finish = self.parser.finish_reason
        return out

    def _deltas(self, deltas) -> list[dict]:
        out = []
        for d in deltas:
            if self.finish is not None:
                break
            if d.content is not None and d.tool_call is None:
                text = self.stop.push(d.content)
                if text:
                    self.content.append(text)
                    out.append({"content": text})
                if self.stop.hit:
                    self.finish = "stop"
                continue
            out += self._flush()
            if d.tool_call is not None:
                tc = d.tool_call
                if tc.index >= 1 and not self.parallel:
                    self.finish = "tool_calls"
                    break
                call = self.calls.setdefault(tc.index, {"id": tc.id, "name": tc.name, "arguments": ""})
                call["arguments"] += tc.arguments
                out.append({"tool_calls": [tc.to_dict()]})
            else:
                self.reasoning.append(d.reasoning_content)
                out.append({"reasoning_content": d.reasoning_content})
        return out

    def _flush(self) -> list[dict]:
        text = self.stop.flush()
        if text:
            self.content.append(text)
            return [{"content": text}]
        return []

    def _logprob(self, o: Output) -> TokenLogprob:
        def entry(i: int, lp: float) -> dict:
            b = self.tok.token_bytes(i)
            return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}
        top = [TopLogprob(**entry(i, lp)) for i, lp in (o.top_logprobs or [])]
        return TokenLogprob(**entry(o.token, o.logprob), top_logprobs=top)

    def message(self) -> ChatMessage:
        calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
                 for _, c in sorted(self.calls.items())]
        return ChatMessage(content="".join(self.content) or (None if calls else ""),
                           reasoning_content="".join(self.reasoning) or None, tool_calls=calls or None)


def choices_for(plan: ChatPlan, req: ChatCompletionRequest, fmt: str, tok, n: int) -> list[Choice]:
    out = []
    for i in range(n):
        parser = make_parser(fmt, tok, plan.parse_tools, forced_tool=plan.forced_tool)
        for t in plan.prefill:
            parser.feed(t)                        # the prefilled call opening: no delta of its own
        out.append(Choice(i, parser, StopText(req.stop_list()), req.parallel_tool_calls, tok,
                          logprobs=[] if req.logprobs else None))
    return out


def usage(prompt_tokens: int, choices: list[Choice]) -> Usage:
    done = sum(c.tokens for c in choices)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done)


def completion(cid: str, created: int, model: str, prompt_tokens: int, choices: list[Choice]) -> ChatCompletion:
    return ChatCompletion(id=cid, created=created, model=model, usage=usage(prompt_tokens, choices), choices=[
        ChatChoice(index=c.index, message=c.message(), finish_reason=c.finish,
                   logprobs=ChoiceLogprobs(content=c.logprobs) if c.logprobs is not None else None)
        for c in choices])


async def chunks(cid: str, created: int, model: str, prompt_tokens: int, choices: list[Choice],
                 outputs: AsyncIterator[tuple[int, Output | None]], include_usage: bool) -> AsyncIterator[str]:
    """The SSE events of a streamed chat completion; `outputs` yields (choice index, output), or
    (-1, None) when nothing came for a while (a keep-alive comment is sent)."""
    def event(choice: ChunkChoice | None, use: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=cid, created=created, model=model, choices=[choice] if choice else [],
                                    usage=use)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    for c in choices:
        yield event(ChunkChoice(index=c.index, delta={"role": "assistant", "content": ""}))
    sent_lp = [0] * len(choices)
    async for i, o in outputs:
        if o is None:
            yield ": keep-alive\n\n"
            continue
        c = choices[i]
        was_done = c.finish is not None
        for d in c.feed(o):
            lp = None
            if c.logprobs is not None and len(c.logprobs) > sent_lp[i]:
                lp, sent_lp[i] = ChoiceLogprobs(content=c.logprobs[sent_lp[i]:]), len(c.logprobs)
            yield event(ChunkChoice(index=i, delta=d, logprobs=lp))
        if c.finish is not None and not was_done:
            lp = None
            if c.logprobs is not None and len(c.logprobs) > sent_lp[i]:
                lp = ChoiceLogprobs(content=c.logprobs[sent_lp[i]:])
            yield event(ChunkChoice(index=i, delta={}, finish_reason=c.finish, logprobs=lp))
        if all(c.finish is not None for c in choices):
            break
    if include_usage:
        yield event(None, usage(prompt_tokens, choices))
    yield "data: [DONE]\n\n"
