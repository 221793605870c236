"""Object metadata carried in HTTP headers: what is stored from a request, what a response returns."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import TYPE_CHECKING

from web.s3.body import stored_content_encoding
from web.s3.errors import S3Error

if TYPE_CHECKING:
    from storage.metadata import ObjectRecord

DEFAULT_CONTENT_TYPE = "binary/octet-stream"  # what S3 stores when a PUT names no Content-Type
USER_META_PREFIX = "x-amz-meta-"
MAX_USER_META_BYTES = 2 * 1024  # S3's limit on the user-defined metadata of one object
# Standard headers stored with an object and returned on GET/HEAD, in S3's spelling.
STORED_HEADERS = ("Content-Disposition", "Content-Encoding", "Content-Language", "Cache-Control", "Expires")
CHECKSUM_PREFIX = "x-amz-checksum-"  # stored x-amz-checksum-<algorithm> values


@dataclass(frozen=True)
class RequestMeta:
    """Metadata of a PUT / CreateMultipartUpload / CopyObject(REPLACE) request."""

    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    user_meta: dict[str, str] = field(default_factory=dict)


def request_meta(headers: Mapping[str, str]) -> RequestMeta:
    """Stored metadata from request headers (Content-Type, the standard headers, x-amz-meta-*)."""
    stored: dict[str, str] = {}
    for name in STORED_HEADERS:
        # aws-chunked is transfer framing (decoded by the body reader), never the object's encoding.
        value = stored_content_encoding(headers) if name == "Content-Encoding" else headers.get(name)
        if value:
            stored[name] = value
    user_meta: dict[str, str] = {}
    size = 0
    for name, value in headers.items():
        lower = name.lower()
        if lower.startswith(USER_META_PREFIX) and len(lower) > len(USER_META_PREFIX):
            meta_name = lower[len(USER_META_PREFIX):]
            # Repeated headers are joined as HTTP does; S3 returns names lower-cased.
            user_meta[meta_name] = f"{user_meta[meta_name]},{value}" if meta_name in user_meta else value
            size += len(meta_name.encode("latin-1", "replace")) + len(value.encode("latin-1", "replace"))
    if size > MAX_USER_META_BYTES:
        raise S3Error("MetadataTooLarge", Size=str(size), MaxSizeAllowed=str(MAX_USER_META_BYTES))
    return RequestMeta(headers.get("Content-Type") or DEFAULT_CONTENT_TYPE, stored, user_meta)


def content_md5(headers: Mapping[str, str]) -> bytes | None:
    """The 16-byte digest of a Content-MD5 header; InvalidDigest when it is not base64 of 16 bytes."""
    value = headers.get("Content-MD5")
    if value is None:
        return None
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 16:
        raise S3Error("InvalidDigest", **{"Content-MD5": value})
    return digest


def quote_etag(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


def http_date(timestamp_us: int) -> str:
    """RFC 1123 date (``Mon, 12 Oct 2009 17:50:30 GMT``) for Last-Modified."""
    return formatdate(timestamp_us / 1_000_000, usegmt=True)


def object_headers(record: ObjectRecord, *, with_checksums: bool) -> dict[str, str]:
    """Response headers describing a stored object (everything but Content-Length / Content-Range)."""
    headers = {
        "Content-Type": record.content_type or DEFAULT_CONTENT_TYPE,
        "ETag": quote_etag(record.etag),
        "Last-Modified": http_date(record.last_modified_us),
        "Accept-Ranges": "bytes",
    }
    for name, value in (record.headers or {}).items():
        if name.lower().startswith(CHECKSUM_PREFIX):
            if with_checksums:
                headers[name] = value
        else:
            headers[name] = value
    for name, value in (record.user_meta or {}).items():
        headers[USER_META_PREFIX + name] = value
    if record.parts:
        headers["x-amz-mp-parts-count"] = str(len(record.parts))
    return headers
