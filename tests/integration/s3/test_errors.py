"""Error documents, bad input that must never become a 500 or a traceback, truncated bodies and
disconnecting clients (nothing left behind), corrupt data (InternalError in XML)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.integration.s3.conftest import error_code
from tests.integration.s3.rawhttp import send, sign, signed

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def assert_error_document(response, code: str, status: int) -> None:
    assert response.status == status
    assert response.headers["content-type"] == "application/xml"
    root = response.xml()
    assert [child.tag for child in root] [:2] == ["Code", "Message"]
    assert root.findtext("Code") == code
    assert root.findtext("Message")
    assert root.findtext("Resource") is not None
    assert root.findtext("RequestId") == response.headers["x-amz-request-id"]


def test_error_document_shape(s3_server, bucket) -> None:
    response = signed(s3_server, "GET", f"/{bucket}/absent/key")
    assert_error_document(response, "NoSuchKey", 404)
    assert response.xml().findtext("Resource") == f"/{bucket}/absent/key"


def test_request_id_on_every_response(s3_server, bucket) -> None:
    for response in (signed(s3_server, "GET", "/"), signed(s3_server, "HEAD", f"/{bucket}"),
                     send(s3_server, "GET", "/"), signed(s3_server, "DELETE", f"/{bucket}/nothing")):
        assert len(response.headers["x-amz-request-id"]) == 16
        assert response.headers["x-amz-id-2"]


def test_head_errors_have_no_body(s3_server, s3, bucket) -> None:
    response = signed(s3_server, "HEAD", f"/{bucket}/absent")
    assert response.status == 404 and response.body == b""
    response = signed(s3_server, "HEAD", "/no-such-bucket-here")
    assert response.status == 404 and response.body == b""
    with pytest.raises(ClientError) as excinfo:
        s3.head_object(Bucket=bucket, Key="absent")
    assert excinfo.value.response["Error"]["Code"] == "404"


@pytest.mark.parametrize("method,path", [("PATCH", "/b/k"), ("OPTIONS", "/b"), ("PUT", "/"), ("DELETE", "/"),
                                         ("TRACE", "/b/k"), ("PROPFIND", "/")])
def test_method_not_allowed(s3_server, method, path) -> None:
    response = signed(s3_server, method, path)
    assert_error_document(response, "MethodNotAllowed", 405)


@pytest.mark.parametrize("method,query", [("GET", "tagging"), ("PUT", "retention"), ("POST", "restore"),
                                          ("POST", "select&select-type=2"), ("GET", "torrent"), ("POST", "")])
def test_unsupported_object_subresources(s3_server, s3, bucket, method, query) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    response = signed(s3_server, method, f"/{bucket}/k", query=query)
    assert_error_document(response, "NotImplemented", 501)


def test_malformed_requests_never_500(s3_server, bucket) -> None:
    cases = [
        ("GET", f"/{bucket}", "prefix=%FF%FE", {}),            # not UTF-8
        ("GET", f"/{bucket}", "max-keys=99999999999999999999999", {}),
        ("PUT", f"/{bucket}/k", "partNumber=1", {}),           # a part without an upload
        ("GET", f"/{bucket}/k", "uploadId=", {}),
        ("POST", f"/{bucket}/k", "uploadId=nope", {}),
        ("PUT", f"/{bucket}/k", "", {"x-amz-copy-source": "%"}),
        ("PUT", f"/{bucket}/k", "", {"x-amz-copy-source": f"/{bucket}/k?versionId=3"}),
        ("GET", f"/{bucket}/k", "partNumber=x", {}),
        ("PUT", f"/{bucket}/k", "", {"x-amz-checksum-crc32": "!!"}),
        ("PUT", f"/{bucket}/k", "", {"x-amz-checksum-md5": "AAAA"}),
        ("GET", f"/{bucket}", "list-type=2&continuation-token=%00", {}),
        ("GET", f"/{bucket}/k", "", {"Range": "bytes=99999999999999999999999-"}),
        ("GET", f"/{bucket}/k", "", {"If-Modified-Since": "Mon, 99 Foo 99999 99:99:99 GMT"}),
    ]
    for method, path, query, headers in cases:
        response = signed(s3_server, method, path, query=query, headers=headers, body=b"" if method != "PUT" else b"x")
        assert response.status < 500 or response.code == "NotImplemented", (method, path, query, headers,
                                                                             response.body)
        if response.status >= 400:
            response.error()  # an S3 error document


def test_garbage_signature_headers(s3_server, bucket) -> None:
    for headers in ({"Authorization": "AWS4-HMAC-SHA256"}, {"Authorization": "Bearer xyz"},
                    {"Authorization": "AWS AKIA:sig"}, {"x-amz-content-sha256": "nonsense", "Authorization": "x"},
                    {"Authorization": "AWS4-HMAC-SHA256 Credential=TMAK/20200101/us-east-1/s3/aws4_request, "
                                      "SignedHeaders=host, Signature=00"}):
        response = send(s3_server, "GET", f"/{bucket}", headers=headers)
        assert 400 <= response.status < 500, headers
        response.error()


# ---------------------------------------------------------------------------------------------
# Truncated bodies and disconnects: nothing is left behind
# ---------------------------------------------------------------------------------------------


def wait_absent(s3, bucket: str, key: str) -> None:
    """The key stays absent (give the server time to notice the broken connection)."""
    time.sleep(0.5)
    with pytest.raises(ClientError) as excinfo:
        s3.head_object(Bucket=bucket, Key=key)
    assert excinfo.value.response["Error"]["Code"] == "404"


def test_truncated_body_half_closed(s3_server, s3, bucket) -> None:
    body = os.urandom(MiB)
    response = signed(s3_server, "PUT", f"/{bucket}/short", body=body, unsigned_payload=True,
                      send_bytes=100_000, close_after_send=True)
    assert response.status == 400 and response.code == "IncompleteBody"
    wait_absent(s3, bucket, "short")


def test_truncated_body_connection_dropped(s3_server, s3, bucket) -> None:
    body = os.urandom(6 * MiB)  # more than one 4 MiB chunk reaches the server before the drop
    headers = sign(s3_server, "PUT", f"/{bucket}/dropped", body=body, unsigned_payload=True)
    headers["Content-Length"] = str(len(body))
    send(s3_server, "PUT", f"/{bucket}/dropped", headers=headers, body=body, send_bytes=5 * MiB,
         read_response=False)
    wait_absent(s3, bucket, "dropped")


def test_truncated_body_keeps_previous_version(s3_server, s3, bucket) -> None:
    s3.put_object(Bucket=bucket, Key="kept", Body=b"previous")
    body = os.urandom(MiB)
    response = signed(s3_server, "PUT", f"/{bucket}/kept", body=body, unsigned_payload=True,
                      send_bytes=10, close_after_send=True)
    assert response.code == "IncompleteBody"
    assert s3.get_object(Bucket=bucket, Key="kept")["Body"].read() == b"previous"


def test_truncated_aws_chunked_body(s3_server, s3, bucket) -> None:
    payload = os.urandom(200_000)
    framed = b"%x\r\n" % len(payload) + payload + b"\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n"
    headers = sign(s3_server, "PUT", f"/{bucket}/chunked-short", headers={
        "Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": str(len(payload)),
        "x-amz-trailer": "x-amz-checksum-crc32"}, content_sha256="STREAMING-UNSIGNED-PAYLOAD-TRAILER")
    headers["Content-Length"] = str(len(framed))
    response = send(s3_server, "PUT", f"/{bucket}/chunked-short", headers=headers, body=framed,
                    send_bytes=150_000, close_after_send=True)
    assert response.status == 400 and response.code == "IncompleteBody"
    wait_absent(s3, bucket, "chunked-short")


def test_multipart_part_truncated(s3_server, s3, bucket) -> None:
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key="mp-short")["UploadId"]
    body = os.urandom(MiB)
    response = signed(s3_server, "PUT", f"/{bucket}/mp-short", query=f"partNumber=1&uploadId={upload_id}",
                      body=body, unsigned_payload=True, send_bytes=1000, close_after_send=True)
    assert response.code == "IncompleteBody"
    assert s3.list_parts(Bucket=bucket, Key="mp-short", UploadId=upload_id).get("Parts", []) == []
    s3.abort_multipart_upload(Bucket=bucket, Key="mp-short", UploadId=upload_id)


def test_client_disconnects_mid_download(s3_server, s3, bucket) -> None:
    data = os.urandom(12 * MiB)
    s3.put_object(Bucket=bucket, Key="big", Body=data)
    for _ in range(5):
        headers = sign(s3_server, "GET", f"/{bucket}/big")
        with socket.create_connection(("127.0.0.1", s3_server.port), timeout=10) as sock:
            head = f"GET /{bucket}/big HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            sock.sendall((head + f"Host: 127.0.0.1:{s3_server.port}\r\n\r\n").encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    # the server still serves, whole and correct
    assert s3.get_object(Bucket=bucket, Key="big")["Body"].read() == data


# ---------------------------------------------------------------------------------------------
# Corrupt data: InternalError as S3 XML, never a traceback
# ---------------------------------------------------------------------------------------------


def chunk_paths(data_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in (data_dir / "chunks").rglob("*") if p.is_file() and len(p.name) == 64}


def test_corrupt_chunk_is_internal_error(s3_server, s3, bucket) -> None:
    import hashlib

    data = os.urandom(1000)
    s3.put_object(Bucket=bucket, Key="corrupt", Body=data)
    path = chunk_paths(s3_server.data_dir)[hashlib.sha256(data).hexdigest()]
    path.chmod(0o644)
    path.write_bytes(b"rotten" + data[6:])
    response = signed(s3_server, "GET", f"/{bucket}/corrupt")
    assert_error_document(response, "InternalError", 500)
    assert b"Traceback" not in response.body
    assert response.headers["x-amz-request-id"] in s3_server.log_tail(400)  # logged with its request ID


def test_corrupt_later_chunk_cuts_the_body(s3_server, s3, bucket) -> None:
    """After the headers are sent an error can only cut the connection: the client must notice."""
    import hashlib

    data = os.urandom(6 * MiB)
    s3.put_object(Bucket=bucket, Key="corrupt-tail", Body=data)
    second = data[4 * MiB:]
    path = chunk_paths(s3_server.data_dir)[hashlib.sha256(second).hexdigest()]
    path.chmod(0o644)
    path.write_bytes(b"rotten" + second[6:])
    with pytest.raises(Exception) as excinfo:  # noqa: B017 - botocore/urllib3 name it differently
        s3.get_object(Bucket=bucket, Key="corrupt-tail")["Body"].read()
    assert "ClientError" not in type(excinfo.value).__name__
    s3.put_object(Bucket=bucket, Key="after", Body=b"fine")  # the server is still well
    assert error_code is not None
