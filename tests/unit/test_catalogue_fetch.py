"""Fetching catalogue images against a real HTTP server on 127.0.0.1 (http.server in a thread) and real
files: every reason code, retries only for transient faults, no redirect to another host, the size cap,
file:// only under the batch roots and never through a link, and one result per product in order."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zalando.catalogue.fetch import (
    FETCH_HTTP_ERROR,
    FETCH_PROBLEMS,
    FETCH_TIMEOUT,
    MISSING_OBJECT,
    REDIRECT_ELSEWHERE,
    URL_NOT_ALLOWED,
    FetchConfig,
    FetchedImage,
    ImageFetcher,
)
from zalando.catalogue.query import ProductRow
from zalando.images import EMPTY_FILE, NOT_AN_IMAGE, TOO_LARGE, decode_image
from zalando.lake import Lake
from zalando.settings import Settings


def _png(value: int = 200) -> bytes:
    a = np.zeros((28, 28), np.uint8)
    a[8:20, 8:20] = value
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()
CAP = 4096  # the test's max_bytes
HTML = b"<!doctype html><html><body>Not an image</body></html>"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str | None = "image/png", **headers: str) -> None:
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv = self.server
        path = self.path.split("?", 1)[0]
        with srv.lock:
            srv.hits[path] += 1
            srv.hosts.append(self.headers.get("Host", ""))
            hit = srv.hits[path]
        port = srv.server_address[1]
        if path == "/png":
            self._send(200, PNG)
        elif path == "/octet":
            self._send(200, PNG, ctype="application/octet-stream")
        elif path == "/html":
            self._send(200, HTML, ctype="text/html; charset=utf-8")
        elif path == "/html-as-png":
            self._send(200, HTML, ctype="image/png")
        elif path == "/500":
            self._send(500, b"boom", ctype="text/plain")
        elif path == "/flaky":  # 503 once, then the image
            self._send(503, b"", ctype=None) if hit == 1 else self._send(200, PNG)
        elif path == "/403":
            self._send(403, b"no", ctype="text/plain")
        elif path == "/404":
            self._send(404, b"gone", ctype="text/plain")
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, PNG)
        elif path == "/trickle":  # headers at once, then a byte at a time, slower than the deadline
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            try:
                for b in PNG[:40]:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        elif path == "/empty":
            self._send(200, b"")
        elif path == "/big":  # announced: refused on the header
            self._send(200, PNG + b"\0" * (CAP * 4))
        elif path == "/big-unannounced":  # chunked, no length: refused at the cap, reading stops there
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                # 40 MB: more than loopback's socket buffers can hold, so a client that hangs up
                # at the cap leaves the server unable to send it all
                for _ in range(2000):
                    block = PNG + b"\0" * 20_000
                    self.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
                srv.big_finished = True
            except OSError:
                pass
        elif path == "/redirect-same":
            self._send(302, b"", ctype=None, Location="/png")
        elif path == "/redirect-twice":
            self._send(301, b"", ctype=None, Location=f"http://127.0.0.1:{port}/redirect-same")
        elif path == "/redirect-loop":
            self._send(302, b"", ctype=None, Location="/redirect-loop")
        elif path == "/redirect-localhost":  # the same server, under another host name
            self._send(302, b"", ctype=None, Location=f"http://localhost:{port}/png")
        elif path == "/redirect-other-ip":
            self._send(307, b"", ctype=None, Location=f"http://127.0.0.2:{port}/png")
        elif path == "/redirect-file":
            self._send(302, b"", ctype=None, Location="file:///etc/passwd")
        elif path == "/redirect-no-location":
            self._send(302, b"", ctype=None)
        else:
            self._send(404, b"", ctype=None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hung up (a time-out, the size cap) is what several tests do on purpose

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.hosts: list[str] = []
        self.big_finished = False


@pytest.fixture(scope="module")
def http_server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _row(pid: int, url: str | None, problem: str | None = None, image_id: int | None = None) -> ProductRow:
    return ProductRow(
        product_id=pid,
        title=f"product {pid}",
        image_id=image_id if image_id is not None else (None if url is None else 1000 + pid),
        image_url=url,
        image_problem=problem,  # type: ignore[arg-type]
        description=None,
        description_source=None,
    )


def _fetcher(tmp_path: Path | None = None, **kw: object) -> ImageFetcher:
    base: dict[str, object] = {
        "concurrency": 4,
        "timeout_s": 0.5,
        "retries": 2,
        "backoff_s": 0.01,
        "max_redirects": 2,
        "max_bytes": CAP,
        "roots": (tmp_path.resolve(),) if tmp_path else (),
    }
    return ImageFetcher(FetchConfig(**{**base, **kw}))  # type: ignore[arg-type]


def _one(fetcher: ImageFetcher, url: str) -> FetchedImage:
    return fetcher.fetch_one(_row(1, url))


# ------------------------------------------------------------------------------ http(s)
def test_a_png_is_fetched_with_its_digest_and_decodes(http_server: _Server) -> None:
    base = f"http://127.0.0.1:{http_server.server_address[1]}"
    for path in ("/png", "/octet"):
        got = _one(_fetcher(), base + path)
        assert got.ok and got.problem is None and got.data == PNG
        assert got.sha256 == hashlib.sha256(PNG).hexdigest() and got.size == len(PNG) and got.attempts == 1
        assert decode_image(got.data).shape == (28, 28)


@pytest.mark.parametrize(
    ("path", "reason", "hits"),
    [
        ("/html", NOT_AN_IMAGE, 1),  # the content type says so: the body is never read
        ("/html-as-png", NOT_AN_IMAGE, 1),  # it says image/png, the bytes say HTML
        ("/empty", EMPTY_FILE, 1),
        ("/big", TOO_LARGE, 1),
        ("/404", MISSING_OBJECT, 1),
        ("/403", FETCH_HTTP_ERROR, 1),  # a permanent refusal: not retried
        ("/500", FETCH_HTTP_ERROR, 3),  # transient: 1 try + 2 retries, then a problem
        ("/redirect-loop", FETCH_HTTP_ERROR, 3),  # the first request and max_redirects=2 follow-ups
        ("/redirect-no-location", FETCH_HTTP_ERROR, 1),
    ],
)
def test_each_http_defect_is_one_typed_problem(
    http_server: _Server, path: str, reason: str, hits: int
) -> None:
    base = f"http://127.0.0.1:{http_server.server_address[1]}"
    before = http_server.hits[path]
    got = _one(_fetcher(), base + path)
    assert got.problem == reason and got.data is None and got.detail
    assert http_server.hits[path] - before == hits
    assert got.transient == (path == "/500")
    if path == "/html-as-png":  # the bytes were read: their size and digest are kept, the bytes not
        assert got.size == len(HTML) and got.sha256 == hashlib.sha256(HTML).hexdigest()
    if path == "/big":
        assert got.size is not None and got.size > CAP


def test_a_transient_fault_is_retried_and_then_succeeds(http_server: _Server) -> None:
    base = f"http://127.0.0.1:{http_server.server_address[1]}"
    got = _one(_fetcher(), base + "/flaky")
    assert got.ok and got.data == PNG and got.attempts == 2
    assert http_server.hits["/flaky"] == 2
    no_retries = _one(_fetcher(retries=0), base + "/500")
    assert no_retries.problem == FETCH_HTTP_ERROR and no_retries.attempts == 1


def test_a_slow_server_or_a_trickling_body_is_a_timeout_within_bounded_time(http_server: _Server) -> None:
    base = f"http://127.0.0.1:{http_server.server_address[1]}"
    for path in ("/slow", "/trickle"):
        t0 = time.perf_counter()
        got = _one(_fetcher(retries=1), base + path)
        elapsed = time.perf_counter() - t0
        assert got.problem == FETCH_TIMEOUT and got.transient and got.attempts == 2, got
        assert elapsed < 2 * (0.5 + 0.5) + 1.0  # two attempts of at most ~2 x timeout_s each


def test_an_unannounced_oversize_body_stops_at_the_cap(http_server: _Server) -> None:
    base = f"http://127.0.0.1:{http_server.server_address[1]}"
    got = _one(_fetcher(timeout_s=5), base + "/big-unannounced")
    assert got.problem == TOO_LARGE and got.size is not None and CAP < got.size <= CAP + 64 * 1024
    time.sleep(0.3)
    assert not http_server.big_finished  # we hung up: the server could not send it all


def test_redirects_to_the_same_host_are_followed_and_to_another_host_never(http_server: _Server) -> None:
    port = http_server.server_address[1]
    base = f"http://127.0.0.1:{port}"
    same = _one(_fetcher(), base + "/redirect-same")
    assert same.ok and same.data == PNG and same.url == base + "/redirect-same"
    assert _one(_fetcher(), base + "/redirect-twice").ok  # two hops, max_redirects=2
    assert _one(_fetcher(max_redirects=1), base + "/redirect-twice").problem == FETCH_HTTP_ERROR
    assert _one(_fetcher(max_redirects=0), base + "/redirect-same").problem == FETCH_HTTP_ERROR
    http_server.hosts.clear()
    for path in ("/redirect-localhost", "/redirect-other-ip", "/redirect-file"):
        got = _one(_fetcher(), base + path)
        assert got.problem == REDIRECT_ELSEWHERE and not got.transient and got.attempts == 1, got
    # the other hosts were never asked: every request the server saw named 127.0.0.1
    assert http_server.hosts and all(h == f"127.0.0.1:{port}" for h in http_server.hosts)


def test_urls_outside_the_allowed_schemes_or_hosts_are_refused(http_server: _Server, tmp_path: Path) -> None:
    port = http_server.server_address[1]
    fetcher = _fetcher()
    for url in (
        "ftp://127.0.0.1/a.png",
        "data:image/png;base64,AAAA",
        "relative/path.png",
        f"http://user:pw@127.0.0.1:{port}/png",
        "http:///no-host.png",
        "http://127.0.0.1:notaport/png",
        "http://user:pw@127.0.0.1:notaport/png",
        "ftp://user:pw@127.0.0.1/a.png",
        "s3://user:pw@bucket/key.png",
        "s3://bucket/key.png",  # no S3 lake
        f"file://user:pw@localhost{tmp_path}/a.png",
    ):
        got = _one(fetcher, url)
        assert got.problem == URL_NOT_ALLOWED, (url, got)
        assert "pw" not in (got.detail or "")
    only_localhost = _fetcher(hosts=("localhost",))
    assert _one(only_localhost, f"http://127.0.0.1:{port}/png").problem == URL_NOT_ALLOWED
    assert _one(only_localhost, f"http://localhost:{port}/png").ok


def test_settings_build_the_config() -> None:
    settings = Settings(
        catalog_fetch_concurrency=3,
        catalog_fetch_timeout_s=2.5,
        catalog_fetch_retries=1,
        catalog_fetch_max_redirects=4,
        catalog_fetch_hosts="img.example.com, CDN.example.com",  # type: ignore[arg-type]
        batch_buckets="retailer-images",  # type: ignore[arg-type]
        batch_roots=["/srv/images"],
    )
    cfg = FetchConfig.from_settings(settings)
    assert (cfg.concurrency, cfg.timeout_s, cfg.retries, cfg.max_redirects) == (3, 2.5, 1, 4)
    assert cfg.hosts == ("img.example.com", "cdn.example.com") and cfg.buckets == ("retailer-images",)
    assert cfg.roots == (Path("/srv/images").resolve(),) and cfg.max_bytes == 20 * 1024 * 1024
    assert FetchConfig.from_settings(Settings()).concurrency == 8


# ------------------------------------------------------------------------------ file://
def test_file_urls_only_under_the_roots_and_never_through_a_link(tmp_path: Path) -> None:
    root = (tmp_path / "root").resolve()
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "a.png").write_bytes(PNG)
    (root / "imgs" / "page.png").write_bytes(HTML)
    (root / "imgs" / "empty.png").write_bytes(b"")
    (root / "imgs" / "big.png").write_bytes(PNG + b"\0" * CAP)
    outside = (tmp_path / "outside").resolve()
    outside.mkdir()
    (outside / "secret.png").write_bytes(PNG)
    (root / "imgs" / "link.png").symlink_to(root / "imgs" / "a.png")  # even a link inside the root
    (root / "linked-dir").symlink_to(root / "imgs", target_is_directory=True)
    (root / "escape.png").symlink_to(outside / "secret.png")
    os.mkfifo(root / "imgs" / "fifo.png")
    fetcher = _fetcher(root)
    ok = _one(fetcher, f"file://{root}/imgs/a.png")
    assert ok.ok and ok.data == PNG and ok.sha256 == hashlib.sha256(PNG).hexdigest()
    assert _one(fetcher, f"file://localhost{root}/imgs/a.png").ok
    assert _one(fetcher, f"file://{root}/imgs/%61.png").ok  # percent-escapes are decoded
    cases = {
        f"file://{root}/imgs/page.png": NOT_AN_IMAGE,
        f"file://{root}/imgs/empty.png": EMPTY_FILE,
        f"file://{root}/imgs/big.png": TOO_LARGE,
        f"file://{root}/imgs/missing.png": MISSING_OBJECT,
        f"file://{root}/nowhere/missing.png": MISSING_OBJECT,
        f"file://{outside}/secret.png": URL_NOT_ALLOWED,
        f"file://{root}/../outside/secret.png": URL_NOT_ALLOWED,
        f"file://{root}/imgs/link.png": URL_NOT_ALLOWED,
        f"file://{root}/linked-dir/a.png": URL_NOT_ALLOWED,
        f"file://{root}/escape.png": URL_NOT_ALLOWED,
        f"file://{root}/imgs/fifo.png": URL_NOT_ALLOWED,  # never opened: the test would hang
        f"file://{root}/imgs": URL_NOT_ALLOWED,  # a folder
        f"file://otherhost{root}/imgs/a.png": URL_NOT_ALLOWED,
    }
    got = {url: _one(fetcher, url).problem for url in cases}
    assert got == cases
    assert _one(_fetcher(None), f"file://{root}/imgs/a.png").problem == URL_NOT_ALLOWED  # no roots at all


def test_s3_urls_need_the_lakes_bucket_or_an_allowed_one(tmp_path: Path) -> None:
    """Without S3 (a file lake) every s3:// URL is refused; the S3 cases run against SeaweedFS in
    tests/integration/test_catalogue_scoring_parts.py."""
    fetcher = ImageFetcher(FetchConfig(roots=(tmp_path.resolve(),)), Lake.local(tmp_path / "lake"))
    got = _one(fetcher, "s3://zalando/lake/catalogue/images/demo/a.png")
    assert got.problem == URL_NOT_ALLOWED and "needs an S3 lake" in (got.detail or "")


# ------------------------------------------------------------------------------ many products
def test_every_product_gives_one_result_in_order_with_the_querys_reasons(
    http_server: _Server, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{http_server.server_address[1]}"
    rows = [
        _row(1, base + "/png"),
        _row(2, None, "no_primary_image"),
        _row(3, None, "several_primary_images"),
        _row(4, None, "image_row_missing", image_id=99),
        _row(5, base + "/html"),
        _row(6, base + "/404"),
        _row(7, base + "/redirect-localhost"),
        _row(8, base + "/empty"),
        _row(9, "gopher://x/y"),
    ] + [_row(100 + i, f"{base}/png?i={i}") for i in range(40)]
    fetcher = _fetcher(tmp_path)
    out = fetcher.fetch_all(rows)
    assert [f.product_id for f in out] == [r.product_id for r in rows]
    by_id = {f.product_id: f for f in out}
    assert {pid: by_id[pid].problem for pid in range(1, 10)} == {
        1: None,
        2: "no_primary_image",
        3: "several_primary_images",
        4: "image_row_missing",
        5: NOT_AN_IMAGE,
        6: MISSING_OBJECT,
        7: REDIRECT_ELSEWHERE,
        8: EMPTY_FILE,
        9: URL_NOT_ALLOWED,
    }
    assert by_id[4].image_id == 99 and by_id[4].url is None and by_id[4].attempts == 0
    assert all(by_id[100 + i].ok for i in range(40))
    assert {f.problem for f in out if f.problem} <= set(FETCH_PROBLEMS) | {
        "no_primary_image",
        "several_primary_images",
        "image_row_missing",
    }
    streamed = list(fetcher.iter_fetch(iter(rows), window=3))  # a bounded window, same answer
    assert [(f.product_id, f.problem, f.sha256) for f in streamed] == [
        (f.product_id, f.problem, f.sha256) for f in out
    ]


def test_fetching_runs_in_parallel_bounded_by_the_concurrency(http_server: _Server) -> None:
    """Eight slow URLs, concurrency 4, timeout 0.5 s and no retries: two waves of ~0.5 s, not eight."""
    base = f"http://127.0.0.1:{http_server.server_address[1]}"
    rows = [_row(i, f"{base}/slow?i={i}") for i in range(8)]
    t0 = time.perf_counter()
    out = _fetcher(concurrency=4, retries=0).fetch_all(rows)
    elapsed = time.perf_counter() - t0
    assert [f.problem for f in out] == [FETCH_TIMEOUT] * 8
    assert 0.9 < elapsed < 3.5
