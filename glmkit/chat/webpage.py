"""Web pages for the browser: HTML to text, and fetching a URL under an allowlist and limits.

- `html_to_text(html) -> (title, text)`: the page's `<title>` and its readable text, one block per
  line (stdlib `html.parser`): script, style, template, svg, head and nav content dropped; headings
  as `# …`, list items as `- …`; whitespace inside a block collapsed (kept inside `<pre>`); runs of
  blank lines folded to one.
- `UrlFetcher(allowed_hosts, max_bytes, timeout).fetch(url) -> WebPage`: GET over HTTP(S) only, only
  to hosts in the allowlist (an entry `example.org` allows that host, `.example.org` also its
  subdomains), redirects re-checked against it, environment proxies ignored (a proxy would see
  every URL). At most `max_bytes` of the body are read (the page is cut there and says so); the
  whole fetch, headers and body, must finish within `timeout` seconds. HTML is converted with
  `html_to_text`, other `text/*` is taken as is; anything else is refused. Every refusal and
  failure raises `BrowserError` (a `GlmkitError`) whose message names the problem; the browser shows
  it to the model.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import urlsplit

from glmkit.errors import GlmkitError


class BrowserError(GlmkitError):
    """A browser action that cannot be done (unknown id, no open page, a refused or failed URL)."""


# ---------------------------------------------------------------------------- HTML to text
_SKIP = {"script", "style", "noscript", "template", "svg", "head", "nav", "iframe", "object"}
# blocks followed by a blank line, and line breaks without one
_PARAGRAPH = {"p", "div", "section", "article", "header", "footer", "ul", "ol", "dl", "table", "blockquote",
              "pre", "main", "aside", "form", "figure", "address", "details", "body", "html",
              "h1", "h2", "h3", "h4", "h5", "h6"}
_LINE = {"br", "hr", "li", "tr", "dt", "dd", "figcaption", "summary", "caption"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title_parts: list[str] = []
        self.lines: list[str] = []
        self.current: list[str] = []  # text of the line being read
        self.blank_before = False     # a paragraph ended: the next text starts after a blank line
        self.skip_depth = 0
        self.in_title = False
        self.pre_depth = 0

    def flush(self) -> None:
        text = "".join(self.current)
        self.current = []
        text = text.strip("\n") if self.pre_depth else re.sub(r"\s+", " ", text).strip()
        if not text:
            return
        if self.blank_before and self.lines:
            self.lines.append("")
        self.lines.extend(text.split("\n"))
        self.blank_before = False

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "title":
            self.in_title = True
        if tag in _SKIP:
            self.skip_depth += 1
        if self.skip_depth:
            return
        if tag in _PARAGRAPH or tag in _LINE:
            self.flush()
        if tag == "pre":
            self.pre_depth += 1
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.current.append("#" * int(tag[1]) + " ")
        elif tag == "li":
            self.current.append("- ")
        elif tag in ("td", "th"):
            self.current.append(" ")

    def handle_startendtag(self, tag: str, attrs) -> None:
        if not self.skip_depth and (tag in _PARAGRAPH or tag in _LINE):
            self.flush()

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        if tag in _SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
            return
        if self.skip_depth:
            return
        if tag in _PARAGRAPH or tag in _LINE:
            self.flush()
        if tag in _PARAGRAPH:
            self.blank_before = True
        if tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title_parts.append(data)
        elif not self.skip_depth:
            self.current.append(data)


def html_to_text(html: str) -> tuple[str, str]:
    """(title, text) of an HTML document; see the module docstring."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    parser.flush()
    lines = parser.lines
    title = re.sub(r"\s+", " ", "".join(parser.title_parts)).strip()
    return title, "\n".join(lines)


# ---------------------------------------------------------------------------- fetching
@dataclass(frozen=True)
class WebPage:
    url: str
    title: str
    text: str


def host_allowed(host: str, allowed_hosts: Sequence[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed_hosts:
        entry = entry.lower().rstrip(".")
        if entry.startswith("."):
            if host == entry[1:] or host.endswith(entry):
                return True
        elif host == entry:
            return True
    return False


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, fetcher: UrlFetcher):
        self.fetcher = fetcher

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.fetcher.check_url(newurl, why=f"{req.full_url} redirects to it")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_HTML_TYPES = ("text/html", "application/xhtml+xml")


@dataclass
class UrlFetcher:
    """Fetches pages for `open(url)`; see the module docstring."""
    allowed_hosts: Sequence[str]
    max_bytes: int = 1_000_000
    timeout: float = 10.0
    user_agent: str = "glmkit-browser/0.1"

    def check_url(self, url: str, why: str = "") -> None:
        parts = urlsplit(url)
        where = f" ({why})" if why else ""
        if parts.scheme not in ("http", "https"):
            raise BrowserError(f"cannot open {url}{where}: only http:// and https:// URLs can be opened")
        host = parts.hostname or ""
        if not host_allowed(host, self.allowed_hosts):
            allowed = ", ".join(self.allowed_hosts) or "none"
            raise BrowserError(f"cannot open {url}{where}: the host {host!r} is not in the allowlist "
                               f"(allowed: {allowed})")

    def fetch(self, url: str) -> WebPage:
        self.check_url(url)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _CheckedRedirects(self))
        request = urllib.request.Request(url, headers={"User-Agent": self.user_agent,
                                                       "Accept": "text/html, text/plain;q=0.9, text/*;q=0.8"})
        deadline = time.monotonic() + self.timeout
        try:
            with opener.open(request, timeout=self.timeout) as response:
                final_url = response.geturl()
                content_type = response.headers.get_content_type()
                if not (content_type in _HTML_TYPES or content_type.startswith("text/")):
                    raise BrowserError(f"cannot show {url}: it is not a text page (Content-Type: {content_type})")
                body, cut = self._read_body(response, deadline, url)
                charset = response.headers.get_content_charset()
        except urllib.error.HTTPError as e:
            raise BrowserError(f"cannot open {url}: the server answered HTTP {e.code} {e.reason}") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, BrowserError):  # a refused redirect
                raise e.reason from e
            if isinstance(e.reason, TimeoutError):
                raise BrowserError(f"cannot open {url}: no answer within {self.timeout:g} s (timed out)") from e
            raise BrowserError(f"cannot open {url}: {e.reason}") from e
        except TimeoutError as e:
            raise BrowserError(f"cannot open {url}: the page did not arrive within {self.timeout:g} s "
                               "(timed out)") from e
        except OSError as e:
            raise BrowserError(f"cannot open {url}: {e}") from e
        if content_type in _HTML_TYPES:
            text = body.decode(charset or _sniff_charset(body) or "utf-8", errors="replace")
            title, text = html_to_text(text)
        else:
            text = body.decode(charset or "utf-8", errors="replace").replace("\r\n", "\n")
            title = ""
        if cut:
            text += f"\n[the page is longer than {self.max_bytes} bytes; only its beginning is shown]"
        return WebPage(final_url, title or final_url, text)

    def _read_body(self, response, deadline: float, url: str) -> tuple[bytes, bool]:
        """At most max_bytes of the body, within the deadline: every wait for data is bounded by the
        time left, so a server that sends slowly cannot hold the browser longer than `timeout`."""
        sock = getattr(getattr(response.fp, "raw", None), "_sock", None)
        chunks, size = [], 0
        while size <= self.max_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if sock is not None:
                sock.settimeout(left)
            chunk = response.read1(min(65536, self.max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        body = b"".join(chunks)
        return body[: self.max_bytes], size > self.max_bytes


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_.:-]+)""", re.I)


def _sniff_charset(body: bytes) -> str | None:
    m = _META_CHARSET.search(body[:4096])
    if not m:
        return None
    name = m.group(1).decode("ascii")
    try:
        "".encode(name)
    except LookupError:
        return None
    return name
