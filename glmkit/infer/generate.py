"""Blank infilling and generation (DESIGN.md §3): sampling, blank parsing, the decode engine, the
text API with streaming (the `glmkit infill` / `glmkit generate` verbs are `glmkit.cli.infer`).

    loaded = glmkit.checkpoint.loader.load("runs/glm");  model, tok = loaded.model, loaded.tokenizer
    infill(model, tok, "The quick [MASK] fox [MASK] the dog.")[0].text
    generate(model, tok, ["In the beginning", "北京是"], SamplingConfig(temperature=0.8, top_p=0.9, seed=0))
    for piece in stream(model, tok, "The [MASK] sat on the mat."): print(piece.text, end="")

Layers, bottom up:
- sampling: pure functions on (B, V) logits (greedy, temperature, top-k, top-p, CTRL repetition
  penalty); filtered entries become -inf; draws come from a caller-owned `torch.Generator`, so a seed
  reproduces a run exactly on one device.
- `decode_blanks`: token ids only. Prefills Part A into `glmkit.model.kv_cache`'s static cache and steps every
  row with `decode_one_token`, yielding an `Event` per produced token and per finished blank.
- `stream` / `run_fill` / `infill` / `generate`: text in, text out; the non-streaming functions are the
  streamed pieces joined, so both always agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from glmkit.errors import GlmkitError
from glmkit.model.kv_cache import KVCache, decode_one_token, prefill

# ================================================================================================
# Sampling
# ================================================================================================


@dataclass
class SamplingConfig:
    """How each next token is chosen (the `--help` of `glmkit generate` / `glmkit infill`)."""
    temperature: float = 0.0         # 0 = greedy (argmax); > 0 divides the logits before sampling
    top_k: int = 0                   # keep the k most likely tokens; 0 = all
    top_p: float = 1.0               # keep the smallest set whose probability reaches p; 1 = all
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output (CTRL)
    max_new_tokens: int = 64         # per blank
    seed: int | None = None          # seeds the sampling generator; None = fresh randomness

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise GlmkitError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise GlmkitError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p}")
        if self.top_k < 0:
            raise GlmkitError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise GlmkitError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise GlmkitError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: for tokens already seen (`seen` (B, V) bool), positive logits are divided by
    `penalty` and negative ones multiplied, so the token always becomes less likely."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are all kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                      # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens whose cumulative probability first reaches p
    (the token that crosses p is kept, so at least one token always survives)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs          # mass strictly before each token
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids under `cfg`."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ================================================================================================
# Prompts: where the blanks are
# ================================================================================================

BLANK_HINT = ("put [MASK] where a short blank goes, [sMASK] for a whole sentence, or [gMASK] at the end to "
              "continue the text (or use `glmkit generate`, which adds the [gMASK] for you)")


@dataclass
class Prompt:
    """One row to fill: Part A token ids and the indices of its blanks in it, left to right."""
    ids: list[int]
    blanks: list[int]
    kinds: list[int]        # the blank token at each blank ([MASK], [sMASK] or [gMASK] id)


def parse_prompt(ids: list[int], tok) -> Prompt:
    """Find the blanks ([MASK], [sMASK], [gMASK]) in token ids; `tok` gives the special ids."""
    kinds = (tok.mask_id, tok.smask_id, tok.gmask_id)
    blanks = [i for i, t in enumerate(ids) if t in kinds]
    if not blanks:
        raise GlmkitError(f"the text has no blank to fill: {BLANK_HINT}")
    return Prompt(list(ids), blanks, [ids[i] for i in blanks])


def generation_prompt(ids: list[int], tok) -> Prompt:
    """Generation = a [gMASK] at the end of the prompt (DESIGN.md §3), unless it already has blanks."""
    kinds = (tok.mask_id, tok.smask_id, tok.gmask_id)
    if any(t in kinds for t in ids):
        return parse_prompt(ids, tok)
    return Prompt(list(ids) + [tok.gmask_id], [len(ids)], [tok.gmask_id])


# ================================================================================================
# The decode engine (token ids only): glmkit.model.kv_cache's prefill / decode_one_token, driven here
# ================================================================================================

@dataclass
class Event:
    """What `decode_blanks` yields: a produced `token` of blank `blank` of row `row`, or, with
    token None, the end of that blank."""
    row: int
    blank: int
    token: int | None


@dataclass
class _Row:
    """Decode state of one row."""
    prompt: Prompt
    j: int = 0                                 # current blank
    gen: list = field(default_factory=list)    # tokens of the current blank so far
    feed: tuple = (0, 0, 0)                    # (token, position id, block position id) fed next
    flush: bool = False                        # feeding the last token of a blank cut at max_new_tokens
    done: bool = False


def _pad(prompts: list[Prompt], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Part A of every row right-padded to the longest: ids (B, P) and lengths (B,)."""
    ids = torch.full((len(prompts), max(len(p.ids) for p in prompts)), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p.ids)] = torch.tensor(p.ids)
    return ids.to(device), torch.tensor([len(p.ids) for p in prompts], device=device)


def decode_blanks(model, prompts: list[Prompt], cfg: SamplingConfig, tok, causal: bool = False,
                  stop_ids: tuple[int, ...] = (), ignore_stop: bool = False, step=decode_one_token,
                  cancel: set[tuple[int, int]] | None = None) -> Iterator[Event]:
    """Fill every blank of every prompt, left to right within a row, rows in lock-step (DESIGN.md §3).

    Bidirectional (GLM, default): Part A is prefilled once with full attention; each blank is decoded
    as `<sop>` at (blank position, 1), then each token at (blank position, k+1), until `<eop>` (a
    [gMASK] blank also ends at end-of-text) or `max_new_tokens`. Every fed token stays in the cache,
    so a later blank sees the earlier fills. Causal (CLM-trained or HF GLM-4 chat checkpoints): Part A
    is prefilled causally and one continuation is decoded at positions len(A), len(A)+1, ...

    All rows write the same cache slot each step (a static cache, one `input_pos` per step); row b
    sees its own Part A (slots < len_b) and every decode slot up to now. Yields `Event`s as produced.
    `tok`: anything with the special ids (`sop_id, eop_id, eot_id, gmask_id, pad_id`); `step`: the
    decode step (e.g. a `torch.compile`d `decode_one_token`: any step other than the eager
    `decode_one_token` itself, which reads only the filled cache slots, is called with the static
    whole-cache shapes); `ignore_stop`: always `max_new_tokens`.
    `cancel`: a set the consumer may add `(row, blank)` to while iterating (a multi-token stop string
    matched on the text): that blank ends before the next decode step, with no further events for it.
    """
    device = model.embed_tokens.weight.device
    B, n_new = len(prompts), cfg.max_new_tokens
    steps = n_new if causal else max(len(p.blanks) for p in prompts) * (n_new + 1)
    ids, lens = _pad(prompts, tok.pad_id, device)
    P = ids.shape[1]
    _check_context(model, int(lens.max()), n_new, causal)
    gen = make_generator(cfg.seed, device)
    penalise = cfg.repetition_penalty != 1.0
    end_span = {tok.eop_id} | set(stop_ids)
    end_gmask = end_span | {tok.eot_id}
    rows = [_Row(p) for p in prompts]
    for r in rows:   # causal: the first token comes from the prefill, at the last prompt position
        r.feed = (0, len(r.prompt.ids) - 1, 0) if causal else (tok.sop_id, r.prompt.blanks[0], 1)
    pos = torch.arange(P, device=device).expand(B, P)
    eager = step is decode_one_token     # attends over the filled slots only; a compiled step keeps static shapes
    # Inference mode (no autograd bookkeeping; eager steps measured ~10% faster on the CPU at batch 1) is
    # entered around the computation only, never across a `yield`: the consumer runs in its own mode.
    with torch.inference_mode():
        cache = KVCache.for_model(model, B, P + steps)
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        if penalise:
            seen.scatter_(1, ids, True)
        logits = prefill(model, cache, ids, pos, torch.zeros_like(pos), lens, sep=torch.zeros_like(lens)
                         if causal else None)
    for t in range(steps + 1):
        decode = not causal or t > 0         # causal: the first token comes from the prefill's logits
        if decode:
            if cancel:
                for b, r in enumerate(rows):
                    if not r.done and (b, r.j) in cancel:
                        _end_blank(r, causal, tok)
            if all(r.done for r in rows) or t >= steps:
                break
        with torch.inference_mode():
            if decode:
                feed = torch.tensor([r.feed for r in rows], device=device)          # (B, 3)
                slot = P + t - (1 if causal else 0)
                kw = {"used": slot + 1} if eager else {}
                logits = step(model, cache, feed[:, :1], feed[:, 1:2], feed[:, 2:],
                              torch.tensor([slot], device=device), **kw)
            nxt = sample_next(logits, cfg, gen, seen if penalise else None)
            if penalise:
                seen[torch.arange(B, device=device), nxt] = True
            nxt = nxt.tolist()
        for b, (r, x) in enumerate(zip(rows, nxt)):
            if not r.done:
                stops = () if ignore_stop else (end_gmask if r.prompt.kinds[r.j] == tok.gmask_id else end_span)
                yield from _advance(r, b, x, n_new, causal, stops, tok)


def _advance(r: _Row, b: int, x: int, n_new: int, causal: bool, stops, tok) -> Iterator[Event]:
    """Move row r on after sampling x: record it, or end the blank and start the next with <sop>."""
    if not r.flush and x not in stops:
        r.gen.append(x)
        yield Event(b, r.j, x)
        blank_pos = r.feed[1] + 1 if causal else r.prompt.blanks[r.j]
        r.feed = (x, blank_pos, 0) if causal else (x, blank_pos, len(r.gen) + 1)
        if len(r.gen) < n_new:
            return
        if causal:
            yield Event(b, r.j, None)
            r.done = True
            return
        r.flush = True      # feed this last token too, so later blanks see the whole fill
        yield Event(b, r.j, None)
        return
    if not r.flush:
        yield Event(b, r.j, None)
    _end_blank(r, causal, tok)


def _end_blank(r: _Row, causal: bool, tok) -> None:
    """Row r's current blank is over: start the next with <sop>, or finish the row."""
    r.flush, r.gen = False, []
    r.j += 1
    if causal or r.j >= len(r.prompt.blanks):
        r.done = True
    else:
        r.feed = (tok.sop_id, r.prompt.blanks[r.j], 1)


def _check_context(model, A: int, n_new: int, causal: bool) -> None:
    limit = model.config.max_position_embeddings
    need = A + n_new + (0 if causal else 1)
    if need > limit:
        raise GlmkitError(f"the prompt is {A} tokens and up to {n_new} new tokens are asked for, but the model "
                          f"reads at most {limit} positions (max_position_embeddings); shorten the prompt or "
                          f"lower max_new_tokens to {max(1, limit - A - 1)}")


# ================================================================================================
# Text API: infill / generate, streamed or not
# ================================================================================================

@dataclass
class Filled:
    """One prompt after filling: the whole text with every blank replaced, and each fill."""
    text: str
    fills: list[str]
    fill_ids: list[list[int]]


@dataclass
class Piece:
    """A streamed piece of text: `text` newly produced for blank `blank` of prompt `row`."""
    row: int
    blank: int
    text: str


def encode_prompts(texts: str | list[str], tok, as_generation: bool, causal: bool) -> list[Prompt]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise GlmkitError("no prompt given; pass at least one text")
    out = []
    for t in texts:
        ids = tok.encode(t, allow_special=True)
        if causal:
            if not ids:
                raise GlmkitError("an empty prompt cannot be continued causally; give some text")
            out.append(Prompt(ids, [len(ids)], [tok.gmask_id]))
        else:
            out.append(generation_prompt(ids, tok) if as_generation else parse_prompt(ids, tok))
    return out


def _stop_ids(stop: list[str], tok) -> tuple[tuple[int, ...], list[str]]:
    """Stop strings that are one token become stop ids; the rest are matched on the decoded text."""
    ids, strings = [], []
    for s in stop or ():
        enc = tok.encode(s, allow_special=True)
        (ids.append(enc[0]) if len(enc) == 1 else strings.append(s))
    return tuple(ids), strings


def stream(model, tok, texts: str | list[str], cfg: SamplingConfig | None = None, *, generation: bool = False,
           causal: bool = False, stop: list[str] | None = None) -> Iterator[Piece]:
    """Yield text pieces as they are produced. Bytes of a character split over tokens are held back
    until the character is complete; a multi-token stop string ends the blank at the match (the text is
    cut there and decoding of that blank stops at once)."""
    cfg = cfg or SamplingConfig()
    prompts = encode_prompts(texts, tok, generation, causal)
    stop_ids, stop_strings = _stop_ids(stop or [], tok)
    spans: dict[tuple[int, int], list[int]] = {}
    shown: dict[tuple[int, int], int] = {}
    cut: set[tuple[int, int]] = set()
    for ev in decode_blanks(model, prompts, cfg, tok, causal, stop_ids, cancel=cut):
        key = (ev.row, ev.blank)
        if key in cut:
            continue
        if ev.token is not None:
            spans.setdefault(key, []).append(ev.token)
        text = tok.decode(spans.get(key, []))
        end = ev.token is None
        hit = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
        if hit >= 0:
            text, end = text[:hit], True
            cut.add(key)
        elif not end and text.endswith("\ufffd"):
            continue
        new = text[shown.get(key, 0):]
        shown[key] = len(text)
        if new:
            yield Piece(ev.row, ev.blank, new)


def assemble(prompt: Prompt, fills: list[str], tok) -> str:
    """The prompt's text with each blank token replaced by its fill."""
    out, start = [], 0
    for i, f in zip(prompt.blanks, fills):
        out += [tok.decode(prompt.ids[start:i]), f]
        start = i + 1
    out.append(tok.decode(prompt.ids[start:]))
    return "".join(out)


def run_fill(model, tok, texts: str | list[str], cfg: SamplingConfig | None = None, *, generation: bool = False,
             causal: bool = False, stop: list[str] | None = None) -> list[Filled]:
    """Fill every blank of every text (non-streaming: the pieces of `stream`, joined)."""
    cfg = cfg or SamplingConfig()
    prompts = encode_prompts(texts, tok, generation, causal)
    fills = [[""] * len(p.blanks) for p in prompts]
    for piece in stream(model, tok, texts, cfg, generation=generation, causal=causal, stop=stop):
        fills[piece.row][piece.blank] += piece.text
    return [Filled(assemble(p, f, tok), f, [tok.encode(x) for x in f]) for p, f in zip(prompts, fills)]


def infill(model, tok, texts: str | list[str], cfg: SamplingConfig | None = None, **kw) -> list[Filled]:
    """Fill the [MASK] / [sMASK] / [gMASK] blanks of each text."""
    return run_fill(model, tok, texts, cfg, **kw)


def generate(model, tok, prompts: str | list[str], cfg: SamplingConfig | None = None, **kw) -> list[str]:
    """Continue each prompt ([gMASK] at its end; causal=True for CLM / HF chat models): the new text."""
    return [f.fills[-1] for f in run_fill(model, tok, prompts, cfg, generation=True, **kw)]
