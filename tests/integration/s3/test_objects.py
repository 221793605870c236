"""PutObject, GetObject, HeadObject, DeleteObject, DeleteObjects, CopyObject, metadata, digests, keys."""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import quote

import pytest
from botocore.exceptions import ClientError

from tests.integration.s3.conftest import error_code, status_of
from tests.integration.s3.rawhttp import S3_NS, signed

pytestmark = pytest.mark.integration


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_put_get_head_delete(s3, bucket) -> None:
    body = b"hello, mesh" * 1000
    put = s3.put_object(Bucket=bucket, Key="dir/file.txt", Body=body)
    assert put["ETag"] == f'"{md5_hex(body)}"'
    # boto3 sent aws-chunked with a trailing CRC32 (default config): it is verified and echoed.
    assert put["ChecksumCRC32"]
    got = s3.get_object(Bucket=bucket, Key="dir/file.txt")
    assert got["Body"].read() == body
    assert got["ContentLength"] == len(body)
    assert got["ETag"] == put["ETag"]
    assert got["AcceptRanges"] == "bytes"
    head = s3.head_object(Bucket=bucket, Key="dir/file.txt")
    assert head["ContentLength"] == len(body)
    assert head["ContentType"] == "binary/octet-stream"
    last_modified = head["ResponseMetadata"]["HTTPHeaders"]["last-modified"]
    assert re.fullmatch(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT", last_modified)
    assert s3.delete_object(Bucket=bucket, Key="dir/file.txt")["ResponseMetadata"]["HTTPStatusCode"] == 204
    with pytest.raises(ClientError) as excinfo:
        s3.get_object(Bucket=bucket, Key="dir/file.txt")
    assert error_code(excinfo) == "NoSuchKey"
    # Deleting an absent key is not an error (S3).
    assert s3.delete_object(Bucket=bucket, Key="never-was")["ResponseMetadata"]["HTTPStatusCode"] == 204


def test_empty_object(s3, bucket) -> None:
    put = s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    assert put["ETag"] == f'"{md5_hex(b"")}"'
    assert s3.get_object(Bucket=bucket, Key="empty")["Body"].read() == b""


def test_overwrite_replaces(s3, bucket) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"one")
    s3.put_object(Bucket=bucket, Key="k", Body=b"two")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"two"


def test_metadata_round_trip(s3, bucket) -> None:
    s3.put_object(Bucket=bucket, Key="meta", Body=b"{}", ContentType="application/json",
                  ContentDisposition='attachment; filename="m.json"', ContentEncoding="gzip",
                  CacheControl="max-age=60", Expires="Thu, 01 Dec 2033 16:00:00 GMT", ContentLanguage="en",
                  Metadata={"Color": "blue", "owner-name": "mesh"})
    for response in (s3.head_object(Bucket=bucket, Key="meta"), s3.get_object(Bucket=bucket, Key="meta")):
        headers = response["ResponseMetadata"]["HTTPHeaders"]
        assert response["ContentType"] == "application/json"
        assert response["ContentDisposition"] == 'attachment; filename="m.json"'
        assert response["ContentEncoding"] == "gzip"  # aws-chunked (the framing) is not stored
        assert response["CacheControl"] == "max-age=60"
        assert headers["expires"] == "Thu, 01 Dec 2033 16:00:00 GMT"
        assert response["ContentLanguage"] == "en"
        assert response["Metadata"] == {"color": "blue", "owner-name": "mesh"}


def test_content_encoding_aws_chunked_only_is_dropped(s3, bucket) -> None:
    s3.put_object(Bucket=bucket, Key="plain", Body=b"abc")
    head = s3.head_object(Bucket=bucket, Key="plain")
    assert "content-encoding" not in head["ResponseMetadata"]["HTTPHeaders"]


def test_stored_checksum_returned_and_validated_by_boto3(s3, bucket) -> None:
    body = b"checksum me" * 100
    put = s3.put_object(Bucket=bucket, Key="ck", Body=body, ChecksumAlgorithm="SHA256")
    assert put["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(body).digest()).decode()
    got = s3.get_object(Bucket=bucket, Key="ck", ChecksumMode="ENABLED")
    assert got["ChecksumSHA256"] == put["ChecksumSHA256"]
    assert got["Body"].read() == body  # botocore verifies the checksum while reading
    # Ranged reads do not carry the whole-object checksum.
    ranged = s3.get_object(Bucket=bucket, Key="ck", Range="bytes=0-9", ChecksumMode="ENABLED")
    assert "ChecksumSHA256" not in ranged


def test_content_md5(s3_server, s3, bucket) -> None:
    body = b"digest me"
    good = base64.b64encode(hashlib.md5(body).digest()).decode()
    assert s3.put_object(Bucket=bucket, Key="md5", Body=body, ContentMD5=good)["ETag"] == f'"{md5_hex(body)}"'
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=bucket, Key="md5-bad", Body=body, ContentMD5=wrong)
    assert error_code(excinfo) == "BadDigest"
    assert status_of(excinfo) == 400
    response = signed(s3_server, "PUT", f"/{bucket}/md5-malformed", body=body, headers={"Content-MD5": "not-md5"})
    assert (response.status, response.code) == (400, "InvalidDigest")
    response = signed(s3_server, "PUT", f"/{bucket}/md5-short", body=body,
                      headers={"Content-MD5": base64.b64encode(b"short").decode()})
    assert (response.status, response.code) == (400, "InvalidDigest")
    for key in ("md5-bad", "md5-malformed", "md5-short"):
        with pytest.raises(ClientError):
            s3.head_object(Bucket=bucket, Key=key)


def test_wrong_checksum_is_bad_digest(s3_server, s3, bucket) -> None:
    body = b"crc me"
    response = signed(s3_server, "PUT", f"/{bucket}/crc-bad", body=body,
                      headers={"x-amz-checksum-crc32": base64.b64encode(b"\0\0\0\0").decode()})
    assert (response.status, response.code) == (400, "BadDigest")
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="crc-bad")


def test_if_none_match_star_on_put(s3, bucket) -> None:
    s3.put_object(Bucket=bucket, Key="once", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=bucket, Key="once", Body=b"second", IfNoneMatch="*")
    assert error_code(excinfo) == "PreconditionFailed"
    assert status_of(excinfo) == 412
    assert s3.get_object(Bucket=bucket, Key="once")["Body"].read() == b"first"
    s3.delete_object(Bucket=bucket, Key="once")
    s3.put_object(Bucket=bucket, Key="once", Body=b"again", IfNoneMatch="*")  # absent again: allowed


def test_if_match_on_put(s3, bucket) -> None:
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=bucket, Key="cas", Body=b"none yet", IfMatch='"0123"')
    assert (error_code(excinfo), status_of(excinfo)) == ("NoSuchKey", 404)
    etag = s3.put_object(Bucket=bucket, Key="cas", Body=b"v1")["ETag"]
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=bucket, Key="cas", Body=b"stale", IfMatch='"00000000000000000000000000000000"')
    assert (error_code(excinfo), status_of(excinfo)) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket=bucket, Key="cas")["Body"].read() == b"v1"
    second = s3.put_object(Bucket=bucket, Key="cas", Body=b"v2", IfMatch=etag)["ETag"]  # compare-and-swap
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=bucket, Key="cas", Body=b"lost update", IfMatch=etag)  # etag is stale now
    assert status_of(excinfo) == 412
    s3.put_object(Bucket=bucket, Key="cas", Body=b"v3", IfMatch="*")
    assert s3.get_object(Bucket=bucket, Key="cas")["Body"].read() == b"v3" and second != etag


def test_missing_content_length(s3_server, bucket) -> None:
    from tests.integration.s3.rawhttp import send, sign

    headers = sign(s3_server, "PUT", f"/{bucket}/no-length", unsigned_payload=True)
    response = send(s3_server, "PUT", f"/{bucket}/no-length", headers=headers)
    assert response.status == 411
    assert response.code == "MissingContentLength"


def test_chunked_transfer_without_length(s3_server, s3, bucket) -> None:
    """HTTP chunked transfer encoding is a length: the body is read to its end."""
    from tests.integration.s3.rawhttp import send, sign

    headers = sign(s3_server, "PUT", f"/{bucket}/chunked-te", unsigned_payload=True)
    headers["Transfer-Encoding"] = "chunked"
    framed = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    response = send(s3_server, "PUT", f"/{bucket}/chunked-te", headers=headers, body=framed)
    assert response.status == 200, response.body
    assert s3.get_object(Bucket=bucket, Key="chunked-te")["Body"].read() == b"hello world"


def test_entity_too_large(s3_server, s3, bucket) -> None:
    from tests.integration.s3.rawhttp import send, sign

    size = 5 * 1024**3 + 1  # one byte over s3.max_object_size (5 GiB): refused before reading
    headers = sign(s3_server, "PUT", f"/{bucket}/huge", headers={"Content-Length": str(size)},
                   unsigned_payload=True)
    response = send(s3_server, "PUT", f"/{bucket}/huge", headers=headers, body=b"x" * 1024)
    assert response.status == 400
    assert response.code == "EntityTooLarge"
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="huge")


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------

ODD_KEYS = [
    "../escape", "a/../../b", "..", ".", "./x", "a//b", "//leading", "trailing//", "a///b////c",
    "ctrl\x01\x02\x1f-chars", "tab\tnewline\ncr\r", "del\x7f", "ünïcödé/日本語/😀", "space and+plus&amp=?#",
    "percent%20literal", "x" * 1024, "日" * 341 + "x",  # 1024 bytes of UTF-8, 3,072 characters encoded
]


@pytest.mark.parametrize("key", ODD_KEYS, ids=range(len(ODD_KEYS)))
def test_odd_keys_round_trip(s3, s3_path, bucket, key) -> None:
    s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    assert s3_path.get_object(Bucket=bucket, Key=key)["Body"].read() == key.encode()
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert listed == [key]  # stored by value, nothing normalised
    listed_v1 = [o["Key"] for o in s3.list_objects(Bucket=bucket)["Contents"]]
    assert listed_v1 == [key]
    s3.delete_object(Bucket=bucket, Key=key)


def test_raw_dot_segments_are_not_normalised(s3_server, s3, bucket) -> None:
    response = signed(s3_server, "PUT", f"/{bucket}/a/../b", body=b"dots")
    assert response.status == 200
    assert s3.get_object(Bucket=bucket, Key="a/../b")["Body"].read() == b"dots"
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="b")


def test_virtual_host_style(s3_server, s3, bucket) -> None:
    """Host: <bucket>.localhost names the bucket (virtual-hosted style); the path is the key."""
    from tests.integration.s3.rawhttp import send, sign

    host = f"{bucket}.localhost:{s3_server.port}"
    headers = sign(s3_server, "PUT", "/vhost/key", body=b"virtual", host=host)
    response = send(s3_server, "PUT", "/vhost/key", headers={**headers, "Host": host}, body=b"virtual")
    assert response.status == 200, response.body
    assert s3.get_object(Bucket=bucket, Key="vhost/key")["Body"].read() == b"virtual"


def test_key_too_long(s3, s3_server, bucket) -> None:
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=bucket, Key="k" * 1025, Body=b"x")
    assert error_code(excinfo) == "KeyTooLongError"
    assert status_of(excinfo) == 400
    # 1025 bytes of UTF-8 in fewer characters
    response = signed(s3_server, "PUT", f"/{bucket}/" + quote("é" * 512 + "k"), body=b"x")
    assert (response.status, response.code) == (400, "KeyTooLongError")


def test_nul_in_key(s3_server, bucket) -> None:
    response = signed(s3_server, "PUT", f"/{bucket}/nul%00byte", body=b"x")
    assert (response.status, response.code) == (400, "InvalidArgument")
    response = signed(s3_server, "GET", f"/{bucket}/nul%00byte")
    assert (response.status, response.code) == (400, "InvalidArgument")


def test_invalid_utf8_key(s3_server, bucket) -> None:
    response = signed(s3_server, "PUT", f"/{bucket}/bad%FF%FEutf8", body=b"x")
    assert response.status == 400
    assert response.code == "InvalidURI"


def test_control_characters_in_plain_xml_listing(s3_server, s3, bucket) -> None:
    """Without encoding-type=url, characters XML cannot carry are written as character references."""
    s3.put_object(Bucket=bucket, Key="bell\x07key", Body=b"x")
    response = signed(s3_server, "GET", f"/{bucket}", query="list-type=2")
    assert b"bell&#x7;key" in response.body
    response = signed(s3_server, "GET", f"/{bucket}", query="encoding-type=url&list-type=2")
    assert response.xml().findtext(f"{S3_NS}Contents/{S3_NS}Key") == "bell%07key"


# ---------------------------------------------------------------------------------------------
# DeleteObjects
# ---------------------------------------------------------------------------------------------


def test_delete_objects(s3, bucket) -> None:
    for i in range(5):
        s3.put_object(Bucket=bucket, Key=f"d/{i}", Body=b"x")
    result = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": f"d/{i}"} for i in range(3)]
                                                      + [{"Key": "d/absent"}, {"Key": "k" * 1025}]})
    assert sorted(d["Key"] for d in result["Deleted"]) == ["d/0", "d/1", "d/2", "d/absent"]
    assert [(e["Key"], e["Code"]) for e in result["Errors"]] == [("k" * 1025, "KeyTooLongError")]
    remaining = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert remaining == ["d/3", "d/4"]
    quiet = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "d/3"}, {"Key": "d/4"}], "Quiet": True})
    assert "Deleted" not in quiet and "Errors" not in quiet
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_delete_objects_malformed(s3_server, bucket) -> None:
    def post(body: bytes):
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        return signed(s3_server, "POST", f"/{bucket}", query="delete", body=body, headers={"Content-MD5": md5})

    for body in (b"<Delete><Object><Key>a</Key></Object>", b"<Delete></Delete>", b"<NotDelete/>",
                 b"<Delete><Object><NoKey/></Object></Delete>",
                 b"<Delete>" + b"<Object><Key>k</Key></Object>" * 1001 + b"</Delete>"):
        response = post(body)
        assert (response.status, response.code) == (400, "MalformedXML"), body[:40]
    body = b"<Delete><Object><Key>a</Key></Object></Delete>"
    response = signed(s3_server, "POST", f"/{bucket}", query="delete", body=body,
                      headers={"Content-MD5": base64.b64encode(hashlib.md5(b"x").digest()).decode()})
    assert (response.status, response.code) == (400, "BadDigest")


# ---------------------------------------------------------------------------------------------
# CopyObject
# ---------------------------------------------------------------------------------------------


def test_copy_object_copy_directive(s3, bucket) -> None:
    s3.put_object(Bucket=bucket, Key="src", Body=b"payload", ContentType="text/plain", Metadata={"a": "1"})
    result = s3.copy_object(Bucket=bucket, Key="dst", CopySource={"Bucket": bucket, "Key": "src"})
    assert result["CopyObjectResult"]["ETag"] == f'"{md5_hex(b"payload")}"'
    got = s3.get_object(Bucket=bucket, Key="dst")
    assert got["Body"].read() == b"payload"
    assert got["ContentType"] == "text/plain" and got["Metadata"] == {"a": "1"}


def test_copy_object_replace_and_cross_bucket(s3, bucket) -> None:
    other = bucket + "-other"
    s3.create_bucket(Bucket=other)
    s3.put_object(Bucket=bucket, Key="src", Body=b"payload", Metadata={"a": "1"})
    s3.copy_object(Bucket=other, Key="dst", CopySource={"Bucket": bucket, "Key": "src"},
                   MetadataDirective="REPLACE", ContentType="text/csv", Metadata={"b": "2"})
    got = s3.get_object(Bucket=other, Key="dst")
    assert got["Body"].read() == b"payload"
    assert got["ContentType"] == "text/csv" and got["Metadata"] == {"b": "2"}


def test_copy_onto_itself(s3, s3_server, bucket) -> None:
    s3.put_object(Bucket=bucket, Key="self", Body=b"same", Metadata={"v": "1"})
    with pytest.raises(ClientError) as excinfo:
        s3.copy_object(Bucket=bucket, Key="self", CopySource={"Bucket": bucket, "Key": "self"})
    assert error_code(excinfo) == "InvalidRequest"
    s3.copy_object(Bucket=bucket, Key="self", CopySource={"Bucket": bucket, "Key": "self"},
                   MetadataDirective="REPLACE", Metadata={"v": "2"}, ContentType="text/plain")
    head = s3.head_object(Bucket=bucket, Key="self")
    assert head["Metadata"] == {"v": "2"} and head["ContentType"] == "text/plain"
    response = signed(s3_server, "PUT", f"/{bucket}/self2",
                      headers={"x-amz-copy-source": f"/{bucket}/self", "x-amz-metadata-directive": "MERGE"})
    assert (response.status, response.code) == (400, "InvalidArgument")


def test_copy_source_url_decoded(s3, s3_server, bucket) -> None:
    key = "sp ace/ü+plus?&"
    s3.put_object(Bucket=bucket, Key=key, Body=b"encoded")
    response = signed(s3_server, "PUT", f"/{bucket}/copied",
                      headers={"x-amz-copy-source": quote(f"{bucket}/{key}")})
    assert response.status == 200, response.body
    assert response.xml().tag == f"{S3_NS}CopyObjectResult"
    assert s3.get_object(Bucket=bucket, Key="copied")["Body"].read() == b"encoded"


def test_copy_source_conditions(s3, bucket) -> None:
    etag = s3.put_object(Bucket=bucket, Key="cond", Body=b"c")["ETag"]
    source = {"Bucket": bucket, "Key": "cond"}
    s3.copy_object(Bucket=bucket, Key="c1", CopySource=source, CopySourceIfMatch=etag)
    s3.copy_object(Bucket=bucket, Key="c2", CopySource=source, CopySourceIfNoneMatch='"other"')
    s3.copy_object(Bucket=bucket, Key="c3", CopySource=source, CopySourceIfUnmodifiedSince="Fri, 01 Jan 2100 00:00:00 GMT")
    s3.copy_object(Bucket=bucket, Key="c4", CopySource=source, CopySourceIfModifiedSince="Sat, 01 Jan 2000 00:00:00 GMT")
    for condition in ({"CopySourceIfMatch": '"other"'}, {"CopySourceIfNoneMatch": etag},
                      {"CopySourceIfUnmodifiedSince": "Sat, 01 Jan 2000 00:00:00 GMT"},
                      {"CopySourceIfModifiedSince": "Fri, 01 Jan 2100 00:00:00 GMT"}):
        with pytest.raises(ClientError) as excinfo:
            s3.copy_object(Bucket=bucket, Key="never", CopySource=source, **condition)
        assert (error_code(excinfo), status_of(excinfo)) == ("PreconditionFailed", 412)
    # S3: If-Match true wins over a false If-Unmodified-Since.
    s3.copy_object(Bucket=bucket, Key="c5", CopySource=source, CopySourceIfMatch=etag,
                   CopySourceIfUnmodifiedSince="Sat, 01 Jan 2000 00:00:00 GMT")


def test_copy_missing_source(s3, bucket) -> None:
    with pytest.raises(ClientError) as excinfo:
        s3.copy_object(Bucket=bucket, Key="dst", CopySource={"Bucket": bucket, "Key": "absent"})
    assert error_code(excinfo) == "NoSuchKey"
    with pytest.raises(ClientError) as excinfo:
        s3.copy_object(Bucket=bucket, Key="dst", CopySource={"Bucket": "absent-bucket", "Key": "absent"})
    assert error_code(excinfo) == "NoSuchBucket"


def test_copy_source_malformed(s3_server, bucket) -> None:
    response = signed(s3_server, "PUT", f"/{bucket}/dst", headers={"x-amz-copy-source": "just-a-bucket"})
    assert (response.status, response.code) == (400, "InvalidArgument")
