"""A small fault-injecting HTTP proxy for storage tests.

It sits on 127.0.0.1 in front of a real S3 server and forwards every request byte for byte
(headers untouched, so SigV4 signatures stay valid), except the requests a :class:`FaultRule`
picks: those get a 5xx (or a 404 NoSuchBucket) answer, hang past the client's timeout, or lose their connection.

    with FaultProxy(server.endpoint) as proxy:
        proxy.add(FaultRule(method="PUT", path=r"\\.parquet$", action=503, times=2))
        lake = Lake.from_uri("s3://bucket/x", S3Config(proxy.endpoint, ...))

Every request is recorded (method, path, what the proxy did) so a test can say how many
attempts an operation took.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlparse

Action = Literal[404, 500, 502, 503, "timeout", "drop"]

_S3_ERRORS = {
    404: ("NoSuchBucket", "The specified bucket does not exist"),  # what AWS and MinIO answer
    500: ("InternalError", "We encountered an internal error. Please try again."),
    502: ("BadGateway", "Bad gateway (injected)."),
    503: ("ServiceUnavailable", "Please reduce your request rate (injected)."),
}


@dataclass
class FaultRule:
    """Fault the requests matching method and path (a regex searched in the path and query).

    ``times``: how many matching requests get the fault (then they pass); None means every one.
    ``skip``: let this many matching requests through before faulting.
    ``hang_s``: for ``timeout``, how long to hold the request before dropping it unanswered.
    """

    action: Action
    method: str | None = None
    path: str = ""
    times: int | None = 1
    skip: int = 0
    hang_s: float = 3.0
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and re.search(self.path, path) is not None

    def take(self) -> bool:
        """Count one matching request; True when this one is to be faulted."""
        self.seen += 1
        if self.seen <= self.skip:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


@dataclass
class Record:
    method: str
    path: str
    outcome: str  # "forwarded <status>", "injected 503", "timeout", "drop", "upstream error"
    at: float = field(default_factory=time.monotonic)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy  # set on the subclass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        return

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is not None:
            return self.rfile.read(int(length))
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the blank line
                        t = self.rfile.readline()
                        raw += t
                        if t in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)
        return b""

    def _handle(self) -> None:
        body = self._read_body()
        method, path = self.command, self.path
        rule = self.proxy._pick(method, path)
        if rule is not None and rule.action in _S3_ERRORS:
            code, msg = _S3_ERRORS[rule.action]  # type: ignore[index]
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>{msg}</Message><Resource>{path}</Resource></Error>"
            ).encode()
            self.proxy._record(method, path, f"injected {rule.action}")
            self.send_response(int(rule.action))  # type: ignore[arg-type]
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)
            return
        if rule is not None and rule.action == "timeout":
            self.proxy._record(method, path, "timeout")
            time.sleep(rule.hang_s)
            self.close_connection = True
            return
        if rule is not None and rule.action == "drop":
            self.proxy._record(method, path, "drop")
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._forward(method, path, body)

    def _forward(self, method: str, path: str, body: bytes) -> None:
        up = urlparse(self.proxy.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            if body:
                conn.send(body)
            resp = conn.getresponse()
            data = resp.read()
        except OSError:
            self.proxy._record(method, path, "upstream error")
            self.close_connection = True
            try:
                self.send_response(502)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                pass
            return
        finally:
            conn.close()
        self.proxy._record(method, path, f"forwarded {resp.status}")
        self.send_response(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() in ("transfer-encoding", "connection", "content-length"):
                continue
            self.send_header(name, value)
        # HEAD answers carry the object's length but no body
        length = resp.getheader("Content-Length") if method == "HEAD" else str(len(data))
        if length is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        if method != "HEAD" and data:
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 (a free port) that injects the faults of its rules."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.rules: list[FaultRule] = []
        self.records: list[Record] = []
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"proxy": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _pick(self, method: str, path: str) -> FaultRule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path) and rule.take():
                    return rule
        return None

    def _record(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.records.append(Record(method, path, outcome))

    def count(self, method: str | None = None, path: str = "", outcome: str = "") -> int:
        """How many recorded requests match (outcome is a prefix: 'injected', 'forwarded 2', ...)."""
        with self._lock:
            return sum(
                1
                for r in self.records
                if (method is None or r.method == method)
                and re.search(path, r.path)
                and r.outcome.startswith(outcome)
            )

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


RecordProperty = Callable[[str, object], None]  # pytest's built-in ``record_property`` fixture


def record_case(
    record_property: RecordProperty,
    case: str,
    happened: str,
    *,
    retried: str = "-",
    lost: str = "nothing",
    leaked: str = "nothing",
) -> None:
    """Note one row of the reliability report (benchmarks/reliability_report.py) for this test.

    Call it at the END of a test, after the assertions: a row exists only when the case held.
    """
    for name, value in (
        ("case", case),
        ("happened", happened),
        ("retried", retried),
        ("lost", lost),
        ("leaked", leaked),
    ):
        record_property(f"reliability_{name}", value)
