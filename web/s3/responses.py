"""Response construction shared by every operation: XML documents, empty answers, errors."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Iterator, Mapping
from xml.etree.ElementTree import Element

from flask import Response, g, request

from web.s3 import xml
from web.s3.errors import S3Error

log = logging.getLogger("tunnelmesh.s3")


class S3Response(Response):
    # No implicit "text/html" on 204s, HEADs and streamed objects: every response says what it is.
    default_mimetype = None


def new_request_id() -> str:
    """16 upper-case hex characters, like S3's x-amz-request-id."""
    return secrets.token_hex(8).upper()


def request_id() -> str:
    rid = g.get("request_id")
    if rid is None:
        rid = g.request_id = new_request_id()
    return rid


def xml_response(root: Element, status: int = 200, headers: Mapping[str, str] | None = None) -> S3Response:
    return S3Response(xml.to_bytes(root), status=status, headers=dict(headers or {}),
                      content_type=xml.XML_CONTENT_TYPE)


def empty_response(status: int = 200, headers: Mapping[str, str] | None = None) -> S3Response:
    response = S3Response(b"", status=status, headers=dict(headers or {}))
    if status in (204, 304):
        response.headers.pop("Content-Length", None)
    return response


def stream_response(body: Iterable[bytes], status: int, headers: Mapping[str, str],
                    content_length: int) -> S3Response:
    """A streamed object body with a known length (never buffered)."""
    response = S3Response(body, status=status, headers=dict(headers), direct_passthrough=True)
    response.headers["Content-Length"] = str(content_length)
    return response


def error_response(error: S3Error) -> S3Response:
    headers = dict(error.headers)
    if request.method == "HEAD":  # HEAD errors have no body (the status says it all)
        return empty_response(error.status, headers)
    body = xml.error_document(error.code, error.message, error.resource or request.path,
                              request_id(), error.extra)
    return S3Response(body, status=error.status, headers=headers, content_type=xml.XML_CONTENT_TYPE)


def body_stream(first: bytes, rest: Iterator[bytes], rid: str, resource: str) -> Iterator[bytes]:
    """The object body: the first block (read before the headers were sent, so that an error in it
    still produces a proper S3 error) followed by the rest. An error after the headers are out
    cannot be reported in the body any more: it is logged with the request ID and the connection
    is dropped, so the client sees a short body instead of a silently corrupt one."""
    try:
        if first:
            yield first
        yield from rest
    except GeneratorExit:
        raise  # the client went away; closing ``rest`` below releases the reader
    except Exception as exc:
        # gunicorn logs the traceback when it drops the connection; this line ties it to the request.
        log.error("request %s: reading %s failed after the response started, connection dropped: %s",
                  rid, resource, exc)
        raise
    finally:
        close = getattr(rest, "close", None)
        if close is not None:
            close()
