"""The inference engine: token ids in, token ids out, with continuous batching and prefix reuse.

    engine = Engine(model, tokenizer, max_batch=16, max_len=2048)
    rid = engine.add(Request.causal(ids, SamplingConfig(max_new_tokens=32)))
    while engine.has_work():
        for out in engine.step(): ...          # Output: a token (with its text delta), a blank's end, a finish
    engine.cancel(rid)                         # any time, from any thread; its row is freed at the next step

One call of `step` is one scheduling round (vLLM's scheduler + runner, kept small):
1. admit waiting requests into free KV rows (a row per request, `glmkit.model.kv_cache.KVCache`), reusing
   the longest cached prefix any row holds (see "Prefix reuse");
2. feed every running request its pending tokens: requests with one pending token (decoding) go through
   one batched forward; a request with several (its prompt, or tokens forced by a hook) is fed in
   chunks of at most `prefill_chunk` tokens, one chunk per request per step, so a long prompt never
   stalls the others' decoding (a Part A longer than a chunk is fed in one step, chunk by chunk and
   layer by layer: `glmkit.infer.runner.prefill_bidirectional`); activation memory is bounded by the
   chunk, not the prompt;
3. sample the next token of each request whose pending tokens are all fed, and move its state on.
Requests join at any step and leave as they finish; when every row is taken, new requests wait.

A request (`Request`) is a GLM row: `prompt` token ids whose first `sep` tokens are Part A (bidirectional),
and the blanks to fill (`blanks`: indices of [MASK] / [sMASK] / [gMASK] tokens in Part A, filled left to
right, DESIGN.md §3): blank j is decoded as `<sop>` at (blanks[j], 1), then each token at (blanks[j],
k + 1), until `<eop>` (or end-of-text for a [gMASK]), a stop id, a stop string or `max_new_tokens`.
Prompt tokens after `sep` are the start of blank 0's fill (they begin with `<sop>`): a chat prompt
`[gMASK]<sop><|user|>...` is `Request.chat`, Part A = `[gMASK]`. With no blanks and sep = 0 the request is
plain causal text (CLM-trained models), token i at position (i, 0). Every token fed stays in the row, so
later blanks see earlier fills.

The forced-token hook (`Request.forced`) is called with the tokens of the current blank after each
sampled token (a stop token included) and may return tokens to append: they are fed as if sampled
(`Output.forced`), and a stop token followed by forced tokens does not stop. It runs inside `step`, so
it must be quick (a tool's output computed elsewhere, a forced name), never a tool call itself.

Prefix reuse. Each row remembers the (token, position, block position) triples it holds and its Part A
length. A new request takes over the row with the longest common prefix (a finished request's row stays
cached until it is needed: least recently used first), or copies that prefix out of a running request's
row, and feeds only the rest; the prefix must cover its whole Part A (Part A's keys depend on all of Part
A). A chat's next turn therefore costs only its new tokens, and requests sharing a system prompt share
its computation.

Greedy output is the same alone or in any batch (up to float rounding of batched matmuls); a seeded
sampled request too (one generator per request). Text (`Output.text`, with a tokenizer) is incremental,
linear in the output, never splits a UTF-8 character, and holds back a possible stop-string start, so the
streamed text equals the final text (`glmkit.infer.detok`).
"""

from __future__ import annotations

import itertools
import queue
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from glmkit.errors import GlmkitError
from glmkit.infer.detok import TextStream, TokenBytes
from glmkit.infer.runner import decode_static, forward_rows, prefill_bidirectional
from glmkit.infer.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    logprobs_of,
    make_generator,
    top_k_filter,
    top_p_filter,
)
from glmkit.model.kv_cache import KVCache

FINISH_REASONS = ("stop", "length", "stop_string", "cancelled")
_SHIFT = 21          # a row key packs (token, position, block position), each < 2**21


@dataclass
class Request:
    """What to decode. Use the constructors `causal`, `infill`, `chat` for the common layouts."""
    prompt: list[int]
    sep: int = 0                                  # Part A = prompt[:sep], bidirectional
    blanks: tuple[int, ...] = ()                  # indices into Part A of the blanks to fill; () = causal text
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int | None = None             # per blank (sampled tokens); None: sampling.max_new_tokens
    stop_ids: tuple[int, ...] = ()                # end the blank (besides <eop>, and end-of-text for [gMASK])
    stop_strings: tuple[str, ...] = ()            # end the blank at the first match (needs a tokenizer)
    ignore_stop: bool = False                     # always decode max_new_tokens (benchmarks)
    logprobs: int | None = None                   # None: none; k >= 0: the sampled token's and the top k
    prompt_logprobs: bool = False                 # log-probability of each prompt token after Part A's first
    forced: Callable[[list[int]], list[int] | None] | None = None
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def causal(cls, prompt: list[int], sampling: SamplingConfig | None = None, **kw) -> Request:
        return cls(list(prompt), 0, (), sampling or SamplingConfig(), **kw)

    @classmethod
    def infill(cls, prompt: list[int], blanks: Iterable[int], sampling: SamplingConfig | None = None, **kw) -> Request:
        return cls(list(prompt), len(prompt), tuple(blanks), sampling or SamplingConfig(), **kw)

    @classmethod
    def chat(cls, prompt: list[int], sampling: SamplingConfig | None = None, **kw) -> Request:
        """A prompt `[gMASK]<sop>...` (the GLM-4 chat layout): Part A is the [gMASK], the rest its fill."""
        return cls(list(prompt), 1, (0,), sampling or SamplingConfig(), **kw)


@dataclass
class Output:
    """One event of one request. `token` None: an end-of-blank (`blank_end`) and/or finish event."""
    request: int
    blank: int
    token: int | None = None
    text: str = ""                                # newly released text of this blank (with a tokenizer)
    forced: bool = False
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    blank_end: str | None = None                  # stop | length | stop_string | cancelled
    stop_id: int | None = None                    # blank_end "stop": the stop token sampled (not fed, not emitted)
    finished: str | None = None                   # the request's finish reason, on its last event
    prompt_logprobs: list[float] | None = None    # on the first event, if asked


@dataclass
class Result:
    """A finished request, assembled from its outputs (`Engine.generate`)."""
    request: int
    tokens: list[list[int]]                       # per blank (causal: one list)
    texts: list[str]
    finish_reason: str
    blank_ends: list[str]
    logprobs: list[list[float]]
    prompt_logprobs: list[float] | None = None


class _Seq:
    """Decode state of one request."""

    def __init__(self, rid: int, req: Request, n_new: int, table: TokenBytes | None, vocab: int, device):
        self.rid, self.req, self.n_new = rid, req, n_new
        self.row: int | None = None
        self.pending: deque = deque()             # (token, pos, bpos, key) to feed, in order
        self.j = 0                                # current blank
        self.n = 0                                # sampled tokens in the current blank
        self.produced: list[int] = []             # tokens of the current blank (sampled and forced)
        self.next_bpos = 1                        # block position of the next token of the current blank
        self.end_after_feed: str | None = None    # the blank ends once pending is fed (cut at max tokens)
        self.cancelled = False
        self.done = False
        self.first = True
        self.gen = make_generator(req.sampling.seed, device) if not req.sampling.greedy else None
        self.seen = None
        if req.sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(req.prompt, dtype=torch.long, device=device)] = True
        self.table = table
        self.text = TextStream(table, req.stop_strings) if table is not None else None
        self.prompt_lp: list[float] | None = [] if req.prompt_logprobs else None
        self._stops: tuple[int, set[int]] | None = None
        self.keys: list[int] | None = None        # the prompt's row keys (Engine._prompt_keys)
        self.plain = req.logits_processor is None and self.seen is None and req.sampling.greedy

    @property
    def causal(self) -> bool:
        return not self.req.blanks

    def position(self, slot: int) -> tuple[int, int]:
        """(position id, block position id) of the next token of the current stream, at `slot`."""
        if self.causal:
            return slot, 0
        return self.req.blanks[self.j], self.next_bpos

    def stops(self, gmask_id: int, eot_id: int, eop_id: int) -> set[int]:
        """The ids that end the current blank (cached per blank)."""
        if self._stops is None or self._stops[0] != self.j:
            s = set() if self.req.ignore_stop else {eop_id, *self.req.stop_ids}
            if not self.req.ignore_stop and (self.causal or self.req.prompt[self.req.blanks[self.j]] == gmask_id):
                s.add(eot_id)
            self._stops = (self.j, s)
        return self._stops[1]


def _key(token: int, pos: int, bpos: int) -> int:
    return (token << (2 * _SHIFT)) | (pos << _SHIFT) | bpos


class Engine:
    """See the module docstring. `tokenizer`: a `GLMTokenizer` (text, stop strings) or any object with the
    special ids (`sop_id eop_id eot_id gmask_id`) for id-only use.

    max_batch: KV rows (running requests at once); max_len: slots per row (default: the model's
    positions, at most 4096); prefill_chunk: most prompt tokens fed per request per step; compile: decode
    steps through a `torch.compile`d whole-pool step with static shapes (an explicit choice; eager reads
    only the filled slots of the running rows); prefix_reuse: False never reuses a cached row
    (benchmarks that repeat the same prompts); kv_dtype: the KV cache's storage dtype, "auto" (the
    model's), "fp32", "bf16", "fp16" or "fp8" (`glmkit.model.kv_cache`)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_len: int | None = None,
                 prefill_chunk: int = 512, compile: bool = False, prefix_reuse: bool = True,
                 kv_dtype: str | torch.dtype = "auto"):
        if max_batch < 1 or prefill_chunk < 1:
            raise GlmkitError(f"max_batch ({max_batch}) and prefill_chunk ({prefill_chunk}) must be >= 1")
        self.model = model.eval()
        self.tok = tokenizer
        c = model.config
        self.limit = c.context_length            # max_position_embeddings, stretched by rope_scaling
        max_len = max_len or min(self.limit, 4096)
        self.device = model.embed_tokens.weight.device
        self.pool = KVCache.for_model(model, max_batch, max_len + (1 if compile else 0), kv_dtype)
        self.max_len = max_len                   # usable slots; with compile the last one is a scratch slot
        self.prefill_chunk = prefill_chunk
        self.prefix_reuse = prefix_reuse
        self.vocab = c.vocab_size
        self.table = TokenBytes(tokenizer) if hasattr(tokenizer, "token_bytes") else None
        mode = "reduce-overhead" if self.device.type == "cuda" else "default"     # CUDA graphs on a GPU
        self.compiled = torch.compile(decode_static, dynamic=False, mode=mode) if compile else None
        R = max_batch
        self.row_seq: list[_Seq | None] = [None] * R
        self.row_keys: list[list[int]] = [[] for _ in range(R)]
        self.row_sep: list[int] = [0] * R
        self.row_used: list[int] = [0] * R
        self.clock = itertools.count(1)
        self.ids = itertools.count()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()      # ("add", seq) / ("cancel", rid): thread-safe
        self.waiting: deque[_Seq] = deque()
        self.running: dict[int, _Seq] = {}
        self.reused_tokens = 0                   # prompt tokens served from cached rows (a counter for tests, metrics)
        self.fed_tokens = 0

    # ------------------------------------------------------------------ public API
    def add(self, req: Request) -> int:
        """Queue a request; returns its id. Raises GlmkitError for a request that cannot run."""
        n_new = req.max_new_tokens if req.max_new_tokens is not None else req.sampling.max_new_tokens
        self._validate(req, n_new)
        rid = next(self.ids)
        self.inbox.put(("add", _Seq(rid, req, n_new, self.table, self.vocab, self.device)))
        return rid

    def cancel(self, rid: int) -> None:
        """Stop a request at the next step (its last output has finished='cancelled'); frees its row."""
        self.inbox.put(("cancel", rid))

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or not self.inbox.empty())

    def step(self) -> list[Output]:
        outs: list[Output] = []
        self._drain_inbox(outs)
        self._admit()
        with torch.inference_mode():
            self._feed_and_sample(outs)
        return outs

    def stream(self, requests: Iterable[Request]) -> Iterator[Output]:
        """Add the requests and yield every output until all are finished (requests added meanwhile by
        others are served too)."""
        for r in requests:
            self.add(r)
        while self.has_work():
            yield from self.step()

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run the requests to completion; results in request order."""
        rids = [self.add(r) for r in requests]
        acc = {rid: Result(rid, [[]], [""], "", [], [[]]) for rid in rids}
        while self.has_work():
            for o in self.step():
                r = acc.get(o.request)
                if r is None:
                    continue
                while len(r.tokens) <= o.blank:
                    r.tokens.append([]), r.texts.append(""), r.logprobs.append([])
                if o.token is not None:
                    r.tokens[o.blank].append(o.token)
                    if o.logprob is not None:
                        r.logprobs[o.blank].append(o.logprob)
                r.texts[o.blank] += o.text
                if o.prompt_logprobs is not None:
                    r.prompt_logprobs = o.prompt_logprobs
                if o.blank_end:
                    r.blank_ends.append(o.blank_end)
                if o.finished:
                    r.finish_reason = o.finished
        return [acc[rid] for rid in rids]

    # ------------------------------------------------------------------ admission
    def _validate(self, req: Request, n_new: int) -> None:
        P = len(req.prompt)
        if P == 0:
            raise GlmkitError("the prompt is empty; give at least one token")
        if not 0 <= req.sep <= P:
            raise GlmkitError(f"sep = {req.sep} must lie in [0, {P}] (the prompt's length)")
        if req.blanks and req.sep == 0:
            raise GlmkitError("blanks need a Part A: set sep to the length of the bidirectional part")
        if any(not 0 <= b < req.sep for b in req.blanks):
            raise GlmkitError(f"blank indices {list(req.blanks)} must lie inside Part A (< sep = {req.sep})")
        if n_new < 0 or (n_new == 0 and not req.prompt_logprobs):
            raise GlmkitError(f"max_new_tokens must be >= 1, got {n_new}")
        if req.stop_strings and self.table is None:
            raise GlmkitError("stop strings need a tokenizer: pass a GLMTokenizer to the Engine")
        if any(not 0 <= t < self.vocab for t in req.prompt):
            raise GlmkitError(f"the prompt holds token ids outside the vocabulary [0, {self.vocab})")
        top = P + n_new if not req.blanks else max(P, req.sep + 1 + n_new)
        if top > self.limit:
            raise GlmkitError(f"the prompt is {P} tokens and up to {n_new} new tokens are asked for, but the "
                              f"model reads at most {self.limit} positions ({self._context_why()}); shorten "
                              f"the prompt or lower max_new_tokens to {max(1, self.limit - P - 1)}")
        need = P + (1 if req.blanks and P == req.sep else 0)
        if need > self.max_len:
            raise GlmkitError(f"the prompt is {P} tokens but a KV-cache row holds {self.max_len}; shorten the "
                              f"prompt or build the engine with max_len >= {need + n_new} (`--max-len` on the command line)")

    def _context_why(self) -> str:
        c = self.model.config
        if c.rope_scaling is None:
            return "max_position_embeddings"
        return f"max_position_embeddings = {c.max_position_embeddings} with {c.rope_scaling['rope_type']} RoPE scaling"

    def _drain_inbox(self, outs: list[Output]) -> None:
        while not self.inbox.empty():
            kind, x = self.inbox.get()
            if kind == "add":
                self.waiting.append(x)
                continue
            seq = self.running.get(x) or next((s for s in self.waiting if s.rid == x), None)
            if seq is not None and not seq.done:
                self._finish(seq, "cancelled", outs)

    def _admit(self) -> None:
        while self.waiting:
            seq = self.waiting[0]
            row, reuse = self._place(seq)
            if row is None:
                return
            self.waiting.popleft()
            self._start(seq, row, reuse)

    def _place(self, seq: _Seq) -> tuple[int | None, int]:
        """A row for seq and how many of its prompt slots that row already holds (or will, after a copy)."""
        keys = self._prompt_keys(seq)
        sep = seq.req.sep
        best, best_len = None, 0
        for r in range(self.pool.rows if self.prefix_reuse else 0):
            rk = self.row_keys[r]
            if not rk or self.row_sep[r] != sep or rk[0] != keys[0]:
                continue
            n = _common(rk, keys)
            if n > best_len:
                best, best_len = r, n
        usable = min(best_len, len(keys) - 1)
        if seq.req.prompt_logprobs:
            usable = min(usable, sep)
        if usable < sep or usable <= 0:
            best, usable = None, 0
        if best is not None and self.row_seq[best] is None:      # a cached row: take it over
            return best, usable
        free = self._free_row(avoid=best)
        if free is None:
            return None, 0
        if best is not None:                                       # shared with a running request: copy
            self.pool.copy_prefix(best, free, usable)
            self.row_keys[free] = self.row_keys[best][:usable]
            self.row_sep[free] = sep
            return free, usable
        return free, 0

    def _free_row(self, avoid: int | None) -> int | None:
        empty = [r for r in range(self.pool.rows) if self.row_seq[r] is None and not self.row_keys[r]]
        if empty:
            return empty[0]
        cached = [r for r in range(self.pool.rows) if self.row_seq[r] is None and r != avoid]
        if not cached:
            return None
        r = min(cached, key=lambda r: self.row_used[r])           # least recently used
        self.row_keys[r] = []
        self.pool.lengths[r] = 0
        return r

    def _prompt_keys(self, seq: _Seq) -> list[int]:
        """The row keys of seq's prompt (computed once: a waiting request is placed at every step)."""
        if seq.keys is not None:
            return seq.keys
        req = seq.req
        out = []
        for i, t in enumerate(req.prompt):
            if i < req.sep or not req.blanks:
                out.append(_key(t, i, 0))
            else:
                out.append(_key(t, req.blanks[0], i - req.sep + 1))
        seq.keys = out
        return out

    def _start(self, seq: _Seq, row: int, reuse: int) -> None:
        req = seq.req
        seq.row = row
        self.row_seq[row] = seq
        self.row_sep[row] = req.sep
        self.row_keys[row] = self.row_keys[row][:reuse]
        self.pool.lengths[row] = reuse
        self.reused_tokens += reuse
        for i, k in enumerate(self._prompt_keys(seq)):
            if i >= reuse:
                pos, bpos = (k >> _SHIFT) & ((1 << _SHIFT) - 1), k & ((1 << _SHIFT) - 1)
                seq.pending.append((req.prompt[i], pos, bpos, k))
        if req.blanks:
            tail = len(req.prompt) - req.sep
            seq.next_bpos = tail + 1 if tail else 1
            if not tail:                                            # decoding starts with <sop> at blank 0
                seq.pending.append(self._token(seq, self.tok.sop_id, len(req.prompt)))
        self.running[seq.rid] = seq

    # ------------------------------------------------------------------ one round
    def _feed_and_sample(self, outs: list[Output]) -> None:
        if not self.running:
            return
        decode = [s for s in self.running.values() if len(s.pending) == 1]
        chunked = [s for s in self.running.values() if len(s.pending) > 1]
        seqs: list[_Seq] = []
        logits: list[torch.Tensor] = []
        if decode:
            self._pack_front([s.row for s in decode])
            decode.sort(key=lambda s: s.row)
            seqs += decode
            logits.append(self._decode(decode))                     # (B, V)
        for s in chunked:
            lg = self._feed_chunk(s)
            if lg is not None:
                seqs.append(s)
                logits.append(lg[None])
        if seqs:
            self._sample(seqs, logits[0] if len(logits) == 1 else torch.cat(logits), outs)

    def _pack_front(self, rows: list[int]) -> None:
        """Move the given rows' contents to rows 0 .. n-1 (one forward then reads a view of the pool)."""
        if max(rows) < len(rows):                                    # already rows 0 .. n-1
            return
        want = set(range(len(rows)))
        misplaced = sorted(r for r in rows if r not in want)
        holes = sorted(want - set(rows))
        for src, dst in zip(misplaced, holes):
            self.pool.swap(src, dst)
            for lst in (self.row_seq, self.row_keys, self.row_sep, self.row_used):
                lst[src], lst[dst] = lst[dst], lst[src]
            for r in (src, dst):
                if self.row_seq[r] is not None:
                    self.row_seq[r].row = r

    def _take(self, seq: _Seq, n: int):
        """Pop n pending tokens of seq and record them as the row's next slots."""
        row = seq.row
        start = self.pool.lengths[row]
        items = [seq.pending.popleft() for _ in range(n)]
        self.row_keys[row].extend(k for *_, k in items)
        self.pool.lengths[row] = start + n
        self.fed_tokens += n
        slots = list(range(start, start + n))
        return [t for t, *_ in items], [p for _, p, _, _ in items], [b for _, _, b, _ in items], slots

    def _decode(self, seqs: list[_Seq]) -> torch.Tensor:
        cols = [self._take(s, 1) for s in seqs]
        ids, pos, bpos, slots = ([c[i] for c in cols] for i in range(4))
        sep = [s.req.sep for s in seqs]
        if self.compiled is not None:
            return self._decode_compiled(seqs, ids, pos, bpos, slots, sep)
        h = forward_rows(self.model, self.pool, 0, ids, pos, bpos, slots, sep)
        return self.model.logits(h[:, -1])

    def _decode_compiled(self, seqs, ids, pos, bpos, slots, sep) -> torch.Tensor:
        """Every pool row in one static-shape step; rows not decoding write a scratch slot and are ignored."""
        R, scratch = self.pool.rows, self.pool.max_len - 1
        full = lambda x, fill: [x[i] if i < len(seqs) else [fill] for i in range(R)]
        t = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)
        sep_all = [sep[i] if i < len(seqs) else 0 for i in range(R)]
        h = self.compiled(self.model, self.pool, t(full(ids, 0)), t(full(pos, 0)), t(full(bpos, 0)),
                          t(full(slots, scratch)), t(sep_all))
        return self.model.logits(h[:len(seqs), -1])

    def _feed_chunk(self, seq: _Seq) -> torch.Tensor | None:
        """Feed up to prefill_chunk pending tokens; logits when pending is empty. Part A is fed whole in
        one step: in one forward when it fits a chunk, else chunk by chunk, layer by layer
        (`prefill_bidirectional`)."""
        row = seq.row
        start = self.pool.lengths[row]
        sep = seq.req.sep
        if start == 0 and sep > self.prefill_chunk:                # reuse covers all of Part A or none of it
            ids, pos, bpos, _ = self._take(seq, sep - start)
            h = prefill_bidirectional(self.model, self.pool, row, ids, pos, bpos, self.prefill_chunk)
            return self.model.logits(h[-1]) if not seq.pending else None
        n = min(len(seq.pending), max(self.prefill_chunk, sep - start))
        ids, pos, bpos, slots = self._take(seq, n)
        h = forward_rows(self.model, self.pool, row, [ids], [pos], [bpos], [slots], [seq.req.sep])[0]
        if seq.prompt_lp is not None:
            self._prompt_logprobs(seq, h, ids, slots)
        return self.model.logits(h[-1]) if not seq.pending else None

    def _prompt_logprobs(self, seq: _Seq, h: torch.Tensor, ids: list[int], slots: list[int]) -> None:
        """Log P(prompt token at slot i + 1) from the hidden state at slot i, for slots i >= sep."""
        P, sep = len(seq.req.prompt), seq.req.sep
        idx = [i for i, s in enumerate(slots) if sep <= s < P - 1]
        if idx:
            lp = torch.log_softmax(self.model.logits(h[idx]).float(), -1)
            nxt = torch.tensor([seq.req.prompt[slots[i] + 1] for i in idx], device=lp.device)
            seq.prompt_lp.extend(lp.gather(1, nxt[:, None]).squeeze(1).tolist())

    # ------------------------------------------------------------------ sampling and the state machine
    def _sample(self, seqs: list[_Seq], logits: torch.Tensor, outs: list[Output]) -> None:
        chosen = logits.argmax(dim=-1)
        if all(s.plain for s in seqs) and all(s.req.logprobs is None for s in seqs):   # greedy, nothing else
            for s, x in zip(seqs, chosen.tolist()):
                self._advance(s, x, None, outs)
            return
        logits = logits.float()
        for i, s in enumerate(seqs):
            sp = s.req.sampling
            if s.plain:
                continue
            row = logits[i:i + 1]
            if s.req.logits_processor is not None:
                row = s.req.logits_processor(list(s.produced), row[0])[None]
            if s.seen is not None:
                row = apply_repetition_penalty(row, s.seen[None], sp.repetition_penalty)
            if sp.greedy:
                chosen[i] = row.argmax(dim=-1)[0]
            else:
                row = top_p_filter(top_k_filter(row / sp.temperature, sp.top_k), sp.top_p)
                chosen[i] = torch.multinomial(torch.softmax(row, dim=-1), 1, generator=s.gen)[0, 0]
        want = max((s.req.logprobs for s in seqs if s.req.logprobs is not None), default=None)
        lps = logprobs_of(logits, chosen, want) if want is not None else None
        for i, (s, x) in enumerate(zip(seqs, chosen.tolist())):
            lp = (lps[0][i], lps[1][i][:s.req.logprobs]) if lps is not None and s.req.logprobs is not None else None
            self._advance(s, x, lp, outs)

    def _token(self, seq: _Seq, token: int, slot: int):
        pos, bpos = seq.position(slot)
        if not seq.causal:
            seq.next_bpos += 1
        return token, pos, bpos, _key(token, pos, bpos)

    def _emit(self, seq: _Seq, token: int, outs: list[Output], forced: bool, lp=None) -> None:
        o = Output(seq.rid, seq.j, token, forced=forced)
        if lp is not None:
            o.logprob, o.top_logprobs = lp
        if seq.text is not None:
            o.text = seq.text.push(token)
        if seq.first:
            o.prompt_logprobs, seq.first = seq.prompt_lp, False
        seq.produced.append(token)
        if seq.seen is not None:
            seq.seen[token] = True
        outs.append(o)

    def _advance(self, seq: _Seq, x: int, lp, outs: list[Output]) -> None:
        """seq sampled x: record it, queue it (and any forced tokens), or end the blank / the request."""
        if seq.end_after_feed is not None:                         # the cut blank's last token is now fed
            reason, seq.end_after_feed = seq.end_after_feed, None
            self._end_blank(seq, reason, outs)
            return
        if seq.n_new == 0:                                          # scoring only: no token wanted
            self._end_blank(seq, "length", outs)
            return
        tok = self.tok
        is_stop = x in seq.stops(tok.gmask_id, tok.eot_id, tok.eop_id)
        extra = seq.req.forced(list(seq.produced) + [x]) if seq.req.forced is not None else None
        if is_stop and not extra:
            self._end_blank(seq, "stop", outs, stop_id=x)
            return
        self._emit(seq, x, outs, forced=False, lp=lp)
        slot = self.pool.lengths[seq.row] + len(seq.pending)
        seq.pending.append(self._token(seq, x, slot))
        for t in extra or ():
            self._emit(seq, t, outs, forced=True)
            seq.pending.append(self._token(seq, t, self.pool.lengths[seq.row] + len(seq.pending)))
        seq.n += 1
        if seq.text is not None and seq.text.stopped is not None:
            seq.pending.clear()
            self._end_blank(seq, "stop_string", outs)
            return
        room = self.pool.lengths[seq.row] + len(seq.pending) < self.max_len
        if seq.n >= seq.n_new or not room:
            reason = "length"
            if seq.causal or seq.j + 1 >= len(seq.req.blanks):
                seq.pending.clear()
                self._end_blank(seq, reason, outs)
            else:
                seq.end_after_feed = reason                         # feed the cut fill: later blanks see it

    def _end_blank(self, seq: _Seq, reason: str, outs: list[Output], stop_id: int | None = None) -> None:
        text = seq.text.finish() if seq.text is not None else ""
        last = seq.causal or seq.j + 1 >= len(seq.req.blanks)
        o = Output(seq.rid, seq.j, None, text=text, blank_end=reason, finished=reason if last else None,
                   stop_id=stop_id)
        if seq.first:
            o.prompt_logprobs, seq.first = seq.prompt_lp, False
        outs.append(o)
        if last:
            self._release(seq)
            return
        seq.j += 1
        seq.n, seq.produced, seq.next_bpos = 0, [], 1
        seq.text = TextStream(self.table, seq.req.stop_strings) if self.table is not None else None
        seq.pending.clear()
        seq.pending.append(self._token(seq, self.tok.sop_id, self.pool.lengths[seq.row]))

    def _finish(self, seq: _Seq, reason: str, outs: list[Output]) -> None:
        """End a request from outside its decoding (cancel)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        text = seq.text.finish() if seq.text is not None else ""
        outs.append(Output(seq.rid, seq.j, None, text=text, blank_end=reason, finished=reason))
        self._release(seq)

    def _release(self, seq: _Seq) -> None:
        """The request is over: its row stays cached for prefix reuse (its keys are what it holds)."""
        seq.done = True
        self.running.pop(seq.rid, None)
        if seq.row is not None:
            self.row_seq[seq.row] = None
            self.row_used[seq.row] = next(self.clock)
            seq.row = None


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two key lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n                                 # binary search on prefix equality (list slices compare in C)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
