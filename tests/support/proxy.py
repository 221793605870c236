"""A test-controlled network fault: a small threaded TCP proxy in front of one listener.

Coordinators reach each other through the ``api_url`` in the membership view, which is
``coordinator.advertise_url`` when set. Starting a coordinator with ``advertise_url`` pointing at a
``FaultProxy`` in front of its coordination port sends every coordinator-to-coordinator call TO it
(heartbeats, registry sync, replication pushes, chunk reads) through the proxy, while the test's
own clients still talk to its ports directly.

Modes (switch at any time; they apply to connections already open as well as new ones):

- normal: bytes are forwarded both ways unchanged.
- ``cut(refuse=True)``: every open connection is closed; new ones are closed at once (refuse) or,
  with ``refuse=False``, accepted and left silent (blackhole: callers run into their timeouts).
- ``slow(bytes_per_second=..., delay=...)``: forwarding is throttled to that rate (each direction,
  per connection) and/or each forwarded segment waits ``delay`` seconds first.
- ``fail_http(status)``: every HTTP request is read and answered with ``status`` (Connection:
  close) without reaching the target: a peer that is up but answers errors.
- ``heal()``: back to normal.

``stop()`` closes the listener and every connection and joins every thread; the proxy is also a
context manager. Counters (``connections``, ``requests_failed``, ``bytes_forwarded``) let tests
check that traffic really went through it.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.support.coordinator import Coordinator

NORMAL = "normal"
CUT = "cut"
BLACKHOLE = "blackhole"
SLOW = "slow"
FAIL_HTTP = "fail_http"

_POLL = 0.05  # how often a pump re-checks the mode while idle (seconds)
_SEGMENT = 64 * 1024


@dataclass(frozen=True, slots=True)
class _Mode:
    name: str = NORMAL
    bytes_per_second: float | None = None
    delay: float = 0.0
    status: int = 503


class FaultProxy:
    """Forward ``listen_host:<free port>`` to ``target_host:target_port`` with switchable faults."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((listen_host, 0))  # the OS picks a free port: no race with other tests
        self._listener.listen(128)
        self._listener.settimeout(_POLL)
        self.host, self.port = self._listener.getsockname()[:2]
        self._mode = _Mode()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopped = threading.Event()
        self.connections = 0
        self.requests_failed = 0
        self.bytes_forwarded = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"proxy-{self.port}-accept", daemon=True)
        self._acceptor.start()

    # -- public controls ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode.name

    def cut(self, refuse: bool = True) -> None:
        """Partition: close every open connection; refuse (or blackhole) new ones."""
        self._set(_Mode(CUT if refuse else BLACKHOLE))
        self._close_connections()

    def heal(self) -> None:
        self._set(_Mode())

    def slow(self, bytes_per_second: float | None = None, delay: float = 0.0) -> None:
        """Throttle every connection to ``bytes_per_second`` per direction and/or delay each segment."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive")
        self._set(_Mode(SLOW, bytes_per_second=bytes_per_second, delay=max(0.0, delay)))

    def fail_http(self, status: int = 503) -> None:
        """Answer every HTTP request with ``status`` (open connections are closed so none bypasses it)."""
        self._set(_Mode(FAIL_HTTP, status=status))
        self._close_connections()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._close_connections()
        self._acceptor.join(5)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------------------------
    def _set(self, mode: _Mode) -> None:
        with self._lock:
            self._mode = mode

    def _close_connections(self) -> None:
        with self._lock:
            victims = list(self._sockets)
            self._sockets.clear()
        for sock in victims:
            _close(sock)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=self._run_tracked, args=(target, *args), daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _run_tracked(self, target: object, *args: object) -> None:
        try:
            target(*args)  # type: ignore[operator]
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            mode = self._mode
            if mode.name == CUT:
                _close(client)  # refused: the caller sees the connection closed at once
                continue
            self._track(client)
            if mode.name == BLACKHOLE:
                continue  # accepted and never answered; closed by heal-less stop() or cut()
            if mode.name == FAIL_HTTP:
                self._spawn(self._answer_http, client)
                continue
            self._spawn(self._connect_and_pump, client)

    def _connect_and_pump(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _close(client)
            return
        self._track(upstream)
        self._spawn(self._pump, upstream, client)
        self._pump(client, upstream)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy ``source`` -> ``sink`` until either side closes, obeying the current mode."""
        try:
            while not self._stopped.is_set():
                mode = self._mode
                if mode.name in (CUT, BLACKHOLE, FAIL_HTTP):
                    break  # open connections do not survive a fault switched on
                ready, _, _ = select.select([source], [], [], _POLL)
                if not ready:
                    continue
                limit = _SEGMENT
                if mode.name == SLOW and mode.bytes_per_second is not None:
                    # Small reads at a low rate keep the throttle smooth (about 10 segments a second).
                    limit = max(1, min(_SEGMENT, int(mode.bytes_per_second / 10)))
                data = source.recv(limit)
                if not data:
                    break
                if mode.name == SLOW:
                    wait = mode.delay + (len(data) / mode.bytes_per_second if mode.bytes_per_second else 0.0)
                    if self._stopped.wait(wait):
                        break
                sink.sendall(data)
                self.bytes_forwarded += len(data)
        except (OSError, ValueError):  # ValueError: select() on a socket another thread just closed
            pass
        finally:
            _close(source)
            _close(sink)

    def _answer_http(self, client: socket.socket) -> None:
        """Read one HTTP request (head and body) and answer it with the configured status."""
        status = self._mode.status
        try:
            client.settimeout(10)
            reader = client.makefile("rb")
            request_line = reader.readline(65536)
            if not request_line:
                return
            length = 0
            chunked = False
            while True:
                line = reader.readline(65536)
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
                elif name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if chunked:
                _drain_chunked(reader)
            else:
                while length > 0:  # consume the body so the caller sees a clean answer, not a reset
                    piece = reader.read(min(length, _SEGMENT))
                    if not piece:
                        break
                    length -= len(piece)
            body = f'{{"error": "injected", "message": "fault proxy answers HTTP {status}"}}'.encode()
            reason = http.client.responses.get(status, "Error")
            with self._lock:
                self.requests_failed += 1  # counted before the answer leaves: callers may check it at once
            client.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        except (OSError, ValueError):
            pass
        finally:
            _close(client)


def _drain_chunked(reader: object) -> None:
    while True:
        size_line = reader.readline(65536)  # type: ignore[attr-defined]
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        reader.read(size + 2)  # type: ignore[attr-defined]
        if size == 0:
            return


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()



@contextlib.contextmanager
def proxied_cluster(root: Path, n: int, *, settings: dict[str, Any] | None = None,
                    timeout: float = 120) -> Iterator[tuple[list[Coordinator], list[FaultProxy]]]:
    """``n`` running coordinators, each advertising a ``FaultProxy`` in front of its coordination API.

    Every coordinator-to-coordinator call to coordinator i goes through ``proxies[i]``; joins and the
    tests' own clients use the real ports. Coordinators are stopped (killed if need be) and proxies
    stopped when the block exits, even on failure.
    """
    from tests.support.coordinator import NAMES, Coordinator, deep_merge

    coordinators: list[Coordinator] = []
    proxies: list[FaultProxy] = []
    try:
        for index in range(n):
            coordinator = Coordinator(root, NAMES[index], settings=settings)
            proxy = FaultProxy(coordinator.api_port)
            proxies.append(proxy)
            coordinator.overrides = deep_merge(coordinator.overrides,
                                               {"coordinator": {"advertise_url": proxy.url}})
            coordinator.write_config()
            coordinators.append(coordinator)
        first = coordinators[0]
        first.start(timeout=timeout)
        _, token = first.printed_join_command()
        for other in coordinators[1:]:
            other.start(join=first, token=token, timeout=timeout)
        yield coordinators, proxies
    finally:
        for coordinator in coordinators:
            coordinator.cleanup()
        for proxy in proxies:
            proxy.stop()
