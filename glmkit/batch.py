"""The one batch structure every objective produces and every model consumes.

GLM blank infilling, BERT-style MLM and GPT-style CLM all become a `Batch`, so one model and one
trainer serve all three (DESIGN.md §1). Every field is a (B, T) array: numpy when built by the data
pipeline, torch after `Batch.to(device)`.

Fields
- input_ids: token ids fed to the model.
- targets: the token to predict at each position; only meaningful where `loss_mask` is set
  (elsewhere it is 0).
- loss_mask: bool, the positions whose prediction is scored. The loss is the mean cross-entropy over
  them, and the model projects to the vocabulary only there.
- position_ids, block_position_ids: GLM's 2D positions. position id = index in the corrupted text
  (every Part B token of a span carries the position of its [MASK]); block position id = 0 in Part A,
  1.. inside a span. Families with 1-D positions use `position_ids + block_position_ids`, which is
  the plain running index for a `[gMASK]` prefix-LM sample.
- segment_ids: int, the packed sample a token belongs to; keys of another segment are never
  visible. Padding forms its own segment (id -1) whose queries see only padding.
- sep: int, the absolute column where Part A of this token's sample ends (`sample start + |A|`).
  MLM: the sample's end (all bidirectional); CLM: the sample's start (all causal). Padding: T.
- span_ids: int, the causal run a Part B token belongs to. In the `glm` layout every Part B token of
  a sample shares one id (each sees all earlier Part B tokens); in the `span` layout each span has
  its own id (a Part B token sees only earlier tokens of its own span).
- loss_weight (optional, default None = every loss position weighs 1): float, a weight on each loss
  position's cross-entropy; the loss is then sum(weight x cross-entropy) / number of loss positions,
  so all-ones weights give the plain mean. Policy-gradient training (`glmkit.train.rl`) puts each
  sampled token's advantage here. Nothing else reads it: the attention mask and the loss positions
  come from the other fields.

The attention rule, for query q and key k in one row (the reference every backend is tested against):

    visible(q, k) = segment_ids[q] == segment_ids[k]
                    and (k < sep[q] or (k <= q and span_ids[k] == span_ids[q]))
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

FIELDS = ("input_ids", "targets", "loss_mask", "position_ids", "block_position_ids", "segment_ids", "sep",
          "span_ids")
OPTIONAL = ("loss_weight",)         # fields that may be None (absent)


@dataclass
class Batch:
    input_ids: np.ndarray | torch.Tensor
    targets: np.ndarray | torch.Tensor
    loss_mask: np.ndarray | torch.Tensor
    position_ids: np.ndarray | torch.Tensor
    block_position_ids: np.ndarray | torch.Tensor
    segment_ids: np.ndarray | torch.Tensor
    sep: np.ndarray | torch.Tensor
    span_ids: np.ndarray | torch.Tensor
    loss_weight: np.ndarray | torch.Tensor | None = None

    def __post_init__(self):
        shape = tuple(self.input_ids.shape)
        if len(shape) != 2:
            raise ValueError(f"Batch fields must be (batch, seq_len) arrays; input_ids has shape {shape}")
        for f in fields(self):
            if getattr(self, f.name) is None and f.name in OPTIONAL:
                continue
            s = tuple(getattr(self, f.name).shape)
            if s != shape:
                raise ValueError(f"Batch field {f.name!r} has shape {s}, expected {shape} like input_ids")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def _present(self):
        """(name, value) of every field that is set (an absent optional field is left out)."""
        return ((n, getattr(self, n)) for n in FIELDS + OPTIONAL if getattr(self, n) is not None)

    def to(self, device: str | torch.device = "cpu", non_blocking: bool = False) -> Batch:
        """Torch tensors on `device`: ids as int64, loss_mask as bool, segment/span ids as int32, loss_weight
        as float32."""
        out = {}
        for name, v in self._present():
            if isinstance(v, np.ndarray):
                v = torch.from_numpy(np.ascontiguousarray(v))
            dtype = torch.bool if name == "loss_mask" else torch.float32 if name == "loss_weight" else (
                torch.int32 if name in ("segment_ids", "span_ids") else torch.int64)
            out[name] = v.to(device=device, dtype=dtype, non_blocking=non_blocking)
        return Batch(**out)

    def pin_memory(self) -> Batch:
        """CPU torch tensors in page-locked memory (needs CUDA), so a copy to the GPU can be asynchronous."""
        return Batch(**{n: v.pin_memory() for n, v in self._present()})

    def numpy(self) -> Batch:
        return Batch(**{n: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for n, v in self._present()})

    def __getitem__(self, rows) -> Batch:
        """Select rows, keeping two dimensions (`batch[2:4]`, `batch[[0, 3]]`)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        return Batch(**{n: v[rows] for n, v in self._present()})

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def loss_positions(batch: Batch) -> torch.Tensor:
    """Flat indices (into the B*T positions) of the loss positions, (N,) int64, in row-major order.
    From a numpy batch: a CPU tensor made on the host (the trainer ships it to the device with the
    batch); from a torch batch: on its device (`nonzero` reads the mask back from a GPU)."""
    if isinstance(batch.loss_mask, np.ndarray):
        return torch.from_numpy(np.flatnonzero(batch.loss_mask.reshape(-1)).astype(np.int64))
    return batch.loss_mask.reshape(-1).nonzero().squeeze(-1)


def dense_mask(batch: Batch) -> torch.Tensor:
    """The reference attention mask, (B, T, T) bool, True where query q (dim 1) may see key k (dim 2).

    Built directly from the rule in the module docstring; O(T^2) memory, for tests, CPU training and
    handing a 4D mask to other implementations.
    """
    b = batch if isinstance(batch.input_ids, torch.Tensor) else batch.to("cpu")
    T = b.input_ids.shape[1]
    idx = torch.arange(T, device=b.input_ids.device)
    q, k = idx[:, None], idx[None, :]                                            # (T, 1), (1, T)
    same_seg = b.segment_ids[:, :, None] == b.segment_ids[:, None, :]            # (B, T, T)
    in_part_a = k[None] < b.sep[:, :, None]                                      # (B, T, T)
    causal_run = (k <= q)[None] & (b.span_ids[:, :, None] == b.span_ids[:, None, :])
    return same_seg & (in_part_a | causal_run)


def float_mask(batch: Batch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`dense_mask` as an additive (B, 1, T, T) float mask, 0 where visible and -inf elsewhere: the
    form HF transformers' eager and sdpa backends agree on."""
    m = dense_mask(batch)
    out = torch.zeros(m.shape, dtype=dtype, device=m.device)
    out.masked_fill_(~m, torch.finfo(dtype).min)
    return out[:, None]
