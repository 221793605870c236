"""The test fault proxy (tests/support/proxy.py) against a local HTTP server: forwarding, cut,
heal, slow and fail_http, and a clean stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.support.proxy import FaultProxy


class _Echo(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def proxy() -> Iterator[FaultProxy]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fault_proxy = FaultProxy(server.server_address[1])
    try:
        yield fault_proxy
    finally:
        fault_proxy.stop()
        server.shutdown()
        server.server_close()
        thread.join(5)


def _post(proxy: FaultProxy, body: bytes, timeout: float = 5.0) -> requests.Response:
    return requests.post(proxy.url, data=body, timeout=timeout)


def test_forwards_cuts_heals_and_fails_http(proxy: FaultProxy) -> None:
    assert _post(proxy, b"hello").content == b"hello"
    proxy.cut()
    with pytest.raises(requests.ConnectionError):
        _post(proxy, b"x")
    proxy.heal()
    assert _post(proxy, b"again").content == b"again"
    proxy.fail_http(503)
    answer = _post(proxy, b"y" * 100_000)
    assert answer.status_code == 503 and proxy.requests_failed == 1
    proxy.cut(refuse=False)
    with pytest.raises(requests.Timeout):
        _post(proxy, b"z", timeout=0.5)
    proxy.heal()
    assert _post(proxy, b"back").content == b"back"
    assert proxy.bytes_forwarded > 0


def test_slow_throttles_each_direction(proxy: FaultProxy) -> None:
    proxy.slow(bytes_per_second=20_000)
    started = time.monotonic()
    assert _post(proxy, b"a" * 10_000).content == b"a" * 10_000
    assert time.monotonic() - started >= 0.8  # ~0.5 s each way
    proxy.slow(delay=0.3)
    started = time.monotonic()
    _post(proxy, b"b")
    assert time.monotonic() - started >= 0.5  # request and answer each wait 0.3 s


def test_stop_joins_every_thread(proxy: FaultProxy) -> None:
    session = requests.Session()
    assert session.post(proxy.url, data=b"keep-alive", timeout=5).status_code == 200
    proxy.stop()
    assert not proxy._threads
    with pytest.raises(requests.ConnectionError):
        requests.post(proxy.url, data=b"x", timeout=2)
