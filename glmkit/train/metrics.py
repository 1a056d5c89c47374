"""Training metrics: a JSONL log in the run directory, TensorBoard when installed, a progress bar,
and the peak FLOP/s that MFU is measured against.

`metrics.jsonl` has one JSON object per line; every record has `step` (optimizer steps completed)
and `kind` ("train", "val" or "event"). Train records carry `loss`, `lr`, `grad_norm`, `tokens`
(processed positions so far), `tok_per_s`, `mfu`, `data_s` / `step_s` (time waiting for data and the
whole step); val records carry `val_loss`. On resume the log is cut back to the checkpoint's step, so
a resumed run's log reads exactly like an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import torch

# bf16 dense tensor-core peaks from the vendors' data sheets, FLOP/s (no sparsity)
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12,
                  "RTX 4090": 165e12, "RTX 3090": 71e12}


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a kill mid-write
            continue
    return out


class MetricsLogger:
    """Append-only JSONL (+ TensorBoard) writer. Only rank 0 writes; other ranks pass enabled=False."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:  # drop what a killed run logged after its last checkpoint
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


class Progress:
    """A tqdm bar over optimizer steps with loss, tokens/s and MFU; when disabled, `write` hands its
    lines to `log` (if given)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train", log=None):
        self.bar, self.log = None, log
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def write(self, text: str) -> None:
        """A line above the bar: the bar is cleared, the line written and flushed (so it lands before
        the bar's next redraw even when stdout is a pipe and the bar is on stderr), the bar redrawn.
        Without a bar the line goes to `log`, if given."""
        if self.bar is None:
            if self.log is not None:
                self.log(text)
            return
        with self.bar.external_write_mode():
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


# Square matmul sizes timed for a measured peak: the best of several, because which size runs fastest
# depends on the BLAS library, the cache sizes and the thread count.
CPU_PEAK_SIZES = (256, 512, 1024, 1536)
GPU_PEAK_SIZES = (4096, 8192)


def _time_matmul(device: torch.device, dtype: torch.dtype, n: int, iters: int, trials: int = 3) -> float:
    """FLOP/s of the best of `trials` timings of `iters` (n x n) @ (n x n) products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(trials):  # best of several: a peak, not a moment when another process held the cores
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * iters / best


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None,
                         iters: int | None = None) -> float:
    """FLOP/s of square matmuls on this device and dtype: the honest peak on a CPU, where no data sheet
    applies. With `n`, that size only; otherwise the best over CPU_PEAK_SIZES / GPU_PEAK_SIZES, each
    the best of three timings of about a GFLOP (CPU) or more (GPU): about a second in all on a CPU."""
    sizes = (n,) if n else (GPU_PEAK_SIZES if device.type == "cuda" else CPU_PEAK_SIZES)
    target = 5e11 if device.type == "cuda" else 1e9            # FLOPs per timing
    return max(_time_matmul(device, dtype, s, iters or max(1, round(target / (2 * s**3)))) for s in sizes)


@functools.cache
def _cached_peak(device: torch.device, dtype: torch.dtype) -> float:
    return measured_matmul_peak(device, dtype)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, what it is): the data-sheet bf16 peak of a known GPU, otherwise the best measured
    square matmul (measured once per process, device and dtype)."""
    sheet = datasheet_peak(device) if dtype == torch.bfloat16 else None
    if sheet is not None:
        return sheet, f"{torch.cuda.get_device_name(device)} data-sheet bf16 peak"
    sizes = GPU_PEAK_SIZES if device.type == "cuda" else CPU_PEAK_SIZES
    dname = str(dtype).replace("torch.", "")
    peak = _cached_peak(device, dtype)
    return peak, (f"best measured {dname} matmul on {device.type} "
                  f"(square sizes {', '.join(map(str, sizes))}, best of 3 each)")
