"""One authenticated S3 request as the operations see it: target, caller, store, body access."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from storage.errors import StorageError
from web.s3.access import Principal, check_bucket_access
from web.s3.body import body_reader
from web.s3.errors import S3Error, from_storage_error
from web.s3.target import Target, check_key

if TYPE_CHECKING:
    from storage.metadata import BucketRecord
    from storage.objects import ObjectStore
    from web.s3.service import S3Service
    from web.s3.sigv4 import AuthResult

# Largest XML request document accepted (DeleteObjects with 1000 long keys, or Complete with
# 10,000 parts, stay well below this).
MAX_XML_BODY = 8 * 1024 * 1024


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
        except StorageError as exc:
            raise from_storage_error(exc, resource=f"/{name}") from exc
        if record is None or record.deleted:
            raise S3Error("NoSuchBucket", resource=f"/{name}", BucketName=name)
        check_bucket_access(self.principal, record, f"/{name}")
        return record

    def checked_key(self) -> str:
        check_key(self.target.key, self.resource)
        return self.target.key

    def body(self) -> Any:
        """The decoded request body (aws-chunked framing removed, signatures and checksums verified)."""
        return body_reader(self.auth, self.environ["wsgi.input"], self.headers)

    def has_body(self) -> bool:
        length = self.headers.get("Content-Length")
        return bool(length and length.strip() != "0") or "chunked" in self.headers.get("Transfer-Encoding", "")

    def small_body(self, limit: int = MAX_XML_BODY) -> bytes:
        """A small request body (an XML document) read whole, refusing anything over ``limit``."""
        if not self.has_body():
            return b""
        reader = self.body()
        declared = getattr(reader, "content_length", None)
        if declared is not None and declared > limit:
            raise S3Error("MaxMessageLengthExceeded", resource=self.resource)
        parts: list[bytes] = []
        received = 0
        while True:
            block = reader.read(64 * 1024)
            if not block:
                break
            received += len(block)
            if received > limit:
                raise S3Error("MaxMessageLengthExceeded", resource=self.resource)
            parts.append(block)
        if declared is not None and received != declared:
            raise S3Error("IncompleteBody", resource=self.resource)
        return b"".join(parts)
