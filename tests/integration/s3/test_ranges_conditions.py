"""Range requests (206/416, chunk boundaries) and conditional GET/HEAD (304/412, S3's precedence)."""

from __future__ import annotations

import hashlib
import os

import pytest
from botocore.exceptions import ClientError

from tests.integration.s3.conftest import error_code, status_of
from tests.integration.s3.rawhttp import signed

pytestmark = pytest.mark.integration

CHUNK = 4 * 1024 * 1024  # storage.chunk_size default
PAST = "Sat, 01 Jan 2000 00:00:00 GMT"
FUTURE = "Fri, 01 Jan 2100 00:00:00 GMT"


@pytest.fixture(scope="module")
def ranged(s3) -> tuple[str, bytes]:
    """An object of 2 chunks + 1000 bytes, so ranges can straddle chunk boundaries."""
    name = f"ranges-{os.getpid()}"
    s3.create_bucket(Bucket=name)
    data = os.urandom(2 * CHUNK + 1000)
    s3.put_object(Bucket=name, Key="big", Body=data)
    return name, data


@pytest.mark.parametrize("first,last", [
    (0, 0), (0, CHUNK - 1), (CHUNK - 1, CHUNK), (CHUNK - 10, CHUNK + 10), (CHUNK, 2 * CHUNK - 1),
    (CHUNK - 1, 2 * CHUNK), (2 * CHUNK, 2 * CHUNK + 999), (100, 2 * CHUNK + 500),
])
def test_ranges_at_chunk_boundaries(s3, ranged, first, last) -> None:
    bucket, data = ranged
    got = s3.get_object(Bucket=bucket, Key="big", Range=f"bytes={first}-{last}")
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert got["ContentRange"] == f"bytes {first}-{last}/{len(data)}"
    assert got["ContentLength"] == last - first + 1
    assert got["Body"].read() == data[first:last + 1]


def test_open_and_suffix_ranges(s3, ranged) -> None:
    bucket, data = ranged
    got = s3.get_object(Bucket=bucket, Key="big", Range=f"bytes={CHUNK + 5}-")
    assert got["ContentRange"] == f"bytes {CHUNK + 5}-{len(data) - 1}/{len(data)}"
    assert got["Body"].read() == data[CHUNK + 5:]
    got = s3.get_object(Bucket=bucket, Key="big", Range="bytes=-1500")
    assert got["Body"].read() == data[-1500:]
    got = s3.get_object(Bucket=bucket, Key="big", Range=f"bytes=-{len(data) + 10}")  # longer than object
    assert got["ContentRange"] == f"bytes 0-{len(data) - 1}/{len(data)}"
    got = s3.get_object(Bucket=bucket, Key="big", Range=f"bytes=10-{len(data) + 100}")  # end clamped
    assert got["ContentLength"] == len(data) - 10


def test_ignored_ranges_serve_whole_object(s3_server, ranged) -> None:
    bucket, data = ranged
    for header in ("bytes=0-1,5-6", "bytes=9-2", "items=0-5", "bytes=abc", "bytes=-"):
        response = signed(s3_server, "GET", f"/{bucket}/big", headers={"Range": header})
        assert response.status == 200, header
        assert "content-range" not in response.headers
        assert hashlib.md5(response.body).digest() == hashlib.md5(data).digest()


def test_unsatisfiable_range(s3, s3_server, ranged) -> None:
    bucket, data = ranged
    with pytest.raises(ClientError) as excinfo:
        s3.get_object(Bucket=bucket, Key="big", Range=f"bytes={len(data)}-")
    assert (error_code(excinfo), status_of(excinfo)) == ("InvalidRange", 416)
    response = signed(s3_server, "GET", f"/{bucket}/big", headers={"Range": "bytes=-0"})
    assert (response.status, response.code) == (416, "InvalidRange")
    assert response.headers["content-range"] == f"bytes */{len(data)}"
    s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    response = signed(s3_server, "GET", f"/{bucket}/empty", headers={"Range": "bytes=0-"})
    assert (response.status, response.headers["content-range"]) == (416, "bytes */0")


def test_head_with_range(s3, ranged) -> None:
    bucket, data = ranged
    head = s3.head_object(Bucket=bucket, Key="big", Range="bytes=0-99")
    assert head["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert head["ContentLength"] == 100


def test_conditional_get(s3, s3_server, bucket) -> None:
    etag = s3.put_object(Bucket=bucket, Key="c", Body=b"conditional")["ETag"]
    ok = [
        {"IfMatch": etag}, {"IfMatch": "*"}, {"IfNoneMatch": '"nope"'}, {"IfModifiedSince": PAST},
        {"IfUnmodifiedSince": FUTURE},
        # If-Match true: If-Unmodified-Since is not consulted (S3).
        {"IfMatch": etag, "IfUnmodifiedSince": PAST},
    ]
    for conditions in ok:
        assert s3.get_object(Bucket=bucket, Key="c", **conditions)["Body"].read() == b"conditional", conditions
    failed = [{"IfMatch": '"nope"'}, {"IfUnmodifiedSince": PAST}, {"IfMatch": '"nope"', "IfNoneMatch": etag}]
    for conditions in failed:
        with pytest.raises(ClientError) as excinfo:
            s3.get_object(Bucket=bucket, Key="c", **conditions)
        assert (error_code(excinfo), status_of(excinfo)) == ("PreconditionFailed", 412), conditions
    # If-None-Match false: 304, and If-Modified-Since true does not change that (S3).
    for conditions in ({"IfNoneMatch": etag}, {"IfModifiedSince": FUTURE},
                       {"IfNoneMatch": etag, "IfModifiedSince": PAST}):
        response = signed(s3_server, "GET", f"/{bucket}/c", headers={
            {"IfNoneMatch": "If-None-Match", "IfModifiedSince": "If-Modified-Since"}[k]: v
            for k, v in conditions.items()})
        assert response.status == 304, conditions
        assert response.body == b""
        assert response.headers["etag"] == etag
    # weak and listed ETags
    response = signed(s3_server, "GET", f"/{bucket}/c", headers={"If-None-Match": f'"x", W/{etag}'})
    assert response.status == 304
    # an unparseable date is ignored
    response = signed(s3_server, "GET", f"/{bucket}/c", headers={"If-Modified-Since": "yesterday"})
    assert response.status == 200


def test_conditional_head(s3, bucket) -> None:
    etag = s3.put_object(Bucket=bucket, Key="h", Body=b"head")["ETag"]
    with pytest.raises(ClientError) as excinfo:
        s3.head_object(Bucket=bucket, Key="h", IfNoneMatch=etag)
    assert status_of(excinfo) == 304
    with pytest.raises(ClientError) as excinfo:
        s3.head_object(Bucket=bucket, Key="h", IfMatch='"nope"')
    assert status_of(excinfo) == 412
    assert s3.head_object(Bucket=bucket, Key="h", IfMatch=etag)["ContentLength"] == 4


def test_response_header_overrides(s3, s3_server, bucket) -> None:
    s3.put_object(Bucket=bucket, Key="o", Body=b"x", ContentType="text/plain")
    got = s3.get_object(Bucket=bucket, Key="o", ResponseContentType="application/x-test",
                        ResponseContentDisposition="attachment")
    assert got["ContentType"] == "application/x-test"
    assert got["ContentDisposition"] == "attachment"
