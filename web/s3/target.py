"""The request target: raw path and query (as signed), bucket, key and query parameters.

Keys are taken from the raw request URI (gunicorn's ``RAW_URI``) and percent-decoded once, as
UTF-8, so nothing is normalised: ``a//b``, ``../x`` and ``%2F`` reach the store byte for byte.
Werkzeug's routing is not used for this because it merges slashes and decodes differently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlsplit

from web.s3.errors import S3Error

MAX_KEY_BYTES = 1024

# Query parameters that select an S3 sub-resource (an operation other than the plain one).
SUBRESOURCES = frozenset({
    "accelerate", "acl", "analytics", "attributes", "cors", "delete", "encryption", "intelligent-tiering",
    "inventory", "legal-hold", "lifecycle", "location", "logging", "metadataConfiguration",
    "metadataTable", "metrics", "notification", "object-lock", "ownershipControls", "partNumber",
    "policy", "policyStatus", "publicAccessBlock", "rename", "replication", "requestPayment", "restore",
    "retention", "select", "session", "tagging", "torrent", "uploadId", "uploads", "versionId",  # "null": plain
    "versioning", "versions", "website",
})
# When several sub-resources appear, the first of these decides (uploadId+partNumber = UploadPart).
_PRECEDENCE = ("uploadId", "uploads", "delete", "location")


@dataclass(frozen=True)
class Target:
    raw_path: str
    raw_query: str
    bucket: str = ""
    key: str = ""
    params: dict[str, str] = field(default_factory=dict)

    @property
    def resource(self) -> str:
        """``/bucket/key`` for error documents."""
        if not self.bucket:
            return "/"
        return f"/{self.bucket}/{self.key}" if self.key else f"/{self.bucket}"

    @property
    def subresource(self) -> str | None:
        present = [name for name in self.params if name in SUBRESOURCES
                   and not (name == "versionId" and self.params[name] == "null")]
        for name in _PRECEDENCE:
            if name in present:
                return name
        return present[0] if present else None


def raw_target(environ: Mapping[str, Any]) -> tuple[str, str]:
    """(raw path, raw query) exactly as the client sent them."""
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw_uri:
        if "://" in raw_uri.split("?", 1)[0]:  # absolute-form request target
            parts = urlsplit(raw_uri)
            return parts.path or "/", parts.query
        path, _, query = raw_uri.partition("?")
        return path or "/", query
    # No raw URI (e.g. Flask's test client): rebuild it from the decoded WSGI path.
    path = environ.get("PATH_INFO", "/").encode("latin-1").decode("utf-8", "surrogateescape")
    return quote(path, safe="/~", errors="surrogateescape"), environ.get("QUERY_STRING", "")


def _decode(raw: str, what: str) -> str:
    """Percent-decode once and read as UTF-8. WSGI strings carry raw bytes as latin-1, so bytes a
    client sent unencoded are recovered before decoding."""
    try:
        try:
            data = unquote_to_bytes(raw.encode("latin-1"))
        except UnicodeEncodeError:
            data = unquote_to_bytes(raw)
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise S3Error("InvalidURI", f"The {what} is not valid UTF-8 once percent-decoded.") from None


def virtual_host_bucket(host: str | None, bases: Iterable[str]) -> str | None:
    """``photos`` for ``Host: photos.s3.example.org`` when ``s3.example.org`` is one of ``bases``."""
    if not host:
        return None
    hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    hostname = hostname.lower().rstrip(".")
    for base in bases:
        base = base.lower().rstrip(".")
        if base and hostname.endswith("." + base):
            return hostname[: -len(base) - 1]
    return None


def parse_target(environ: Mapping[str, Any], virtual_host_bases: Iterable[str] = ()) -> Target:
    raw_path, raw_query = raw_target(environ)
    if not raw_path.startswith("/"):
        raise S3Error("InvalidURI")
    try:
        pairs = parse_qsl(raw_query, keep_blank_values=True, encoding="utf-8", errors="strict",
                          max_num_fields=1000)
    except (UnicodeDecodeError, ValueError):
        raise S3Error("InvalidURI", "The query string could not be parsed.") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        params.setdefault(name, value)
    bucket = virtual_host_bucket(environ.get("HTTP_HOST"), virtual_host_bases)
    if bucket is not None:
        raw_key = raw_path[1:]
    else:
        raw_bucket, _, raw_key = raw_path[1:].partition("/")
        bucket = _decode(raw_bucket, "bucket name")
    key = _decode(raw_key, "object key")
    return Target(raw_path=raw_path, raw_query=raw_query, bucket=bucket, key=key, params=params)


def check_key(key: str, resource: str) -> None:
    """KeyTooLongError over 1024 UTF-8 bytes; InvalidArgument for NUL (unrepresentable in S3 XML)."""
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise S3Error("KeyTooLongError", resource=resource, MaxSizeAllowed=str(MAX_KEY_BYTES),
                      Size=str(len(key.encode("utf-8", "surrogatepass"))))
    if "\x00" in key:
        raise S3Error("InvalidArgument", "Object keys cannot contain the NUL character.", resource=resource)
