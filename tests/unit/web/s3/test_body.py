"""Request body readers: plain and aws-chunked bodies as boto3 (and AWS's examples) send them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import crc32c
import pytest
from botocore.httpchecksum import AwsChunkedWrapper, BaseChecksum
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.web.s3.test_sigv4 import (
    AWS_EXAMPLE_NOW,
    AWS_EXAMPLE_SECRET,
    boto3_client,
    captured_wire,
    expect_error,
    object_url,
    sign_request,
    verify,
)
from web.s3.body import BodyReader, body_reader, checksum_b64, stored_content_encoding
from web.s3.errors import S3Error
from web.s3.sigv4 import (
    EMPTY_SHA256,
    STREAMING_SIGNED,
    STREAMING_SIGNED_TRAILER,
    STREAMING_UNSIGNED_TRAILER,
    UNSIGNED_PAYLOAD,
    AuthResult,
    verify_request,
)

# --- Helpers -------------------------------------------------------------------------------------------


def read_all(reader: BodyReader, size: int = 65536) -> bytes:
    out = bytearray()
    while chunk := reader.read(size):
        out += chunk
    return bytes(out)


def _hmac_hex(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def encode_aws_chunked(data: bytes, chunk_size: int, *, auth: AuthResult | None = None,
                       trailers: Sequence[tuple[str, str]] = (), sign_trailer: bool = False) -> bytes:
    """An aws-chunked body written from the AWS specification (signed when ``auth`` is given)."""
    out = bytearray()
    previous = auth.seed_signature if auth else ""
    pieces = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] + [b""]
    for piece in pieces:
        line = f"{len(piece):x}"
        if auth is not None:
            previous = _hmac_hex(auth.signing_key, "\n".join([
                "AWS4-HMAC-SHA256-PAYLOAD", auth.amz_date, auth.scope, previous, EMPTY_SHA256,
                hashlib.sha256(piece).hexdigest()]))
            line += f";chunk-signature={previous}"
        out += line.encode() + b"\r\n" + piece + (b"\r\n" if piece else b"")
    for name, value in trailers:
        out += f"{name}:{value}\r\n".encode()
    if sign_trailer and auth is not None:
        canonical = "".join(f"{name}:{value}\n" for name, value in trailers)
        signature = _hmac_hex(auth.signing_key, "\n".join([
            "AWS4-HMAC-SHA256-TRAILER", auth.amz_date, auth.scope, previous,
            hashlib.sha256(canonical.encode()).hexdigest()]))
        out += f"x-amz-trailer-signature:{signature}\r\n".encode()
    out += b"\r\n"
    return bytes(out)


def streaming_request(mode: str, data: bytes, *, trailer_algorithm: str | None = None,
                      decoded_length: int | None = None,
                      extra_headers: dict[str, str] | None = None) -> tuple[AuthResult, dict[str, str]]:
    """Headers signed by botocore for an aws-chunked PUT, and the verified AuthResult."""
    headers = {"Content-Encoding": "aws-chunked",
               "x-amz-decoded-content-length": str(len(data) if decoded_length is None else decoded_length)}
    if trailer_algorithm:
        headers["x-amz-trailer"] = f"x-amz-checksum-{trailer_algorithm}"
    headers.update(extra_headers or {})
    wire = sign_request("PUT", object_url("obj"), headers=headers, payload_hash=mode)
    return verify(wire), wire.headers


def reader_for(auth: AuthResult, headers: dict[str, str], body: bytes, *, content_length: bool = True,
               stream: io.BytesIO | None = None) -> BodyReader:
    headers = dict(headers)
    if content_length:
        headers["Content-Length"] = str(len(body))
    return body_reader(auth, stream or io.BytesIO(body), headers)


def crc64nvme_reference(data: bytes) -> int:
    """Bit-at-a-time CRC-64/NVME, independent of the table-driven implementation."""
    crc = 0xFFFFFFFFFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x9A6C9329AC4BC9B5 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFFFFFFFFFF


class _Crc32cForBotocore(BaseChecksum):
    """CRC32C for botocore's AwsChunkedWrapper (botocore only has it with the CRT installed)."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, chunk: bytes) -> None:
        self._value = crc32c.crc32c(chunk, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


class _Crc64NvmeForBotocore(BaseChecksum):
    def __init__(self) -> None:
        self._data = bytearray()

    def update(self, chunk: bytes) -> None:
        self._data += chunk

    def digest(self) -> bytes:
        return crc64nvme_reference(bytes(self._data)).to_bytes(8, "big")


class RecordingStream(io.BytesIO):
    """A wsgi.input that records the size of every read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.read_sizes: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        self.read_sizes.append(-1 if size is None else size)
        return super().read(size)


DATA = bytes(range(256)) * 1000 + b"tail"  # 256004 bytes


# --- AWS's documented examples --------------------------------------------------------------------------

AWS_AUTH = ("AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
            "SignedHeaders={signed},Signature={signature}")


def _aws_auth(headers: dict[str, str]) -> AuthResult:
    return verify_request("PUT", "/examplebucket/chunkObject.txt", "", headers,
                          lookup_secret=lambda k: AWS_EXAMPLE_SECRET, region="us-east-1", now=AWS_EXAMPLE_NOW,
                          peer_id_of=lambda k: "aws-example")


def test_aws_example_signed_chunks() -> None:
    headers = {
        "Host": "s3.amazonaws.com", "x-amz-date": "20130524T000000Z", "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "x-amz-content-sha256": STREAMING_SIGNED, "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": "66560", "Content-Length": "66824",
        "Authorization": AWS_AUTH.format(
            signed="content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
                   "x-amz-decoded-content-length;x-amz-storage-class",
            signature="4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9")}
    body = (b"10000;chunk-signature=ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648\r\n"
            + b"a" * 65536 + b"\r\n"
            + b"400;chunk-signature=0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497\r\n"
            + b"a" * 1024 + b"\r\n"
            + b"0;chunk-signature=b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9\r\n\r\n")
    assert len(body) == 66824
    auth = _aws_auth(headers)
    reader = body_reader(auth, io.BytesIO(body), headers)
    assert reader.content_length == 66560
    assert read_all(reader, 5000) == b"a" * 66560 and reader.finished
    # Our encoder agrees with AWS's example, byte for byte.
    assert encode_aws_chunked(b"a" * 66560, 65536, auth=auth) == body


def test_aws_example_signed_chunks_with_signed_trailer() -> None:
    headers = {
        "Host": "s3.amazonaws.com", "x-amz-date": "20130524T000000Z", "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "x-amz-content-sha256": STREAMING_SIGNED_TRAILER, "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": "66560", "x-amz-trailer": "x-amz-checksum-crc32c",
        "Authorization": AWS_AUTH.format(
            signed="content-encoding;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;"
                   "x-amz-storage-class;x-amz-trailer",
            signature="106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e")}
    body = (b"10000;chunk-signature=b474d8862b1487a5145d686f57f013e54db672cee1c953b3010fb58501ef5aa2\r\n"
            + b"a" * 65536 + b"\r\n"
            + b"400;chunk-signature=1c1344b170168f8e65b41376b44b20fe354e373826ccbbe2c1d40a8cae51e5c7\r\n"
            + b"a" * 1024 + b"\r\n"
            + b"0;chunk-signature=2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992\r\n"
            + b"x-amz-checksum-crc32c:sOO8/Q==\r\n"
            + b"x-amz-trailer-signature:d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435\r\n\r\n")
    auth = _aws_auth(headers)
    reader = reader_for(auth, headers, body)
    assert read_all(reader) == b"a" * 66560
    assert reader.checksum_headers() == {"x-amz-checksum-crc32c": "sOO8/Q=="}
    assert encode_aws_chunked(b"a" * 66560, 65536, auth=auth, trailers=[("x-amz-checksum-crc32c", "sOO8/Q==")],
                              sign_trailer=True) == body
    tampered = body.replace(b"sOO8/Q==", b"AAAAAA==")
    expect_error("SignatureDoesNotMatch", read_all, reader_for(auth, headers, tampered))


def test_aws_example_unsigned_payload_trailer() -> None:
    headers = {
        "Host": "amzn-s3-demo-bucket.s3.amazonaws.com", "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": "17408", "x-amz-content-sha256": STREAMING_UNSIGNED_TRAILER,
        "x-amz-trailer": "x-amz-checksum-crc32", "x-amz-date": "20130524T000000Z",
        "Authorization": AWS_AUTH.format(
            signed="content-encoding;host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;"
                   "x-amz-trailer", signature="8fdf2b7a7005b82789d2a9cec832705457298e8a6a908f8c85f17e44c707aa64")}
    auth = verify_request("PUT", "/Key+", "", headers, lookup_secret=lambda k: AWS_EXAMPLE_SECRET,
                          region="us-east-1", now=AWS_EXAMPLE_NOW, peer_id_of=lambda k: "aws-example")
    # The example's trailer line ends in "\n\r\n" and the body in an extra CRLF.
    body = (b"2000\r\n" + b"a" * 8192 + b"\r\n2000\r\n" + b"a" * 8192 + b"\r\n400\r\n" + b"a" * 1024
            + b"\r\n0\r\nx-amz-checksum-crc32:s3SFCQ==\n\r\n\r\n")
    reader = reader_for(auth, headers, body)
    assert read_all(reader, 1000) == b"a" * 17408
    assert reader.checksum_headers() == {"x-amz-checksum-crc32": "s3SFCQ=="}


# --- Bodies as boto3 sends them ------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", [None, "SHA256", "SHA1", "CRC32"])
@pytest.mark.parametrize("size", [0, 11, 3 * 1024 * 1024 + 17])
def test_boto3_put_object_over_https_aws_chunked_with_trailing_checksum(algorithm: str | None, size: int) -> None:
    client, captured = boto3_client("https://s3.mesh.test")
    data = (DATA * (size // len(DATA) + 1))[:size]
    extra = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    client.put_object(Bucket="bkt", Key="k", Body=data, **extra)
    wire = captured_wire(captured[0])
    auth = verify(wire, now=datetime.now(UTC))
    assert auth.payload_mode == STREAMING_UNSIGNED_TRAILER
    assert "Content-Length" not in wire.headers  # Transfer-Encoding: chunked, decoded by the server
    reader = body_reader(auth, io.BytesIO(wire.body), wire.headers)
    assert reader.content_length == size
    assert read_all(reader, 1 << 20) == data
    name = (algorithm or "CRC32").lower()
    assert reader.checksum_headers() == {f"x-amz-checksum-{name}": checksum_b64(name, data)}
    assert stored_content_encoding(wire.headers) is None


def test_boto3_upload_part_over_https() -> None:
    client, captured = boto3_client("https://s3.mesh.test")
    client.upload_part(Bucket="bkt", Key="big", UploadId="u", PartNumber=1, Body=DATA)
    wire = captured_wire(captured[0])
    reader = body_reader(verify(wire, now=datetime.now(UTC)), io.BytesIO(wire.body), wire.headers)
    assert read_all(reader, 7777) == DATA


def test_boto3_put_object_over_http_plain_body_with_sha256_and_crc32_header() -> None:
    client, captured = boto3_client()
    client.put_object(Bucket="bkt", Key="k", Body=DATA, ContentEncoding="gzip")
    wire = captured_wire(captured[0])
    auth = verify(wire, now=datetime.now(UTC))
    assert auth.payload_mode == "SHA256" and auth.payload_sha256 == hashlib.sha256(DATA).hexdigest()
    reader = body_reader(auth, io.BytesIO(wire.body), wire.headers)
    assert reader.content_length == len(DATA)
    assert read_all(reader) == DATA
    assert reader.checksum_headers() == {"x-amz-checksum-crc32": checksum_b64("crc32", DATA)}
    assert stored_content_encoding(wire.headers) == "gzip"
    # Same length, one byte changed: the claimed SHA-256 no longer matches.
    tampered = bytearray(wire.body)
    tampered[1000] ^= 1
    error = expect_error("XAmzContentSHA256Mismatch", read_all, body_reader(auth, io.BytesIO(bytes(tampered)),
                                                                              wire.headers))
    assert error.extra["ClientComputedContentSHA256"] == auth.payload_sha256


@pytest.mark.parametrize("checksum_cls, name", [(_Crc32cForBotocore, "crc32c"),
                                                (_Crc64NvmeForBotocore, "crc64nvme")])
def test_botocore_aws_chunked_wrapper_with_crc32c_and_crc64nvme(checksum_cls: type, name: str) -> None:
    data = DATA[:40000]
    auth, headers = streaming_request(STREAMING_UNSIGNED_TRAILER, data, trailer_algorithm=name)
    body = AwsChunkedWrapper(io.BytesIO(data), checksum_cls=checksum_cls, checksum_name=f"x-amz-checksum-{name}",
                             chunk_size=16384).read()
    reader = reader_for(auth, headers, body)
    assert read_all(reader) == data
    assert reader.checksum_headers() == {f"x-amz-checksum-{name}": checksum_cls().handle(data)}


# --- Signed chunks (STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]) --------------------------------------

@pytest.mark.parametrize("read_size", [1, 7, 8192, 65536, -1])
@pytest.mark.parametrize("chunk_size", [8192, 65536, 1 << 20])
def test_signed_chunks_decode_whatever_the_read_size(chunk_size: int, read_size: int) -> None:
    data = DATA if read_size != 1 else DATA[:20000]
    auth, headers = streaming_request(STREAMING_SIGNED, data)
    reader = reader_for(auth, headers, encode_aws_chunked(data, chunk_size, auth=auth))
    assert read_all(reader, read_size) == data
    assert reader.read(10) == b"" and reader.finished


@pytest.mark.parametrize("algorithm", ["crc32", "crc32c", "sha256", "sha1", "crc64nvme"])
def test_signed_chunks_with_signed_trailing_checksum(algorithm: str) -> None:
    data = DATA[:100000]
    auth, headers = streaming_request(STREAMING_SIGNED_TRAILER, data, trailer_algorithm=algorithm)
    trailer = (f"x-amz-checksum-{algorithm}", checksum_b64(algorithm, data))
    reader = reader_for(auth, headers, encode_aws_chunked(data, 65536, auth=auth, trailers=[trailer],
                                                          sign_trailer=True))
    assert reader.checksum_headers() == {}
    assert read_all(reader) == data
    assert reader.checksum_headers() == {trailer[0]: trailer[1]}


def test_empty_body_signed_and_unsigned() -> None:
    for mode in (STREAMING_SIGNED, STREAMING_UNSIGNED_TRAILER):
        auth, headers = streaming_request(mode, b"")
        body = encode_aws_chunked(b"", 100, auth=auth if mode == STREAMING_SIGNED else None)
        reader = reader_for(auth, headers, body)
        assert reader.read() == b"" and reader.finished


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(length=st.integers(0, 70000), chunk_size=st.integers(1, 30000), read_size=st.integers(1, 50000),
       signed=st.booleans(), known_length=st.booleans())
def test_any_framing_decodes_to_the_payload(length: int, chunk_size: int, read_size: int, signed: bool,
                                            known_length: bool) -> None:
    data = (DATA * 2)[:length]
    mode = STREAMING_SIGNED_TRAILER if signed else STREAMING_UNSIGNED_TRAILER
    auth, headers = streaming_request(mode, data, trailer_algorithm="crc32c")
    if not known_length:
        del headers["x-amz-decoded-content-length"]
    trailer = [("x-amz-checksum-crc32c", checksum_b64("crc32c", data))]
    body = encode_aws_chunked(data, chunk_size, auth=auth if signed else None, trailers=trailer, sign_trailer=signed)
    reader = reader_for(auth, headers, body, content_length=known_length)
    assert reader.content_length == (length if known_length else None)
    assert read_all(reader, read_size) == data


def test_memory_stays_bounded_with_a_huge_chunk() -> None:
    data = b"x" * (8 << 20)
    auth, headers = streaming_request(STREAMING_SIGNED, data)
    body = encode_aws_chunked(data, len(data), auth=auth)  # one 8 MiB chunk
    stream = RecordingStream(body)
    reader = reader_for(auth, headers, body, stream=stream)
    total = 0
    while piece := reader.read(65536):
        assert len(piece) <= 65536
        total += len(piece)
    assert total == len(data) and reader.finished
    assert max(stream.read_sizes) <= 65536


def test_the_last_bytes_are_withheld_until_everything_verifies() -> None:
    # A consumer that stops after content_length bytes must never see an unverified end.
    data = DATA[:50000]
    auth, headers = streaming_request(STREAMING_UNSIGNED_TRAILER, data, trailer_algorithm="crc32")
    body = encode_aws_chunked(data, 65536, trailers=[("x-amz-checksum-crc32", checksum_b64("crc32", b"other"))])
    reader = reader_for(auth, headers, body)
    with pytest.raises(S3Error) as info:
        reader.read(len(data))
    assert info.value.code == "BadDigest"
    assert info.value.message == "The CRC32 you specified did not match the calculated checksum."
    with pytest.raises(S3Error):  # failures are sticky
        reader.read(1)


# --- Refused aws-chunked bodies ---------------------------------------------------------------------

def _signed_body(data: bytes = DATA[:100000], **kwargs: Any) -> tuple[AuthResult, dict[str, str], bytes]:
    auth, headers = streaming_request(STREAMING_SIGNED, data, **kwargs)
    return auth, headers, encode_aws_chunked(data, 32768, auth=auth)


@pytest.mark.parametrize("cut", [10, 100, 32768 + 90, 32768 + 91, 32768 + 92, -90, -3, -1])
def test_truncated_aws_chunked_body_is_incomplete(cut: int) -> None:
    auth, headers, body = _signed_body()
    headers = {**headers, "Content-Length": str(len(body))}
    error = expect_error("IncompleteBody", read_all, body_reader(auth, io.BytesIO(body[:cut]), headers))
    assert error.status == 400


def test_truncated_unsigned_trailer_body_is_incomplete() -> None:
    data = DATA[:5000]
    auth, headers = streaming_request(STREAMING_UNSIGNED_TRAILER, data, trailer_algorithm="crc32")
    body = encode_aws_chunked(data, 1000, trailers=[("x-amz-checksum-crc32", checksum_b64("crc32", data))])
    cut_after_final_chunk = body.index(b"0\r\nx-amz") + 3
    for cut in (2500, cut_after_final_chunk, len(body) - 5):
        headers_with_length = {**headers, "Content-Length": str(len(body))}
        expect_error("IncompleteBody", read_all, body_reader(auth, io.BytesIO(body[:cut]), headers_with_length))
    # Without Content-Length, a body cut inside the data is still detected.
    expect_error("IncompleteBody", read_all, body_reader(auth, io.BytesIO(body[:2500]), headers))


def test_bad_chunk_signatures_are_refused() -> None:
    auth, headers, body = _signed_body()
    signature_at = body.index(b"chunk-signature=", 40000) + len(b"chunk-signature=")
    bad_signature = body[:signature_at] + (b"0" if body[signature_at:signature_at + 1] != b"0" else b"1") \
        + body[signature_at + 1:]
    expect_error("SignatureDoesNotMatch", read_all, reader_for(auth, headers, bad_signature))
    flipped = bytearray(body)
    flipped[50000] ^= 0x01  # inside the data of the second chunk
    expect_error("SignatureDoesNotMatch", read_all, reader_for(auth, headers, bytes(flipped)))
    unsigned = encode_aws_chunked(DATA[:100000], 32768)  # no chunk-signature at all
    expect_error("SignatureDoesNotMatch", read_all, reader_for(auth, headers, unsigned))


def test_reordered_chunks_are_refused() -> None:
    data = b"A" * 1000 + b"B" * 1000
    auth, headers = streaming_request(STREAMING_SIGNED, data)
    body = encode_aws_chunked(data, 1000, auth=auth)
    first_end = body.index(b"\r\n", body.index(b"AAAA")) + 2
    second_end = body.index(b"\r\n", body.index(b"BBBB")) + 2
    swapped = body[first_end:second_end] + body[:first_end] + body[second_end:]
    expect_error("SignatureDoesNotMatch", read_all, reader_for(auth, headers, swapped))


def test_bad_or_missing_trailer_signature_is_refused() -> None:
    data = DATA[:3000]
    auth, headers = streaming_request(STREAMING_SIGNED_TRAILER, data, trailer_algorithm="sha256")
    trailer = [("x-amz-checksum-sha256", checksum_b64("sha256", data))]
    body = encode_aws_chunked(data, 1000, auth=auth, trailers=trailer, sign_trailer=True)
    at = body.index(b"x-amz-trailer-signature:") + len(b"x-amz-trailer-signature:")
    bad = body[:at] + (b"f" if body[at:at + 1] != b"f" else b"e") + body[at + 1:]
    expect_error("SignatureDoesNotMatch", read_all, reader_for(auth, headers, bad))
    unsigned = encode_aws_chunked(data, 1000, auth=auth, trailers=trailer, sign_trailer=False)
    expect_error("SignatureDoesNotMatch", read_all, reader_for(auth, headers, unsigned))


def test_wrong_or_invalid_trailing_checksum() -> None:
    data = DATA[:3000]
    auth, headers = streaming_request(STREAMING_UNSIGNED_TRAILER, data, trailer_algorithm="sha256")
    wrong = encode_aws_chunked(data, 1000, trailers=[("x-amz-checksum-sha256", checksum_b64("sha256", b"x"))])
    error = expect_error("BadDigest", read_all, reader_for(auth, headers, wrong))
    assert error.message == "The SHA256 you specified did not match the calculated checksum."
    invalid = encode_aws_chunked(data, 1000, trailers=[("x-amz-checksum-sha256", "not base64!")])
    expect_error("InvalidRequest", read_all, reader_for(auth, headers, invalid))


@pytest.mark.parametrize("trailers", [
    [("x-amz-checksum-crc32", "AAAAAA=="), ("x-amz-checksum-sha1", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")],  # undeclared
    [],                                                                                                 # missing
    [("not a header line", "")],
])
def test_malformed_trailers(trailers: list[tuple[str, str]]) -> None:
    auth, headers = streaming_request(STREAMING_UNSIGNED_TRAILER, b"abc", trailer_algorithm="crc32")
    body = encode_aws_chunked(b"abc", 10, trailers=trailers)
    if trailers and trailers[0][0] == "not a header line":
        body = body.replace(b"not a header line:", b"not a header line")
    expect_error("MalformedTrailerError", read_all, reader_for(auth, headers, body))


def test_decoded_length_mismatch() -> None:
    data = DATA[:10000]
    auth, headers = streaming_request(STREAMING_SIGNED, data, decoded_length=10001)
    error = expect_error("IncompleteBody", read_all, reader_for(auth, headers, encode_aws_chunked(data, 4096, auth=auth)))
    assert "10001" in error.message
    auth, headers = streaming_request(STREAMING_SIGNED, data, decoded_length=9999)
    expect_error("InvalidRequest", read_all, reader_for(auth, headers, encode_aws_chunked(data, 4096, auth=auth)))


@pytest.mark.parametrize("body", [
    b"zz\r\nabc\r\n0\r\n\r\n",             # not hex
    b"\r\nabc\r\n0\r\n\r\n",               # empty size
    b"3\r\nabcX\r\n0\r\n\r\n",             # data longer than its size
    b"3\r\nabc\r\n0\r\n\r\ngarbage",       # data after the end
    b"3" + b" " * 5000 + b"\r\nabc\r\n0\r\n\r\n",  # a line too long
    b"11111111111111111\r\n",              # a size of more than 16 hex digits
])
def test_malformed_framing_is_invalid(body: bytes) -> None:
    auth, headers = streaming_request(STREAMING_UNSIGNED_TRAILER, b"abc")
    expect_error("InvalidRequest", read_all, reader_for(auth, headers, body))


def test_unsupported_trailers_and_checksums_are_refused_up_front() -> None:
    auth, headers = streaming_request(STREAMING_UNSIGNED_TRAILER, b"abc", extra_headers={"x-amz-trailer": "x-amz-meta-a"})
    expect_error("InvalidRequest", body_reader, auth, io.BytesIO(b""), headers)
    auth, headers = streaming_request(STREAMING_UNSIGNED_TRAILER, b"abc", trailer_algorithm="xxhash64")
    expect_error("NotImplemented", body_reader, auth, io.BytesIO(b""), headers)


# --- Plain bodies -------------------------------------------------------------------------------------

def _plain(data: bytes, *, headers: dict[str, str] | None = None, signed_payload: bool = True,
           body: bytes | None = None, content_length: bool = True) -> BodyReader:
    payload_hash = None if signed_payload else UNSIGNED_PAYLOAD
    wire = sign_request("PUT", object_url("k"), headers=headers, body=data, payload_hash=payload_hash)
    sent = data if body is None else body
    wire_headers = {k: v for k, v in wire.headers.items() if k.lower() != "content-length"}
    if content_length:
        wire_headers["Content-Length"] = str(len(data))
    return body_reader(verify(wire), io.BytesIO(sent), wire_headers)


def test_plain_bodies_stream_through() -> None:
    reader = _plain(DATA)
    assert reader.content_length == len(DATA)
    assert read_all(reader, 1000) == DATA and reader.finished
    assert read_all(_plain(DATA, signed_payload=False)) == DATA
    assert read_all(_plain(b"")) == b""
    reader = _plain(DATA, content_length=False)  # HTTP chunked transfer: read to the end
    assert reader.content_length is None and read_all(reader) == DATA


def test_plain_body_never_reads_past_content_length() -> None:
    reader = _plain(b"hello", body=b"hello and more")
    assert read_all(reader) == b"hello"


def test_plain_sha256_mismatch_is_raised_before_the_last_bytes() -> None:
    reader = _plain(DATA, body=DATA[:-1] + b"!")
    assert len(reader.read(len(DATA) - 10)) == len(DATA) - 10
    expect_error("XAmzContentSHA256Mismatch", reader.read, 10)
    expect_error("XAmzContentSHA256Mismatch", reader.read, 10)  # sticky
    empty_claim = _plain(b"", body=b"")
    assert empty_claim.read() == b""


def test_plain_body_shorter_than_content_length_is_incomplete() -> None:
    for signed_payload in (True, False):
        reader = _plain(DATA, body=DATA[:1000], signed_payload=signed_payload)
        expect_error("IncompleteBody", read_all, reader)


@pytest.mark.parametrize("algorithm, label", [("crc32", "CRC32"), ("crc32c", "CRC32C"), ("sha1", "SHA1"),
                                              ("sha256", "SHA256"), ("crc64nvme", "CRC64NVME")])
def test_checksum_headers_on_plain_bodies(algorithm: str, label: str) -> None:
    data = DATA[:20000]
    header = {f"x-amz-checksum-{algorithm}": checksum_b64(algorithm, data),
              "x-amz-sdk-checksum-algorithm": algorithm.upper()}
    reader = _plain(data, headers=header, signed_payload=False)
    assert read_all(reader) == data
    assert reader.checksum_headers() == {f"x-amz-checksum-{algorithm}": header[f"x-amz-checksum-{algorithm}"]}
    wrong = {f"x-amz-checksum-{algorithm}": checksum_b64(algorithm, b"something else")}
    error = expect_error("BadDigest", read_all, _plain(data, headers=wrong, signed_payload=False))
    assert error.message == f"The {label} you specified did not match the calculated checksum."


@pytest.mark.parametrize("headers, code", [
    ({"x-amz-checksum-crc32": "AAAA"}, "InvalidRequest"),                      # 3 bytes, not 4
    ({"x-amz-checksum-crc32": "!!!!!!!!"}, "InvalidRequest"),                  # not base64
    ({"x-amz-checksum-crc32": "AAAAAA==", "x-amz-checksum-sha1": "AAAAAAAAAAAAAAAAAAAAAAAAAAA="}, "InvalidRequest"),
    ({"x-amz-checksum-xxhash64": "AAAAAAAAAAA="}, "NotImplemented"),
    ({"x-amz-checksum-whatever": "AAAA"}, "InvalidRequest"),
    ({"x-amz-sdk-checksum-algorithm": "CRC32"}, "InvalidRequest"),             # no checksum given
    ({"x-amz-sdk-checksum-algorithm": "SHA1", "x-amz-checksum-crc32": "AAAAAA=="}, "InvalidRequest"),
])
def test_invalid_checksum_headers(headers: dict[str, str], code: str) -> None:
    with pytest.raises(S3Error) as info:
        read_all(_plain(b"abc", headers=headers, signed_payload=False))
    assert info.value.code == code


def test_checksum_type_and_mode_headers_are_not_checksums() -> None:
    reader = _plain(b"abc", headers={"x-amz-checksum-type": "FULL_OBJECT", "x-amz-checksum-algorithm": "CRC32"})
    assert read_all(reader) == b"abc" and reader.checksum_headers() == {}


def test_crc64nvme_known_answer() -> None:
    expected = base64.b64encode((0xAE8B14860A799888).to_bytes(8, "big")).decode()
    assert checksum_b64("crc64nvme", b"123456789") == expected
    assert checksum_b64("crc64nvme", DATA[:5003]) == base64.b64encode(
        crc64nvme_reference(DATA[:5003]).to_bytes(8, "big")).decode()


def test_stored_content_encoding() -> None:
    assert stored_content_encoding({"Content-Encoding": "aws-chunked"}) is None
    assert stored_content_encoding({"content-encoding": "gzip,aws-chunked"}) == "gzip"
    assert stored_content_encoding({"Content-Encoding": "aws-chunked, br"}) == "br"
    assert stored_content_encoding({}) is None


def test_readinto() -> None:
    reader = _plain(b"hello")
    buffer = bytearray(10)
    assert reader.readinto(buffer) == 5 and bytes(buffer[:5]) == b"hello"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from([STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER]),
       garbage=st.binary(max_size=300), position=st.integers(0, 3000), length_known=st.booleans())
def test_corrupted_bodies_only_raise_s3_errors(mode: str, garbage: bytes, position: int, length_known: bool) -> None:
    data = DATA[:2000]
    auth, headers = streaming_request(mode, data, trailer_algorithm="crc32")
    signed = mode != STREAMING_UNSIGNED_TRAILER
    body = encode_aws_chunked(data, 700, auth=auth if signed else None, sign_trailer=mode == STREAMING_SIGNED_TRAILER,
                              trailers=[("x-amz-checksum-crc32", checksum_b64("crc32", data))])
    corrupted = body[:position] + garbage + body[position + len(garbage) // 2:]
    try:
        decoded = read_all(reader_for(auth, headers, corrupted, content_length=length_known), 333)
    except S3Error:
        return
    assert decoded == data  # whatever got through verified: it must be the payload
