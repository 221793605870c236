"""Hand-made S3 requests for what boto3 will not send: malformed or truncated bodies, missing
headers, odd keys, shifted clocks. Requests are signed with botocore's own SigV4 signer."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any
from unittest import mock

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from bench._server import REGION, S3Server

S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def error(self) -> tuple[str, str]:
        """(Code, Message) of an S3 error document."""
        root = ET.fromstring(self.body)
        assert root.tag == "Error", self.body
        return root.findtext("Code") or "", root.findtext("Message") or ""

    @property
    def code(self) -> str:
        return self.error()[0]

    def xml(self) -> ET.Element:
        return ET.fromstring(self.body)


def sign(server: S3Server, method: str, path: str, *, query: str = "", headers: dict[str, str] | None = None,
         body: bytes = b"", peer_id: str | None = None, secret: str | None = None, unsigned_payload: bool = False,
         when: dt.datetime | None = None, content_sha256: str | None = None,
         host: str | None = None) -> dict[str, str]:
    """SigV4 headers for a request to ``path`` (already percent-encoded as it will be sent).
    ``content_sha256`` forces the x-amz-content-sha256 value (e.g. a STREAMING-* mode)."""
    creds = server.credentials(peer_id)
    base = f"http://{host}" if host else server.endpoint
    url = base + path + (f"?{query}" if query else "")
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers or {}))
    if unsigned_payload:
        request.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    signer = S3SigV4Auth(Credentials(creds.access_key, secret or creds.secret_key), "s3", REGION)
    if content_sha256 is not None:
        signer.payload = lambda _request: content_sha256  # type: ignore[method-assign]
    if when is None:
        signer.add_auth(request)
    else:
        with mock.patch("botocore.auth.get_current_datetime", return_value=when):
            signer.add_auth(request)
    return dict(request.headers.items())


def _read_response(sock: socket.socket, method: str) -> RawResponse:
    reader = sock.makefile("rb")
    status_line = reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection without answering")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if method != "HEAD" and status not in (204, 304):
        if "content-length" in headers:
            body = reader.read(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(reader.readline().split(b";")[0], 16)
                if size == 0:
                    reader.readline()
                    break
                body += reader.read(size)
                reader.readline()
    return RawResponse(status, headers, body)


def send(server: S3Server, method: str, path: str, *, query: str = "", headers: dict[str, str] | None = None,
         body: bytes = b"", send_bytes: int | None = None, close_after_send: bool = False,
         read_response: bool = True, timeout: float = 30.0) -> RawResponse | None:
    """Send a request over a raw socket. ``send_bytes`` sends only that much of ``body``;
    ``close_after_send`` half-closes (shutdown write) so the server sees the end of the body.
    Headers are sent as given (a Content-Length is added only if absent and body is given)."""
    all_headers = {"Host": f"127.0.0.1:{server.port}", **(headers or {})}
    if body and not any(name.lower() in ("content-length", "transfer-encoding") for name in all_headers):
        all_headers["Content-Length"] = str(len(body))
    target = path + (f"?{query}" if query else "")
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in all_headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1"))
        payload = body if send_bytes is None else body[:send_bytes]
        if payload:
            sock.sendall(payload)
        if close_after_send:
            sock.shutdown(socket.SHUT_WR)
        if not read_response:
            return None
        return _read_response(sock, method)


def signed(server: S3Server, method: str, path: str, *, query: str = "", headers: dict[str, str] | None = None,
           body: bytes = b"", peer_id: str | None = None, unsigned_payload: bool = False,
           **send_options: Any) -> RawResponse:
    """Sign and send in one go (the whole ``body`` is signed, ``send_bytes`` may send less)."""
    signed_headers = sign(server, method, path, query=query, headers=headers, body=body, peer_id=peer_id,
                          unsigned_payload=unsigned_payload)
    if body and not any(name.lower() == "content-length" for name in signed_headers):
        signed_headers["Content-Length"] = str(len(body))
    response = send(server, method, path, query=query, headers=signed_headers, body=body, **send_options)
    assert response is not None
    return response


def signed_chunks_put(server: S3Server, path: str, payload: bytes, chunk_size: int = 64 * 1024,
                      tamper_chunk: int | None = None, **send_options: Any) -> RawResponse:
    """PUT with STREAMING-AWS4-HMAC-SHA256-PAYLOAD: every aws-chunked chunk signed (the chain
    starts from the request's signature). ``tamper_chunk`` flips a byte in that chunk's data."""
    pieces = [payload[i:i + chunk_size] for i in range(0, len(payload), chunk_size)] + [b""]
    # The framed length is known up front: each chunk adds "<hex>;chunk-signature=<64>\r\n...\r\n".
    framed_length = sum(len(f"{len(p):x};chunk-signature=") + 64 + 2 + len(p) + 2 for p in pieces)
    headers = sign(server, "PUT", path, headers={
        "Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": str(len(payload)),
        "Content-Length": str(framed_length)}, content_sha256="STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    authorization = headers["Authorization"]
    previous = authorization.rsplit("Signature=", 1)[1]
    scope = authorization.split("Credential=", 1)[1].split(",", 1)[0].split("/", 1)[1]
    amz_date = headers["X-Amz-Date"]
    key = ("AWS4" + server.credentials().secret_key).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    empty = hashlib.sha256(b"").hexdigest()
    framed = []
    for number, piece in enumerate(pieces):
        to_sign = (f"AWS4-HMAC-SHA256-PAYLOAD\n{amz_date}\n{scope}\n{previous}\n{empty}\n"
                   f"{hashlib.sha256(piece).hexdigest()}")
        previous = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if number == tamper_chunk:
            piece = bytes([piece[0] ^ 1]) + piece[1:]
        framed.append(f"{len(piece):x};chunk-signature={previous}\r\n".encode() + piece + b"\r\n")
    body = b"".join(framed)
    assert len(body) == framed_length
    response = send(server, "PUT", path, headers=headers, body=body, **send_options)
    assert response is not None
    return response
