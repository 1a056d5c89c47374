"""What the incremental parsers share: deltas, UTF-8-safe incremental decoding, the parser base.

A parser takes the ids a model generates after the generation prompt, one at a time (`feed`), and
returns `Delta`s in OpenAI's streaming shape: content text, reasoning text, or a piece of a tool
call. A tool call's first delta carries its `index`, `id`, type and `function.name` (with empty
arguments); later deltas for that index carry argument text only. `finish(reason)` flushes what is
held back and sets `finish_reason`: `tool_calls` when calls were made and generation stopped by
itself, else the reason given (`stop` or `length`). `message()` is everything so far as one
`AssistantMessage`; what the parser could not make sense of (a call cut off, text between tags,
arguments that are not JSON) is listed in its `parse_errors`, never raised.

Text deltas never split a character: ids are turned into bytes (`GLMTokenizer.token_bytes`) and
decoded by an incremental UTF-8 decoder, so a character spread over two tokens appears whole in the
delta of the second.
"""

from __future__ import annotations

import codecs
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from glmkit.chat.messages import AssistantMessage, FunctionCall, ToolCall


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # only in the call's first delta, with name
    name: str | None = None
    arguments: str = ""

    def to_dict(self) -> dict:
        d: dict = {"index": self.index}
        if self.id is not None:
            d["id"] = self.id
            d["type"] = "function"
        fn: dict = {}
        if self.name is not None:
            fn["name"] = self.name
        fn["arguments"] = self.arguments
        d["function"] = fn
        return d


@dataclass
class Delta:
    content: str | None = None
    reasoning_content: str | None = None
    tool_call: ToolCallDelta | None = None

    def to_dict(self) -> dict:
        """The `delta` object of an OpenAI chat.completion.chunk choice."""
        if self.tool_call is not None:
            return {"tool_calls": [self.tool_call.to_dict()]}
        if self.reasoning_content is not None:
            return {"reasoning_content": self.reasoning_content}
        return {"content": self.content}


def new_call_id(index: int) -> str:
    return "call_" + secrets.token_hex(12)


class Utf8Stream:
    """Token ids -> text, never splitting a character across two results."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Bytes of an unfinished character at the end become U+FFFD."""
        return self._decoder.decode(b"", final=True)


class Stripped:
    """Streams a text with its leading and trailing whitespace removed (what `str.strip` would
    give for the whole text): whitespace is held back until something follows it."""

    def __init__(self):
        self.started = False
        self.held = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        full = self.held + text
        core = full.rstrip()
        self.held = full[len(core):]
        return core


@dataclass
class _Call:
    id: str
    name: str
    arguments: str = ""
    closed: bool = False


class ParserBase:
    """Collects the message while subclasses emit deltas through `_content`, `_reasoning`,
    `_start_call`, `_arguments`. Subclasses fill `structural` (id -> token text of the format's
    structure) and implement `_token(text)`, `_text(text)` and `_end(reason)`."""

    def __init__(self, tokenizer, stop: Iterable[int], make_id: Callable[[int], str] = new_call_id):
        self.tokenizer = tokenizer
        self.stop = frozenset(int(i) for i in stop)
        self.make_id = make_id
        self.finish_reason: str | None = None
        self.errors: list[str] = []
        self._utf8 = Utf8Stream(tokenizer)
        self._out: list[Delta] = []
        self._content_parts: list[str] = []
        self._reasoning_parts: list[str] = []
        self._calls: list[_Call] = []
        self.stopped = False
        self.structural: dict[int, str] = {}

    # ------------------------------------------------------------------ public
    def feed(self, token_id: int) -> list[Delta]:
        """One generated id -> the deltas it completes (often none, e.g. inside a held-back name)."""
        if self.stopped:
            return self._take()
        token_id = int(token_id)
        if token_id in self.stop:
            self.stopped = True
            return self._take()
        if token_id in self.structural:
            if text := self._utf8.flush():
                self._text(text)
            self._token(self.structural[token_id])
        elif text := self._utf8.push(token_id):
            self._text(text)
        return self._take()

    def feed_all(self, ids: Iterable[int]) -> list[Delta]:
        out = []
        for i in ids:
            out += self.feed(i)
        return out

    def finish(self, reason: str = "stop") -> list[Delta]:
        """End of generation (`reason`: `stop`, or `length` when cut by the token budget)."""
        if self.finish_reason is None:
            if text := self._utf8.flush():
                self._text(text)
            self._end(reason)
            for i, call in enumerate(self._calls):
                if not call.closed:
                    self.errors.append(f"tool call {i} ({call.name}) was cut off before it ended")
            made = any(c.closed for c in self._calls)
            self.finish_reason = "tool_calls" if reason == "stop" and made else reason
        return self._take()

    def message(self) -> AssistantMessage:
        content = "".join(self._content_parts)
        reasoning = "".join(self._reasoning_parts)
        return AssistantMessage(
            content=content or None,
            tool_calls=[ToolCall(c.id, FunctionCall(c.name, c.arguments)) for c in self._calls],
            reasoning_content=reasoning or None,
            parse_errors=list(self.errors))

    # ------------------------------------------------------------------ for subclasses
    def _token(self, name: str) -> None:
        raise NotImplementedError

    def _text(self, text: str) -> None:
        raise NotImplementedError

    def _end(self, reason: str) -> None:
        pass

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    def _content(self, text: str) -> None:
        if text:
            self._content_parts.append(text)
            self._out.append(Delta(content=text))

    def _reasoning(self, text: str) -> None:
        if text:
            self._reasoning_parts.append(text)
            self._out.append(Delta(reasoning_content=text))

    def _start_call(self, name: str) -> None:
        index = len(self._calls)
        call = _Call(self.make_id(index), name)
        self._calls.append(call)
        self._out.append(Delta(tool_call=ToolCallDelta(index, call.id, name, "")))

    def _arguments(self, text: str) -> None:
        if text:
            call = self._calls[-1]
            call.arguments += text
            self._out.append(Delta(tool_call=ToolCallDelta(len(self._calls) - 1, arguments=text)))

    def _close_call(self) -> None:
        self._calls[-1].closed = True

    @property
    def _open_call(self) -> _Call | None:
        return self._calls[-1] if self._calls and not self._calls[-1].closed else None
