"""Conditional requests and byte ranges, with S3's rules.

Preconditions (GET/HEAD, RFC 9110 §13.2.2 as S3 applies it):
1. If-Match present and false -> 412. If it is true, If-Unmodified-Since is not consulted.
2. Else If-Unmodified-Since false -> 412.
3. If-None-Match present and false (the ETag matches) -> 304. If present and true,
   If-Modified-Since is not consulted.
4. Else If-Modified-Since false (not modified) -> 304.
CopyObject's ``x-amz-copy-source-if-*`` follow the same order but every failure is 412.
Unparseable dates are ignored, as S3 ignores them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from web.s3.errors import S3Error


@dataclass(frozen=True)
class Preconditions:
    if_match: str | None = None
    if_none_match: str | None = None
    if_modified_since: str | None = None
    if_unmodified_since: str | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], prefix: str = "") -> Preconditions:
        """``prefix`` is ``""`` for GET/HEAD and ``"x-amz-copy-source-"`` for copies."""
        return cls(headers.get(prefix + "If-Match"), headers.get(prefix + "If-None-Match"),
                   headers.get(prefix + "If-Modified-Since"), headers.get(prefix + "If-Unmodified-Since"))


def etag_list(header_value: str) -> frozenset[str]:
    """The ETags (without quotes or ``W/``) of a comma-separated list; ``*`` stays ``*``."""
    etags = set()
    for candidate in header_value.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        etags.add(candidate if candidate == "*" else candidate.strip('"'))
    return frozenset(etags)


def etag_matches(header_value: str, etag: str) -> bool:
    """True when a (comma-separated, possibly weak, possibly ``*``) ETag list names ``etag``."""
    etags = etag_list(header_value)
    return "*" in etags or etag in etags


def _parse_http_date(value: str | None) -> int | None:
    """Seconds since the epoch, or None when absent or unparseable."""
    if not value:
        return None
    try:
        return int(parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def evaluate(conditions: Preconditions, etag: str, last_modified_us: int) -> int | None:
    """None when the request may proceed, else the status S3 answers (304 or 412)."""
    modified_s = last_modified_us // 1_000_000  # HTTP dates have one-second resolution
    if conditions.if_match is not None:
        if not etag_matches(conditions.if_match, etag):
            return 412
    else:
        unmodified_since = _parse_http_date(conditions.if_unmodified_since)
        if unmodified_since is not None and modified_s > unmodified_since:
            return 412
    if conditions.if_none_match is not None:
        if etag_matches(conditions.if_none_match, etag):
            return 304
    else:
        modified_since = _parse_http_date(conditions.if_modified_since)
        if modified_since is not None and modified_s <= modified_since:
            return 304
    return None


def check_copy_source(conditions: Preconditions, etag: str, last_modified_us: int) -> None:
    """x-amz-copy-source-if-*: every failed condition is 412 PreconditionFailed."""
    if evaluate(conditions, etag, last_modified_us) is not None:
        raise S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold",
                      Condition="x-amz-copy-source-If-*")


# ---------------------------------------------------------------------------------------------
# Ranges
# ---------------------------------------------------------------------------------------------


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of a single ``bytes=`` range, or None to serve the whole object.

    As S3: malformed headers and multiple ranges are ignored (200 with the whole object); a
    range that starts at or beyond the end (or a suffix of zero bytes) is 416 InvalidRange.
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()) or not (first or last):
        return None
    if not first:  # suffix range: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise _unsatisfiable(header, size)
        return max(0, size - length), size
    start = int(first)
    if last and int(last) < start:
        return None  # syntactically invalid: ignored
    if start >= size:
        raise _unsatisfiable(header, size)
    end = min(int(last) + 1, size) if last else size
    return start, end


def _unsatisfiable(header: str, size: int) -> S3Error:
    return S3Error("InvalidRange", headers={"Content-Range": f"bytes */{size}"},
                   RangeRequested=header, ActualObjectSize=str(size))


def parse_copy_source_range(header: str, size: int) -> tuple[int, int]:
    """``[start, end)`` of x-amz-copy-source-range (``bytes=first-last``, both required)."""
    unit, _, spec = header.strip().partition("=")
    first, dash, last = spec.partition("-")
    if (unit.strip().lower() != "bytes" or not dash or not first.strip().isdigit()
            or not last.strip().isdigit() or int(last) < int(first)):
        raise S3Error("InvalidArgument", "The x-amz-copy-source-range value must be of the form bytes=first-last "
                      "where first and last are the zero-based offsets of the first and last bytes to copy",
                      ArgumentName="x-amz-copy-source-range", ArgumentValue=header)
    start, last_byte = int(first), int(last)
    if last_byte >= size:
        # S3 answers InvalidArgument (400) here, not InvalidRange as for GET.
        raise S3Error("InvalidArgument", f"Range specified is not valid for source object of size: {size}",
                      ArgumentName="x-amz-copy-source-range", ArgumentValue=header)
    return start, last_byte + 1
