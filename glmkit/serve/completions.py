"""Plain completions (`POST /v1/completions`), and glmkit's extension: blanks filled in place.

A prompt without blanks is continued: a GLM-trained model through a [gMASK] at its end, a causal
(CLM-trained or HF) model left to right; `choices[i].text` is the continuation, as OpenAI's.
A prompt holding [MASK] / [sMASK] / [gMASK] (a GLM-trained model) has each blank filled, left to
right over the bidirectional text (DESIGN.md §3): `choices[i].fills` lists each blank's fill and
`choices[i].text` is the prompt with every blank replaced by its fill. Streamed, each chunk's choice
carries a piece of one fill and its `blank` index. `stop` strings end a blank (the engine's stop
strings: the match is never shown).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from glmkit.errors import GlmkitError
from glmkit.infer.engine import Output, Request
from glmkit.infer.sampling import SamplingConfig
from glmkit.infer.text import Prompt, assemble, encode_prompts, to_request
from glmkit.serve.protocol import APIError, Completion, CompletionChoice, CompletionRequest, Usage

FINISH = {"stop": "stop", "stop_string": "stop", "length": "length", "cancelled": "stop"}


@dataclass
class FillChoice:
    index: int
    prompt: Prompt
    has_blanks: bool
    fills: list[str] = field(default_factory=list)
    tokens: int = 0
    finish: str | None = None
    logprobs: dict | None = None

    def feed(self, o: Output, tok) -> str:
        """One output -> the text it adds (to blank `o.blank`)."""
        if self.finish is not None:
            return ""
        while len(self.fills) <= o.blank:
            self.fills.append("")
        self.fills[o.blank] += o.text
        if o.token is not None:
            self.tokens += 1
            if self.logprobs is not None and o.logprob is not None:
                lp = self.logprobs
                lp["tokens"].append(tok.token_bytes(o.token).decode("utf-8", errors="replace"))
                lp["token_logprobs"].append(o.logprob)
                lp["top_logprobs"].append({tok.token_bytes(i).decode("utf-8", errors="replace"): v
                                           for i, v in (o.top_logprobs or [])})
        if o.finished:
            self.finish = FINISH[o.finished]
        return o.text

    def choice(self, tok, echo: str | None) -> CompletionChoice:
        if self.has_blanks:
            return CompletionChoice(index=self.index, text=assemble(self.prompt, self.fills, tok),
                                    finish_reason=self.finish, fills=self.fills, logprobs=self.logprobs)
        text = (echo or "") + "".join(self.fills)
        return CompletionChoice(index=self.index, text=text, finish_reason=self.finish, logprobs=self.logprobs)


def plan_completion(req: CompletionRequest, tok, causal: bool, max_tokens: int) -> list[tuple[Request, FillChoice]]:
    """One engine request and choice per prompt (the server submits each n times)."""
    texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not texts or any(not t for t in texts):
        raise APIError(400, "prompt is empty; give the text to continue, or text with [MASK] blanks to fill", "prompt")
    blank_ids = {tok.mask_id, tok.smask_id, tok.gmask_id}
    typed = [bool(blank_ids & set(tok.encode(t, allow_special=True))) for t in texts]
    if causal and any(typed):
        raise APIError(400, "this model reads text left to right (CLM-trained or an HF checkpoint) and cannot "
                       "fill [MASK] / [sMASK] / [gMASK] blanks; send the text before the blank to continue it", "prompt")
    try:
        prompts = encode_prompts(texts, tok, as_generation=True, causal=causal)
        cfg = SamplingConfig(temperature=req.temperature, top_p=req.top_p, max_new_tokens=max_tokens, seed=req.seed)
    except GlmkitError as e:
        raise APIError(400, str(e), "prompt") from None
    out = []
    for i, (p, has) in enumerate(zip(prompts, typed)):
        r = to_request(p, cfg, causal, req.stop_list(), tok)
        r.logprobs = req.logprobs
        r.ignore_stop = req.ignore_eos
        lp = {"tokens": [], "token_logprobs": [], "top_logprobs": []} if req.logprobs is not None else None
        out.append((r, FillChoice(i, p, has, logprobs=lp)))
    return out


def completion(cid: str, created: int, model: str, choices: list[FillChoice], prompt_tokens: int, tok,
               echo: list[str | None]) -> Completion:
    done = sum(c.tokens for c in choices)
    return Completion(id=cid, created=created, model=model,
                      choices=[c.choice(tok, e) for c, e in zip(choices, echo)],
                      usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done))


async def chunks(cid: str, created: int, model: str, choices: list[FillChoice], prompt_tokens: int, tok,
                 outputs: AsyncIterator[tuple[int, Output | None]], include_usage: bool) -> AsyncIterator[str]:
    def event(choice: dict | None, usage: Usage | None = None) -> str:
        c = Completion(id=cid, created=created, model=model, choices=[], usage=usage).model_dump(exclude_none=True)
        c["choices"] = [choice] if choice else []
        import json
        return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

    async for i, o in outputs:
        if o is None:
            yield ": keep-alive\n\n"
            continue
        c = choices[i]
        text = c.feed(o, tok)
        if text or o.finished:
            d = {"index": i, "text": text, "finish_reason": c.finish if o.finished else None}
            if c.has_blanks:
                d["blank"] = o.blank
            yield event(d)
        if all(c.finish is not None for c in choices):
            break
    if include_usage:
        done = sum(c.tokens for c in choices)
        yield event(None, Usage(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done))
    yield "data: [DONE]\n\n"
