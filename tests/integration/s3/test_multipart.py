"""Multipart uploads: Create, UploadPart, UploadPartCopy, Complete, Abort, ListParts,
ListMultipartUploads; the 100 MiB upload; CopyObject of a multipart object."""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.s3.conftest import error_code, status_of
from tests.integration.s3.rawhttp import S3_NS, signed

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def multipart_etag(parts: list[bytes]) -> str:
    digests = b"".join(hashlib.md5(p).digest() for p in parts)
    return f'"{hashlib.md5(digests).hexdigest()}-{len(parts)}"'


def upload(s3: Any, bucket: str, key: str, parts: list[bytes]) -> dict[str, Any]:
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key, ContentType="text/x-parts",
                                           Metadata={"kind": "multi"})["UploadId"]
    etags = [s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=data)["ETag"]
             for n, data in enumerate(parts, 1)]
    return s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]})


def read_md5(s3: Any, bucket: str, key: str, **params: Any) -> tuple[str, int]:
    body = s3.get_object(Bucket=bucket, Key=key, **params)["Body"]
    md5, size = hashlib.md5(), 0
    for block in iter(lambda: body.read(1024 * 1024), b""):
        md5.update(block)
        size += len(block)
    return md5.hexdigest(), size


def test_small_multipart(s3, bucket) -> None:
    parts = [os.urandom(5 * MiB), os.urandom(5 * MiB + 17), b"tail"]
    result = upload(s3, bucket, "mp", parts)
    assert result["ETag"] == multipart_etag(parts)
    assert result["Bucket"] == bucket and result["Key"] == "mp"
    head = s3.head_object(Bucket=bucket, Key="mp")
    assert head["ETag"] == multipart_etag(parts)
    assert head["ContentLength"] == sum(map(len, parts))
    assert head["ContentType"] == "text/x-parts" and head["Metadata"] == {"kind": "multi"}
    assert head["PartsCount"] == 3
    assert read_md5(s3, bucket, "mp") == (hashlib.md5(b"".join(parts)).hexdigest(), sum(map(len, parts)))
    second = s3.get_object(Bucket=bucket, Key="mp", PartNumber=2)
    assert second["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert second["Body"].read() == parts[1]
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_complete_errors(s3, s3_server, bucket) -> None:
    key = "errs"
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    small = [s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=b"x" * 10)["ETag"]
             for n in (1, 2)]

    def complete(parts: list[dict[str, Any]]) -> pytest.ExceptionInfo[ClientError]:
        with pytest.raises(ClientError) as excinfo:
            s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
        return excinfo

    excinfo = complete([{"PartNumber": 1, "ETag": small[0]}, {"PartNumber": 2, "ETag": small[1]}])
    assert (error_code(excinfo), status_of(excinfo)) == ("EntityTooSmall", 400)
    excinfo = complete([{"PartNumber": 2, "ETag": small[1]}, {"PartNumber": 1, "ETag": small[0]}])
    assert error_code(excinfo) == "InvalidPartOrder"
    excinfo = complete([{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}])
    assert error_code(excinfo) == "InvalidPart"
    excinfo = complete([{"PartNumber": 3, "ETag": small[0]}])
    assert error_code(excinfo) == "InvalidPart"
    for body in (b"<CompleteMultipartUpload>", b"<CompleteMultipartUpload/>",
                 b"<CompleteMultipartUpload><Part><PartNumber>x</PartNumber><ETag>e</ETag></Part>"
                 b"</CompleteMultipartUpload>", b"<Other/>"):
        response = signed(s3_server, "POST", f"/{bucket}/{key}", query=f"uploadId={upload_id}", body=body)
        assert (response.status, response.code) == (400, "MalformedXML"), body
    # One small part alone is fine (the last part has no minimum).
    result = s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                          MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": small[0]}]})
    assert result["ETag"] == multipart_etag([b"x" * 10])
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"x" * 10


def test_abort_and_no_such_upload(s3, bucket) -> None:
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key="ab")["UploadId"]
    s3.upload_part(Bucket=bucket, Key="ab", UploadId=upload_id, PartNumber=1, Body=b"data")
    response = s3.abort_multipart_upload(Bucket=bucket, Key="ab", UploadId=upload_id)
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 204
    for call in (lambda: s3.upload_part(Bucket=bucket, Key="ab", UploadId=upload_id, PartNumber=1, Body=b"x"),
                 lambda: s3.list_parts(Bucket=bucket, Key="ab", UploadId=upload_id),
                 lambda: s3.abort_multipart_upload(Bucket=bucket, Key="ab", UploadId=upload_id),
                 lambda: s3.complete_multipart_upload(Bucket=bucket, Key="ab", UploadId=upload_id,
                                                      MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": "x"}]})):
        with pytest.raises(ClientError) as excinfo:
            call()
        assert (error_code(excinfo), status_of(excinfo)) == ("NoSuchUpload", 404)
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="ab")


def test_upload_id_bound_to_its_key(s3, bucket) -> None:
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key="mine")["UploadId"]
    with pytest.raises(ClientError) as excinfo:
        s3.upload_part(Bucket=bucket, Key="other", UploadId=upload_id, PartNumber=1, Body=b"x")
    assert error_code(excinfo) == "NoSuchUpload"
    s3.abort_multipart_upload(Bucket=bucket, Key="mine", UploadId=upload_id)


def test_invalid_part_numbers(s3_server, s3, bucket) -> None:
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key="pn")["UploadId"]
    for number in ("0", "10001", "abc", "-1"):
        response = signed(s3_server, "PUT", f"/{bucket}/pn", query=f"partNumber={number}&uploadId={upload_id}",
                          body=b"x")
        assert (response.status, response.code) == (400, "InvalidArgument"), number


def test_list_parts_and_uploads(s3, bucket) -> None:
    ids = {}
    for key in ("u/a", "u/b", "v/c"):
        ids[key] = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    for n in range(1, 6):
        s3.upload_part(Bucket=bucket, Key="u/a", UploadId=ids["u/a"], PartNumber=n, Body=bytes([n]) * n)
    listed = s3.list_parts(Bucket=bucket, Key="u/a", UploadId=ids["u/a"], MaxParts=2)
    assert [p["PartNumber"] for p in listed["Parts"]] == [1, 2]
    assert listed["IsTruncated"] and listed["NextPartNumberMarker"] == 2
    rest = s3.list_parts(Bucket=bucket, Key="u/a", UploadId=ids["u/a"], PartNumberMarker=2)
    assert [(p["PartNumber"], p["Size"]) for p in rest["Parts"]] == [(3, 3), (4, 4), (5, 5)]
    assert rest["Parts"][0]["ETag"] == f'"{hashlib.md5(bytes([3]) * 3).hexdigest()}"'
    assert not rest["IsTruncated"]
    uploads = s3.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert [(u["Key"], u["UploadId"]) for u in uploads] == [(k, ids[k]) for k in ("u/a", "u/b", "v/c")]
    assert s3.list_multipart_uploads(Bucket=bucket, Prefix="u/")["Uploads"][-1]["Key"] == "u/b"
    first = s3.list_multipart_uploads(Bucket=bucket, MaxUploads=1)
    assert first["IsTruncated"] and first["NextKeyMarker"] == "u/a"
    after = s3.list_multipart_uploads(Bucket=bucket, KeyMarker=first["NextKeyMarker"],
                                      UploadIdMarker=first["NextUploadIdMarker"])
    assert [u["Key"] for u in after["Uploads"]] == ["u/b", "v/c"]
    for key, upload_id in ids.items():
        s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)


def test_upload_part_copy(s3, s3_server, bucket) -> None:
    source = os.urandom(6 * MiB)
    s3.put_object(Bucket=bucket, Key="source", Body=source)
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key="assembled")["UploadId"]
    first = s3.upload_part_copy(Bucket=bucket, Key="assembled", UploadId=upload_id, PartNumber=1,
                                CopySource={"Bucket": bucket, "Key": "source"},
                                CopySourceRange=f"bytes=0-{5 * MiB}")
    second = s3.upload_part_copy(Bucket=bucket, Key="assembled", UploadId=upload_id, PartNumber=2,
                                 CopySource={"Bucket": bucket, "Key": "source"})
    assert first["CopyPartResult"]["ETag"] == f'"{hashlib.md5(source[:5 * MiB + 1]).hexdigest()}"'
    for bad in ("bytes=0-", f"bytes=0-{6 * MiB}", "0-5", "bytes=5-1"):
        with pytest.raises(ClientError) as excinfo:
            s3.upload_part_copy(Bucket=bucket, Key="assembled", UploadId=upload_id, PartNumber=3,
                                CopySource={"Bucket": bucket, "Key": "source"}, CopySourceRange=bad)
        assert error_code(excinfo) == "InvalidArgument", bad
    s3.complete_multipart_upload(Bucket=bucket, Key="assembled", UploadId=upload_id, MultipartUpload={"Parts": [
        {"PartNumber": 1, "ETag": first["CopyPartResult"]["ETag"]},
        {"PartNumber": 2, "ETag": second["CopyPartResult"]["ETag"]}]})
    expected = source[:5 * MiB + 1] + source
    assert read_md5(s3, bucket, "assembled") == (hashlib.md5(expected).hexdigest(), len(expected))


def test_create_multipart_document(s3_server, bucket) -> None:
    response = signed(s3_server, "POST", f"/{bucket}/doc", query="uploads")
    root = response.xml()
    assert root.tag == f"{S3_NS}InitiateMultipartUploadResult"
    assert root.findtext(f"{S3_NS}Bucket") == bucket and root.findtext(f"{S3_NS}Key") == "doc"
    assert root.findtext(f"{S3_NS}UploadId")


@pytest.mark.slow
def test_100_mib_multipart_and_copy(s3, bucket) -> None:
    """100 MiB in 13 parts through the default client (aws-chunked + CRC32 trailers), read back
    streaming, copied with CopyObject (no data copied), ranges at part and chunk boundaries."""
    part_size, total = 8 * MiB, 100 * MiB
    key = "hundred"
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    whole, part_md5s, parts, offset, number = hashlib.md5(), [], [], 0, 1
    while offset < total:
        size = min(part_size, total - offset)
        data = os.urandom(size)  # generated on the fly, one part in memory at a time
        whole.update(data)
        part_md5s.append(hashlib.md5(data).digest())
        etag = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                              Body=io.BytesIO(data))["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
        if number == 2:
            second_part = data
        offset += size
        number += 1
    result = s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                          MultipartUpload={"Parts": parts})
    expected_etag = f'"{hashlib.md5(b"".join(part_md5s)).hexdigest()}-{len(parts)}"'
    assert result["ETag"] == expected_etag
    assert read_md5(s3, bucket, key) == (whole.hexdigest(), total)
    # a range across the part 1/2 boundary (8 MiB) and the chunk boundary at 8 MiB + 4 MiB
    got = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={part_size - 3}-{part_size + 2}")
    assert got["Body"].read()[3:] == second_part[:3]
    got = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={part_size + 4 * MiB - 2}-{part_size + 4 * MiB + 1}")
    assert got["Body"].read() == second_part[4 * MiB - 2:4 * MiB + 2]

    copy = s3.copy_object(Bucket=bucket, Key="hundred-copy", CopySource={"Bucket": bucket, "Key": key})
    assert copy["CopyObjectResult"]["ETag"] == expected_etag
    head = s3.head_object(Bucket=bucket, Key="hundred-copy")
    assert head["ContentLength"] == total and head["PartsCount"] == len(parts)
    assert read_md5(s3, bucket, "hundred-copy") == (whole.hexdigest(), total)


@pytest.mark.slow
def test_upload_fileobj_multipart(s3, bucket) -> None:
    """s3transfer's managed upload (parallel parts) and download."""
    from boto3.s3.transfer import TransferConfig

    data = os.urandom(24 * MiB)
    config = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4)
    s3.upload_fileobj(io.BytesIO(data), bucket, "managed", Config=config)
    assert s3.head_object(Bucket=bucket, Key="managed")["ETag"].endswith('-3"')
    out = io.BytesIO()
    s3.download_fileobj(bucket, "managed", out, Config=config)
    assert out.getvalue() == data
