"""The batch iterator: determinism, resumption bit for bit, sharding, epochs, bad input."""

import numpy as np
import pytest
from helpers import MASK_IDS, SP, reconstruct
from hypothesis import given, settings
from hypothesis import strategies as st

from glmkit.batch import FIELDS
from glmkit.data.batches import BatchIterator
from glmkit.data.objective_config import ObjectiveConfig
from glmkit.errors import GlmkitError


def corpus(n=60, seed=0):
    rng = np.random.default_rng(seed)
    # each document starts with its own id (as two tokens) so sharding can be checked from the text
    return [np.concatenate([[i // 50, i % 50], rng.integers(0, 50, size=int(rng.integers(5, 400)))])
            for i in range(n)]


def same(a, b):
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


@pytest.mark.parametrize("preset,group", [("glm-10b", None), ("glm-130b", 1), ("bert", None), ("gpt", 3)])
def test_resume_is_bit_for_bit(preset, group):
    docs, cfg = corpus(15), ObjectiveConfig.from_name(preset)
    it = BatchIterator(docs, cfg, SP, batch_size=3, seq_len=128, seed=7, group=group)
    for _ in range(5):
        next(it)
    state = it.state_dict()
    want = [next(it) for _ in range(12)]                 # runs past the end of an epoch
    assert it.epoch >= 1
    fresh = BatchIterator(docs, cfg, SP, batch_size=3, seq_len=128, seed=7, group=group)
    fresh.load_state_dict(state)
    got = [next(fresh) for _ in range(12)]
    assert all(same(a, b) for a, b in zip(want, got))
    assert fresh.state_dict() == it.state_dict()
    # and the same seed from scratch gives the same stream; another seed does not
    again = BatchIterator(docs, cfg, SP, batch_size=3, seq_len=128, seed=7, group=group)
    other = BatchIterator(docs, cfg, SP, batch_size=3, seq_len=128, seed=8, group=group)
    first = [next(again) for _ in range(5)] + want
    assert same(first[5], want[0]) and not same(next(other), first[0])


def test_state_from_another_setup_is_refused():
    docs = corpus()
    it = BatchIterator(docs, ObjectiveConfig(), SP, 2, 128, seed=1)
    state = it.state_dict()
    with pytest.raises(GlmkitError, match="seed"):
        BatchIterator(docs, ObjectiveConfig(), SP, 2, 128, seed=2).load_state_dict(state)
    with pytest.raises(GlmkitError, match="fingerprint"):
        BatchIterator(docs, ObjectiveConfig(), SP, 2, 256, seed=1).load_state_dict(state)


def test_epoch_covers_every_document_once_and_ranks_are_disjoint():
    docs = corpus(40)
    cfg = ObjectiveConfig()        # pieces of up to chunk_length(cfg, 512) tokens: every document is one piece
    per_rank = []
    for rank in range(2):
        it = BatchIterator(docs, cfg, SP, batch_size=2, seq_len=512, seed=3, rank=rank, world_size=2)
        seen, newest = [], 0
        while newest < 2 or it._queue:                  # until all of epoch 0 has been handed out
            res = it.next_result()
            newest = max(newest, int(it.last_source[:, 0].max()))
            for j, (epoch, doc) in enumerate(it.last_source):
                s = res.samples.sample(j)
                text, _ = reconstruct(s, MASK_IDS[s["kind"]])
                assert text == docs[doc].tolist()                     # the sample is that document
                if epoch == 0:
                    seen.append(int(doc))
        per_rank.append(seen)
    a, b = per_rank
    assert len(set(a)) == len(a) and len(set(b)) == len(b)
    assert not set(a) & set(b) and set(a) | set(b) == set(range(40))


def test_epochs_reshuffle():
    docs = corpus(30)
    it = BatchIterator(docs, ObjectiveConfig(kind="clm"), SP, 1, 512, seed=0)
    order0 = [int(d[0] * 50 + d[1]) for d in (docs[i] for i in it._epoch_pieces(0)[0])]
    order1 = [int(d[0] * 50 + d[1]) for d in (docs[i] for i in it._epoch_pieces(1)[0])]
    assert sorted(order0) == sorted(order1) == list(range(30)) and order0 != order1


def test_bad_input_is_named():
    with pytest.raises(GlmkitError, match="no documents"):
        BatchIterator([], ObjectiveConfig(), SP, 2, 64)
    with pytest.raises(GlmkitError, match="token ids outside"):
        BatchIterator([np.array([1, 2, 500])], ObjectiveConfig(), SP, 2, 64)
    with pytest.raises(GlmkitError, match="world_size"):
        BatchIterator(corpus(4), ObjectiveConfig(), SP, 2, 64, rank=2, world_size=2)
    with pytest.raises(GlmkitError, match="seq_len >= "):
        BatchIterator(corpus(4), ObjectiveConfig(), SP, 2, 8)
    it = BatchIterator([np.array([1, 2, 3]), np.array([], dtype=np.int64)], ObjectiveConfig(), SP, 2, 64)
    assert it.skipped_empty == 1
    with pytest.raises(GlmkitError, match="shorter than 7 tokens"):
        next(it)


def test_skipped_and_padding_are_counted():
    docs = corpus(20) + [np.array([1, 2, 3])] * 5
    it = BatchIterator(docs, ObjectiveConfig(), SP, 2, 256, seed=0)
    for _ in range(20):
        next(it)
    st = it.stats
    assert st.skipped_short >= 5 and st.skipped_tokens >= 15
    assert 0 < st.padding_fraction < 0.5 and st.rows == 40


# ---------------------------------------------------------------- real text: a tiny bilingual corpus

@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from glmkit.data.corpus import build_corpus
    from glmkit.data.sources import Source, kjv_source, peoples_daily_source
    from glmkit.data.tokenizer import GLMTokenizer
    real = [d for d, _ in zip(kjv_source(), range(6))] + [d for d, _ in zip(peoples_daily_source(), range(30))]
    tok = GLMTokenizer.train([d.text for d in real], vocab_size=1000)
    src = Source("mixed", "test", "kjv + people's daily", lambda s: iter(real))
    return build_corpus([src], tok, tmp_path_factory.mktemp("c") / "corpus", val_fraction=0.3, seed=0)


def test_real_text_batches(tiny_corpus):
    from glmkit.data.objective_config import SpecialIds
    from glmkit.data.objectives import SMASK
    sp = SpecialIds.from_tokenizer(tiny_corpus.tokenizer)
    assert len(sp.sentence_ends) > 0 and sp.pad not in sp.random_pool()
    docs = tiny_corpus.documents("train")
    it = BatchIterator(docs, ObjectiveConfig(mixture=(0, 1, 0)), sp, 2, 256, seed=0)
    for _ in range(6):
        res = it.next_result()
        for j, (_, doc) in enumerate(it.last_source):
            s = res.samples.sample(j)
            text, _ = reconstruct(s, sp.smask if s["kind"] == SMASK else sp.mask, sp)
            d, c = docs[doc].tolist(), it.chunk_len                     # the sample is a piece of its document
            assert any(text == d[k:k + c] for k in range(0, len(d), c))
    # real text has sentence ends: [sMASK] rarely has to fall back to [MASK]
    assert it.stats.kind_counts[SMASK] > 4 * it.stats.smask_fallback


@pytest.mark.slow
def test_samples_and_bench_verbs(tiny_corpus, capsys, tmp_path):
    import json

    from glmkit import cli
    assert cli.main(["samples", "--corpus", str(tiny_corpus.directory), "--length", "24", "--table"]) == 0
    out = capsys.readouterr().out
    for title in ("[MASK] blank infilling", "[sMASK] whole sentences", "[gMASK] one long span", "BERT MLM", "GPT CLM"):
        assert title in out
    assert "--- English" in out and "--- Chinese" in out and "Part B 1: position" in out and "<sop>" in out
    assert cli.main(["bench", "data", "--corpus", str(tmp_path / "none"), "--tokens", "20000",
                     "--baseline-tokens", "5000", "--batch-size", "2", "--seq-len", "128"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["glm_tokens_per_s_per_core"] > 0 and last["python_baseline_tokens_per_s_per_core"] > 0
    assert last["ratio"] == pytest.approx(last["glm_tokens_per_s_per_core"]
                                          / last["python_baseline_tokens_per_s_per_core"], abs=0.006)
    assert last["glm-large_tokens_per_s_per_core"] == last["glm_tokens_per_s_per_core"]   # the headline preset
    assert all(0 < last[f"{p}_packing_efficiency"] <= 1 for p in ("glm-large", "glm-10b", "glm-130b", "bert", "gpt"))
    assert (last["text"], last["batch_size"], last["seq_len"]) == ("synthetic", 2, 128)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), min_size=1, max_size=12), seed=st.integers(0, 1000),
       preset=st.sampled_from(["glm-large", "glm-10b", "glm-130b", "bert", "gpt"]),
       batch_size=st.integers(1, 3), seq_len=st.sampled_from([64, 100, 256]))
def test_every_sample_is_a_piece_of_its_document(lengths, seed, preset, batch_size, seq_len):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 50, size=n) for n in lengths]
    cfg = ObjectiveConfig.from_name(preset)
    if sum(n >= cfg.min_length for n in lengths) == 0:
        return
    it = BatchIterator(docs, cfg, SP, batch_size, seq_len, seed=seed)
    c = it.chunk_len
    for _ in range(3):
        res = it.next_result()
        assert res.batch.shape == (batch_size, seq_len)
        for j, (_, doc) in enumerate(it.last_source):
            s = res.samples.sample(j)
            d = docs[doc].tolist()
            if cfg.kind == "glm":
                text, _ = reconstruct(s, MASK_IDS[s["kind"]])
            elif cfg.kind == "mlm":
                text = np.where(s["loss_mask"], s["targets"], s["input_ids"]).tolist()
            else:
                text = s["input_ids"].tolist()
            assert any(text == d[k:k + c] for k in range(0, len(d), c))


def test_mixture_per_batch_gives_one_kind_per_batch():
    from glmkit.data.objectives import MASK, SMASK
    it = BatchIterator(corpus(30), ObjectiveConfig.from_name("glm-10b"), SP, 2, 128, seed=0)
    assert it.group == 1
    seen = set()
    for _ in range(30):
        kinds = set(it.next_result().samples.kind.tolist())
        if SMASK in kinds:
            kinds.discard(MASK)                                # sentences that could not be masked fall back
        assert len(kinds) == 1
        seen |= kinds
    assert len(seen) == 3
    with pytest.raises(GlmkitError, match="group=1"):
        BatchIterator(corpus(30), ObjectiveConfig.from_name("glm-10b"), SP, 2, 128, group=4)
