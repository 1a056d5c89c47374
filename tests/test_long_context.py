"""Long-context training: the objective, packing and the training step at rows of thousands of tokens.

- span sampling and packing keep DESIGN.md §1's rules at 8K and 32K rows (reconstruction, the 15%
  target reached and overshot by less than one span, spans apart, nothing unplaceable), and a
  document that fits a row is never cut;
- one training step with activation checkpointing equals the step without (loss and every gradient),
  through both CPU attention backends (the dense-mask reference and `segments`);
- `glmkit train --seq-len 8192 --activation-checkpointing` runs on the CPU.
"""

import numpy as np
import pytest
import torch
from helpers import MASK_IDS, SP, reconstruct
from hypothesis import given, settings
from hypothesis import strategies as st

from glmkit.data.objective_config import ObjectiveConfig
from glmkit.data.objectives import GMASK, MASK, chunk_length, max_glm_length
from glmkit.data.packing import chunk_documents, pack, pack_documents
from glmkit.data.spans import mask_spans
from glmkit.model.config import GLMConfig
from glmkit.model.glm import GLM

GMASK_ONLY = ObjectiveConfig(mixture=(0.0, 0.0, 1.0))
OBJECTIVES = {"glm-large": ObjectiveConfig.from_name("glm-large"), "glm-10b": ObjectiveConfig.from_name("glm-10b"),
              "glm-130b": ObjectiveConfig.from_name("glm-130b"), "gmask-only": GMASK_ONLY}


def test_chunk_length_at_long_rows():
    """[MASK] samples grow by 2 tokens per ~3.16 masked (15%): a row holds a piece of at most
    1 / (1 + 0.3 / 3.157) = 91.3% of its length, less a margin that shrinks relative to the row."""
    cfg = ObjectiveConfig()
    bound = 1 / (1 + 2 * 0.15 / 3.157)
    for T, lo in ((2048, 0.89), (8192, 0.90), (32768, 0.905)):
        c = chunk_length(cfg, T)
        assert lo * T <= c < bound * T
        assert c == max_glm_length(cfg, T)
    # [gMASK] adds two tokens whatever the length: a gMASK-only objective cuts only what exceeds the row
    assert chunk_length(GMASK_ONLY, 32768) == 32766
    assert chunk_length(ObjectiveConfig(kind="clm"), 32768) == 32768


def test_a_32k_row_holds_whole_documents():
    rng = np.random.default_rng(0)
    T = 32768
    for cfg, lengths in ((ObjectiveConfig(), [29000, 3000, 500]), (GMASK_ONLY, [32766, 20000, 12000])):
        docs = [rng.integers(0, 50, size=n) for n in lengths]
        res = pack_documents(docs, cfg, SP, rng, len(docs), T)
        assert res.stats.samples == len(docs) and res.stats.skipped_unplaced == 0
        for i in range(len(res.samples)):
            s = res.samples.sample(i)
            text, _ = reconstruct(s, MASK_IDS[s["kind"]])
            assert text == docs[res.index[i]].tolist()                  # the whole document, in one sample


@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.integers(1, 40_000), min_size=1, max_size=5), seed=st.integers(0, 2**32 - 1),
       objective=st.sampled_from(list(OBJECTIVES)), seq_len=st.sampled_from([8192, 32768]))
def test_long_rows_keep_the_objective_rules(lengths, seed, objective, seq_len):
    rng = np.random.default_rng(seed)
    cfg = OBJECTIVES[objective]
    docs = [rng.integers(0, 50, size=n) for n in lengths]
    chunk = chunk_length(cfg, seq_len)
    tokens, offsets = chunk_documents(docs, chunk)
    pieces = np.diff(offsets)
    # a document is cut only if it exceeds the chunk, and then into full chunks and one rest
    assert len(pieces) == sum(-(-n // chunk) for n in lengths)
    res = pack(tokens, offsets, cfg, SP, rng, len(pieces), seq_len)     # a row per piece: everything fits
    assert res.consumed == len(pieces) and res.stats.skipped_unplaced == 0
    assert set(res.index) == {i for i, n in enumerate(pieces) if n >= cfg.min_length}
    for j, i in enumerate(res.index):
        s = res.samples.sample(j)
        doc = tokens[offsets[i]:offsets[i + 1]].tolist()
        text, spans = reconstruct(s, MASK_IDS[s["kind"]])
        assert text == doc and len(s["input_ids"]) <= seq_len
        starts = sorted(spans)
        assert all(a + n < b for (a, n), (b, _) in zip(starts, starts[1:]))     # apart, never touching
        masked = sum(n for _, n in spans)
        if s["kind"] == MASK:
            target = int(0.15 * len(doc))
            assert target <= masked < target + cfg.max_span                     # overshoot: less than one span
            assert max(n for _, n in spans) <= cfg.max_span
        if s["kind"] == GMASK:
            assert 0.5 * len(doc) - 1e-9 <= masked <= len(doc) - 1


def test_spans_cover_a_long_document_evenly():
    """Span placement in 32K-token documents: every tenth of the document gets its 15% share."""
    rng = np.random.default_rng(3)
    L = 30_000
    spans, ok = mask_spans(np.full(40, L), ObjectiveConfig(), rng, SP.mask)
    assert ok.all()
    covered = np.zeros(L)
    for a, n in zip(spans.start, spans.length):
        covered[a:a + n] += 1
    tenths = covered.reshape(10, -1).mean(1) / 40
    assert np.all(np.abs(tenths - 0.15) < 0.01), tenths


def _step_grads(model: GLM, batch, backend: str, checkpointing: bool):
    model.zero_grad(set_to_none=True)
    model.checkpointing = checkpointing
    attn = model.attention_mask(batch, backend)
    assert attn.backend == backend
    loss = model.loss(batch, attn)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpointed_long_step_equals_the_plain_one():
    torch.manual_seed(0)
    T = 1024                                             # SEGMENTS_MIN_LEN: auto picks segments on the CPU
    model = GLM(GLMConfig.from_name("tiny", vocab_size=110, max_position_embeddings=T)).train()
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, size=n) for n in (800, 1300, 350, 150)]
    batch = pack_documents(docs, OBJECTIVES["glm-130b"], SP, rng, 2, T).batch.to("cpu")
    ref_loss, ref_grads = _step_grads(model, batch, "sdpa", False)
    for backend in ("sdpa", "segments"):
        for ckpt in (False, True):
            loss, grads = _step_grads(model, batch, backend, ckpt)
            if backend == "sdpa":                        # the same kernels, recomputed: bit for bit
                assert torch.equal(loss, ref_loss)
                assert all(torch.equal(grads[n], g) for n, g in ref_grads.items())
            else:
                torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
                for n, g in ref_grads.items():
                    torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
    assert model.attention_mask(batch).backend == "segments"           # what `auto` trains with on the CPU


@pytest.mark.slow
def test_train_at_8k_with_activation_checkpointing(toy_corpus, tmp_path):
    from glmkit.cli import main
    rc = main(["train", "--corpus", str(toy_corpus.directory), "--out-dir", str(tmp_path / "run"), "--model", "tiny",
               "--seq-len", "8192", "--batch-size", "1", "--max-steps", "2", "--activation-checkpointing",
               "--eval-every", "0", "--save-every", "0", "--no-progress", "--no-tensorboard", "--device", "cpu"])
    assert rc == 0
    import json
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r.get("kind") == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))
