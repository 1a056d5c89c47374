"""A rendered conversation before tokenization: a list of pieces, each a structural token or text,
each owned by one message (DESIGN.md §5).

Renderers build pieces; `render_text` joins them; `render` turns each structural token into its id
explicitly and encodes each run of text between two structural tokens in one call with
`allow_special=False`, so no text from a user, a tool or a document ever becomes a structural
token, and the ids equal what HF's tokenizer gives for the rendered text whenever that text holds
no special-token spelling.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmkit.errors import GlmkitError

PREAMBLE = -1  # owner of `[gMASK]<sop>` and the tools block
PROMPT = -2  # owner of the generation prompt and of a token appended to close the last turn


@dataclass(frozen=True)
class Piece:
    text: str
    special: bool  # a structural token, spelled `text`
    owner: int  # index of the message it renders, or PREAMBLE / PROMPT
    assistant: bool  # the owner is an assistant message (its tokens are what fine-tuning learns)


class Pieces:
    """Append-only builder: `tok(...)` for structural tokens, `text(...)` for text."""

    def __init__(self):
        self.items: list[Piece] = []
        self.owner = PREAMBLE
        self.assistant = False

    def at(self, owner: int, assistant: bool = False) -> Pieces:
        self.owner, self.assistant = owner, assistant
        return self

    def tok(self, *names: str) -> None:
        for name in names:
            self.items.append(Piece(name, True, self.owner, self.assistant))

    def text(self, text: str) -> None:
        if text:
            self.items.append(Piece(text, False, self.owner, self.assistant))


@dataclass
class Rendered:
    """Token ids of a conversation, and what fine-tuning learns from them.

    labels[i] is ids[i] where the loss covers token i, else -100 (the convention of HF and of
    GLM-4's fine-tuning code): token i is learned when token i-1 belongs to an assistant message,
    which covers the assistant's own tokens after its opening role token (metadata or call line,
    reasoning, content) plus the one token that ends its turn, and never system, user or tool text.
    spans[m] = (start, end): the ids of message m, its opening role token first (an empty span for
    a message the format does not render, e.g. GLM-4's empty contents).
    """
    ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int]]

    @property
    def loss_mask(self) -> list[bool]:
        return [label != -100 for label in self.labels]


def join(pieces: list[Piece]) -> str:
    return "".join(p.text for p in pieces)


def tokenize(pieces: list[Piece], tokenizer, n_messages: int) -> Rendered:
    ids: list[int] = []
    assistant_token: list[bool] = []  # per id: owned by an assistant message
    spans: list[list[int]] = [[-1, -1] for _ in range(n_messages)]
    preamble_end = 0
    i = 0
    while i < len(pieces):
        p = pieces[i]
        if p.special:
            tid = tokenizer.special_id(p.text)
            if tid is None:
                raise GlmkitError(f"the tokenizer has no special token {p.text}; the chat format needs it")
            new = [tid]
            i += 1
        else:  # one run of text up to the next structural token (always one owner: checked below)
            j = i
            while j < len(pieces) and not pieces[j].special:
                if pieces[j].owner != p.owner:
                    raise AssertionError("a text run spans two messages")  # a renderer bug
                j += 1
            new = tokenizer.encode("".join(q.text for q in pieces[i:j]), allow_special=False)
            i = j
        if p.owner >= 0:
            span = spans[p.owner]
            span[0] = len(ids) if span[0] < 0 else span[0]
            span[1] = len(ids) + len(new)
        ids += new
        if p.owner == PREAMBLE:
            preamble_end = len(ids)
        assistant_token += [p.assistant] * len(new)
    labels = [-100] + [t if assistant_token[k] else -100 for k, t in enumerate(ids[1:])]
    out_spans: list[tuple[int, int]] = []
    for m, (s, e) in enumerate(spans):  # an unrendered message: an empty span where it would sit
        if s < 0:
            s = e = out_spans[m - 1][1] if m else preamble_end
        out_spans.append((s, e))
    return Rendered(ids, labels, out_spans)
