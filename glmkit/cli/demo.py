"""`glmkit demo`: the main job, end to end on the CPU.

1. builds (or reuses) the default bilingual corpus and its tokenizer in `data/default`;
2. prints one sample of each objective in English and Chinese (Part A, Part B, 2D positions, targets);
3. measures the untrained model: whole-word blanks drawn at random (seeded) from the held-out text,
   English and Chinese (`glmkit.eval.blank_probe`: the true word, the greedy fill, the rank and
   probability of the word's first token among the whole vocabulary, the top candidates), bits per
   byte of held-out text and token accuracy on held-out spans, beside a unigram model of the training
   counts (`glmkit.eval.baselines`);
4. times a few training steps and prints an estimate, then pretrains a small GLM-4-shaped model with
   GLM-130B's objective mixture of [MASK] and [gMASK] (about ten minutes on 2 free cores);
5. measures the trained model on the same blanks and text, prints the blanks before and after and a
   summary table, writes the loss curves to a PNG and everything measured to `demo.json`;
6. the tool-use stage (`glmkit.eval.tooldemo`; `--no-tools-stage` skips it): writes the tool-use task
   suite, runs its held-out tasks through the agent loop with the pretrained model (with tools and
   without), fine-tunes the model on the train conversations, runs them again, prints the before/after
   table and a transcript of the fine-tuned model calling the sandboxed interpreter and the browser,
   and records it all in `tools/tools.json`.

Everything goes to `--out-dir` (default `runs/demo`). Options are checked before any work starts. A
second run of the same recipe shows the recorded results of a finished demo (never rewriting them),
or resumes an interrupted training; `--overwrite` starts over; another recipe in the same folder is
refused (use `--overwrite` or another `--out-dir`). The tool-use stage keeps its own record the same way
(`--overwrite-tools` runs it again on the same pretrained model); a finished demo without it gains it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from glmkit.cli.options import nonnegative_int, positive_float, positive_int
from glmkit.errors import GlmkitError
from glmkit.eval.tooldemo import ToolStage

STAGE = ToolStage()         # the tool-use stage's defaults

GENERATION_PROMPTS = ["And the LORD spake unto Moses, saying,", "中国人民"]

# The demo model: GLM-4-shaped (RMSNorm, SwiGLU, GQA, partial RoPE), sized to learn the most in about
# ten minutes on 2 CPU cores (see the README for how it was chosen).
DEMO_MODEL = "small"
DEMO_OVERRIDES = "hidden_size=256,num_layers=4,num_heads=4,num_kv_heads=2,intermediate_size=704"

# How much held-out text the before/after measurements read: about 10 s per model on 2 free cores.
VAL_TOKENS = 10000          # bits per byte
SPANS = 100                 # Poisson-length held-out spans (teacher-forced token accuracy)
SHOWN = 3                   # word blanks shown one by one, per language

# what must match for a second run to be the same demo (the rest only changes how it is shown)
RECIPE = ("max_steps", "batch_size", "seq_len", "lr", "objective", "model", "model_overrides", "corpus",
          "blanks", "blank_seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--corpus", default=None, help="corpus directory (default: the default bilingual corpus)")
    parser.add_argument("--max-steps", type=positive_int, default=700, help="optimizer steps (default 700: ~10 min on 2 cores)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--lr", type=positive_float, default=2e-3)
    parser.add_argument("--objective", default="glm-130b",
                        help="GLM objective preset (default glm-130b: 30%% [MASK] spans, 70%% [gMASK] generation, "
                             "which gives a small model the most loss tokens per step)")
    parser.add_argument("--eval-every", type=nonnegative_int, default=50, help="validation loss every N steps (0: never)")
    parser.add_argument("--model", default=DEMO_MODEL, help="model preset or config.json")
    parser.add_argument("--model-overrides", default=DEMO_OVERRIDES)
    parser.add_argument("--blanks", type=nonnegative_int, default=64,
                        help="whole-word blanks per language drawn from the held-out text (default 64)")
    parser.add_argument("--blank-seed", type=nonnegative_int, default=0, help="seed of the blank draw (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="start the training over")
    parser.add_argument("--no-samples", action="store_true", help="skip printing objective samples")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    tools = parser.add_argument_group("the tool-use stage (after pretraining; glmkit.eval.tooldemo)")
    tools.add_argument("--no-tools-stage", action="store_true", help="stop after pretraining")
    tools.add_argument("--tool-families", default=",".join(STAGE.families),
                       help=f"task families taught and measured (default {','.join(STAGE.families)})")
    tools.add_argument("--tool-train", type=positive_int, default=STAGE.train,
                       help=f"train conversations per family and language (default {STAGE.train})")
    tools.add_argument("--tool-heldout", type=positive_int, default=STAGE.heldout,
                       help=f"held-out tasks per family and language (default {STAGE.heldout})")
    tools.add_argument("--tool-steps", type=positive_int, default=STAGE.steps,
                       help=f"fine-tuning steps (default {STAGE.steps})")
    tools.add_argument("--tool-batch-size", type=positive_int, default=STAGE.batch_size,
                       help=f"fine-tuning rows per step (default {STAGE.batch_size})")
    tools.add_argument("--tool-seq-len", type=nonnegative_int, default=STAGE.seq_len,
                       help="fine-tuning row length (default 0: the longest conversation, rounded up to 128)")
    tools.add_argument("--tool-lr", type=positive_float, default=STAGE.lr,
                       help=f"fine-tuning peak learning rate (default {STAGE.lr:g})")
    tools.add_argument("--tool-max-new-tokens", type=positive_int, default=STAGE.max_new_tokens,
                       help=f"most tokens per model reply when measuring (default {STAGE.max_new_tokens})")
    tools.add_argument("--overwrite-tools", action="store_true",
                       help="run the tool-use stage again (the pretraining and its results stay)")


class _Clock:
    def __init__(self):
        self.t0 = time.time()

    @property
    def minutes(self) -> float:
        return (time.time() - self.t0) / 60

    def __str__(self) -> str:
        s = int(time.time() - self.t0)
        return f"{s // 60}:{s % 60:02d}"


def _heading(text: str, clock: _Clock) -> None:
    print(f"\n{'=' * 100}\n{text}   [{clock} elapsed]\n{'=' * 100}", flush=True)


# ------------------------------------------------------------------------------------------ checks

def _recipe(args) -> dict:
    return {k: getattr(args, k) for k in RECIPE}


def validate(args):
    """The TrainConfig of the demo, every option checked before any work (GlmkitError names the bad one)."""
    from glmkit.data.corpus import DEFAULT_VOCAB_SIZE
    from glmkit.train.setup import TrainConfig, build_model_config
    cfg = TrainConfig(out_dir=args.out_dir, model=args.model, model_overrides=args.model_overrides,
                      corpus=args.corpus, objective=args.objective, seq_len=args.seq_len,
                      batch_size=args.batch_size, max_steps=args.max_steps, lr=args.lr,
                      eval_every=args.eval_every, save_every=max(args.eval_every, args.max_steps // 4),
                      overwrite=args.overwrite, resume=not args.overwrite, progress=not args.no_progress)
    cfg.validate()
    # the model config itself (e.g. heads that do not divide the width); the corpus sets the vocabulary
    build_model_config(cfg, SimpleNamespace(vocab_size=DEFAULT_VOCAB_SIZE))
    return cfg


def recorded(out_dir: str | Path, recipe: dict) -> dict | None:
    """The results of a finished demo of `recipe` in `out_dir`, or None when there are none. A finished
    demo of another recipe there is a GlmkitError: its results are never replaced without --overwrite."""
    path = Path(out_dir) / "demo.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except ValueError:
        raise GlmkitError(f"{path} is not valid JSON; pass --overwrite to run the demo again") from None
    old = rec.get("recipe")
    if old == recipe:
        return rec
    diff = ", ".join(f"{k} {old.get(k)!r} -> {recipe[k]!r}" for k in recipe if (old or {}).get(k) != recipe[k])
    raise GlmkitError(f"{out_dir} holds a finished demo with another recipe ({diff or 'recorded by an older glmkit'}); "
                      f"pass --overwrite to replace it, or --out-dir to run this one elsewhere")


# ------------------------------------------------------------------------------------------ measuring

def measure(model, tok, corpus, blanks, counts) -> tuple[dict, list]:
    """Bits per byte, span token accuracy and the word-blank probe of one model: (numbers, readings)."""
    from glmkit.data.objective_config import SpecialIds
    from glmkit.eval import tasks
    from glmkit.eval.blank_probe import read_blanks, summarize
    from glmkit.eval.evaluate import bits_per_byte
    from glmkit.eval.scoring import fill_token_accuracy
    model.eval()
    val = corpus.documents("val")
    bpb = bits_per_byte(model, tok, val, "glm", window=256, budget=VAL_TOKENS, counts=counts)
    spans = tasks.infill_examples([[int(x) for x in d] for d in val], SPANS, seed=0)
    correct, total = fill_token_accuracy(model, [tasks.Choice(b.left, b.right, [b.answer], 0) for b in spans],
                                         "glm", SpecialIds.from_tokenizer(tok))
    readings = read_blanks(model, tok, blanks, shown=set(_shown(blanks)))
    return {"bits_per_byte": bpb["bits_per_byte"], "unigram_bits_per_byte": bpb["unigram_bits_per_byte"],
            "bpb_tokens": bpb["tokens"], "span_token_accuracy": correct / total, "spans": len(spans),
            "blanks": summarize(blanks, readings)}, readings


def unigram_numbers(tok, corpus, blanks, counts, measured: dict) -> dict:
    """The same numbers for the unigram model of the training counts (bits per byte: as `measure`
    scored it on the same text)."""
    from glmkit.eval import tasks
    from glmkit.eval.baselines import unigram_infill
    from glmkit.eval.blank_probe import summarize, unigram_readings
    spans = tasks.infill_examples([[int(x) for x in d] for d in corpus.documents("val")], SPANS, seed=0)
    return {"bits_per_byte": measured["unigram_bits_per_byte"],
            "span_token_accuracy": unigram_infill([b.answer for b in spans], counts)["token_accuracy"],
            "blanks": summarize(blanks, unigram_readings(blanks, counts, tok.vocab_size))}


def _text(tok, ids) -> str:
    return tok.decode(ids).replace("\n", " ")


def _reading_line(tok, label: str, r) -> str:
    top = ", ".join(f"{_text(tok, [t])!r} {p:.2g}" for t, p in r.top)
    fill = repr(_text(tok, r.fill)) if r.fill else "'' (<eop> first)"
    return f"      {label:<10} p {r.p_first:<8.2g} rank {r.rank_first:>6,}   fill {fill:<18} top: {top}"


def _shown(blanks) -> list[int]:
    """Indices of the blanks printed one by one: the first SHOWN of each language."""
    return [i for s in ("latin", "cjk") for i in [j for j, b in enumerate(blanks) if b.script == s][:SHOWN]]


def show_blanks(tok, blanks, before, after=None) -> None:
    """The first SHOWN blanks of each language, with the untrained (and trained) model's reading."""
    for i in _shown(blanks):
        b = blanks[i]
        print(f"  …{_text(tok, b.left[-24:])}[____]{_text(tok, b.right[:8])}…")
        first = f"   (p and rank: of its first token {_text(tok, b.answer[:1])!r})" if len(b.answer) > 1 else ""
        print(f"      answer {_text(tok, b.answer)!r}{first}")
        print(_reading_line(tok, "untrained", before[i]))
        if after is not None:
            print(_reading_line(tok, "trained", after[i]))


def show_generations(model, tok, title: str) -> list[dict]:
    from glmkit.infer.sampling import SamplingConfig
    from glmkit.infer.text import generate
    out = []
    for text, cont in zip(GENERATION_PROMPTS, generate(model, tok, GENERATION_PROMPTS, SamplingConfig(max_new_tokens=24))):
        cont = cont.replace("\n", " ")
        print(f"  {title:<10} {text}[gMASK] -> {cont}")
        out.append({"prompt": text + "[gMASK]", "continuation": cont})
    return out


def estimate_minutes(cfg) -> tuple[float, float]:
    """(seconds per step measured on 3 steps now, minutes the whole training should take)."""
    from glmkit.train.loop import measure_data_share
    step_s = measure_data_share(cfg, steps=3)["step_s"]
    evals = cfg.max_steps // cfg.eval_every if cfg.eval_every else 0
    # one validation = eval_batches forwards, about a third of a training step each
    return step_s, step_s * (cfg.max_steps + evals * cfg.eval_batches / 3) / 60


# ------------------------------------------------------------------------------------------ summary

def summary_table(rec: dict) -> str:
    """The recorded demo as a short table: the unigram baseline, the untrained and the trained model."""
    u, b, a, t = rec["unigram"], rec["before"], rec["after"], rec["training"]
    n = a["blanks"]["all"]["n"]
    rows = [("bits per byte, held-out text (lower is better)", "bits_per_byte", "{:.3f}"),
            (f"token accuracy, {a['spans']} held-out spans", "span_token_accuracy", "{:.3f}"),
            (f"word blanks ({n}): greedy fill exact", ("blanks", "all", "exact"), "{:.3f}"),
            ("word blanks: first token ranked 1st", ("blanks", "all", "top1"), "{:.3f}"),
            ("word blanks: first token in the top 10", ("blanks", "all", "top10"), "{:.3f}"),
            ("word blanks: median rank of the first token", ("blanks", "all", "median_rank"), "{:,.0f}"),
            ("  English words", ("blanks", "latin", "median_rank"), "{:,.0f}"),
            ("  Chinese words", ("blanks", "cjk", "median_rank"), "{:,.0f}")]

    def get(d, key):
        for k in (key if isinstance(key, tuple) else (key,)):
            d = d.get(k) if isinstance(d, dict) else None
        return d

    lines = [f"glmkit demo: {t['steps']} steps of {rec['recipe']['batch_size']} x {rec['recipe']['seq_len']} in "
             f"{rec['minutes']:.1f} min (training {t['minutes']:.1f} min, {t['step_s']:.2f} s/step, "
             f"MFU {100 * t['mfu']:.1f}% of the {t['mfu_basis']})",
             f"final loss: train {t['loss']:.3f}" + (f", validation {t['val_loss']:.3f}" if t["val_loss"] else "")
             + " (nats per loss token)",
             "", f"{'':<48}{'unigram':>10}{'untrained':>11}{'trained':>10}"]
    for label, key, fmt in rows:
        cells = [get(x, key) for x in (u, b, a)]
        lines.append(f"{label:<48}" + "".join(f"{(fmt.format(c) if c is not None else '-'):>{w}}"
                                              for c, w in zip(cells, (10, 11, 10))))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the job

def run(args: argparse.Namespace) -> int:
    from glmkit.checkpoint.loader import load
    from glmkit.data.corpus import Corpus, default_corpus
    from glmkit.eval import tasks
    from glmkit.eval.blank_probe import word_blanks
    from glmkit.model.glm import GLM
    from glmkit.train.loop import build_model_config, train
    from glmkit.train.metrics import read_jsonl
    from glmkit.train.plot import plot

    clock = _Clock()
    cfg = validate(args)
    stage = tool_stage(args)
    recipe = _recipe(args)
    rec = None if args.overwrite else recorded(args.out_dir, recipe)
    if stage is not None and rec is not None and not args.overwrite_tools:
        recorded_tools(args.out_dir, tools_recipe(recipe, stage))      # another stage recipe: refused now
    if rec is not None:
        print(f"{args.out_dir} holds a finished demo ({rec['finished']}); its recorded results "
              f"(--overwrite runs it again):\n\n{summary_table(rec)}")
        return 0 if stage is None else run_tools_stage(args, stage, recipe, clock, first=6)
    if args.overwrite:
        (Path(args.out_dir) / "demo.json").unlink(missing_ok=True)
    # a tool stage left in the folder was built on a pretrained model that this run replaces
    shutil.rmtree(Path(args.out_dir) / "tools", ignore_errors=True)

    _heading("1. the default bilingual corpus and tokenizer", clock)
    corpus = default_corpus(progress=True) if args.corpus is None else Corpus.open(args.corpus)
    tok = corpus.tokenizer
    cfg.corpus = str(corpus.directory)
    for src in corpus.manifest["sources"]:
        print(f"  {src['name']:14s} train {src['train']['documents']:5d} docs {src['train']['tokens']:9,d} tokens"
              f" | val {src['val']['documents']:4d} docs {src['val']['tokens']:7,d} tokens")
    print(f"  tokenizer: byte-level BPE, {tok.vocab_size} tokens ({corpus.directory}/tokenizer.json)")

    if not args.no_samples:
        from glmkit.cli import samples
        _heading("2. what each objective makes of English and Chinese text", clock)
        samples.run(argparse.Namespace(corpus=str(corpus.directory), length=40, per_language=1, layout="glm",
                                       no_shuffle=False, table=False, seed=0))

    _heading(f"3. the untrained model on {args.blanks} English + {args.blanks} Chinese word blanks drawn at "
             f"random from held-out text (seed {args.blank_seed})", clock)
    blanks = word_blanks(corpus.documents("val"), tok, args.blanks, args.blanks, seed=args.blank_seed)
    counts = tasks.token_counts(corpus.documents("train"))
    torch.manual_seed(cfg.seed)                      # the model exactly as training will initialise it
    untrained = GLM(build_model_config(cfg, tok))
    before, before_readings = measure(untrained, tok, corpus, blanks, counts)
    unigram = unigram_numbers(tok, corpus, blanks, counts, before)
    show_blanks(tok, blanks, before_readings)
    gen_before = show_generations(untrained, tok, "untrained")
    print(f"  bits per byte {before['bits_per_byte']:.3f} (unigram {unigram['bits_per_byte']:.3f}); "
          f"median rank of the first token {before['blanks']['all']['median_rank']:,.0f} "
          f"(unigram {unigram['blanks']['all']['median_rank']:,.0f})")

    _heading(f"4. pretraining with the GLM objective ({args.objective}): {args.max_steps} steps of "
             f"{args.batch_size} x {args.seq_len}", clock)
    step_s, minutes = estimate_minutes(cfg)
    print(f"  estimate: {step_s:.2f} s/step on 3 steps timed now -> about {minutes:.1f} min of training "
          f"(finishing at about {clock.minutes + minutes + 0.5:.0f} min; other load on the machine changes it)",
          flush=True)
    t_train = time.time()
    metrics = train(cfg, log=lambda line: print(line, flush=True))
    train_minutes = (time.time() - t_train) / 60
    if metrics["interrupted"]:
        print(f"interrupted at step {metrics['step']}; run the same command again to continue")
        return 130
    log = read_jsonl(Path(args.out_dir) / "metrics.jsonl")
    steps = [r for r in log if r["kind"] == "train"]
    last_val = next((r for r in reversed(log) if r["kind"] == "val"), {})
    steady = steps[1:] or steps          # the first step pays for start-up

    _heading("5. the same blanks after pretraining", clock)
    model = load(args.out_dir).model
    after, after_readings = measure(model, tok, corpus, blanks, counts)
    show_blanks(tok, blanks, before_readings, after_readings)
    gen_after = show_generations(model, tok, "trained")
    png = plot([args.out_dir], Path(args.out_dir) / "loss.png", title="glmkit demo: GLM pretraining on 2 CPU cores")

    rec = {"recipe": recipe, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "minutes": round(clock.minutes, 2),
           "training": {"steps": metrics["step"], "loss": steps[-1]["loss"], "val_loss": last_val.get("val_loss"),
                        "minutes": round(train_minutes, 2),
                        "step_s": sum(r["step_s"] for r in steady) / len(steady),
                        "tok_per_s": sum(r["tok_per_s"] for r in steady) / len(steady),
                        "mfu": sum(r["mfu"] for r in steady) / len(steady), "mfu_basis": metrics["mfu_basis"]},
           "unigram": unigram, "before": before, "after": after,
           "blanks": [{"script": b.script, "left": tok.decode(b.left), "answer": tok.decode(b.answer),
                       "right": tok.decode(b.right),
                       **{name: {"fill": tok.decode(r.fill), "fill_complete": r.fill_complete,
                                 "p_first": r.p_first, "rank_first": r.rank_first,
                                 "top": [[tok.decode([i]), p] for i, p in r.top]}
                          for name, r in (("before", rb), ("after", ra))}}
                      for b, rb, ra in zip(blanks, before_readings, after_readings)],
           "generations": {"before": gen_before, "after": gen_after}, "loss_png": str(png)}
    path = Path(args.out_dir) / "demo.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, ensure_ascii=False, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"\n{summary_table(rec)}\n\nloss curves: {png}\nrecorded: {path}")
    return 0 if stage is None else run_tools_stage(args, stage, recipe, clock, first=6)


# ------------------------------------------------------------------------------------------ tool use

def tool_stage(args) -> ToolStage | None:
    """The tool-use stage's recipe from the options (checked now), or None with --no-tools-stage."""
    if args.no_tools_stage:
        return None
    families = tuple(f.strip() for f in args.tool_families.split(",") if f.strip())
    return ToolStage(families=families, train=args.tool_train, heldout=args.tool_heldout, steps=args.tool_steps,
                     batch_size=args.tool_batch_size, seq_len=args.tool_seq_len, lr=args.tool_lr,
                     max_new_tokens=args.tool_max_new_tokens).validate()


def tools_recipe(recipe: dict, stage: ToolStage) -> dict:
    return {"pretraining": recipe, **stage.recipe()}


def recorded_tools(out_dir: str | Path, recipe: dict) -> dict | None:
    """The results of a finished tool-use stage of `recipe` in `out_dir/tools`, or None. Another recipe
    there is a GlmkitError (its results are replaced only with --overwrite-tools)."""
    path = Path(out_dir) / "tools" / "tools.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except ValueError:
        raise GlmkitError(f"{path} is not valid JSON; pass --overwrite-tools to run the tool-use stage again") from None
    old = rec.get("recipe") or {}
    if old == recipe:
        return rec
    diff = ", ".join(f"{k} {old.get(k)!r} -> {recipe[k]!r}" for k in recipe if old.get(k) != recipe[k])
    raise GlmkitError(f"{path.parent} holds a finished tool-use stage with another recipe ({diff}); pass "
                      "--overwrite-tools to replace it (the pretraining stays), or --no-tools-stage")


def _claim(folder: Path, recipe: dict) -> None:
    """Mark `folder` as this stage recipe's; an unfinished stage of another recipe there is refused (its
    fine-tuning would resume under the wrong options)."""
    path = folder / "recipe.json"
    if path.is_file() and json.loads(path.read_text()) != recipe:
        raise GlmkitError(f"{folder} holds an unfinished tool-use stage of another recipe; pass --overwrite-tools "
                          "to start it over, or run it with its own options to finish it")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe, indent=1) + "\n")


def _python_for_transcript(workspace: Path):
    """The sandboxed interpreter where this machine has one, else the suite's exact arithmetic (and why)."""
    from glmkit.chat.sandbox import Sandbox, sandbox_problem
    from glmkit.eval.tooltasks import ExactPython
    problem = sandbox_problem()
    if problem is None:
        return Sandbox(workspace), "the sandboxed interpreter (glmkit.chat.sandbox)"
    return ExactPython(), f"ExactPython: no sandbox on this machine ({problem}; scripts/setup_sandbox.sh)"


def run_tools_stage(args, stage: ToolStage, recipe: dict, clock: _Clock, first: int) -> int:
    """Fine-tune the pretrained demo model in `args.out_dir` on the tool-use suite, measure it before and
    after on held-out tasks, print the table and a transcript; recorded in `out_dir/tools/tools.json`."""
    from glmkit.chat.docstore import DocStore
    from glmkit.checkpoint.loader import load
    from glmkit.eval import tooldemo
    from glmkit.eval.tooleval import read_tasks
    from glmkit.infer.engine import Engine
    from glmkit.train.loop import train

    folder = Path(args.out_dir) / "tools"
    recipe = tools_recipe(recipe, stage)
    if args.overwrite_tools or args.overwrite:
        shutil.rmtree(folder, ignore_errors=True)
    rec = recorded_tools(args.out_dir, recipe)
    if rec is not None:
        print(f"\n{folder} holds a finished tool-use stage ({rec['finished']}; --overwrite-tools runs it "
              f"again):\n\n{tools_summary(rec)}")
        return 0
    _claim(folder, recipe)
    t0 = time.time()
    families = ", ".join(stage.families)
    _heading(f"{first}. tool use: the task suite ({families}; English and Chinese), {stage.train} train "
             f"conversations and {stage.heldout} held-out tasks per family and language", clock)
    suite, paths = tooldemo.write_stage_suite(stage, folder / "suite")
    train_rows = len(suite.tasks("train"))
    print(f"  {train_rows} train conversations ({tooldemo.FORMAT}) in {paths['train']}; "
          f"{len(suite.tasks('heldout'))} held-out tasks; {len(suite.documents())} invented documents in "
          f"{paths['store']}")
    pretrained = load(args.out_dir)
    tok = pretrained.tokenizer
    longest = tooldemo.longest_conversation(paths["train"], tok)
    seq_len = tooldemo.row_length(stage, longest, pretrained.model.config.max_position_embeddings)
    tasks = read_tasks(paths["heldout_tasks"])
    store = DocStore(paths["store"])

    _heading(f"{first + 1}. the pretrained model on the {len(tasks)} held-out tasks, with their tools and "
             "without", clock)
    before = tooldemo.measure(Engine(pretrained.model, tok, max_batch=8), tok, tasks, stage, store=store)
    print(before["table"])

    _heading(f"{first + 2}. fine-tuning on the {train_rows} conversations ({tooldemo.FORMAT} format, loss on the "
             f"assistant's turns): {stage.steps} steps of {stage.batch_size} x {seq_len}", clock)
    cfg = tooldemo.sft_config(stage, init=args.out_dir, chat_data=paths["train"], out_dir=folder / "sft",
                              seq_len=seq_len, progress=not args.no_progress)
    t_train = time.time()
    metrics = train(cfg, log=lambda line: print(line, flush=True))
    if metrics["interrupted"]:
        print(f"interrupted at step {metrics['step']}; run the same command again to continue")
        return 130
    train_minutes = (time.time() - t_train) / 60

    _heading(f"{first + 3}. the fine-tuned model on the same held-out tasks", clock)
    tuned = load(folder / "sft")
    engine = Engine(tuned.model, tok, max_batch=8)
    after = tooldemo.measure(engine, tok, tasks, stage, store=store)
    print(after["table"])

    _heading(f"{first + 4}. the fine-tuned model at work: the first English held-out task of each family", clock)
    python, python_name = _python_for_transcript(folder / "workspace")
    transcripts = []
    try:
        for family in stage.families:
            task = next(t for t in tasks if t.family == family and t.lang == "en")
            events = tooldemo.episode(engine, tok, task, stage,
                                      store=store, python=python)
            transcripts.append({"task": task.id, "answer": task.answer, "events": events})
    finally:
        if hasattr(python, "close"):
            python.close()
    rec = {"recipe": recipe, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "minutes": round((time.time() - t0) / 60, 2), "seq_len": seq_len, "longest_conversation": longest,
           "python_in_transcripts": python_name,
           "training": {"steps": metrics["step"], "loss": metrics["loss"], "minutes": round(train_minutes, 2),
                        "tok_per_s": metrics.get("tok_per_s")},
           "before": before, "after": after, "transcripts": transcripts}
    path = folder / "tools.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, ensure_ascii=False, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"\n{tools_summary(rec)}\n\nrecorded: {path}; the whole demo took {clock} (minutes:seconds)")
    return 0


def tools_summary(rec: dict) -> str:
    """The recorded tool-use stage: the before/after table and the transcripts."""
    from glmkit.eval.tooldemo import before_after_table, format_transcript
    r, t = rec["recipe"], rec["training"]
    lines = [f"tool use: {t['steps']} fine-tuning steps of {r['batch_size']} x {rec['seq_len']} in "
             f"{t['minutes']:.1f} min (the stage {rec['minutes']:.1f} min); final loss {t['loss']:.3f} "
             "(nats per assistant token)", "", before_after_table(rec["before"], rec["after"]), "",
             f"transcripts (python: {rec['python_in_transcripts']}):"]
    for tr in rec["transcripts"]:
        lines += ["", f"[{tr['task']}; expected answer {tr['answer']}]", format_transcript(tr["events"])]
    return "\n".join(lines)
