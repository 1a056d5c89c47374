"""The GLM paper's central comparison at a size a CPU can run (`glmkit experiment compare`).

GLM (blank infilling), BERT-style MLM and GPT-style CLM models of the same shape are pretrained on the
same corpus for the same number of processed positions (steps x batch x seq_len, with the same seed
and optimizer), plus the span-shuffling ablation (GLM with Part B left to right). Each is then
evaluated on every task of `glmkit.eval.evaluate`, and the results go to `OUT/results.json`,
`OUT/results.md` (a Markdown table) and `OUT/compare.png` (validation curves + task scores).

    glmkit experiment compare                 # the CPU default (~27 min on 2 cores)
    glmkit experiment compare --quick         # a ~3-minute smoke run of the whole pipeline
    glmkit experiment compare --steps 5000 --model-overrides hidden_size=512,num_layers=8 --device cuda

GLM is trained with the multi-task mixture of GLM-10B (P([MASK]), P([sMASK]), P([gMASK]) =
0.5 / 0.3 / 0.2) so that one model is asked to both fill blanks and continue text, as GLM is used
here; `--mixture 1,0,0` gives GLM-Large's [MASK]-only objective.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from glmkit.errors import GlmkitError
from glmkit.eval.evaluate import EvalConfig, evaluate

VARIANTS = ("glm", "glm-noshuffle", "mlm", "clm")


@dataclass
class CompareConfig:
    out_dir: str = "runs/compare"
    model: str = "small"
    model_overrides: str = "hidden_size=128,num_layers=4,num_heads=4,num_kv_heads=2,intermediate_size=352"
    corpus: str | None = None
    steps: int = 400
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 1e-3
    mixture: str = "0.5,0.3,0.2"
    seed: int = 1234
    device: str = "cpu"
    variants: str = ",".join(VARIANTS)
    eval_every: int = 50


QUICK = dict(steps=30, seq_len=64, batch_size=8, eval_every=10,
             model_overrides="hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,intermediate_size=128")
QUICK_EVAL = EvalConfig(val_tokens=2000, infill_n=40, cloze_n=40, sentiment_test=80, sentiment_train=64,
                        finetune_steps=10, finetune_batch=8)
DEFAULT_EVAL = EvalConfig(val_tokens=20000, infill_n=200, cloze_n=200, sentiment_test=400, sentiment_train=512,
                          finetune_steps=100, finetune_batch=16, finetune_lr=3e-4)


def train_variant(cfg: CompareConfig, variant: str) -> Path:
    from glmkit.train.loop import TrainConfig, train
    glm = variant.startswith("glm")
    tc = TrainConfig(out_dir=str(Path(cfg.out_dir) / variant), model=cfg.model, model_overrides=cfg.model_overrides,
                     corpus=cfg.corpus, objective={"glm": "glm", "glm-noshuffle": "glm-noshuffle"}.get(variant, variant),
                     mixture=cfg.mixture if glm else None, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                     max_steps=cfg.steps, lr=cfg.lr, seed=cfg.seed, device=cfg.device, eval_every=cfg.eval_every,
                     eval_batches=4, save_every=cfg.steps, keep=1, progress=False, tensorboard=False, overwrite=True)
    res = train(tc)
    return Path(res["checkpoint"])


def _row(name: str, r: dict) -> str:
    s = r["sentiment"]
    return (f"| {name} | {r['val']['bits_per_byte']:.3f} | {r['val']['perplexity']:.1f} | "
            f"{r['infill']['exact_match']:.3f} | {r['infill']['token_accuracy']:.3f} | {r['cloze']['accuracy']:.3f} | "
            f"{s['zero_shot']:.3f} | {s.get('finetuned', float('nan')):.3f} |")


def table(results: dict, cfg: CompareConfig) -> str:
    r0 = next(iter(results.values()))
    lines = [f"Same shape ({cfg.model}: {cfg.model_overrides}), {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} "
             f"= {cfg.steps * cfg.batch_size * cfg.seq_len:,} positions each, seed {cfg.seed}. "
             f"Chance: cloze {r0['cloze']['chance']:.2f}, sentiment majority {r0['sentiment']['majority']:.3f}.", "",
             "| model | val bits/byte | val ppl | infill exact | infill token acc | cloze acc | sentiment zero-shot "
             "| sentiment PET |", "|---|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [_row(n, r) for n, r in results.items()]) + "\n"


def draw(results: dict, cfg: CompareConfig, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from glmkit.train.plot import curves
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=110)
    for i, name in enumerate(results):
        c = curves(Path(cfg.out_dir) / name)
        if c["val"][0]:
            a.plot(c["val"][0], c["val"][1], marker="o", ms=3, color=f"C{i}", label=name)
    a.set(xlabel="step", ylabel="validation loss (own objective, nats)", title="validation loss")
    a.grid(alpha=0.3)
    a.legend()
    metrics = [("infill token acc", lambda r: r["infill"]["token_accuracy"]),
               ("infill exact", lambda r: r["infill"]["exact_match"]),
               ("cloze", lambda r: r["cloze"]["accuracy"]),
               ("sentiment 0-shot", lambda r: r["sentiment"]["zero_shot"]),
               ("sentiment PET", lambda r: r["sentiment"].get("finetuned", 0.0))]
    w = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        b.bar([k + i * w for k in range(len(metrics))], [f(r) for _, f in metrics], w, color=f"C{i}", label=name)
    b.set_xticks([k + 0.4 - w / 2 for k in range(len(metrics))], [m for m, _ in metrics], fontsize=8)
    b.set(ylim=(0, 1), title="task scores (higher is better)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def compare(cfg: CompareConfig, eval_cfg: EvalConfig, log=None) -> dict:
    """Pretrain and evaluate every variant of `cfg.variants`; writes results.json, results.md and
    compare.png into `cfg.out_dir` and returns the results. `log` gets progress lines and the table."""
    log = log or (lambda line: None)
    variants = [v.strip() for v in cfg.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise GlmkitError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eval_cfg = replace(eval_cfg, corpus=cfg.corpus, device=cfg.device)
    results, t0 = {}, time.time()
    for v in variants:
        t = time.time()
        log(f"[{v}] pretraining {cfg.steps} steps ...")
        ckpt = train_variant(cfg, v)
        from glmkit.checkpoint.loader import load
        loaded = load(ckpt, cfg.device)
        model, tok, objective = loaded.model, loaded.tokenizer, loaded.objective
        log(f"[{v}] evaluating ({time.time() - t:.0f}s so far)")
        results[v] = evaluate(model, tok, objective, eval_cfg, log=log)
        results[v]["seconds_total"] = round(time.time() - t, 1)
    (out / "results.json").write_text(json.dumps({"config": asdict(cfg), "eval": asdict(eval_cfg),
                                                  "results": results}, indent=1) + "\n")
    md = table(results, cfg)
    (out / "results.md").write_text(md)
    draw(results, cfg, out / "compare.png")
    log(md)
    log(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'compare.png'} in {time.time() - t0:.0f}s")
    return results
