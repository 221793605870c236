"""One authenticated S3 request as the operations see it: target, caller, store, body access."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage.errors import NoSuchBucket
from web.s3.access import Principal, check_bucket_access
from web.s3.body import BodyReader, body_reader
from web.s3.errors import S3Error
from web.s3.target import Target, check_key

if TYPE_CHECKING:
    from storage.metadata import BucketRecord
    from storage.objects import ObjectStore
    from web.s3.service import S3Service
    from web.s3.sigv4 import AuthResult

# Largest XML request document accepted (DeleteObjects with 1000 long keys, or Complete with
# 10,000 parts, stay well below this).
MAX_XML_BODY = 8 * 1024 * 1024


class RequestBody:
    """The request body as operations and the store read it.

    - Reaches the end of the stream once the declared length has been delivered (the store
      stops reading at ``content_length``): the final chunk signature and trailing checksums of
      an aws-chunked body are verified there. The body reader already does this before handing
      out the last bytes; ``finish`` keeps it true for empty bodies, which the store never reads.
    - A body without a declared length (chunked transfer encoding) is bounded by ``limit``
      (EntityTooLarge) while it streams.
    - A connection that breaks mid-body is IncompleteBody, not an internal error.
    """

    def __init__(self, reader: BodyReader, limit: int | None = None) -> None:
        self._reader = reader
        self.content_length: int | None = reader.content_length
        self._limit = limit
        self._delivered = 0
        self._finished = False
        self._checksum_sink: dict[str, str] | None = None

    def store_checksums_in(self, sink: dict[str, str]) -> None:
        """Add the verified x-amz-checksum-* values to ``sink`` once the body has been read whole.

        Trailer checksums are only known at the end of the body, after the store was handed the
        object's metadata; the store copies ``meta.headers`` when it commits, after reading the
        body, so checksums added here are recorded with the object.
        """
        self._checksum_sink = sink

    @property
    def checksums(self) -> dict[str, str]:
        """x-amz-checksum-* values the reader verified (header or trailer), when it reports them."""
        return self._reader.checksum_headers()

    def read(self, size: int = -1) -> bytes:
        if self._finished:
            return b""
        try:
            block = self._reader.read(size)
            if not block:
                self._complete()
                return b""
            self._delivered += len(block)
            if self._limit is not None and self._delivered > self._limit:
                raise S3Error("EntityTooLarge", MaxSizeAllowed=str(self._limit))
            if self.content_length is not None and self._delivered >= self.content_length:
                self.finish()
            return block
        except OSError:  # gunicorn: the client closed or reset the connection
            raise S3Error("IncompleteBody", "The connection closed before the whole body arrived.") from None

    def finish(self) -> None:
        """Read to the end of the stream (verifying what comes after the payload)."""
        if self._finished:
            return
        if self.content_length is not None and self._delivered > self.content_length:
            raise S3Error("IncompleteBody", "The body is longer than its declared length.")
        extra = self._reader.read(1)
        if extra:
            raise S3Error("InvalidRequest", "The body is longer than its declared length.")
        self._complete()

    def _complete(self) -> None:
        self._finished = True
        if self._checksum_sink is not None:
            self._checksum_sink.update({name.lower(): value for name, value in self.checksums.items()})


@dataclass
class S3Call:
    method: str
    target: Target
    headers: Mapping[str, str]
    environ: dict[str, Any]
    auth: AuthResult
    principal: Principal
    service: S3Service

    @property
    def store(self) -> ObjectStore:
        return self.service.store

    @property
    def bucket_name(self) -> str:
        return self.target.bucket

    @property
    def key(self) -> str:
        return self.target.key

    @property
    def resource(self) -> str:
        return self.target.resource

    def param(self, name: str, default: str | None = None) -> str | None:
        return self.target.params.get(name, default)

    def bucket(self, name: str | None = None) -> BucketRecord:
        """The bucket record (default: the target's bucket), after checking the caller may use it."""
        name = self.target.bucket if name is None else name
        try:
            record = self.store.get_bucket(name)
        except NoSuchBucket:
            raise S3Error("NoSuchBucket", resource=f"/{name}", BucketName=name) from None
        check_bucket_access(self.principal, record, f"/{name}")
        return record

    def checked_key(self) -> str:
        check_key(self.target.key, self.resource)
        return self.target.key

    def body(self, limit: int | None = None) -> RequestBody:
        """The decoded request body (aws-chunked framing removed, signatures and checksums verified)."""
        return RequestBody(body_reader(self.auth, self.environ["wsgi.input"], self.headers), limit)

    def has_body(self) -> bool:
        length = self.headers.get("Content-Length")
        return bool(length and length.strip() != "0") or "chunked" in self.headers.get("Transfer-Encoding", "")

    def small_body(self, limit: int = MAX_XML_BODY) -> bytes:
        """A small request body (an XML document) read whole, refusing anything over ``limit``."""
        if not self.has_body():
            return b""
        reader = self.body(limit)
        declared = reader.content_length
        if declared is not None and declared > limit:
            raise S3Error("MaxMessageLengthExceeded", resource=self.resource)
        parts: list[bytes] = []
        received = 0
        try:
            while block := reader.read(64 * 1024):
                received += len(block)
                parts.append(block)
        except S3Error as exc:
            if exc.code == "EntityTooLarge":
                raise S3Error("MaxMessageLengthExceeded", resource=self.resource) from None
            raise
        if declared is not None and received != declared:
            raise S3Error("IncompleteBody", resource=self.resource)
        return b"".join(parts)
