"""Incremental detokenization: token ids in, stable text out, in time linear in the output.

`TokenBytes(tokenizer)` is a table from token id to the bytes it stands for, built once per engine from
`GLMTokenizer.token_bytes` (byte-level tokens through the GPT-2 byte alphabet, special and added tokens
as their text, any other vocabulary one token decoded alone).

`TextStream(table, stop_strings)` turns ids pushed one at a time into text deltas:
- bytes pass through an incremental UTF-8 decoder, so a character split over tokens is released only
  when complete (never a replacement character from a split sequence);
- text that could be the start of a stop string is held back until it is not, so the streamed text
  always equals the final text;
- `push` reports a stop string found in the text (the text is cut before it); `finish` releases what
  was held back; bytes of a character still incomplete at the end are dropped, not shown as U+FFFD.
Each push costs O(len(token text) + longest stop string), whatever the length of the text so far.
"""

from __future__ import annotations

import codecs

from glmkit.errors import GlmkitError


class TokenBytes:
    """id -> bytes for every token of a `GLMTokenizer`, as one list (`table`) built once from
    `GLMTokenizer.token_bytes`; ids outside the vocabulary (a model's padded rows) stand for no bytes."""

    def __init__(self, tokenizer):
        def raw(i: int) -> bytes:
            try:
                return tokenizer.token_bytes(i)
            except GlmkitError:          # a gap in the vocabulary's ids
                return b""
        self.table = [raw(i) for i in range(tokenizer.vocab_size)]

    def __getitem__(self, token: int) -> bytes:
        return self.table[token] if 0 <= token < len(self.table) else b""


class TextStream:
    """Text of one stream of ids (one blank or one continuation). See the module docstring."""

    def __init__(self, table: TokenBytes, stop_strings: tuple[str, ...] = ()):
        self.table = table
        self.stops = tuple(s for s in stop_strings if s)
        self.hold = max((len(s) for s in self.stops), default=0)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""          # decoded but not yet released (may start a stop string)
        self.text = ""              # released so far
        self.stopped: str | None = None

    def push(self, token: int) -> str:
        """Add one token; return the newly released text ('' while held back or after a stop)."""
        if self.stopped is not None:
            return ""
        self._pending += self._utf8.decode(self.table[token])
        if self.stops:
            hits = [(i, s) for s in self.stops if (i := self._pending.find(s)) >= 0]
            if hits:
                i, s = min(hits)
                self.stopped = s
                return self._release(self._pending[:i])
        keep = self._held_back()
        out = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(out):]
        return self._release(out)

    def finish(self) -> str:
        """End of the stream: release the held-back text (an incomplete character is dropped)."""
        if self.stopped is not None:
            return ""
        out, self._pending = self._pending, ""
        self._utf8.reset()
        return self._release(out)

    def _held_back(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop string."""
        p = self._pending
        for n in range(min(self.hold - 1, len(p)), 0, -1):
            tail = p[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _release(self, text: str) -> str:
        self._pending = "" if self.stopped is not None else self._pending
        self.text += text
        return text
