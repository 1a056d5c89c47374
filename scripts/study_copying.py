"""How fast a model learns to copy from its context: the skill the demo's tool-use stage lacks.

    PYTHONPATH=$PWD .venv/bin/python scripts/study_copying.py --init runs/demo [--fresh] \
        [--drill-steps 450] [--sft-steps 300] [--threads 1]

Two measurements, run in this order on the model of `--init` (a glmkit run directory or checkpoint;
`--fresh`: a randomly initialised model of the same config, with the same tokenizer):

1. **Copy drill** (`--drill-steps`, 0 skips it): rows of 128 tokens packed with samples
   `[gMASK] <sop> d1 .. dn <eop> d1 .. dn` in the `chat` layout (`glmkit.train.chat_data.pack_rows`),
   d the tokenizer's single-digit tokens, n drawn from `--drill-len` (default 4..12); the loss covers
   the repeat. Every `--eval-every` steps: exact match and token accuracy of the repeat, teacher
   forced, on 64 fixed unseen samples.
2. **Tool SFT, teacher forced** (`--sft-steps`, 0 skips it): the arithmetic family of the tool-task
   suite (`glmkit.eval.tooltasks`, English and Chinese, `--sft-train` train tasks per language) in the
   demo's `glm45` format, packed into `--sft-seq-len`-token rows, 4 per step. Every `--eval-every`
   steps, on the 40 held-out conversations: the share of assistant turns whose every token the model
   predicts (argmax, given the true history: the tool call, then the final answer) and the token
   accuracy over all assistant tokens. A turn right here is what greedy decoding writes, so 0% means
   the agent loop cannot succeed either.

AdamW (betas 0.9 / 0.95, no weight decay), `--lr` with 5% warmup and cosine decay to 5%, gradient
clipping at 1. Prints progress lines and, last, one JSON object with every evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from glmkit.chat.docstore import build_store
from glmkit.checkpoint.loader import load
from glmkit.eval.toolsft import conversations
from glmkit.eval.tooltasks import ExactPython, ToolSuite
from glmkit.train.chat_data import ChatBatchIterator, pack_rows, render_conversation


def schedule(step: int, steps: int, lr: float) -> float:
    warm = max(1, int(0.05 * steps))
    if step < warm:
        return lr * (step + 1) / warm
    q = (step - warm) / max(1, steps - warm)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * q)))


def drill_sample(rng: np.random.Generator, tok, digits: list[int], lo: int, hi: int):
    n = int(rng.integers(lo, hi + 1))
    xs = rng.choice(digits, n)
    ids = np.concatenate([[tok.gmask_id, tok.sop_id], xs, [tok.eop_id], xs]).astype(np.int64)
    loss = np.zeros(len(ids), dtype=bool)
    loss[n + 2:len(ids) - 1] = True         # position i predicts token i + 1: <eop> .. d(n-1) predict the repeat
    return ids, loss


def drill_batch(rng, tok, digits, lo, hi, rows: int = 16, seq_len: int = 128):
    samples, total = [], 0
    while total < rows * seq_len:
        samples.append(drill_sample(rng, tok, digits, lo, hi))
        total += len(samples[-1][0])
    return pack_rows(samples, rows, seq_len, "chat", tok.pad_id)[0].to("cpu")


@torch.no_grad()
def teacher_forced(model, tok, examples) -> dict:
    """Per example (ids, loss): argmax at the loss positions against the true next tokens, scored per
    run of consecutive loss positions (an assistant turn) and per token."""
    model.eval()
    turns_ok, turns, tokens_ok, tokens = 0, 0, 0, 0
    for ids, loss in examples:
        b = pack_rows([(ids, loss)], 1, len(ids), "chat", tok.pad_id)[0].to("cpu")
        h = model(b.input_ids, b.position_ids, b.block_position_ids, model.attention_mask(b))
        right = (model.logits(h)[0].argmax(-1) == b.targets[0]).numpy()
        at = np.flatnonzero(loss)
        for run in np.split(at, np.flatnonzero(np.diff(at) > 1) + 1):
            turns_ok += bool(right[run].all())
            turns += 1
        tokens_ok += int(right[at].sum())
        tokens += len(at)
    model.train()
    return {"turn_exact": round(turns_ok / turns, 4), "token_accuracy": round(tokens_ok / tokens, 4)}


def train(model, batches, steps: int, lr: float, evaluate, every: int, label: str, log: list) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = schedule(step, steps, lr)
        loss = model.loss(next(batches))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            entry = {"stage": label, "step": step + 1, "loss": round(loss.item(), 4), **evaluate(),
                     "seconds": round(time.time() - t0, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True, help="glmkit run directory or checkpoint (model config and tokenizer)")
    p.add_argument("--fresh", action="store_true", help="a random init of --init's config instead of its weights")
    p.add_argument("--drill-steps", type=int, default=450)
    p.add_argument("--drill-len", default="4,12", help="shortest,longest digit string of the drill")
    p.add_argument("--drill-lr", type=float, default=3e-3)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--sft-train", type=int, default=200, help="train tasks per language")
    p.add_argument("--sft-seq-len", type=int, default=1024)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    loaded = load(a.init)
    model, tok = loaded.model, loaded.tokenizer
    if a.fresh:
        model = type(model)(model.config)
    log: list[dict] = []
    if a.drill_steps:
        lo, hi = (int(x) for x in a.drill_len.split(","))
        digits = [tok.encode(str(d))[0] for d in range(10)]
        rng = np.random.default_rng(a.seed)
        held = [drill_sample(np.random.default_rng(10_000 + i), tok, digits, lo, hi) for i in range(64)]
        batches = iter(lambda: drill_batch(rng, tok, digits, lo, hi), None)
        train(model, batches, a.drill_steps, a.drill_lr, lambda: teacher_forced(model, tok, held),
              a.eval_every, "drill", log)
    if a.sft_steps:
        suite = ToolSuite(seed=a.seed, per_split={"train": a.sft_train, "heldout": 20}, families=("arithmetic",))
        with tempfile.TemporaryDirectory() as d:
            store = build_store(suite.documents(), Path(d) / "facts.sqlite")
            rows = {s: conversations(suite.tasks(s), "glm45", store=store, python=ExactPython())
                    for s in ("train", "heldout")}
        train_ex = [render_conversation(r, "glm45", tok) for r in rows["train"]]
        held = [render_conversation(r, "glm45", tok) for r in rows["heldout"]]
        it = ChatBatchIterator(train_ex, 4, a.sft_seq_len, "chat", tok.pad_id, seed=a.seed)
        batches = (b.to("cpu") for b in it)
        train(model, batches, a.sft_steps, a.sft_lr, lambda: teacher_forced(model, tok, held),
              a.eval_every, "tool-sft", log)
    print(json.dumps({"init": a.init, "fresh": a.fresh, "drill_steps": a.drill_steps, "drill_len": a.drill_len,
                      "sft_steps": a.sft_steps, "evaluations": log}))


if __name__ == "__main__":
    main()
