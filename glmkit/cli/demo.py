"""`glmkit demo`: the main job, end to end on the CPU.

1. builds (or reuses) the default bilingual corpus and its tokenizer in `data/default`;
2. prints one sample of each objective in English and Chinese (Part A, Part B, 2D positions, targets);
3. fills a few blanks in English and Chinese with the untrained model;
4. pretrains a small GLM-4-shaped model with the GLM objective (GLM-130B's mixture of [MASK] and
   [gMASK]) for about ten minutes on 2 cores;
5. fills the same blanks again, and writes the loss curves (train and validation) to a PNG.

Everything goes to `--out-dir` (default `runs/demo`); a second run resumes a finished or interrupted
training instead of starting over (pass `--overwrite` to start again).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# The blanks the model fills before and after training. The first sentences' sources are in the
# corpus (so a trained model should know their style); the answers are printed alongside.
PROMPTS = [
    ("In the beginning God created the [MASK] and the earth.", "heaven"),
    ("And God said, Let there be [MASK]: and there was light.", "light"),
    ("To be, or not to be: that is the [MASK].", "question"),
    ("Now is the winter of our [MASK] made glorious summer by this sun of York.", "discontent"),
    ("新华社北京1月1日电 国家主席江泽民发表了1998年[MASK]讲话。", "新年"),
    ("我国经济[MASK]持续快速健康发展。", "保持"),
]
GENERATION_PROMPTS = ["And the LORD spake unto Moses, saying,", "中国人民"]

# The demo model: GLM-4-shaped (RMSNorm, SwiGLU, GQA, partial RoPE), sized to learn the most in about
# ten minutes on 2 CPU cores (see the README for how it was chosen).
DEMO_MODEL = "small"
DEMO_OVERRIDES = "hidden_size=256,num_layers=4,num_heads=4,num_kv_heads=2,intermediate_size=704"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--corpus", default=None, help="corpus directory (default: the default bilingual corpus)")
    parser.add_argument("--max-steps", type=int, default=700, help="optimizer steps (default 700: ~10 min on 2 cores)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--objective", default="glm-130b",
                        help="GLM objective preset (default glm-130b: 30%% [MASK] spans, 70%% [gMASK] generation, "
                             "which gives a small model the most loss tokens per step)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--model", default=DEMO_MODEL, help="model preset or config.json")
    parser.add_argument("--model-overrides", default=DEMO_OVERRIDES)
    parser.add_argument("--overwrite", action="store_true", help="start the training over")
    parser.add_argument("--no-samples", action="store_true", help="skip printing objective samples")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _heading(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def show_fills(model, tok, title: str) -> list[dict]:
    """Greedy fills of PROMPTS and continuations of GENERATION_PROMPTS, printed and returned."""
    from glmkit.infer.sampling import SamplingConfig
    from glmkit.infer.text import generate, infill
    model.eval()
    cfg = SamplingConfig(max_new_tokens=12)
    _heading(title)
    results = []
    for (text, answer), filled in zip(PROMPTS, infill(model, tok, [p for p, _ in PROMPTS], cfg)):
        fill = filled.fills[0].replace("\n", " ")
        print(f"  {text}\n      -> [{fill}]   (original: {answer})")
        results.append({"prompt": text, "fill": fill, "answer": answer})
    cfg = SamplingConfig(max_new_tokens=24)
    for text, cont in zip(GENERATION_PROMPTS, generate(model, tok, GENERATION_PROMPTS, cfg)):
        cont = cont.replace("\n", " ")
        print(f"  {text}[gMASK]\n      -> {cont}")
        results.append({"prompt": text + "[gMASK]", "fill": cont})
    return results


def untrained_model(train_cfg, tokenizer):
    """The model exactly as training will initialise it (same config and seed)."""
    from glmkit.model.glm import GLM
    from glmkit.train.loop import build_model_config
    torch.manual_seed(train_cfg.seed)
    return GLM(build_model_config(train_cfg, tokenizer))


def run(args: argparse.Namespace) -> int:
    from glmkit.checkpoint.loader import load
    from glmkit.data.corpus import Corpus, default_corpus
    from glmkit.train.loop import TrainConfig, train
    from glmkit.train.plot import plot

    t0 = time.time()
    _heading("1. the default bilingual corpus and tokenizer")
    corpus = default_corpus(progress=True) if args.corpus is None else Corpus.open(args.corpus)
    m = corpus.manifest
    for src in m["sources"]:
        print(f"  {src['name']:14s} train {src['train']['documents']:5d} docs {src['train']['tokens']:9,d} tokens"
              f" | val {src['val']['documents']:4d} docs {src['val']['tokens']:7,d} tokens")
    print(f"  tokenizer: byte-level BPE, {corpus.tokenizer.vocab_size} tokens ({corpus.directory}/tokenizer.json)")

    if not args.no_samples:
        from glmkit.cli import samples
        _heading("2. what each objective makes of English and Chinese text")
        samples.run(argparse.Namespace(corpus=str(corpus.directory), length=40, per_language=1, layout="glm",
                                       no_shuffle=False, table=False, seed=0))

    cfg = TrainConfig(out_dir=args.out_dir, model=args.model, model_overrides=args.model_overrides,
                      corpus=str(corpus.directory), objective=args.objective, seq_len=args.seq_len,
                      batch_size=args.batch_size, max_steps=args.max_steps, lr=args.lr,
                      eval_every=args.eval_every, save_every=max(args.eval_every, args.max_steps // 4),
                      overwrite=args.overwrite, resume=not args.overwrite, progress=not args.no_progress)
    before = show_fills(untrained_model(cfg, corpus.tokenizer), corpus.tokenizer, "3. blanks filled by the untrained model")

    _heading(f"4. pretraining with the GLM objective ({args.objective}): {args.max_steps} steps of {args.batch_size} x {args.seq_len}")
    metrics = train(cfg)
    print(f"  final: {json.dumps(metrics)}")

    loaded = load(args.out_dir)
    model, tok = loaded.model, loaded.tokenizer
    after = show_fills(model, tok, "5. the same blanks after pretraining")
    png = plot([args.out_dir], Path(args.out_dir) / "loss.png", title="glmkit demo: GLM pretraining on 2 CPU cores")
    summary = {"before": before, "after": after, "metrics": metrics, "loss_png": str(png),
               "minutes": round((time.time() - t0) / 60, 1)}
    (Path(args.out_dir) / "demo.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1))
    print(f"\nloss curves: {png}\nsummary: {Path(args.out_dir) / 'demo.json'} ({summary['minutes']} minutes in all)")
    return 0
