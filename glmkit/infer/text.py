"""Text in, text out: blank infilling, generation, streaming and scoring over the engine.

    loaded = glmkit.checkpoint.loader.load("runs/glm")
    model, tok = loaded.model, loaded.tokenizer
    infill(model, tok, "The quick [MASK] fox [MASK] the dog.")[0].text
    generate(model, tok, ["In the beginning", "北京是"], SamplingConfig(temperature=0.8, top_p=0.9, seed=0))
    for piece in stream(model, tok, "The [MASK] sat on the mat."): print(piece.text, end="")
    score(model, tok, "The capital of France is [MASK].", ["Paris", "Rome"])     # log-likelihoods

Each text becomes one engine `Request`: the blanks of a GLM prompt ([MASK], [sMASK], [gMASK]) are
filled left to right over a bidirectional Part A; `generation=True` puts a [gMASK] at the end of a
prompt that has no blank (DESIGN.md §3); `causal=True` reads the prompt causally and continues it
(CLM-trained models). Pieces come from the engine's incremental text (whole UTF-8 characters; a
multi-token stop string ends its blank at the match and is never shown), so the non-streaming
functions are the streamed pieces joined and always agree with them. Pass `engine=` to reuse one
engine (and its cached prefixes) across calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from glmkit.errors import GlmkitError
from glmkit.infer.engine import Engine, Request
from glmkit.infer.sampling import SamplingConfig

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


def encode_prompts(texts: str | list[str], tok, as_generation: bool, causal: bool) -> list[Prompt]:
    """Texts -> Prompts. Blank tokens typed in a prompt are the blanks (allow_special)."""
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


def to_request(prompt: Prompt, cfg: SamplingConfig, causal: bool, stop: list[str] | None, tok) -> Request:
    """One Prompt -> one engine Request (stop strings of one token become stop ids)."""
    stop_ids, stop_strings = stop_split(stop or [], tok)
    if causal:
        return Request.causal(prompt.ids, cfg, stop_ids=stop_ids, stop_strings=stop_strings)
    return Request.infill(prompt.ids, prompt.blanks, cfg, stop_ids=stop_ids, stop_strings=stop_strings)


def stop_split(stop: list[str], tok) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Stop strings that are one token become stop ids; the rest are matched on the decoded text."""
    ids, strings = [], []
    for s in stop:
        enc = tok.encode(s, allow_special=True)
        (ids.append(enc[0]) if len(enc) == 1 else strings.append(s))
    return tuple(ids), tuple(strings)


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


def _engine(model, tok, n: int, engine: Engine | None) -> Engine:
    return engine if engine is not None else Engine(model, tok, max_batch=max(1, n))


def stream(model, tok, texts: str | list[str], cfg: SamplingConfig | None = None, *, generation: bool = False,
           causal: bool = False, stop: list[str] | None = None, engine: Engine | None = None) -> Iterator[Piece]:
    """Yield text pieces of every prompt as they are produced (prompts decode as one continuous batch)."""
    cfg = cfg or SamplingConfig()
    prompts = encode_prompts(texts, tok, generation, causal)
    eng = _engine(model, tok, len(prompts), engine)
    row_of = {eng.add(to_request(p, cfg, causal, stop, tok)): i for i, p in enumerate(prompts)}
    left = set(row_of)
    while left:
        for o in eng.step():
            if o.request not in row_of:
                continue
            if o.text:
                yield Piece(row_of[o.request], o.blank, o.text)
            if o.finished:
                left.discard(o.request)


def assemble(prompt: Prompt, fills: list[str], tok) -> str:
    """The prompt's text with each blank token replaced by its fill."""
    out, start = [], 0
    for i, f in zip(prompt.blanks, fills):
        out += [tok.decode(prompt.ids[start:i]), f]
        start = i + 1
    out.append(tok.decode(prompt.ids[start:]))
    return "".join(out)


def run_fill(model, tok, texts: str | list[str], cfg: SamplingConfig | None = None, *, generation: bool = False,
             causal: bool = False, stop: list[str] | None = None, engine: Engine | None = None) -> list[Filled]:
    """Fill every blank of every text (non-streaming: the pieces of `stream`, joined)."""
    cfg = cfg or SamplingConfig()
    prompts = encode_prompts(texts, tok, generation, causal)
    fills = [[""] * len(p.blanks) for p in prompts]
    for piece in stream(model, tok, texts, cfg, generation=generation, causal=causal, stop=stop, engine=engine):
        fills[piece.row][piece.blank] += piece.text
    return [Filled(assemble(p, f, tok), f, [tok.encode(x) for x in f]) for p, f in zip(prompts, fills)]


def infill(model, tok, texts: str | list[str], cfg: SamplingConfig | None = None, **kw) -> list[Filled]:
    """Fill the [MASK] / [sMASK] / [gMASK] blanks of each text."""
    return run_fill(model, tok, texts, cfg, **kw)


def generate(model, tok, prompts: str | list[str], cfg: SamplingConfig | None = None, **kw) -> list[str]:
    """Continue each prompt ([gMASK] at its end; causal=True for CLM / HF chat models): the new text."""
    return [f.fills[-1] for f in run_fill(model, tok, prompts, cfg, generation=True, **kw)]


def score(model, tok, text: str, candidates: list[str], *, engine: Engine | None = None) -> list[float]:
    """Log-likelihood of each candidate filling the one blank of `text` (cloze scoring, DESIGN.md §3):
    sum of log P over the candidate's tokens and the closing <eop>. Part A is computed once and shared
    by every candidate (the engine's prefix reuse)."""
    [prompt] = encode_prompts(text, tok, False, False)
    if len(prompt.blanks) != 1:
        raise GlmkitError(f"scoring needs exactly one blank in the text, found {len(prompt.blanks)}")
    if not candidates:
        raise GlmkitError("no candidates to score")
    eng = engine if engine is not None else Engine(model, tok, max_batch=min(len(candidates), 16))
    reqs = [Request(prompt.ids + [tok.sop_id] + tok.encode(c) + [tok.eop_id], len(prompt.ids), (prompt.blanks[0],),
                    SamplingConfig(), max_new_tokens=0, prompt_logprobs=True) for c in candidates]
    first = eng.generate(reqs[:1])               # Part A computed once; the others start from its cached row
    return [sum(r.prompt_logprobs) for r in first + eng.generate(reqs[1:])]
