"""The training data prefetcher: each step's micro-batches, built ahead in a background thread together
with everything the step would otherwise have to read back from the device.

A micro-batch leaves `glmkit.data.batches.BatchIterator` as numpy arrays. While it is still on the host,
`prepare` turns it into a `StepBatch`:
- `batch`: the torch tensors (`Batch.to("cpu")`), in pinned memory when the model is on CUDA, so that
  `StepBatch.to(device)` is an asynchronous copy;
- `plan`: the host part of its attention mask (`glmkit.model.attention.plan_mask`: which backend runs,
  no mask at all when every row is one plain causal / bidirectional sample, the split backend's
  flat-token plan), resolved for the model's backend, device and compute dtype;
- `loss_index`: the flat indices of its loss positions (`glmkit.batch.loss_positions`), which the model
  gathers the hidden states at;
- `n_loss`: how many there are, a host int (the step weights its micro-batches by it).
On the device, the step builds the rest of the mask from the plan (`model.attention_mask(batch,
plan=...)`) and calls `model.loss(batch, attn, loss_index=...)`: nothing is read back. What a GPU
step still reads back is named in `glmkit.train.loop.train_step`.

`Prefetcher` runs the draw and the preparation `depth` steps ahead in a daemon thread (or in the
caller's thread with depth 0). Each item carries the data-iterator states *after* its batches were
drawn, so a checkpoint stores exactly where the consumed stream stands, not where the read-ahead got to.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from glmkit.batch import Batch, loss_positions
from glmkit.model.attention import MaskPlan, plan_mask


@dataclass
class StepBatch:
    """One micro-batch ready for a training step (see the module docstring)."""
    batch: Batch                 # torch tensors: pinned CPU (CUDA runs) or CPU, then the device's
    plan: MaskPlan               # host decisions about its attention mask
    loss_index: torch.Tensor     # (n_loss,) int64 flat indices of the loss positions
    n_loss: int                  # number of loss positions (host)

    def to(self, device: str | torch.device) -> StepBatch:
        """Every tensor on `device`; non-blocking copies (asynchronous from pinned memory)."""
        return StepBatch(self.batch.to(device, non_blocking=True), self.plan.to(device, non_blocking=True),
                         self.loss_index.to(device, non_blocking=True), self.n_loss)


def prepare(batch: Batch, backend: str, device: str | torch.device, dtype: torch.dtype | None) -> StepBatch:
    """A numpy micro-batch as a `StepBatch` for a model on `device` computing in `dtype` with attention
    `backend`. Reads only host memory."""
    plan = plan_mask(batch, backend, device, dtype)
    index = loss_positions(batch)
    tensors = batch.to("cpu")
    if torch.device(device).type == "cuda":       # page-locked: the copy to the GPU runs asynchronously
        tensors, plan, index = tensors.pin_memory(), plan.pin_memory(), index.pin_memory()
    return StepBatch(tensors, plan, index, int(index.numel()))


class Prefetcher:
    """Yields one step's micro-batches at a time (each passed through `prepare`, default: as drawn),
    built `depth` steps ahead in a daemon thread."""

    def __init__(self, iterators: dict[int, object], grad_accum: int, start_micro: int, depth: int,
                 prepare: Callable | None = None):
        self.its, self.grad_accum, self.micro = iterators, grad_accum, start_micro
        self.prepare = prepare or (lambda b: b)
        self.order = sorted(iterators)
        self.depth, self.stop = depth, threading.Event()
        if depth > 0:
            self.queue = queue.Queue(maxsize=depth)
            self.thread = threading.Thread(target=self._run, daemon=True, name="glmkit-data")
            self.thread.start()

    def _make(self):
        batches = []
        for _ in range(self.grad_accum):
            batches.append(self.prepare(next(self.its[self.order[self.micro % len(self.order)]])))
            self.micro += 1
        return batches, {s: copy.deepcopy(it.state_dict()) for s, it in self.its.items()}

    def _run(self):
        try:
            while not self.stop.is_set():
                self._put(self._make())
        except BaseException as e:  # hand the error to the training thread
            self._put(e)

    def _put(self, item) -> None:
        """Queue `item`, giving up once the consumer has closed the prefetcher."""
        while not self.stop.is_set():
            with contextlib.suppress(queue.Full):
                self.queue.put(item, timeout=0.1)
                return

    def next(self):
        if self.depth == 0:
            return self._make()
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        """Stop the thread and wait for it: it runs torch code (`prepare`), which must not be cut off by
        the interpreter's exit (a daemon thread inside torch at exit can abort the process)."""
        self.stop.set()
        if self.depth > 0:
            self.thread.join()
