"""The node's HTTP server (stdlib ``ThreadingHTTPServer``) with a small, extensible routing table.

Others add routes with ``router.add("GET", r"/metrics", handler)``; a handler
takes a :class:`Request` and returns a :class:`Response`. Routes marked
``auth=True`` require ``Authorization: Bearer <token>`` when a token is configured.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)


class BodyTooLargeError(ValueError):
    """A request body exceeds the server's limit."""


def read_chunked(rfile: BinaryIO, limit: int) -> bytes:
    """Read an HTTP/1.1 chunked body (RFC 9112 section 7.1) of at most ``limit`` bytes.

    Chunk extensions and trailer fields are read and ignored.

    Raises
    ------
    BodyTooLargeError
        The chunks add up to more than ``limit`` bytes.
    ValueError
        The framing is malformed or the connection ends early.
    """
    parts: list[bytes] = []
    total = 0
    while True:
        line = rfile.readline(1026)
        if not line.endswith(b"\r\n"):
            raise ValueError("chunk size line missing or too long")
        size_text = line[:-2].split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
            raise ValueError(f"bad chunk size {size_text[:20]!r}")
        size = int(size_text, 16)
        if size == 0:
            break
        total += size
        if total > limit:
            raise BodyTooLargeError(f"chunked body exceeds {limit} bytes")
        data = rfile.read(size)
        if len(data) != size or rfile.read(2) != b"\r\n":
            raise ValueError("chunk shorter than its size, or not followed by CRLF")
        parts.append(data)
    for _ in range(100):  # trailer fields, up to the empty line
        line = rfile.readline(8192)
        if line in (b"\r\n", b"\n"):
            return b"".join(parts)
        if not line.endswith(b"\n"):
            raise ValueError("trailer section not terminated")
    raise ValueError("too many trailer fields")


@dataclass
class Request:
    """What a route handler gets."""

    method: str
    path: str
    params: dict[str, str]      # named groups of the route pattern
    query: dict[str, list[str]]
    headers: dict[str, str]     # lower-case names
    body: bytes
    client: str


@dataclass
class Response:
    """What a route handler returns."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200, content_type: str = "application/json") -> Response:
        return cls(status, json.dumps(data, default=str).encode("utf-8"), content_type)

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode("utf-8"))


Handler = Callable[[Request], Response]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    auth: bool


class Router:
    """Method + regex routes, tried in the order added."""

    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, method: str, pattern: str, handler: Handler, auth: bool = True) -> None:
        """Route ``method`` requests whose path fully matches ``pattern`` (named groups become params)."""
        self.routes.append(Route(method.upper(), re.compile(pattern), handler, auth))

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        """(route, params, path_known): path_known is True when another method would match."""
        path_known = False
        for route in self.routes:
            m = route.pattern.fullmatch(path)
            if m:
                path_known = True
                if route.method == method:
                    return route, m.groupdict(), True
        return None, {}, path_known


class HttpServer:
    """ThreadingHTTPServer around a :class:`Router`.

    Parameters
    ----------
    host, port:
        Where to listen (port 0 picks a free one).
    router:
        The routes.
    token:
        Bearer token required on ``auth`` routes; None disables the check.
    max_body:
        Larger request bodies are refused with 413.
    """

    def __init__(self, host: str, port: int, router: Router, token: str | None = None,
                 max_body: int = 2 * 1024**3) -> None:
        self.router = router
        self.token = token
        self.max_body = max_body
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "igtv-node"

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("%s %s", self.address_string(), fmt % args)

            def _serve(self) -> None:
                outer._dispatch(self)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        self.server = ThreadingHTTPServer((host, int(port)), _Handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> int:
        """Serve in a background thread; return the bound port."""
        self._thread = threading.Thread(target=self.server.serve_forever, name="igtv-http", daemon=True)
        self._thread.start()
        log.info("HTTP server on %s:%d", self.server.server_address[0], self.port)
        return self.port

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread:
            self._thread.join(10)

    def _authorised(self, headers: dict[str, str]) -> bool:
        if not self.token:
            return True
        value = headers.get("authorization", "")
        scheme, _, given = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def _dispatch(self, h: BaseHTTPRequestHandler) -> None:
        split = urlsplit(h.path)
        headers = {k.lower(): v for k, v in h.headers.items()}
        route, params, known = self.router.match(h.command, split.path)
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        try:
            length = 0 if chunked else int(headers.get("content-length", "0") or 0)
        except ValueError:
            length = -1
        if length < 0:
            return self._send(h, Response.text("Content-Length required\n", 411), close=True)
        if length > self.max_body:
            return self._send(h, Response.text(f"body larger than {self.max_body} bytes\n", 413), close=True)
        if route is None:
            h.rfile.read(length)
            return self._send(h, Response.text("not found\n" if not known else "method not allowed\n",
                                               404 if not known else 405), close=chunked)
        if route.auth and not self._authorised(headers):
            h.rfile.read(length) if length <= 16 * 1024**2 else None
            resp = Response.text("missing or wrong bearer token\n", 401)
            resp.headers["WWW-Authenticate"] = 'Bearer realm="igtv-node"'
            return self._send(h, resp, close=chunked or length > 16 * 1024**2)
        if chunked:
            try:
                body = read_chunked(h.rfile, self.max_body)
            except BodyTooLargeError:
                return self._send(h, Response.text(f"body larger than {self.max_body} bytes\n", 413), close=True)
            except ValueError as exc:
                return self._send(h, Response.text(f"malformed chunked body: {exc}\n", 400), close=True)
        else:
            body = h.rfile.read(length) if length else b""
        request = Request(h.command, split.path, params, parse_qs(split.query), headers, body, h.client_address[0])
        try:
            response = route.handler(request)
        except Exception:
            log.exception("HTTP %s %s failed", h.command, split.path)
            response = Response.text("internal error\n", 500)
        self._send(h, response)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, resp: Response, close: bool = False) -> None:
        h.send_response(resp.status)
        h.send_header("Content-Type", resp.content_type)
        h.send_header("Content-Length", str(len(resp.body)))
        for k, v in resp.headers.items():
            h.send_header(k, v)
        if close:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(resp.body)
