"""Tokenized, document-aware corpora on disk: build once, memory-map for training.

Layout of a corpus directory (self-contained: it carries its tokenizer):

    manifest.json           what was built, from what, with which tokenizer; written last
    tokenizer.json          the tokenizer every token id refers to
    train-00000.bin         token ids, uint16 (vocab < 65536) or uint32, documents back to back
    train-00000.idx.npy     int64 document offsets into the shard, (n_docs + 1,): doc i = [o[i], o[i+1])
    train-00000.src.npy     uint16, the manifest source index of each document
    val-00000.* ...

No separator token is stored between documents: boundaries live in the offsets, and the objectives
decide what goes between packed samples. The split is by document, from a hash of (source, id,
seed), so a document's split never depends on which other documents or sources are present or in
what order they come. A build writes into a hidden temporary directory and renames it into place
only when complete, so an interrupted build never leaves a corpus that looks valid.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import glmkit
from glmkit.data.sources import Document, Skip, Source, default_sources
from glmkit.data.tokenizer import DEFAULT_VOCAB_SIZE, GLMTokenizer
from glmkit.errors import GlmkitError

FORMAT = "glmkit-corpus"
VERSION = 1
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_ROOT = "data/default"
SHARD_TOKENS = 1 << 28        # 512 MB of uint16 per shard
BATCH_CHARS = 4_000_000       # text handed to one encode_batch call
MAX_SKIP_EXAMPLES = 100       # skipped items listed one by one in the manifest (all are counted)


def split_of(doc: Document, val_fraction: float, seed: int = 0) -> str:
    """'val' for a stable pseudo-random `val_fraction` of documents, else 'train'."""
    digest = hashlib.sha256(f"{seed}\x00{doc.source}\x00{doc.id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "little") < val_fraction * 2.0**64 else "train"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the disk and page cache), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ---------------------------------------------------------------------------- building
@dataclass
class _Shard:
    """One shard being written: token file open for append, offsets and source indices in memory."""
    path: Path
    dtype: np.dtype

    def __post_init__(self):
        self.file = open(self.path.with_suffix(".bin"), "wb")
        self.offsets, self.sources, self.tokens = [0], [], 0

    def add(self, ids: list[int], source: int) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self.file)
        self.tokens += len(ids)
        self.offsets.append(self.tokens)
        self.sources.append(source)

    def close(self) -> dict:
        self.file.close()
        np.save(self.path.with_suffix(".idx.npy"), np.asarray(self.offsets, dtype=np.int64))
        np.save(self.path.with_suffix(".src.npy"), np.asarray(self.sources, dtype=np.uint16))
        return {"name": self.path.name, "documents": len(self.sources), "tokens": self.tokens}


class _SplitWriter:
    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.current: _Shard | None = None

    def add(self, ids: list[int], source: int) -> None:
        if self.current is None or (self.current.tokens and self.current.tokens + len(ids) > self.shard_tokens):
            self._roll()
        self.current.add(ids, source)

    def _roll(self) -> None:
        if self.current is not None:
            self.shards.append(self.current.close())
        self.current = _Shard(self.directory / f"{self.split}-{len(self.shards):05d}", self.dtype)

    def close(self) -> list[dict]:
        if self.current is None:
            self._roll()  # an empty split still gets one (empty) shard, so readers need no special case
        self.shards.append(self.current.close())
        self.current = None
        return self.shards


def build_corpus(sources: Iterable[Source], tokenizer: GLMTokenizer, out_dir: str | os.PathLike,
                 val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0, overwrite: bool = False,
                 shard_tokens: int = SHARD_TOKENS, log: Callable[[str], None] | None = None) -> Corpus:
    """Tokenize every document of `sources` into a corpus at `out_dir` and open it; `log` gets a
    line per batch of documents read.

    Empty or whitespace-only documents are skipped and counted; what the sources skip is counted
    too. Raises if `out_dir` exists, unless `overwrite` (the old corpus is replaced only once the
    new one is complete), and when the sources hold no document at all (nothing is written)."""
    if not 0.0 <= val_fraction < 1.0:
        raise GlmkitError(f"val_fraction={val_fraction} is out of range; use a fraction in [0, 1), e.g. 0.05")
    sources = list(sources)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise GlmkitError(f"source names must be unique (they key the split and the manifest), got {names}; "
                          "give each source its own name")
    if len(sources) > np.iinfo(np.uint16).max:
        raise GlmkitError(f"{len(sources)} sources is too many; merge them into folders")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise GlmkitError(f"{out} already exists; pass --force (overwrite=True) to rebuild it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        _write_corpus(sources, tokenizer, tmp, val_fraction, seed, shard_tokens, log)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Corpus.open(out, tokenizer)


def _write_corpus(sources: list[Source], tokenizer: GLMTokenizer, tmp: Path, val_fraction: float, seed: int,
                  shard_tokens: int, log: Callable[[str], None] | None) -> dict:
    start = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    tokenizer.save(tmp)
    writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
    stats = {s.name: {sp: Counter(documents=0, tokens=0, characters=0) for sp in SPLITS} for s in sources}
    empty: list[Skip] = []
    for si, src in enumerate(sources):
        for batch in _batches(src, empty):
            ids = tokenizer.encode_batch([d.text for d in batch])
            for doc, doc_ids in zip(batch, ids):
                split = split_of(doc, val_fraction, seed)
                writers[split].add(doc_ids, si)
                stats[src.name][split].update(documents=1, tokens=len(doc_ids), characters=len(doc.text))
            if log is not None:
                log(f"  {src.name}: {sum(c['documents'] for c in stats[src.name].values())} documents")
    shards = {s: w.close() for s, w in writers.items()}
    skipped = empty + [k for src in sources for k in src.skipped]
    if not sum(c["documents"] for by_split in stats.values() for c in by_split.values()):
        reasons = "".join(f"; {n} x {r}" for r, n in _count_reasons(skipped).items())
        raise GlmkitError(f"no document to build a corpus from in {', '.join(s.origin for s in sources)} "
                          f"({len(skipped)} skipped{reasons}); give text files, .jsonl files or folders "
                          "holding non-empty text")
    manifest = {
        "format": FORMAT, "version": VERSION, "glmkit_version": glmkit.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": {"file": "tokenizer.json", "hash": tokenizer.hash, "vocab_size": tokenizer.vocab_size},
        "dtype": dtype.name, "val_fraction": val_fraction, "seed": seed,
        "sources": [{**src.describe(), **{sp: dict(stats[src.name][sp]) for sp in SPLITS}} for src in sources],
        "splits": {s: {"documents": sum(x["documents"] for x in shards[s]),
                       "tokens": sum(x["tokens"] for x in shards[s]), "shards": shards[s]} for s in SPLITS},
        "skipped": {"total": len(skipped),
                    "by_reason": _count_reasons(skipped),
                    "examples": [vars(k) for k in skipped[:MAX_SKIP_EXAMPLES]]},
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    # the manifest is written last: a directory without one is never taken for a corpus
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    return manifest


def _batches(src: Source, empty: list[Skip]) -> Iterator[list[Document]]:
    """Documents of `src` in groups of about BATCH_CHARS characters; empty ones recorded as skipped."""
    batch, chars = [], 0
    for doc in src:
        if not doc.text.strip():
            empty.append(Skip(src.name, doc.id, "empty or whitespace-only document"))
            continue
        batch.append(doc)
        chars += len(doc.text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _count_reasons(skipped: list[Skip]) -> dict[str, int]:
    return dict(Counter(f"{k.source}: {_reason_kind(k.reason)}" for k in skipped))


def _reason_kind(reason: str) -> str:
    """The reason without its particulars: 'line 12 is not valid JSON (...)' -> 'JSONL line is not valid
    JSON', 'not valid UTF-8 (byte 3: ...)' -> 'not valid UTF-8'."""
    if reason.startswith("line "):
        reason = "JSONL line " + reason.split(" ", 2)[2]
    return reason.split(" (")[0]


def _remove_stale_builds(out: Path) -> None:
    """Delete temporary folders left by builds of `out` whose process died (killed, power loss)."""
    for stale in out.parent.glob(f".{out.name}.building-*"):
        pid = int(stale.name.rsplit("-", 2)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def _install(tmp: Path, out: Path) -> None:
    """Move the finished build into place; an existing corpus is replaced only after this succeeds."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


# ---------------------------------------------------------------------------- reading
class Corpus:
    """A built corpus, memory-mapped. `documents(split)` gives one zero-copy array per document."""

    def __init__(self, directory: Path, manifest: dict, tokenizer: GLMTokenizer):
        self.directory, self.manifest, self.tokenizer = directory, manifest, tokenizer
        self.dtype = np.dtype(manifest["dtype"])
        self.source_names = [s["name"] for s in manifest["sources"]]
        self._shards: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}

    @classmethod
    def open(cls, directory: str | os.PathLike, tokenizer: GLMTokenizer | None = None) -> Corpus:
        """Open the corpus at `directory`. With `tokenizer`, check that the corpus was built with it."""
        directory = Path(directory)
        manifest = _read_manifest(directory)
        own = GLMTokenizer.load(directory / manifest["tokenizer"]["file"])
        if own.hash != manifest["tokenizer"]["hash"]:
            raise GlmkitError(f"{directory}/tokenizer.json does not match the manifest's tokenizer hash; the corpus "
                              "was modified after it was built. Rebuild it with `glmkit corpus build --force`")
        if tokenizer is not None and tokenizer.hash != own.hash:
            raise GlmkitError(
                f"the corpus at {directory} was built with another tokenizer (hash {own.hash[:12]}, yours "
                f"{tokenizer.hash[:12]}); its token ids mean different text. Use the corpus's own tokenizer "
                f"(Corpus.open(dir).tokenizer, or {directory}/tokenizer.json), or rebuild the corpus with "
                f"yours: `glmkit corpus build --tokenizer YOUR_TOKENIZER --out {directory} --force ...`")
        corpus = cls(directory, manifest, own)
        corpus._check_files()
        return corpus

    def documents(self, split: str = "train", source: str | None = None) -> list[np.ndarray]:
        """One 1-D array per document (views into the memory-mapped shards), in build order;
        `source` keeps only the documents of that source (e.g. per-language evaluation)."""
        want = None if source is None else self._source_index(source)
        docs = []
        for tokens, offsets, srcs in self._load(split):
            bounds = offsets.tolist()
            keep = range(len(srcs)) if want is None else np.flatnonzero(srcs == want).tolist()
            docs += [tokens[bounds[i]:bounds[i + 1]] for i in keep]
        return docs

    def shards(self, split: str = "train") -> list[tuple[np.ndarray, np.ndarray]]:
        """(tokens, offsets) per shard, for vectorised readers that want the flat arrays."""
        return [(tokens, offsets) for tokens, offsets, _ in self._load(split)]

    def document_sources(self, split: str = "train") -> list[str]:
        return [self.source_names[i] for _, _, srcs in self._load(split) for i in srcs.tolist()]

    def num_tokens(self, split: str = "train") -> int:
        return int(self._split_info(split)["tokens"])

    def num_documents(self, split: str = "train") -> int:
        return int(self._split_info(split)["documents"])

    def __repr__(self) -> str:
        return (f"Corpus({str(self.directory)!r}, train={self.num_documents('train')} docs/"
                f"{self.num_tokens('train')} tokens, val={self.num_documents('val')} docs/{self.num_tokens('val')} tokens)")

    def summary(self) -> str:
        """A human-readable table of the manifest (what `glmkit corpus info` prints)."""
        m = self.manifest
        lines = [f"corpus {self.directory}  (built {m['created']} in {m['build_seconds']} s, dtype {m['dtype']}, "
                 f"val_fraction {m['val_fraction']}, seed {m['seed']})",
                 f"tokenizer {m['tokenizer']['hash'][:16]}  vocab {m['tokenizer']['vocab_size']}",
                 f"{'source':<16}{'train docs':>11}{'train tokens':>14}{'val docs':>9}{'val tokens':>12}"
                 f"{'chars/token':>12}  licence"]
        for s in m["sources"]:
            tr, va = s["train"], s["val"]
            chars, toks = tr.get("characters", 0) + va.get("characters", 0), tr.get("tokens", 0) + va.get("tokens", 0)
            lines.append(f"{s['name']:<16}{tr.get('documents', 0):>11}{tr.get('tokens', 0):>14}{va.get('documents', 0):>9}"
                         f"{va.get('tokens', 0):>12}{chars / max(toks, 1):>12.2f}  {s['licence']}")
        lines.append(f"{'total':<16}{self.num_documents('train'):>11}{self.num_tokens('train'):>14}"
                     f"{self.num_documents('val'):>9}{self.num_tokens('val'):>12}")
        sk = m["skipped"]
        lines.append(f"skipped: {sk['total']}" + "".join(f"\n  {n:>6}  {r}" for r, n in sk["by_reason"].items()))
        return "\n".join(lines)

    # -------------------------------------------------------------- internals
    def _split_info(self, split: str) -> dict:
        if split not in SPLITS:
            raise GlmkitError(f"unknown split {split!r}; use one of {SPLITS}")
        return self.manifest["splits"][split]

    def _source_index(self, source: str) -> int:
        if source not in self.source_names:
            raise GlmkitError(f"the corpus has no source {source!r}; its sources are {self.source_names}")
        return self.source_names.index(source)

    def _load(self, split: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if split not in self._shards:
            self._shards[split] = [self._map(s) for s in self._split_info(split)["shards"]]
        return self._shards[split]

    def _map(self, shard: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        base = self.directory / shard["name"]
        offsets = np.load(base.with_suffix(".idx.npy"))
        sources = np.load(base.with_suffix(".src.npy"))
        if shard["tokens"] == 0:  # numpy cannot memory-map an empty file
            return np.zeros(0, self.dtype), offsets, sources
        tokens = np.memmap(base.with_suffix(".bin"), dtype=self.dtype, mode="r", shape=(shard["tokens"],))
        return tokens, offsets, sources

    def _check_files(self) -> None:
        for split in SPLITS:
            for shard in self._split_info(split)["shards"]:
                base = self.directory / shard["name"]
                files = [base.with_suffix(s) for s in (".bin", ".idx.npy", ".src.npy")]
                missing = [f.name for f in files if not f.exists()]
                size = files[0].stat().st_size if not missing else None
                if missing or size != shard["tokens"] * self.dtype.itemsize:
                    what = f"missing {missing}" if missing else f"{files[0].name} has {size} bytes, expected " \
                                                                 f"{shard['tokens'] * self.dtype.itemsize}"
                    raise GlmkitError(f"corpus {self.directory} is damaged ({what}); rebuild it with "
                                      "`glmkit corpus build --force`")


def _read_manifest(directory: Path) -> dict:
    file = directory / "manifest.json"
    if not file.is_file():
        raise GlmkitError(f"{directory} is not a glmkit corpus (no manifest.json); build one with "
                          "`glmkit corpus build` (the default corpus: `glmkit corpus build` with no inputs)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GlmkitError(f"{file} is unreadable ({e}); rebuild the corpus with `glmkit corpus build --force`") from e
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise GlmkitError(f"{file} is not a glmkit corpus manifest of version {VERSION} (format "
                          f"{manifest.get('format')!r}, version {manifest.get('version')!r}); rebuild with "
                          "`glmkit corpus build --force`")
    return manifest


# ---------------------------------------------------------------------------- the default corpus
def default_corpus(root: str | os.PathLike = DEFAULT_ROOT, rebuild: bool = False,
                   vocab_size: int = DEFAULT_VOCAB_SIZE, progress: bool = False,
                   log: Callable[[str], None] | None = None) -> Corpus:
    """The default bilingual corpus at `root`: trains the tokenizer on its train split and builds the
    corpus when absent (or when `rebuild`), else opens what is there. Safe to call from several
    processes at once (the first builds, the others wait for it). `progress` shows the tokenizer
    trainer's progress bar, `log` gets the builder's lines."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "manifest.json").exists() and not rebuild:
            return Corpus.open(root)
        if root.exists() and any(root.iterdir()) and not (root / "manifest.json").exists():
            raise GlmkitError(f"{root} exists but is not a glmkit corpus; move it away (or pass another root) so "
                              "the default corpus can be built there")
        return build_default_corpus(root, vocab_size=vocab_size, progress=progress, log=log)


def build_default_corpus(root: str | os.PathLike = DEFAULT_ROOT, vocab_size: int = DEFAULT_VOCAB_SIZE,
                         val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0,
                         progress: bool = False, log: Callable[[str], None] | None = None) -> Corpus:
    sources = default_sources()
    tokenizer = train_tokenizer(sources, vocab_size, val_fraction, seed, progress)
    return build_corpus(sources, tokenizer, root, val_fraction, seed, overwrite=True, log=log)


def train_tokenizer(sources: Iterable[Source], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0, progress: bool = False) -> GLMTokenizer:
    """Train the tokenizer on the train split of `sources` only (the validation text stays unseen).
    The result may hold fewer than `vocab_size` tokens when the text has fewer distinct merges."""
    sources = list(sources)
    seen = Counter()

    def texts():
        for src in sources:
            for d in src:
                if d.text.strip() and split_of(d, val_fraction, seed) == "train":
                    seen["documents"] += 1
                    yield d.text

    tokenizer = GLMTokenizer.train(texts(), vocab_size=vocab_size, show_progress=progress)
    if not seen["documents"]:
        raise GlmkitError(f"no document to train a tokenizer on: {', '.join(s.origin for s in sources)} hold(s) no "
                          "non-empty document for the train split; give more text (or a folder of text files)")
    return tokenizer
