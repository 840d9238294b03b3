"""A fault-injecting HTTP proxy of the tests' own, on 127.0.0.1 in front of the moto S3 server.

``FaultProxy(upstream, rules, seed)`` forwards every request to ``upstream`` (moto's
``http://127.0.0.1:PORT``) and, for requests a :class:`Rule` matches, injects a fault instead of a
plain answer on a seeded random share of them, at most ``Rule.count`` times and only within
``Rule.within_s`` seconds of the rule's first match (so every rule stops by itself). Kinds:

* ``"500"`` / ``"503"``: that status with an S3 error body, before forwarding (moto never sees it);
* ``"reset"``: the request is forwarded and done by moto, then the connection is reset instead of
  answering (the client never learns it succeeded: the retry repeats a finished request);
* ``"delay"``: wait ``Rule.delay_s`` seconds, then forward.

A rule's faults take its ``kinds`` in turn, so a small ``count`` still covers each kind; which
matching requests get them is drawn from ``random.Random(f"{seed}:{rule.match}")`` in arrival
order; ``add(rule)`` adds one later. ``stop()`` takes the endpoint down (the listening socket
closed, open connections reset: clients get connection refused / reset); ``start()`` brings it
back on the same port.
``down_after(match, n)``: once the n-th request matching ``match`` is answered, the endpoint goes
down. ``on_answer(match, n, fn)``: the n-th request matching ``match`` is done by moto, then
``fn()`` runs (e.g. the bucket removed behind the client's back), then the client gets its answer.
``faults`` lists what was injected: ``(rule match, kind, method, path)``.
"""
from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te",
              "trailer", "upgrade", "expect", "content-length"}
ERROR_BODY = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
              "<Message>injected by the test's fault proxy</Message></Error>")


@dataclass
class Rule:
    """Faults for requests whose ``"METHOD /path?query"`` matches the regex ``match``."""
    match: str
    kinds: tuple[str, ...] = ("500", "503", "reset", "delay")
    share: float = 0.3
    count: int = 4
    within_s: float = 120.0
    delay_s: float = 0.5


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:  # a client that hung up: quiet
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reset(self) -> None:
        """Close with SO_LINGER 0: the client sees a connection reset, no answer."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._body()
        if proxy.is_down:
            return self._reset()
        fault, delay_s = proxy._decide(self.command, self.path)
        if fault in ("500", "503"):
            code = "InternalError" if fault == "500" else "SlowDown"
            data = ERROR_BODY.format(code=code).encode()
            self.send_response(int(fault))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if fault == "delay":
            time.sleep(delay_s)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        up = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=120)
        try:
            up.request(self.command, self.path, body=body or None, headers=headers)
            resp = up.getresponse()
            data = resp.read()
            status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
        finally:
            up.close()
        proxy._answered(self.command, self.path)
        if fault == "reset" or proxy.is_down:
            return self._reset()
        self.send_response(status, reason)
        length = None
        for k, v in resp_headers:
            if k.lower() == "content-length":
                length = v
            elif k.lower() not in HOP_BY_HOP and k.lower() not in ("server", "date"):
                self.send_header(k, v)
        # a HEAD answer carries the object's length and no body
        self.send_header("Content-Length", length if self.command == "HEAD" and length
                         else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class FaultProxy:
    """See the module docstring. Use as a context manager (started on entry, stopped on exit)."""

    def __init__(self, upstream: str, rules: list[Rule] | tuple[Rule, ...] = (), *, seed: int = 0):
        parts = urlsplit(upstream)
        assert parts.hostname == "127.0.0.1", "the tests' traffic stays on 127.0.0.1"
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.rules, self.seed = list(rules), seed
        self._rng = {r.match: random.Random(f"{seed}:{r.match}") for r in self.rules}
        self._first: dict[str, float] = {}
        self._lock = threading.Lock()
        self.faults: list[tuple[str, str, str, str]] = []
        self.requests = 0
        self._hooks: list[list] = []  # [pattern, n, fn, hits]
        self.is_down = False
        self.port = 0
        self._server: _Server | None = None

    # ------------------------------------------------------------------ endpoint up/down
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.proxy = self  # type: ignore[attr-defined]
        self.port = self._server.server_address[1]
        self.is_down = False
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        """The endpoint goes down: new connections are refused, open ones reset."""
        self.is_down = True
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def add(self, rule: Rule) -> None:
        """One more rule (its time window starts at its first match)."""
        with self._lock:
            self.rules.append(rule)
            self._rng[rule.match] = random.Random(f"{self.seed}:{rule.match}")

    def down_after(self, match: str, n: int) -> None:
        """Go down once the ``n``-th request matching ``match`` has been answered by moto."""
        def down() -> None:
            self.is_down = True  # this answer and every later request: reset
            threading.Thread(target=self.stop, daemon=True).start()
        self.on_answer(match, n, down)

    def on_answer(self, match: str, n: int, fn) -> None:
        """Run ``fn()`` once moto has done the ``n``-th request matching ``match``, before the
        client gets the answer."""
        with self._lock:
            self._hooks.append([re.compile(match), n, fn, 0])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ decisions
    def _rule_of(self, line: str) -> Rule | None:
        return next((r for r in self.rules if re.search(r.match, line)), None)

    def _decide(self, method: str, path: str) -> tuple[str | None, float]:
        """(the fault for this request or None, the rule's delay)."""
        line = f"{method} {path}"
        with self._lock:
            self.requests += 1
            rule = self._rule_of(line)
            if rule is None:
                return None, 0.0
            first = self._first.setdefault(rule.match, time.monotonic())
            done = sum(f[0] == rule.match for f in self.faults)
            draw = self._rng[rule.match].random()  # drawn for every match: the sequence is fixed
            if done >= rule.count or time.monotonic() - first > rule.within_s or draw >= rule.share:
                return None, 0.0
            kind = rule.kinds[done % len(rule.kinds)]
            self.faults.append((rule.match, kind, method, path))
            return kind, rule.delay_s

    def _answered(self, method: str, path: str) -> None:
        due = []
        with self._lock:
            for hook in self._hooks:
                if hook[0].search(f"{method} {path}"):
                    hook[3] += 1
                    if hook[3] == hook[1]:
                        due.append(hook[2])
        for fn in due:
            fn()

    def injected(self, match: str | None = None) -> list[tuple[str, str, str, str]]:
        """The faults injected (by the rule ``match``, or all)."""
        with self._lock:
            return [f for f in self.faults if match is None or f[0] == match]
