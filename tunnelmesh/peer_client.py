"""Signed HTTP requests from this node to a coordinator (coordinator-to-coordinator and peer agents).

Every request carries:

- ``X-TM-Peer``: the sender's peer ID;
- ``X-TM-Date``: unix seconds (the receiver rejects dates outside its skew window);
- ``X-TM-Protocol``: ``"1"`` (:data:`PROTOCOL_VERSION`; receivers reject an unknown major version);
- ``X-TM-Content-SHA256``: hex SHA-256 of the body, or ``UNSIGNED`` for iterable (streamed)
  bodies, whose integrity the receiver checks by content hash (chunks are content-addressed);
- ``X-TM-Signature``: base64 ed25519 signature over
  ``METHOD\\nPATH?QUERY\\nDATE\\nCONTENT-SHA256`` (:func:`string_to_sign`), PATH?QUERY exactly
  as sent on the wire (percent-encoded; no ``?`` when there is no query).

The receiving side is :mod:`web.peer_auth`. One ``requests.Session`` per process (connection
reuse); TLS verification follows ``coordinator.tls``: the ``ca`` bundle when set, else the system
store. Plain ``http://`` is refused towards public addresses unless ``tls.allow_insecure_http``
(then a warning is logged once per host).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json as jsonlib
import logging
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import requests

from tunnelmesh.config import Settings
from tunnelmesh.identity import NodeIdentity

log = logging.getLogger(__name__)

PROTOCOL_VERSION = "1"
UNSIGNED = "UNSIGNED"
HEADER_PEER = "X-TM-Peer"
HEADER_DATE = "X-TM-Date"
HEADER_PROTOCOL = "X-TM-Protocol"
HEADER_CONTENT = "X-TM-Content-SHA256"
HEADER_SIGNATURE = "X-TM-Signature"

_session: requests.Session | None = None
_session_lock = threading.Lock()
_warned_hosts: set[str] = set()


class InsecureTransport(requests.RequestException):
    """Plain HTTP towards a public address without ``coordinator.tls.allow_insecure_http``."""


def string_to_sign(method: str, path_and_query: str, date: str, content_sha256: str) -> bytes:
    return f"{method.upper()}\n{path_and_query}\n{date}\n{content_sha256}".encode()


def sign_headers(identity: NodeIdentity, method: str, path_and_query: str, content_sha256: str,
                 *, now: float | None = None) -> dict[str, str]:
    """The five authentication headers for one request."""
    date = str(int(time.time() if now is None else now))
    signature = identity.sign(string_to_sign(method, path_and_query, date, content_sha256))
    return {
        HEADER_PEER: identity.peer_id,
        HEADER_DATE: date,
        HEADER_PROTOCOL: PROTOCOL_VERSION,
        HEADER_CONTENT: content_sha256,
        HEADER_SIGNATURE: base64.b64encode(signature).decode(),
    }


def session() -> requests.Session:
    """The process-wide session (created on first use)."""
    global _session
    with _session_lock:
        if _session is None:
            _session = requests.Session()
        return _session


def is_private_host(host: str) -> bool:
    """Loopback or private (RFC 1918 / ULA / link-local) address, or a name resolving only to those."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addresses = [ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, None)]
        except (OSError, ValueError):
            return False
    return bool(addresses) and all(a.is_loopback or a.is_private or a.is_link_local for a in addresses)


def check_transport(settings: Settings, url: str) -> None:
    """Raise InsecureTransport for plain HTTP to a public host unless explicitly allowed (then warn)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or is_private_host(parts.hostname or ""):
        return
    if not settings.coordinator.tls.allow_insecure_http:
        raise InsecureTransport(
            f"refusing plain HTTP to the public address {parts.hostname} (configure coordinator.tls, "
            "or set coordinator.tls.allow_insecure_http: true)")
    if parts.hostname not in _warned_hosts:
        _warned_hosts.add(parts.hostname or "")
        log.warning("plain HTTP to the public address %s (coordinator.tls.allow_insecure_http is set)",
                    parts.hostname)


def tls_verify(settings: Settings) -> str | bool:
    return settings.coordinator.tls.ca or True


class PeerClient:
    """Signs and sends requests as this node (see the module doc for the headers)."""

    def __init__(self, settings: Settings, identity: NodeIdentity) -> None:
        self.settings = settings
        self.identity = identity

    def request(self, method: str, url: str, *, json: Any = None, data: bytes | Iterable[bytes] | None = None,
                headers: dict | None = None, timeout: float | tuple[float, float],
                stream: bool = False) -> requests.Response:
        check_transport(self.settings, url)
        all_headers = dict(headers or {})
        if json is not None:
            # Serialised here so the signed hash covers exactly the bytes sent.
            data = jsonlib.dumps(json, separators=(",", ":")).encode()
            all_headers.setdefault("Content-Type", "application/json")
        if data is None:
            content_sha256 = hashlib.sha256(b"").hexdigest()
        elif isinstance(data, bytes | bytearray | memoryview):
            content_sha256 = hashlib.sha256(data).hexdigest()
        else:
            content_sha256 = UNSIGNED
        prepared = session().prepare_request(requests.Request(method.upper(), url, data=data, headers=all_headers))
        prepared.headers.update(sign_headers(self.identity, method, prepared.path_url, content_sha256))
        return session().send(prepared, timeout=timeout, stream=stream, verify=tls_verify(self.settings))
