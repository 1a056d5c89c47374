"""The training prefetcher builds the mask metadata and the loss positions on the host: they equal what
the model used to compute from the batch on its device, and the loss from them is the same, bit for bit."""

import numpy as np
import pytest
import torch

import glmkit.model.attention as att
from glmkit.batch import Batch
from glmkit.data.objective_config import ObjectiveConfig, SpecialIds
from glmkit.data.packing import chunk_length, pack_documents
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM
from glmkit.train.prefetch import Prefetcher, StepBatch, prepare

VOCAB = 128
SP = SpecialIds(mask=120, smask=121, gmask=122, sop=123, eop=124, eot=125, pad=126, vocab_size=VOCAB,
                sentence_ends=(7, 9))
# (objective, layout, document length as a share of a row's text, rows): packed GLM rows in both layouts,
# plain rows (one unpadded sample each: no mask at all), and padded causal / bidirectional rows
CASES = {"glm": ("glm", "glm", 0.3, 3), "glm-span": ("glm", "span", 0.3, 3), "clm": ("clm", "glm", 1.0, 2),
         "mlm": ("mlm", "glm", 1.0, 2), "clm-padded": ("clm", "glm", 0.7, 2), "mlm-packed": ("mlm", "glm", 0.4, 2)}


def _batch(case: str, seq_len: int = 48, seed: int = 0) -> Batch:
    kind, layout, share, rows = CASES[case]
    cfg = ObjectiveConfig(kind=kind, layout=layout, mixture=(0.5, 0.2, 0.3) if kind == "glm" else (1.0, 0.0, 0.0))
    rng = np.random.default_rng(seed)
    n = max(4, int(share * chunk_length(cfg, seq_len)))
    docs = [rng.integers(0, 100, n) for _ in range(3 * rows)]
    return pack_documents(docs, cfg, SP, rng, rows, seq_len).batch


def _old_loss_index(batch: Batch) -> torch.Tensor:
    return batch.to("cpu").loss_mask.reshape(-1).nonzero().squeeze(-1)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["auto", "sdpa", "flex"])
def test_prefetched_metadata_equals_what_the_device_path_computes(case, backend):
    batch = _batch(case)
    item = prepare(batch, backend, "cpu", torch.float32)
    old = att.make_attention_mask(batch.to("cpu"), backend, torch.float32)      # reads the batch itself
    new = att.make_attention_mask(item.batch, plan=item.plan)
    assert new.backend == old.backend == item.plan.backend
    assert (new.backend in ("causal", "full")) == (case in ("clm", "mlm"))
    if old.dense is not None:
        assert torch.equal(new.dense, old.dense)
    if old.block_mask is not None:
        assert torch.equal(new.block_mask.to_dense(), old.block_mask.to_dense())
    assert torch.equal(item.loss_index, _old_loss_index(batch)) and item.loss_index.dtype == torch.int64
    assert item.n_loss == int(batch.loss_mask.sum()) > 0
    for name in ("input_ids", "loss_mask", "segment_ids", "sep"):
        assert torch.equal(getattr(item.batch, name), getattr(batch.to("cpu"), name))


def test_split_plan_is_made_on_the_host(monkeypatch):
    """For a CUDA model the split backend's flat-token plan comes from the numpy batch, equal to the plan
    the old path built from the device batch; `auto` picks split for long half-precision rows only."""
    monkeypatch.setattr(att, "split_available", lambda: True)      # resolution only: no kernel runs here
    for case in ("glm", "clm-padded", "mlm-packed"):
        batch = _batch(case)
        plan = att.plan_mask(batch, "split", "cuda", torch.bfloat16)
        assert plan.backend == "split"
        ref = att.split_plan(batch.to("cpu"))
        for name in ("a_idx", "b_idx", "inverse", "cu_a", "cu_b", "cu_k"):
            got, want = getattr(plan.split, name), getattr(ref, name)
            assert got.device.type == "cpu" and got.dtype == want.dtype and torch.equal(got, want), name
        assert plan.split.max_len == ref.max_len == 48
    span = _batch("glm-span", seq_len=256)                           # several spans per sample, own-span layout
    assert not att.split_applies(span) and att.plan_mask(span, "split", "cuda", torch.bfloat16).backend == "flex"
    long = _batch("glm", seq_len=att.SPLIT_MIN_LEN)
    assert att.plan_mask(long, "auto", "cuda", torch.bfloat16).backend == "split"
    assert att.plan_mask(long, "auto", "cuda", torch.float32).backend == "flex"
    assert att.plan_mask(_batch("glm"), "auto", "cuda", torch.bfloat16).backend == "flex"        # short rows


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-glm"])
@pytest.mark.parametrize("case", ["glm", "glm-span", "clm", "mlm", "clm-padded"])
def test_loss_from_host_metadata_equals_the_old_loss_exactly(preset, case):
    torch.manual_seed(0)
    model = GLM(GLMConfig.from_name(preset, vocab_size=VOCAB))
    batch = _batch(case)
    old = model.loss(batch.to("cpu"))                         # mask and loss positions from the batch itself
    old.backward()
    old_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    item = prepare(batch, model.attention_backend, "cpu", torch.float32).to("cpu")
    new = model.loss(item.batch, model.attention_mask(item.batch, plan=item.plan), loss_index=item.loss_index)
    new.backward()
    assert torch.equal(new, old)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), old_grads))


def test_prefetcher_prepares_each_micro_batch_and_keeps_the_stream_states():
    class Stream:
        def __init__(self, cases):
            self.cases, self.i = cases, 0

        def __next__(self):
            self.i += 1
            return _batch(self.cases[(self.i - 1) % len(self.cases)], seed=self.i)

        def state_dict(self):
            return {"i": self.i}

    for depth in (0, 2):
        its = {0: Stream(["glm", "clm"]), 1: Stream(["mlm"])}
        pre = Prefetcher(its, grad_accum=3, start_micro=0, depth=depth,
                         prepare=lambda b: prepare(b, "sdpa", "cpu", torch.float32))
        items, states = pre.next()
        pre.close()
        assert [type(x) for x in items] == [StepBatch] * 3
        assert [x.plan.backend for x in items] == ["sdpa", "full", "causal"]       # shards 0, 1, 0
        assert states[0]["i"] >= 2 and states[1]["i"] >= 1
        if depth == 0:
            assert states == {0: {"i": 2}, 1: {"i": 1}}
