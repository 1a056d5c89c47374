"""Training metrics: a JSONL log in the run directory, TensorBoard when installed, a progress bar,
and the peak FLOP/s that MFU is measured against.

`metrics.jsonl` has one JSON object per line; every record has `step` (optimizer steps completed)
and `kind` ("train", "val" or "event"). Train records carry `loss`, `lr`, `grad_norm`, `tokens`
(processed positions so far), `tok_per_s`, `mfu`, `data_s` / `step_s` (time waiting for data and the
whole step); val records carry `val_loss`. On resume the log is cut back to the checkpoint's step, so
a resumed run's log reads exactly like an uninterrupted one.
"""

from __future__ import annotations

import json
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
        if self.bar is not None:
            self.bar.write(text)
        elif self.log is not None:
            self.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 1024, iters: int = 8) -> float:
    """FLOP/s of a square matmul on this device and dtype: the honest peak on a CPU, where no data
    sheet applies. Measured once at start-up, in well under a second."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    for _ in range(3):  # best of three: a peak, not a moment when another process held the cores
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 * iters / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, what it is): the data-sheet bf16 peak of a known GPU, otherwise measured."""
    sheet = datasheet_peak(device) if dtype == torch.bfloat16 else None
    if sheet is not None:
        return sheet, f"{torch.cuda.get_device_name(device)} data-sheet bf16 peak"
    n = 4096 if device.type == "cuda" else 1024
    dname = str(dtype).replace("torch.", "")
    return measured_matmul_peak(device, dtype, n=n), f"measured {n}x{n} {dname} matmul on {device.type}"
