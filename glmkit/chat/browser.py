"""The browser tool (GLM-4 All Tools style): search and read a local document store, optionally
open allowlisted web pages, with citations checked against what was shown.

One `Browser` per conversation holds its state: every document it has shown has an id, unique in
the conversation (the same document keeps its id across searches), the open page, and the text
shown under each id. Its actions return the observation text the model reads:

- `search(query)` (GLM-4's result page; a document's best passage, at most one per document):
      ` # 【{id}†{title}†{source}】`
      `{snippet}`
      ... one pair per result, then `Visible: 0% - 100%`.
- `open(id or url, line=None)`: a page of the document, by lines, starting at the matching passage
  for a search result (or at `line`); a result's source (as shown) names it too; `open()` shows
  the next page of the open document:
      `TITLE: {title} 【{id}†{source}】`
      ``
      `L{n}: {line}` ... as many lines as fit in `page_chars` characters
      `Visible: {a}% - {b}%` (the shown lines' share of the document, rounded outwards)
  A URL is fetched by the `UrlFetcher` given (allowlist, size and time limits); without one, URLs
  are refused.
- `find(pattern)`: the lines of the open page containing `pattern` (case-insensitive, literal):
      `TITLE: Find results for `{pattern}` in {title} 【{id}†{source}】`, a blank line, `L{n}: …`
      lines, then `({k} of {n} matches)` when more matched than are shown.

Quotes cite `【{id}†{text}】`. `check_citations(answer)` verifies each: the id must have been
shown in this conversation, and the text must be the document's title or source (or the word
`source`, as GLM-4 writes), or appear in the text shown under that id (comparison ignores
whitespace, case and NFKC differences; `…` in a quote separates pieces that must each appear).

Mistakes (an unknown id, `find` with no open page, a refused URL) raise `BrowserError` with a
message meant for the model; the function registry turns it into the observation.
`tools()` gives the three actions as function tools for the registry (`browser_search`,
`browser_open`, `browser_find`); `run(command)` executes GLM-4's code-style calls
(`search("...")`, `open(3)`, `find("...")`, `open_url("https://...")`).
"""

from __future__ import annotations

import ast
import re
import threading
import unicodedata
from dataclasses import dataclass, field

from glmkit.chat.docstore import DocStore, display_lines
from glmkit.chat.webpage import BrowserError, UrlFetcher

_CITATION = re.compile(r"【(\d+)†([^】]*)】")


@dataclass
class _Shown:
    """A document as this conversation knows it: where it comes from and what was shown of it."""
    key: tuple  # ("store", doc) or ("url", url)
    title: str
    source: str
    anchor: int = 0  # the line open(id) starts at
    lines: list[str] | None = None  # loaded on open
    shown: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Citation:
    """One `【id†text】` in an answer; `start:end` is its span in the answer."""
    id: int
    text: str
    start: int
    end: int
    valid: bool
    reason: str = ""  # why it is not valid


class Browser:
    def __init__(self, store: DocStore | None, fetcher: UrlFetcher | None = None, *, results: int = 5,
                 page_chars: int = 3000, snippet_chars: int = 200, find_matches: int = 20):
        if store is None and fetcher is None:
            raise BrowserError("a browser needs a document store, a URL fetcher or both")
        self.store = store
        self.fetcher = fetcher
        self.results = results
        self.page_chars = page_chars
        self.snippet_chars = snippet_chars
        self.find_matches = find_matches
        self._docs: list[_Shown] = []  # index = id
        self._ids: dict[tuple, int] = {}
        self._open: int | None = None
        self._next_line = 0
        self._lock = threading.RLock()  # the calls of one turn may run in parallel threads

    # ------------------------------------------------------------------------ actions
    def search(self, query: str) -> str:
        """Search the documents; returns numbered results with title, source and snippet."""
        if self.store is None:
            raise BrowserError("there is no document store to search; open a URL instead")
        if not query.strip():
            raise BrowserError("the search query is empty; give words to look for")
        hits = self.store.search(query, self.results, self.snippet_chars)
        if not hits:
            return f"No results for `{query}`."
        out = []
        with self._lock:
            for hit in hits:
                i = self._id(("store", hit.doc), hit.title, hit.source)
                doc = self._docs[i]
                doc.anchor = hit.line
                doc.shown.append(hit.snippet)
                out += [f" # 【{i}†{hit.title}†{hit.source}】", hit.snippet]
        return "\n".join(out) + "\nVisible: 0% - 100%"

    def open(self, target: int | str | None = None, line: int | None = None) -> str:
        """Open a search result by its id (or a URL), at its matching passage or at `line`; with no
        target, show the next page of the open document."""
        with self._lock:
            if target is None:
                if self._open is None:
                    raise BrowserError("no page is open; open a search result by its id first")
                i = self._open
                start = self._next_line if line is None else line
            else:
                i = self._resolve(target)
                start = self._docs[i].anchor if line is None else line
            doc = self._docs[i]
            lines = doc.lines
        if lines is None:  # loaded outside the lock: a web page may take seconds
            lines = self._load(doc)
        with self._lock:
            doc.lines = lines
            n = len(lines)
            if target is None and line is None and start >= n:
                raise BrowserError(f"【{i}†{doc.title}】 has been shown to its end (Visible: 100%); open another "
                                   "result, or give a line to go back to")
            if not 0 <= start < max(n, 1):
                raise BrowserError(f"【{i}†{doc.title}】 has lines 0 to {max(n - 1, 0)}; line {start} is outside it")
            stop, size = start, 0
            while stop < n and (stop == start or size + len(lines[stop]) + 1 <= self.page_chars):
                size += len(lines[stop]) + 1
                stop += 1
            shown = lines[start:stop]
            doc.shown.append("\n".join(shown))
            self._open, self._next_line = i, stop
            body = "\n".join(f"L{start + k}: {text}".rstrip() for k, text in enumerate(shown))
            a, b = (start * 100 // n, -(-stop * 100 // n)) if n else (0, 100)
            return f"TITLE: {doc.title} 【{i}†{doc.source}】\n\n{body}\nVisible: {a}% - {b}%"

    def find(self, pattern: str) -> str:
        """Find the lines of the open page that contain `pattern` (case-insensitive)."""
        with self._lock:
            if self._open is None:
                raise BrowserError("no page is open to search in; open a search result by its id first")
            if not pattern.strip():
                raise BrowserError("the pattern is empty; give the text to find")
            i = self._open
            doc = self._docs[i]
            needle = _fold(pattern)
            matches = [k for k, text in enumerate(doc.lines) if needle in _fold(text)]
            where = f"{doc.title} 【{i}†{doc.source}】"
            if not matches:
                return f"No match for `{pattern}` in {where}."
            shown = matches[: self.find_matches]
            doc.shown.append("\n".join(doc.lines[k] for k in shown))
            body = "\n".join(f"L{k}: {doc.lines[k]}".rstrip() for k in shown)
            more = f"\n({len(shown)} of {len(matches)} matches)" if len(shown) < len(matches) else ""
            return f"TITLE: Find results for `{pattern}` in {where}\n\n{body}{more}"

    # ------------------------------------------------------------------------ citations
    def check_citations(self, answer: str) -> list[Citation]:
        """Every `【id†text】` of `answer`, each checked against what this conversation showed."""
        out = []
        with self._lock:
            for m in _CITATION.finditer(answer):
                i, text = int(m.group(1)), m.group(2)
                reason = self._citation_problem(i, text)
                out.append(Citation(i, text, m.start(), m.end(), reason == "", reason))
        return out

    def _citation_problem(self, i: int, text: str) -> str:
        if not 0 <= i < len(self._docs):
            return f"id {i} was never shown in this conversation"
        doc = self._docs[i]
        if _fold(text) in {"source", _fold(doc.title), _fold(doc.source), _fold(f"{doc.title}†{doc.source}")}:
            return ""
        seen = _fold("\n".join(doc.shown))
        pieces = [p for p in re.split(r"…|\.\.\.", _fold(text)) if p]
        if not pieces:
            return f"the citation of id {i} quotes nothing"
        if all(p in seen for p in pieces):
            return ""
        return f"the quoted text was not shown under id {i} ({doc.title})"

    # ------------------------------------------------------------------------ as tools
    def tools(self) -> list:
        """The actions as function tools: browser_search, browser_open, browser_find."""
        from glmkit.chat.functions import function_tool

        def browser_search(query: str) -> str:
            """Search the documents. Returns numbered results 【id†title†source】 with a snippet each."""
            return self.search(query)

        def browser_open(id: int | None = None, url: str | None = None, line: int | None = None) -> str:
            """Open a search result by its id (or a web page by its url), showing numbered lines; call it
            with no id and no url for the next page. Cite what you use as 【id†quoted text】.

            Args:
                id: The id of a search result.
                url: A web address to open instead of an id.
                line: The line number to start at.
            """
            if id is not None and url is not None:
                raise BrowserError("give an id or a url, not both")
            return self.open(url if url is not None else id, line)

        def browser_find(pattern: str) -> str:
            """Find the lines of the open page that contain the pattern (case-insensitive)."""
            return self.find(pattern)

        return [function_tool(f) for f in (browser_search, browser_open, browser_find)]

    def run(self, command: str) -> str:
        """Execute one GLM-4-style browser call, e.g. `search("人民日报")` or `open(3)`."""
        try:
            call = ast.parse(command.strip(), mode="eval").body
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
                raise ValueError
            name = call.func.id
            args = [ast.literal_eval(a) for a in call.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        except (SyntaxError, ValueError):
            raise BrowserError(f"cannot read the browser call {command.strip()[:200]!r}; write one call such as "
                               'search("query"), open(0), find("text") or open_url("https://...")') from None
        if name == "search":  # GLM-4's search(query, recency_days): a local store has no dates
            args, kwargs = args[:1], {k: v for k, v in kwargs.items() if k != "recency_days"}
        actions = {"search": self.search, "open": self.open, "find": self.find, "open_url": self.open}
        if name == "mclick":  # GLM-4's "open several results": show each
            ids = args[0] if args else kwargs.get("ids", [])
            return "\n\n".join(self.open(int(i)) for i in ids)
        if name not in actions:
            raise BrowserError(f"the browser has no action {name!r}; use search, open, find or open_url")
        try:
            return actions[name](*args, **kwargs)
        except TypeError as e:
            raise BrowserError(f"bad arguments for {name}: {e}") from None

    # ------------------------------------------------------------------------ internals
    def _id(self, key: tuple, title: str, source: str) -> int:
        if key not in self._ids:
            self._ids[key] = len(self._docs)
            self._docs.append(_Shown(key, title, source))
        return self._ids[key]

    def _resolve(self, target: int | str) -> int:
        if isinstance(target, str) and target.strip().isdigit():
            target = int(target)
        if isinstance(target, int):
            if not 0 <= target < len(self._docs):
                shown = f"0 to {len(self._docs) - 1}" if self._docs else "none yet: search first"
                raise BrowserError(f"no result has id {target} (ids shown in this conversation: {shown})")
            return target
        for i, doc in enumerate(self._docs):  # a result named by its source, as the results show it
            if doc.source == target.strip():
                return i
        if self.fetcher is None:
            raise BrowserError(f"cannot open {target}: opening web pages is not enabled; open a search result "
                               "by its id")
        self.fetcher.check_url(target)
        return self._id(("url", target), target, target)

    def _load(self, doc: _Shown) -> list[str]:
        kind, ref = doc.key
        if kind == "store":
            return self.store.page(ref).lines
        page = self.fetcher.fetch(ref)
        with self._lock:
            doc.title = page.title
        return display_lines(page.text)


def _fold(text: str) -> str:
    """Text for comparison: NFKC, case-folded, without whitespace."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text).casefold())
