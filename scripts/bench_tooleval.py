"""Time per task of `evaluate_tools`, one episode at a time against several decoded together.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_tooleval.py [--model small] [--count 10] [--threads 1]

A random `--model` (default `small`) with a byte-level BPE trained on the suite's own SFT conversations
(so prompts have realistic token counts) runs the held-out tasks (`--count` per family and language,
8 groups) with tools, its replies forced to what a perfect model writes (the suite's conversations in
glm45, so every episode has the rounds and lengths of a correct one), python computed by `ExactPython`.
Each `--concurrency` value runs the same episodes; prints a Markdown table (seconds per task, the
ratio to concurrency 1) and one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from glmkit.chat.agent import ScriptedModel
from glmkit.chat.docstore import build_store
from glmkit.data.tokenizer import GLMTokenizer
from glmkit.eval.tooleval import evaluate_tools
from glmkit.eval.toolsft import conversation, conversations
from glmkit.eval.tooltasks import ExactPython, ToolSuite
from glmkit.infer.engine import Engine
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM


def glm45_reply(message: dict) -> str:
    """What a GLM-4.5 model writes after `<|assistant|>` to produce `message`."""
    text = "\n<think></think>"
    if message.get("content"):
        return text + "\n" + message["content"] + "<|user|>"
    for call in message["tool_calls"]:
        args = json.loads(call["function"]["arguments"])
        text += f"\n<tool_call>{call['function']['name']}\n" + "".join(
            f"<arg_key>{k}</arg_key>\n<arg_value>{v if isinstance(v, str) else json.dumps(v)}</arg_value>\n"
            for k, v in args.items()) + "</tool_call>"
    return text + "<|observation|>"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    suite = ToolSuite(seed=0, per_split={"train": 40, "heldout": args.count})
    tmp = Path(tempfile.mkdtemp(prefix="bench-tooleval-"))
    store = build_store(suite.documents(), tmp / "facts.sqlite")
    train = conversations(suite.tasks("train"), "glm45", store=store, python=ExactPython())
    texts = [json.dumps(r["messages"], ensure_ascii=False) for r in train] + [d[2] for d in suite.documents()]
    config = GLMConfig.from_name(args.model)
    tok = GLMTokenizer.train(texts, vocab_size=max(config.vocab_size, 1024))
    torch.manual_seed(0)
    model = GLM(GLMConfig.from_name(args.model, vocab_size=len(tok))).eval().to(args.device)
    tasks = suite.tasks("heldout")
    replies = {t.id: [glm45_reply(m) for m in conversation(t, "glm45", store=store, python=ExactPython())["messages"]
                      if m["role"] == "assistant"] for t in tasks}
    script = lambda task, tools: ScriptedModel.from_texts(tok, replies[task.id])  # noqa: E731
    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        engine = Engine(model, tok, max_batch=c, max_len=min(config.max_position_embeddings, 4096))
        start = time.perf_counter()
        report = evaluate_tools(engine, tok, tasks, fmt="glm45", store=store, max_new_tokens=args.max_new_tokens,
                                concurrency=c, logits_processor=script)
        seconds = time.perf_counter() - start
        s = report.summary()
        assert s["answer_em_with_tools"] == 1.0 and s["parse_rate"] == 1.0, s
        tokens = sum(e.tokens for e in report.episodes)
        prompt = sum(ev["tokens"] for e in report.episodes for ev in e.events if ev["event"] == "prompt")
        rows.append({"concurrency": c, "tasks": len(tasks), "seconds": round(seconds, 2),
                     "seconds_per_task": round(seconds / len(tasks), 3), "generated_tokens": tokens,
                     "prompt_tokens": prompt})
    base = rows[0]["seconds_per_task"]
    print(f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocab {len(tok)}), "
          f"{args.threads} thread(s), {args.device}")
    print("| concurrency | tasks | s per task | vs first | generated tokens | prompt tokens (all rounds) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['tasks']} | {r['seconds_per_task']:.3f} | "
              f"{base / r['seconds_per_task']:.2f}x | {r['generated_tokens']} | {r['prompt_tokens']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
