"""Errors of the storage core.

Each error carries a human message (``str(exc)``) and the S3 error code it corresponds to
(``exc.code``), so the S3 layer can map every storage error with one lookup. The storage core
itself never speaks HTTP.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error the storage core raises on purpose."""

    code = "InternalError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoSuchBucket(StorageError):
    code = "NoSuchBucket"

    def __init__(self, bucket: str) -> None:
        super().__init__(f"the bucket {bucket!r} does not exist")
        self.bucket = bucket


class BucketAlreadyExists(StorageError):
    """The bucket exists and belongs to another owner."""

    code = "BucketAlreadyExists"

    def __init__(self, bucket: str) -> None:
        super().__init__(f"the bucket {bucket!r} already exists and belongs to someone else")
        self.bucket = bucket


class BucketAlreadyOwnedByYou(StorageError):
    code = "BucketAlreadyOwnedByYou"

    def __init__(self, bucket: str) -> None:
        super().__init__(f"you already own the bucket {bucket!r}")
        self.bucket = bucket


class BucketNotEmpty(StorageError):
    code = "BucketNotEmpty"

    def __init__(self, bucket: str) -> None:
        super().__init__(f"the bucket {bucket!r} still holds objects")
        self.bucket = bucket


class NoSuchKey(StorageError):
    code = "NoSuchKey"

    def __init__(self, bucket: str, key: str) -> None:
        super().__init__(f"no object {key!r} in bucket {bucket!r}")
        self.bucket = bucket
        self.key = key


class NoSuchUpload(StorageError):
    code = "NoSuchUpload"

    def __init__(self, upload_id: str) -> None:
        super().__init__(
            f"no multipart upload {upload_id!r} in progress (completed, aborted or never created)"
        )
        self.upload_id = upload_id


class InvalidPart(StorageError):
    code = "InvalidPart"


class InvalidPartOrder(StorageError):
    code = "InvalidPartOrder"


class EntityTooSmall(StorageError):
    code = "EntityTooSmall"


class EntityTooLarge(StorageError):
    code = "EntityTooLarge"


class BadDigest(StorageError):
    code = "BadDigest"


class IncompleteBody(StorageError):
    code = "IncompleteBody"

    def __init__(self, expected: int, received: int) -> None:
        super().__init__(f"the body ended after {received} of the {expected} bytes announced")
        self.expected = expected
        self.received = received


class PreconditionFailed(StorageError):
    """``If-None-Match: *`` on a PUT whose key already holds a live object."""

    code = "PreconditionFailed"


class InvalidArgument(StorageError):
    """A parameter out of range (part number, max_keys, read range...)."""

    code = "InvalidArgument"


class InvalidObjectKey(StorageError):
    """A key the store refuses. ``reason`` is ``"empty"``, ``"too_long"``, ``"nul"`` or ``"encoding"``;
    the S3 layer answers ``KeyTooLongError`` for ``"too_long"`` and ``InvalidArgument`` otherwise."""

    code = "InvalidArgument"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        if reason == "too_long":
            self.code = "KeyTooLongError"


class InvalidBucketName(StorageError):
    code = "InvalidBucketName"


class InsufficientStorage(StorageError):
    """Disk full, or free space under ``storage.min_free_space``: nothing was stored."""

    code = "InsufficientStorage"


class CorruptChunk(StorageError):
    """A chunk whose bytes do not hash to its name (moved to quarantine; never returned)."""

    code = "InternalError"

    def __init__(self, chunk_hash: str, detail: str = "") -> None:
        super().__init__(f"chunk {chunk_hash} is corrupt" + (f": {detail}" if detail else ""))
        self.hash = chunk_hash


class ChunkMissing(StorageError):
    """A chunk that is neither stored locally nor obtainable from the chunk fetcher."""

    code = "InternalError"

    def __init__(self, chunk_hash: str, detail: str = "") -> None:
        super().__init__(f"chunk {chunk_hash} is not available" + (f": {detail}" if detail else ""))
        self.hash = chunk_hash
