"""A real headless Chromium (Debian's ``chromium``; ``make system-deps`` installs it) for tests of
the HTML the pipeline writes (report.html, later leaderboard.html).

    dump_dom(path) -> str                  the DOM after load (``--dump-dom``)
    screenshot(path, png, width) -> Path   pixels of the whole page (``--screenshot``)
    image_sizes(path) -> [Img]             every <img> as the browser decoded it (natural size)
    network_requests(path) -> Requests     what the page asked the network for (see below)
    parse_dom(dom) -> Dom                  tagged numbers, <img> sources and text of a DOM
    lookup(src, key) -> value              a tagged number's ``data-metric`` path in its source

Each call starts a fresh browser with a new temporary profile and the background services
(sync, component updates, field trials) off, so runs do not share state.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",
]


def require_chromium() -> str:
    exe = shutil.which(CHROMIUM)
    if exe is None:
        raise RuntimeError(
            f"{CHROMIUM} not found; the browser tests need Debian's chromium "
            f"(apt-get install -y chromium, or `make system-deps`)"
        )
    return exe


def run_chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Chromium with FLAGS, a fresh --user-data-dir and ``args``; raises with stderr on failure."""
    exe = require_chromium()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        p = subprocess.run(
            [exe, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    if p.returncode != 0:
        raise RuntimeError(f"chromium {args} exited {p.returncode}: {p.stderr[-3000:]}")
    return p


def _url(target: str | Path) -> str:
    s = str(target)
    return s if "://" in s else Path(s).resolve().as_uri()


def dump_dom(target: str | Path, width: int = 1280) -> str:
    """The serialised DOM of a file path or URL once the page has loaded (window ``width`` px)."""
    return run_chromium(f"--window-size={width},1000", "--dump-dom", _url(target)).stdout


_PROBE = """<script>addEventListener("load", () => {
  for (const i of document.images)
    i.setAttribute("data-probe", `${i.complete ? 1 : 0} ${i.naturalWidth} ${i.naturalHeight}`);
  document.body.setAttribute("data-probe-height", document.documentElement.scrollHeight);
});</script>"""


def _probed_dom(path: str | Path, width: int = 1280) -> str:
    """DOM of a copy of ``path`` with a load-time probe script (the original has no script)."""
    page = Path(path).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / Path(path).name
        copy.write_text(page.replace("</body>", _PROBE + "</body>", 1), encoding="utf-8")
        return dump_dom(copy, width)


@dataclass
class Img:
    alt: str
    complete: bool
    width: int
    height: int


def image_sizes(path: str | Path) -> list[Img]:
    """Every <img> of the page as the browser decoded it: complete flag and natural size
    (0 x 0 for an image the browser could not decode)."""
    dom = parse_dom(_probed_dom(path))
    out = []
    for attrs in dom.images:
        c, w, h = (attrs.get("data-probe") or "0 0 0").split()
        out.append(Img(attrs.get("alt", ""), c == "1", int(w), int(h)))
    return out


def screenshot(
    path: str | Path, png: str | Path, width: int = 1280, max_height: int = 16000
) -> Path:
    """PNG of the whole page (its scroll height at ``width`` measured in the browser first, at most
    max_height)."""
    dom = _probed_dom(path, width)
    height = min(max_height, int(parse_dom(dom).body_attrs.get("data-probe-height", 2000)) + 20)
    run_chromium(
        f"--window-size={width},{height}", f"--screenshot={Path(png).resolve()}", _url(path)
    )
    return Path(png)


@dataclass
class Requests:
    page: str  # URL the page was served at
    page_requests: list[str]  # URLs the browser fetched for the page (net log), the page first
    served: list[str]  # paths the local server answered, in order


def _page_requests(netlog: Path, top_site: str) -> list[str]:
    """URLs of URL_REQUEST_START_JOB events whose network isolation key's top-frame site is
    ``top_site``: the requests made for the page and its subresources (frames included),
    as opposed to the browser's own background traffic, which is keyed to other sites."""
    raw = netlog.read_text()
    try:
        log = json.loads(raw)
    except ValueError:  # cut short at exit: close the event list
        log = json.loads(raw.rstrip().rstrip(",") + "]}")
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for e in log["events"]:
        p = e.get("params") or {}
        if (
            e["type"] == start
            and "url" in p
            and p.get("network_isolation_key", "").split(" ")[0] == top_site
        ):
            urls.append(p["url"])
    return urls


def network_requests(path: str | Path) -> Requests:
    """Load ``path`` from a local HTTP server on 127.0.0.1 in a browser that records a net log.

    Two independent records: (1) the server's own log of the paths it answered (a relative
    reference would show up there); (2) Chromium's net log (``--log-net-log``), which lists every
    URL request the browser starts, to any host, before DNS or a connection can fail, so an
    absolute ``https://cdn...`` reference shows up even with no network. Requests belong to the
    page when their network isolation key is keyed to the page's site; data: URIs never reach
    the network stack. A self-contained page yields exactly [its own URL] in both.
    """
    root = Path(path).resolve().parent
    served: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean; paths are recorded below
            pass

        def send_head(self):
            served.append(self.path)
            return super().send_head()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{Path(path).name}"
        with tempfile.TemporaryDirectory() as d:
            netlog = Path(d) / "net.json"
            run_chromium(f"--log-net-log={netlog}", "--dump-dom", url)
            reqs = _page_requests(netlog, "http://127.0.0.1")
    finally:
        server.shutdown()
        server.server_close()
    return Requests(page=url, page_requests=reqs, served=served)


@dataclass
class Dom:
    numbers: list[dict] = field(
        default_factory=list
    )  # {"attrs": {...}, "text": str} per tagged span
    images: list[dict] = field(default_factory=list)  # attrs of every <img>
    text: str = ""  # all text outside <style>/<script>
    body_attrs: dict = field(default_factory=dict)


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.dom, self._num, self._skip, self._text = Dom(), None, 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.dom.images.append(a)
        elif tag == "body":
            self.dom.body_attrs = a
        elif tag in ("style", "script"):
            self._skip += 1
        elif tag == "span" and "data-fmt" in a:
            self._num = {"attrs": a, "text": ""}

    def handle_endtag(self, tag):
        if tag in ("style", "script"):
            self._skip -= 1
        elif tag == "span" and self._num is not None:
            self.dom.numbers.append(self._num)
            self._num = None

    def handle_data(self, data):
        if self._skip:
            return
        self._text.append(data)
        if self._num is not None:
            self._num["text"] += data


def parse_dom(dom: str) -> Dom:
    p = _Parser()
    p.feed(dom)
    p.close()
    p.dom.text = " ".join(p._text)
    return p.dom


def lookup(src, key: str):
    """The value at the dotted ``key`` of ``src`` (dicts by key, lists by index): what a tagged
    number's ``data-metric`` names in its ``data-source``."""
    node = src
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node
