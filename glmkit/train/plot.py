"""Training and validation loss curves from `metrics.jsonl` (`glmkit plot RUN_DIR...`).

Each run is one colour: the training loss as a thin line (smoothed with a running mean), the
validation loss as a thick line with markers. Drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path

from glmkit.errors import GlmkitError
from glmkit.train.metrics import read_jsonl


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing running mean over `window` points (window <= 1: unchanged)."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def curves(run_dir: str | Path, x: str = "step") -> dict[str, tuple[list[float], list[float]]]:
    """{"train": (xs, losses), "val": (xs, losses)} read from a run directory (or a metrics.jsonl)."""
    path = Path(run_dir)
    path = path if path.suffix == ".jsonl" else path / "metrics.jsonl"
    records = read_jsonl(path)
    if not records:
        raise GlmkitError(f"no metrics in {path}: pass a run directory written by `glmkit train`")
    tokens_at = {r["step"]: r["tokens"] for r in records if r.get("kind") == "train" and "tokens" in r}

    def xval(r):
        return tokens_at.get(r["step"], 0) if x == "tokens" else r["step"]

    train = [(xval(r), r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    val = [(xval(r), r["val_loss"]) for r in records if r.get("kind") == "val"]
    return {k: ([a for a, _ in v], [b for _, b in v]) for k, v in (("train", train), ("val", val))}


def plot(run_dirs: list[str | Path], out: str | Path, x: str = "step", window: int = 20,
         title: str | None = None, log_y: bool = False) -> Path:
    """Draw the curves of `run_dirs` into the image `out` (its folder must exist; the format follows
    its suffix: .png, .pdf or .svg); returns `out`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, run in enumerate(run_dirs):
        c = curves(run, x)
        color, name = f"C{i}", Path(run).name
        if c["train"][0]:
            ax.plot(c["train"][0], smooth(c["train"][1], window), color=color, lw=1, alpha=0.6,
                    label=f"{name} train")
        if c["val"][0]:
            ax.plot(c["val"][0], c["val"][1], color=color, lw=2, marker="o", ms=3, label=f"{name} val")
    ax.set_xlabel("tokens (processed positions)" if x == "tokens" else "step")
    ax.set_ylabel("loss (nats per predicted token)")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "glmkit training loss")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
