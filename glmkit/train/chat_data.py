"""Chat data for fine-tuning: JSONL conversations -> rendered ids with the assistant's labels -> packed `Batch`es.

    examples = load_chat_jsonl("train.jsonl", "glm45", tokenizer, max_len=1024)
    it = ChatBatchIterator(examples, batch_size=8, seq_len=1024, layout="chat", pad_id=tok.pad_id, seed=0)
    next(it)   # a numpy Batch, as `glmkit.data.batches.BatchIterator` gives, for the same trainer

A line is `{"messages": [...], "tools": [...]}` (OpenAI shape, validated by `glmkit.chat.messages`;
other keys are ignored). It is rendered with the format's renderer without a generation prompt and
with the last assistant turn closed (`render(..., close_last_turn=True)`), and the loss covers what
the renderer labels: the assistant's content, its tool calls and the token that ends its turn, never
system, user or tool text (`glmkit.chat.render`). Token i of a conversation predicts token i + 1, so
position i is a loss position when label i + 1 is set.

Layout of one conversation of n tokens at columns c..c+n-1 of a row (the engine's, so training and
inference agree on positions):
- `chat` (GLM-trained models; `Request.chat`): Part A is the leading `[gMASK]`, the rest its fill:
  sep = c + 1, position ids 0, block position ids 0, 1, ..., n-1;
- `causal` (CLM-trained and converted HF models; `Request.causal`): sep = c, position ids 0..n-1,
  block position ids 0.
Each conversation is its own segment (segment id = its index in the row, span id the same), so no
conversation ever attends to another; the rest of a row is padding (segment -1, sep = T, pad id).

Packing: conversations are taken in the stream's order and placed next-fit (a row takes conversations
while the next one fits, then the next row starts), so a batch is a pure function of where the stream
stands. Each epoch shuffles the conversations by (seed, epoch) and gives rank r every world_size-th.
`state_dict()` is (epoch, cursor); a resumed iterator yields the same batches bit for bit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from glmkit.batch import Batch
from glmkit.errors import GlmkitError

LAYOUTS = ("chat", "causal")


def render_conversation(row: dict, fmt: str, tokenizer, where: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
    """(ids, loss) of one conversation: int64 ids and a bool per position, True where position i's
    prediction (token i + 1) is the assistant's."""
    from glmkit.chat.messages import messages_from_dicts, tools_from_dicts
    from glmkit.chat.render import render

    if not isinstance(row, dict) or "messages" not in row:
        raise GlmkitError(f'{where}: not a conversation; each line is {{"messages": [...], "tools": [...]}}')
    messages = messages_from_dicts(row["messages"], where=f"{where}: messages")
    tools = tools_from_dicts(row.get("tools") or [], where=f"{where}: tools")
    if not any(m.role == "assistant" for m in messages):
        raise GlmkitError(f"{where}: has no assistant message, so nothing to learn from; drop it")
    r = render(messages, tools, fmt, tokenizer=tokenizer, add_generation_prompt=False, close_last_turn=True)
    ids = np.asarray(r.ids, dtype=np.int64)
    labels = np.asarray(r.labels, dtype=np.int64)
    loss = np.zeros(len(ids), dtype=bool)
    loss[:-1] = labels[1:] != -100
    return ids, loss


def load_chat_jsonl(path: str | Path, fmt: str, tokenizer, max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every conversation of a JSONL file, rendered (`render_conversation`). A conversation longer than
    `max_len` tokens is an error naming its line (it would have to be cut mid-turn)."""
    path = Path(path)
    if not path.is_file():
        raise GlmkitError(f"chat data {path} does not exist; give a JSONL file of conversations")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GlmkitError(f"{where}: not JSON ({e}); each line is one conversation object") from None
        ids, loss = render_conversation(row, fmt, tokenizer, where)
        if len(ids) > max_len:
            raise GlmkitError(f"{where}: the conversation renders to {len(ids)} tokens, more than --seq-len "
                              f"{max_len}; raise --seq-len or shorten it")
        out.append((ids, loss))
    if not out:
        raise GlmkitError(f"chat data {path} holds no conversation")
    return out


def data_hash(examples: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """A digest of the rendered conversations (ids and loss positions): a resumed run must see the same."""
    h = hashlib.sha256()
    for ids, loss in examples:
        h.update(ids.tobytes())
        h.update(np.packbits(loss).tobytes())
        h.update(len(ids).to_bytes(8, "little"))
    return h.hexdigest()[:16]


def pack_rows(examples: list[tuple[np.ndarray, np.ndarray]], rows: int, seq_len: int, layout: str,
              pad_id: int, weights: list[float] | None = None) -> tuple[Batch, int]:
    """Place conversations next-fit into `rows` rows of `seq_len`; (the batch, how many were placed).
    `weights` (one per conversation): the batch's `loss_weight`, each conversation's weight on its loss
    positions (policy-gradient advantages); None: no weights (the plain mean)."""
    if layout not in LAYOUTS:
        raise GlmkitError(f"unknown chat layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    shape = (rows, seq_len)
    ids = np.full(shape, pad_id, dtype=np.int64)
    targets = np.zeros(shape, dtype=np.int64)
    loss_mask = np.zeros(shape, dtype=bool)
    pos, bpos = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    segment = np.full(shape, -1, dtype=np.int64)
    sep = np.full(shape, seq_len, dtype=np.int64)
    weight = None if weights is None else np.zeros(shape, dtype=np.float32)
    row, col, seg, placed = 0, 0, 0, 0
    for k, (conv, loss) in enumerate(examples):
        n = len(conv)
        if n > seq_len:
            raise GlmkitError(f"a conversation of {n} tokens does not fit a row of {seq_len}")
        if col + n > seq_len:
            row, col, seg = row + 1, 0, 0
            if row == rows:
                break
        at = slice(col, col + n)
        ids[row, at] = conv
        targets[row, col:col + n - 1] = conv[1:]
        loss_mask[row, at] = loss
        if weight is not None:
            weight[row, at] = np.where(loss, np.float32(weights[k]), np.float32(0))
        segment[row, at] = seg
        if layout == "chat":
            sep[row, at] = col + 1
            bpos[row, at] = np.arange(n)
        else:
            sep[row, at] = col
            pos[row, at] = np.arange(n)
        col, seg, placed = col + n, seg + 1, placed + 1
    batch = Batch(input_ids=ids, targets=targets, loss_mask=loss_mask, position_ids=pos, block_position_ids=bpos,
                  segment_ids=segment, sep=sep, span_ids=segment.copy(), loss_weight=weight)
    return batch, placed


class ChatBatchIterator:
    """Yields numpy `Batch`es of `batch_size` x `seq_len` forever; see the module docstring."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], batch_size: int, seq_len: int, layout: str,
                 pad_id: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1:
            raise GlmkitError(f"batch_size={batch_size} and seq_len={seq_len} must both be >= 1")
        if not 0 <= rank < world_size:
            raise GlmkitError(f"rank={rank} is outside world_size={world_size}; use 0 <= rank < world_size")
        if len(examples) < world_size:
            raise GlmkitError(f"{len(examples)} conversations cannot feed {world_size} data shards; "
                              "give more conversations or use fewer shards")
        if layout not in LAYOUTS:
            raise GlmkitError(f"unknown chat layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        too_long = [len(ids) for ids, _ in examples if len(ids) > seq_len]
        if too_long:
            raise GlmkitError(f"{len(too_long)} conversations are longer than seq_len {seq_len} (the longest "
                              f"{max(too_long)} tokens); raise --seq-len")
        self.examples, self.batch_size, self.seq_len, self.layout, self.pad_id = \
            examples, batch_size, seq_len, layout, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order: dict[int, np.ndarray] = {}
        self._hash = data_hash(examples)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._order:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._order = {epoch: order[self.rank::self.world_size]}
        return self._order[epoch]

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        # the next conversations of the stream, across epochs, enough to fill every row
        window, epoch, cursor, need = [], self.epoch, self.cursor, self.batch_size * self.seq_len
        total = 0
        while total < need + self.seq_len:
            order = self._epoch_order(epoch)
            if cursor >= len(order):
                epoch, cursor = epoch + 1, 0
                continue
            ex = self.examples[int(order[cursor])]
            window.append((epoch, cursor, ex))
            total += len(ex[0])
            cursor += 1
        batch, placed = pack_rows([w[2] for w in window], self.batch_size, self.seq_len, self.layout, self.pad_id)
        last_epoch, last_cursor, _ = window[placed - 1]
        self.epoch, self.cursor = last_epoch, last_cursor + 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "fingerprint": self._fingerprint()}

    def _fingerprint(self) -> str:
        return f"{self._hash}:{self.batch_size}:{self.seq_len}:{self.layout}"

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "fingerprint"):
            if state.get(key) != mine[key]:
                raise GlmkitError(f"chat data state was saved with {key}={state.get(key)!r}, this iterator has "
                                  f"{mine[key]!r}; resume with the same chat data, format, batch size, sequence "
                                  "length, seed and data shards")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
