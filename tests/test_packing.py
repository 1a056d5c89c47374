"""Packing samples into rows: isolation in the reference mask, chunking, padding, gMASK in shared rows."""

import numpy as np
import torch
from helpers import MASK_IDS, SP, reconstruct
from hypothesis import given, settings
from hypothesis import strategies as st

from glmkit.batch import dense_mask
from glmkit.data.objective_config import ObjectiveConfig
from glmkit.data.objectives import GMASK, MLM, chunk_length
from glmkit.data.packing import PackStats, chunk_documents, chunk_lengths, first_fit, pack, pack_documents

PRESETS = ["glm-large", "glm-10b", "glm-130b", "bert", "gpt"]


def segments(batch, r):
    """(segment id, first column, last column + 1) of each sample in row r."""
    seg = batch.segment_ids[r]
    out = []
    for s in sorted(set(seg.tolist()) - {-1}):
        cols = np.flatnonzero(seg == s)
        assert (np.diff(cols) == 1).all()                    # a sample is contiguous
        out.append((s, cols[0], cols[-1] + 1))
    return out


def test_chunking_keeps_every_token():
    docs = [np.arange(n) for n in (0, 1, 10, 25, 31)]
    tokens, offsets = chunk_documents(docs, 10)
    assert np.diff(offsets).tolist() == [1, 10, 10, 10, 5, 10, 10, 10, 1]
    assert tokens.tolist() == np.concatenate(docs).tolist()
    assert chunk_lengths(np.array([20]), 10).tolist() == [10, 10]


def test_first_fit_in_order():
    row, col, consumed = first_fit(np.array([6, 5, 4, 3, 9, 2]), np.array([1, 1, 0, 1, 1, 1], bool), 2, 10)
    # 6 -> row 0; 5 -> row 1; (4 skipped); 3 -> row 0 at col 6; 9 fits nowhere: stop
    assert consumed == 4 and row.tolist() == [0, 1, -1, 0] and col.tolist() == [0, 0, 0, 6]


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 150), min_size=1, max_size=30), seed=st.integers(0, 2**32 - 1),
       preset=st.sampled_from(PRESETS), layout=st.sampled_from(["glm", "span"]),
       seq_len=st.sampled_from([64, 128]))
def test_packed_rows(lengths, seed, preset, layout, seq_len):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 50, size=n) for n in lengths]
    cfg = ObjectiveConfig.from_name(preset, layout=layout)
    tokens, offsets = chunk_documents(docs, chunk_length(cfg, seq_len))
    res = pack(tokens, offsets, cfg, SP, rng, 3, seq_len)
    b, T = res.batch, seq_len
    m = dense_mask(b)
    seg = torch.as_tensor(b.segment_ids)
    assert not (m & (seg[:, :, None] != seg[:, None, :])).any()           # samples never see each other
    pad = b.segment_ids == -1
    assert (b.input_ids[pad] == SP.pad).all() and (b.sep[pad] == T).all() and not b.loss_mask[pad].any()
    assert not b.targets[~b.loss_mask].any()
    pieces = [tokens[offsets[i]:offsets[i + 1]] for i in res.index]
    n_seen = 0
    for r in range(3):
        for j, (s, c0, c1) in enumerate(segments(b, r)):
            assert s == j                                                      # numbered left to right
            i = np.flatnonzero((res.row == r) & (res.col == c0))[0]
            n_seen += 1
            sep = int(b.sep[r, c0]) - c0
            assert (b.sep[r, c0:c1] == c0 + sep).all()
            # within the sample the mask is the single-sample rule on relative columns
            q, k = torch.arange(c1 - c0)[:, None], torch.arange(c1 - c0)[None]
            span = torch.as_tensor(b.span_ids[r, c0:c1])
            assert torch.equal(m[r, c0:c1, c0:c1], (k < sep) | ((k <= q) & (span[:, None] == span[None])))
            sample = {f: getattr(b, f)[r, c0:c1] for f in
                      ("input_ids", "targets", "loss_mask", "position_ids", "block_position_ids", "span_ids")}
            sample["sep"] = sep
            kind = int(res.samples.kind[i])
            if cfg.kind == "glm":
                text, _ = reconstruct(sample, MASK_IDS[kind])
                assert text == pieces[i].tolist()
                if kind == GMASK and len(segments(b, r)) > 1:                 # shared row: always the suffix
                    assert sample["input_ids"][sep - 1] == SP.gmask
            elif kind == MLM:
                assert sep == c1 - c0
                sel = sample["loss_mask"]
                assert (sample["input_ids"][~sel] == pieces[i][~sel]).all()
            else:
                assert sep == 0 and (sample["input_ids"] == pieces[i]).all()
    assert n_seen == len(res.index) == res.stats.samples
    st_ = res.stats
    assert st_.processed == int((b.segment_ids >= 0).sum()) and st_.positions == 3 * T
    assert abs(st_.efficiency - (b.segment_ids >= 0).mean()) < 1e-12
    assert st_.text_tokens == sum(len(p) for p in pieces)
    assert res.consumed >= len(res.index)


def test_long_documents_fill_rows():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, size=5000) for _ in range(4)]
    res = pack_documents(docs, ObjectiveConfig(), SP, rng, 8, 512)
    assert res.stats.samples >= 8 and res.stats.efficiency > 0.9
    stats = res.stats + PackStats()
    assert stats.samples == res.stats.samples and "packing efficiency" in stats.summary()
