"""The reference mask rule of glmkit.batch on hand-built rows."""

import numpy as np
import pytest
import torch

from glmkit.batch import Batch, dense_mask, float_mask


def _batch(sep, seg, span):
    T = len(sep)
    z = np.zeros((1, T), dtype=np.int64)
    return Batch(input_ids=z, targets=z, loss_mask=z.astype(bool), position_ids=z, block_position_ids=z,
                 segment_ids=np.array([seg]), sep=np.array([sep]), span_ids=np.array([span]))


def test_glm_layout_is_prefix_lm():
    # one sample: Part A = 3 tokens, Part B = 3 tokens
    m = dense_mask(_batch([3] * 6, [0] * 6, [0, 0, 0, 1, 1, 1]))[0]
    A = torch.zeros(6, 6, dtype=torch.bool)
    A[:, :3] = True                       # everyone sees Part A
    A[:3, 3:] = False                     # Part A never sees Part B (already false)
    for q in range(3, 6):
        A[q, 3:q + 1] = True              # Part B causal
    assert torch.equal(m, A)


def test_span_layout_and_segments():
    # sample 0: A=2, spans of length 2 and 1; sample 1 (packed): CLM of 2 tokens; one padding token
    sep = [2, 2, 2, 2, 2, 5, 5, 7]
    seg = [0, 0, 0, 0, 0, 1, 1, -1]
    span = [0, 0, 1, 1, 2, 0, 0, 0]
    m = dense_mask(_batch(sep, seg, span))[0]
    assert m[3, 2] and not m[4, 2] and not m[4, 3] and m[4, 4]   # own span only
    assert m[2, 0] and m[4, 1] and not m[1, 2]                     # B sees A, A does not see B
    assert not m[5, :5].any() and m[6, 5] and not m[5, 6]          # packed CLM sample is causal, isolated
    assert m[7, 7] and m[7].sum() == 1                             # padding sees only padding
    f = float_mask(_batch(sep, seg, span))
    assert f.shape == (1, 1, 8, 8) and torch.equal(f[0, 0] == 0, m)


def test_shape_mismatch_is_named():
    z = np.zeros((1, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="segment_ids"):
        Batch(z, z, z, z, z, np.zeros((1, 3)), z, z)
