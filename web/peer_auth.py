"""Receiving side of signed node-to-coordinator requests (the sender is :mod:`tunnelmesh.peer_client`).

- :func:`require_coordinator`: the sender must be an ACTIVE coordinator of this node's membership
  view (its key is taken from the view). A valid signature by a registered non-coordinator node
  gets 403; missing or invalid authentication 401; an unknown protocol major version 400.
- :func:`require_peer`: any node of the peer registry (used by peer-agent heartbeats).

Both set ``flask.g.peer_id``. For a JSON body the content hash is checked here (and an ``UNSIGNED``
JSON body is refused). For other bodies with a hex hash the view may call :func:`body_matches`
(the body is not read here, so streamed uploads stay streamed); ``UNSIGNED`` bodies are checked by
the view against the content hash of what they carry. Replays inside the skew window
(``coordinator.max_clock_skew``) are not detected: every signed endpoint is idempotent.
Errors are JSON ``{"error", "message"}``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from flask import current_app, g, jsonify, request

from tunnelmesh.identity import verify_signature
from tunnelmesh.peer_client import (
    HEADER_CONTENT,
    HEADER_DATE,
    HEADER_PEER,
    HEADER_PROTOCOL,
    HEADER_SIGNATURE,
    PROTOCOL_VERSION,
    UNSIGNED,
    string_to_sign,
)

_HEX64 = frozenset("0123456789abcdef")


class AuthFailure(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _raw_path() -> str:
    environ = request.environ
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return raw
    query = environ.get("QUERY_STRING", "")
    return quote(request.path) + (f"?{query}" if query else "")


def _known_key(peer_id: str) -> tuple[str | None, bool]:
    """(public key, is an active coordinator) of ``peer_id`` as this coordinator knows it."""
    ctx = current_app.extensions["tunnelmesh"]
    member = ctx.registry.load_view().get(peer_id)
    if member is not None and member.state == "active":
        return member.public_key, True
    record = ctx.registry.get(peer_id)
    return (record.public_key if record is not None else None), False


def authenticate(*, coordinators_only: bool, now: float | None = None) -> str:
    """The verified sender's peer ID; raises AuthFailure."""
    headers = request.headers
    peer_id, date, content, signature = (headers.get(h, "") for h in (
        HEADER_PEER, HEADER_DATE, HEADER_CONTENT, HEADER_SIGNATURE))
    if not (peer_id and date and content and signature):
        raise AuthFailure(401, "unauthorized", "missing request signature (X-TM-Peer, X-TM-Date, "
                                               "X-TM-Content-SHA256 and X-TM-Signature are required)")
    protocol = headers.get(HEADER_PROTOCOL, "")
    if protocol.split(".", 1)[0] != PROTOCOL_VERSION:
        raise AuthFailure(400, "unsupported_protocol",
                          f"X-TM-Protocol {protocol or '(missing)'!s} is not supported: this coordinator "
                          f"speaks protocol {PROTOCOL_VERSION}")
    settings = current_app.extensions["tunnelmesh"].settings
    try:
        sent_at = int(date)
    except ValueError:
        raise AuthFailure(401, "unauthorized", "X-TM-Date must be unix seconds") from None
    skew = settings.coordinator.max_clock_skew
    if abs((time.time() if now is None else now) - sent_at) > skew:
        raise AuthFailure(401, "request_expired", f"X-TM-Date is more than {skew:g}s away from this "
                                                  "coordinator's clock")
    if content != UNSIGNED and not (len(content) == 64 and set(content) <= _HEX64):
        raise AuthFailure(401, "unauthorized", "X-TM-Content-SHA256 must be 64 lowercase hex or UNSIGNED")
    public_key, is_coordinator = _known_key(peer_id)
    if public_key is None:
        raise AuthFailure(401, "unknown_peer", f"peer {peer_id[:32]} is not registered with this coordinator")
    try:
        raw_signature = base64.b64decode(signature, validate=True)
    except ValueError:
        raw_signature = b""
    if not verify_signature(public_key, string_to_sign(request.method, _raw_path(), date, content), raw_signature):
        raise AuthFailure(401, "bad_signature", "the request signature does not verify")
    if coordinators_only and not is_coordinator:
        raise AuthFailure(403, "forbidden", "only coordinators of this mesh may call this endpoint")
    if request.is_json:
        if content == UNSIGNED:
            raise AuthFailure(401, "unauthorized", "a JSON body must be signed (X-TM-Content-SHA256)")
        if not body_matches(request.get_data(cache=True)):  # 413 here when over max_request_body
            raise AuthFailure(401, "bad_content_hash", "the body does not match X-TM-Content-SHA256")
    g.peer_id = peer_id
    return peer_id


def body_matches(body: bytes) -> bool:
    """True when ``body`` hashes to the signed X-TM-Content-SHA256 of this request."""
    return hmac.compare_digest(hashlib.sha256(body).hexdigest(), request.headers.get(HEADER_CONTENT, ""))


def _guard(coordinators_only: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                authenticate(coordinators_only=coordinators_only)
            except AuthFailure as exc:
                response = jsonify({"error": exc.code, "message": exc.message})
                response.status_code = exc.status
                return response
            return view(*args, **kwargs)
        return wrapper
    return decorator


def require_coordinator(view: Callable[..., Any]) -> Callable[..., Any]:
    """Only an active coordinator of the membership view may call ``view`` (sets ``g.peer_id``)."""
    return _guard(True)(view)


def require_peer(view: Callable[..., Any]) -> Callable[..., Any]:
    """Any registered node may call ``view`` (sets ``g.peer_id``)."""
    return _guard(False)(view)
