"""Request body readers: the decoded, verified payload of a PUT/POST, streamed.

:func:`body_reader` picks the reader for a verified request (:class:`~web.s3.sigv4.AuthResult`):

- plain bodies (``UNSIGNED-PAYLOAD`` or a hex SHA-256): passed through, never read past
  Content-Length; the SHA-256 claimed in ``x-amz-content-sha256`` is checked;
- ``aws-chunked`` bodies (the ``STREAMING-*`` modes; boto3 >= 1.36 sends them over HTTPS with a
  trailing checksum): the framing is decoded, every chunk signature and the trailer signature are
  verified, the trailing checksums named by ``x-amz-trailer`` are checked and the decoded length
  must equal ``x-amz-decoded-content-length``.

In both cases any ``x-amz-checksum-<algorithm>`` header is verified too, and the verified values
are available from :meth:`BodyReader.checksum_headers` so they can be stored and returned on
GET/HEAD.

Memory stays bounded whatever the chunk size: chunk data goes from the input to the caller in
pieces of at most the size asked for, hashed on the way. Verification is done before the last
bytes are handed out whenever the length is known (Content-Length, x-amz-decoded-content-length):
the read that would return the final bytes raises instead if anything does not verify, so a
consumer that stops after ``content_length`` bytes cannot store an unverified body. When the length
is not known the caller must read until ``b""``. Any :class:`S3Error` raised by ``read`` is raised
again by every later call.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import sys
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO, Protocol

import crc32c as _crc32c

from storage.hashing import BackgroundHash
from web.s3.errors import S3Error
from web.s3.sigv4 import (
    EMPTY_SHA256,
    PAYLOAD_SHA256,
    STREAMING_MODES,
    STREAMING_SIGNED,
    STREAMING_SIGNED_TRAILER,
    AuthResult,
    sign,
)

CHECKSUM_HEADER_PREFIX = "x-amz-checksum-"
MAX_LINE_LENGTH = 4096        # a chunk-size line or a trailer line
MAX_TRAILERS = 16
_LINE_READ_SIZE = 4096        # look-ahead used to find line ends in the framing
_MAX_LEFTOVER = 4096          # whitespace tolerated after the end of an aws-chunked body
_ALL = 1 << 62                # read(-1)


# --- Checksums (x-amz-checksum-*) ---------------------------------------------------------------------

class Checksum(Protocol):
    def update(self, data: bytes) -> None: ...
    def digest(self) -> bytes: ...


class _Crc32:
    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


class _Crc32c:
    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = _crc32c.crc32c(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


def _crc64_tables() -> list[list[int]]:
    """Slicing-by-8 tables for CRC-64/NVME (reflected polynomial 0x9A6C9329AC4BC9B5)."""
    first = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x9A6C9329AC4BC9B5 if crc & 1 else crc >> 1
        first.append(crc)
    tables = [first]
    for _ in range(7):
        previous = tables[-1]
        tables.append([(previous[i] >> 8) ^ first[previous[i] & 0xFF] for i in range(256)])
    return tables


_CRC64_TABLES: list[list[int]] = []
_MASK64 = (1 << 64) - 1
_LITTLE_ENDIAN = sys.byteorder == "little"  # memoryview.cast("Q") reads native-endian words


class _Crc64Nvme:
    """CRC-64/NVME in pure Python (no C implementation is installed): about 15 MB/s."""

    def __init__(self) -> None:
        if not _CRC64_TABLES:
            _CRC64_TABLES.extend(_crc64_tables())
        self._value = 0

    def update(self, data: bytes) -> None:
        t0, t1, t2, t3, t4, t5, t6, t7 = _CRC64_TABLES
        crc = self._value ^ _MASK64
        whole = len(data) - len(data) % 8
        words = memoryview(data)[:whole].cast("Q") if whole else ()
        for word in words:
            x = crc ^ (word if _LITTLE_ENDIAN else int.from_bytes(word.to_bytes(8, "big"), "little"))
            crc = (t7[x & 0xFF] ^ t6[(x >> 8) & 0xFF] ^ t5[(x >> 16) & 0xFF] ^ t4[(x >> 24) & 0xFF]
                   ^ t3[(x >> 32) & 0xFF] ^ t2[(x >> 40) & 0xFF] ^ t1[(x >> 48) & 0xFF] ^ t0[x >> 56])
        for byte in data[whole:]:
            crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        self._value = crc ^ _MASK64

    def digest(self) -> bytes:
        return self._value.to_bytes(8, "big")


class _Hashlib:
    def __init__(self, name: str) -> None:
        self._hash = hashlib.new(name)

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def digest(self) -> bytes:
        return self._hash.digest()


# algorithm (as in the header name) -> (name used in S3's messages, digest size, factory)
CHECKSUM_ALGORITHMS: dict[str, tuple[str, int, Any]] = {
    "crc32": ("CRC32", 4, _Crc32),
    "crc32c": ("CRC32C", 4, _Crc32c),
    "crc64nvme": ("CRC64NVME", 8, _Crc64Nvme),
    "sha1": ("SHA1", 20, lambda: _Hashlib("sha1")),
    "sha256": ("SHA256", 32, lambda: _Hashlib("sha256")),
    "sha512": ("SHA512", 64, lambda: _Hashlib("sha512")),
}
_UNSUPPORTED_CHECKSUMS = frozenset({"xxhash64", "xxhash3", "xxhash128", "md5"})
# x-amz-checksum-* headers that are not checksums of this body.
_NOT_CHECKSUMS = frozenset({"algorithm", "type", "mode"})


def new_checksum(algorithm: str) -> Checksum:
    """A fresh incremental checksum (``update``/``digest``) for an x-amz-checksum-* algorithm."""
    return CHECKSUM_ALGORITHMS[algorithm][2]()


def checksum_b64(algorithm: str, data: bytes) -> str:
    """The x-amz-checksum-<algorithm> value of ``data`` (base64 of the big-endian digest)."""
    checksum = new_checksum(algorithm)
    checksum.update(data)
    return base64.b64encode(checksum.digest()).decode("ascii")


def _checksum_algorithm(header: str) -> str | None:
    """The algorithm of an x-amz-checksum-* name; None for the headers that are not checksums."""
    algorithm = header[len(CHECKSUM_HEADER_PREFIX):]
    if algorithm in _NOT_CHECKSUMS:
        return None
    if algorithm in _UNSUPPORTED_CHECKSUMS:
        raise S3Error("NotImplemented", f"The {algorithm.upper()} checksum algorithm is not supported; use "
                      "CRC32, CRC32C, CRC64NVME, SHA1 or SHA256.")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise S3Error("InvalidRequest", f"{header} is not a supported checksum header.")
    return algorithm


def _decode_checksum_value(algorithm: str, header: str, value: str) -> bytes:
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != CHECKSUM_ALGORITHMS[algorithm][1]:
        raise S3Error("InvalidRequest", f"Value for {header} header is invalid.")
    return digest


class _ChecksumSet:
    """The checksums a request claims (in headers and/or trailers), computed over the payload."""

    def __init__(self) -> None:
        self._running: dict[str, BackgroundHash] = {}  # large updates overlap with the other digests
        self._expected: dict[str, bytes] = {}   # algorithm -> claimed digest (from headers)
        self.verified: dict[str, str] = {}      # header name -> base64 value, once verified

    def compute(self, algorithm: str) -> None:
        if algorithm not in self._running:
            self._running[algorithm] = BackgroundHash(new_checksum(algorithm))

    def expect(self, algorithm: str, digest: bytes) -> None:
        self.compute(algorithm)
        self._expected[algorithm] = digest

    @property
    def algorithms(self) -> set[str]:
        return set(self._running)

    def update(self, data: bytes) -> None:
        for checksum in self._running.values():
            checksum.update(data)

    def verify(self, algorithm: str, digest: bytes) -> None:
        actual = self._running[algorithm].digest()
        if not hmac.compare_digest(actual, digest):
            label = CHECKSUM_ALGORITHMS[algorithm][0]
            raise S3Error("BadDigest", f"The {label} you specified did not match the calculated checksum.")
        self.verified[CHECKSUM_HEADER_PREFIX + algorithm] = base64.b64encode(actual).decode("ascii")

    def verify_expected(self) -> None:
        for algorithm, digest in self._expected.items():
            self.verify(algorithm, digest)


def _header_checksums(header_values: dict[str, list[str]], sdk_algorithm: str | None,
                      trailer_algorithms: list[str]) -> _ChecksumSet:
    checksums = _ChecksumSet()
    for name, values in header_values.items():
        if not name.startswith(CHECKSUM_HEADER_PREFIX):
            continue
        algorithm = _checksum_algorithm(name)
        if algorithm is not None:
            checksums.expect(algorithm, _decode_checksum_value(algorithm, name, values[0]))
    for algorithm in trailer_algorithms:
        checksums.compute(algorithm)
    if len(checksums.algorithms) > 1:
        raise S3Error("InvalidRequest", "Expecting a single x-amz-checksum- header. Multiple checksum Types "
                      "are not allowed.")
    if sdk_algorithm:
        if not checksums.algorithms:
            raise S3Error("InvalidRequest", "x-amz-sdk-checksum-algorithm specified, but no corresponding "
                          "x-amz-checksum-* or x-amz-trailer headers were found.")
        if sdk_algorithm.strip().lower() not in checksums.algorithms:
            raise S3Error("InvalidRequest", "Value for x-amz-sdk-checksum-algorithm header is invalid.")
    return checksums


# --- Readers -------------------------------------------------------------------------------------------

class BodyReader:
    """The decoded payload of a request; ``read(n)`` returns up to n bytes, ``b""`` at the end."""

    content_length: int | None  # the decoded length when known (Content-Length / decoded length)

    def __init__(self, content_length: int | None, checksums: _ChecksumSet) -> None:
        self.content_length = content_length
        self.bytes_read = 0           # decoded bytes handed out so far
        self._checksums = checksums
        self._finished = False        # everything read and verified
        self._failure: S3Error | None = None

    @property
    def finished(self) -> bool:
        return self._finished

    def read(self, n: int = -1) -> bytes:
        if self._failure is not None:
            raise self._failure
        if self._finished or n == 0:
            return b""
        try:
            data = self._read(_ALL if n is None or n < 0 else n)
        except S3Error as error:
            self._failure = error
            raise
        self.bytes_read += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def checksum_headers(self) -> dict[str, str]:
        """Verified ``x-amz-checksum-*`` values (header name -> base64); empty until the end."""
        return dict(self._checksums.verified) if self._finished else {}

    def _read(self, n: int) -> bytes:
        raise NotImplementedError


class _WireInput:
    """The raw request body: never read past ``limit`` (Content-Length, when known).

    A small look-ahead buffer serves the line parsing of the aws-chunked framing; bulk data is
    read straight from the stream in the size the caller asked for.
    """

    def __init__(self, stream: BinaryIO, limit: int | None) -> None:
        self._stream = stream
        self._left = limit
        self._buffer = bytearray()
        self.truncated = False  # the input ended before Content-Length bytes

    @property
    def limited(self) -> bool:
        return self._left is not None

    def _pull(self, size: int) -> bytes:
        if self._left is not None:
            size = min(size, self._left)
            if size <= 0:
                return b""
        data = self._stream.read(size) or b""
        if self._left is not None:
            self._left -= len(data)
            if not data:
                self.truncated = True
        return data

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes (fewer only at the end of the input or of the look-ahead)."""
        if self._buffer:
            data = bytes(self._buffer[:size])
            del self._buffer[:size]
            return data
        return self._pull(size)

    def read_exact(self, size: int) -> bytes:
        data = self.read(size)
        while len(data) < size:
            more = self.read(size - len(data))
            if not more:
                break
            data += more
        return data

    def read_line(self) -> bytes | None:
        """The next line without its LF (and CR); None at the end of the input."""
        searched = 0
        while True:
            end = self._buffer.find(b"\n", searched)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                if len(line) > MAX_LINE_LENGTH:
                    break
                return line[:-1] if line.endswith(b"\r") else line
            if len(self._buffer) > MAX_LINE_LENGTH:
                break
            searched = len(self._buffer)
            data = self._pull(_LINE_READ_SIZE)
            if not data:
                if self._buffer or self.truncated:
                    raise S3Error("IncompleteBody", "You did not provide the number of bytes specified by the "
                                  "Content-Length HTTP header: the aws-chunked body ended early.")
                return None
            self._buffer += data
        raise S3Error("InvalidRequest", f"Malformed aws-chunked body: a line is longer than {MAX_LINE_LENGTH} "
                      "bytes.")


class _PlainBodyReader(BodyReader):
    """A body sent as is: counted against Content-Length, hashed when a SHA-256 was claimed."""

    def __init__(self, wire: _WireInput, content_length: int | None, claimed_sha256: str | None,
                 checksums: _ChecksumSet) -> None:
        super().__init__(content_length, checksums)
        self._wire = wire
        self._claimed_sha256 = claimed_sha256
        self._sha256 = BackgroundHash(hashlib.sha256()) if claimed_sha256 is not None else None
        self._left = content_length

    def _read(self, n: int) -> bytes:
        if self._left is not None:
            n = min(n, self._left)
        pieces = []
        wanted = n
        while wanted > 0:
            piece = self._wire.read(min(wanted, 1 << 24))
            if not piece:
                break
            pieces.append(piece)
            wanted -= len(piece)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if self._sha256 is not None:
            self._sha256.update(data)
        self._checksums.update(data)
        if self._left is not None:
            self._left -= len(data)
            if self._left > 0 and wanted > 0:
                raise S3Error("IncompleteBody", "You did not provide the number of bytes specified by the "
                              f"Content-Length HTTP header ({self.content_length}); the body ended after "
                              f"{self.content_length - self._left} bytes.")
            if self._left == 0:
                self._finish()  # before handing out the last bytes
        elif not data:
            self._finish()
        return data

    def _finish(self) -> None:
        if self._sha256 is not None and not hmac.compare_digest(self._sha256.hexdigest(),
                                                                 self._claimed_sha256 or ""):
            raise S3Error("XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' header does not "
                          "match what was computed.", ClientComputedContentSHA256=self._claimed_sha256 or "",
                          S3ComputedContentSHA256=self._sha256.hexdigest())
        self._checksums.verify_expected()
        self._finished = True


class _AwsChunkedBodyReader(BodyReader):
    """Decodes ``hex-size[;chunk-signature=sig]\\r\\n data \\r\\n ... 0[;...]\\r\\n [trailers] \\r\\n``."""

    def __init__(self, auth: AuthResult, wire: _WireInput, decoded_length: int | None,
                 trailer_names: list[str], checksums: _ChecksumSet) -> None:
        super().__init__(decoded_length, checksums)
        self._wire = wire
        self._signed = auth.payload_mode in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER)
        self._trailer_signed = auth.payload_mode == STREAMING_SIGNED_TRAILER
        self._signing_key = auth.signing_key
        self._chunk_sts_prefix = f"AWS4-HMAC-SHA256-PAYLOAD\n{auth.amz_date}\n{auth.scope}\n"
        self._trailer_sts_prefix = f"AWS4-HMAC-SHA256-TRAILER\n{auth.amz_date}\n{auth.scope}\n"
        self._previous_signature = auth.seed_signature
        self._trailer_names = trailer_names
        self._decoded_total = 0
        self._chunk_left = 0
        self._chunk_signature: bytes | None = None
        self._chunk_sha256: Any = None
        self.chunks = 0

    def _read(self, n: int) -> bytes:
        pieces = []
        wanted = n
        while wanted > 0 and not self._finished:
            if self._chunk_left == 0:
                self._begin_chunk()
                continue
            piece = self._wire.read(min(wanted, self._chunk_left))
            if not piece:
                raise S3Error("IncompleteBody", "The aws-chunked body ended in the middle of a chunk "
                              f"({self._decoded_total} payload bytes received).")
            if self._chunk_sha256 is not None:
                self._chunk_sha256.update(piece)
            self._checksums.update(piece)
            self._chunk_left -= len(piece)
            self._decoded_total += len(piece)
            pieces.append(piece)
            wanted -= len(piece)
            if self._chunk_left == 0:
                self._end_chunk()
                if self._decoded_total == self.content_length:
                    # The payload is complete: read the final chunk and the trailers now, so
                    # everything is verified before the last bytes are handed out.
                    self._begin_chunk()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _begin_chunk(self) -> None:
        line = self._wire.read_line()
        if line is None:
            raise S3Error("IncompleteBody", "The aws-chunked body ended before its final (zero-length) chunk "
                          f"({self._decoded_total} payload bytes received).")
        size_text, _, extensions = line.partition(b";")
        size_text = size_text.strip()
        if not size_text or len(size_text) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise S3Error("InvalidRequest", f"Malformed aws-chunked body: invalid chunk size line {line[:80]!r}.")
        size = int(size_text, 16)
        signature = None
        for extension in extensions.split(b";"):
            name, _, value = extension.partition(b"=")
            if name.strip() == b"chunk-signature":
                signature = value.strip()
        if self._signed and signature is None:
            raise S3Error("SignatureDoesNotMatch", "A chunk of the aws-chunked body has no chunk-signature.")
        if self.content_length is not None and self._decoded_total + size > self.content_length:
            raise S3Error("InvalidRequest", "The aws-chunked body carries more than x-amz-decoded-content-length "
                          f"({self.content_length}) bytes.")
        self.chunks += 1
        self._chunk_signature = signature
        self._chunk_left = size
        self._chunk_sha256 = hashlib.sha256() if self._signed else None
        if size == 0:
            self._verify_chunk_signature()
            self._read_trailers()
            self._finish()

    def _end_chunk(self) -> None:
        terminator = self._wire.read_exact(2)
        if terminator != b"\r\n":
            if len(terminator) < 2:
                raise S3Error("IncompleteBody", "The aws-chunked body ended after the data of a chunk.")
            raise S3Error("InvalidRequest", "Malformed aws-chunked body: chunk data is not followed by CRLF "
                          "(the chunk size does not match its data).")
        self._verify_chunk_signature()

    def _verify_chunk_signature(self) -> None:
        if not self._signed:
            return
        chunk_hash = self._chunk_sha256.hexdigest() if self._chunk_sha256 is not None else EMPTY_SHA256
        expected = sign(self._signing_key, f"{self._chunk_sts_prefix}{self._previous_signature}\n"
                                           f"{EMPTY_SHA256}\n{chunk_hash}")
        if not hmac.compare_digest(expected.encode("ascii"), self._chunk_signature or b""):
            raise S3Error("SignatureDoesNotMatch", f"The signature of chunk {self.chunks} of the aws-chunked "
                          "body does not match.")
        self._previous_signature = expected

    def _read_trailers(self) -> None:
        trailers: list[tuple[str, str]] = []
        trailer_signature: str | None = None
        while True:
            line = self._wire.read_line()
            if line is None or not line.strip():
                break  # the empty line that ends the body (some clients end the input instead)
            name_bytes, sep, value_bytes = line.partition(b":")
            try:
                name, value = name_bytes.strip().lower().decode("ascii"), value_bytes.strip().decode("ascii")
            except UnicodeDecodeError:
                sep = b""
            if not sep or not name:
                raise S3Error("MalformedTrailerError", "The request contained trailing data that was not "
                              f"well-formed: {line[:80]!r}.")
            if name == "x-amz-trailer-signature":
                trailer_signature = value
                continue
            if name not in self._trailer_names or any(name == seen for seen, _ in trailers):
                raise S3Error("MalformedTrailerError", f"The trailing header {name} was not declared in "
                              "x-amz-trailer (or was sent twice).")
            trailers.append((name, value))
            if len(trailers) > MAX_TRAILERS:
                raise S3Error("MalformedTrailerError", "Too many trailing headers.")
        missing = [name for name in self._trailer_names if all(name != seen for seen, _ in trailers)]
        if missing:
            raise S3Error("MalformedTrailerError", f"x-amz-trailer declares {', '.join(missing)} but the body "
                          "does not carry it.")
        if self._trailer_signed:
            if trailer_signature is None:
                raise S3Error("SignatureDoesNotMatch", "The aws-chunked body has no x-amz-trailer-signature.")
            canonical = "".join(f"{name}:{value}\n" for name, value in trailers)
            expected = sign(self._signing_key, f"{self._trailer_sts_prefix}{self._previous_signature}\n"
                                               f"{hashlib.sha256(canonical.encode('ascii')).hexdigest()}")
            if not hmac.compare_digest(expected, trailer_signature):
                raise S3Error("SignatureDoesNotMatch", "The trailer signature of the aws-chunked body does not "
                              "match.")
        for name, value in trailers:
            algorithm = name[len(CHECKSUM_HEADER_PREFIX):]
            self._checksums.verify(algorithm, _decode_checksum_value(algorithm, name, value))
        if self._wire.limited:
            # Only line ends may follow (AWS's own example ends in "\n\r\n\r\n").
            leftover = self._wire.read_exact(_MAX_LEFTOVER + 1)
            if leftover.strip(b"\r\n"):
                raise S3Error("InvalidRequest", "Malformed aws-chunked body: data after the final chunk.")

    def _finish(self) -> None:
        if self.content_length is not None and self._decoded_total != self.content_length:
            raise S3Error("IncompleteBody", f"The aws-chunked body decoded to {self._decoded_total} bytes but "
                          f"x-amz-decoded-content-length is {self.content_length}.")
        self._checksums.verify_expected()
        self._finished = True


# --- Entry points --------------------------------------------------------------------------------------

def body_reader(auth: AuthResult, stream: BinaryIO, headers: Mapping[str, str] | Any) -> BodyReader:
    """The reader of the decoded, verified payload of a request authenticated as ``auth``.

    ``stream`` is the raw WSGI input (``environ["wsgi.input"]``); it is never read past
    Content-Length. Without Content-Length (HTTP chunked transfer) it is read to its end, which the
    server marks (gunicorn and werkzeug set ``wsgi.input_terminated``).
    """
    header_values: dict[str, list[str]] = {}
    for name, value in headers.items():
        header_values.setdefault(str(name).lower(), []).append(str(value))
    wire_length = _length_header(header_values, "content-length")
    wire = _WireInput(stream, wire_length)
    sdk_algorithm = _first(header_values, "x-amz-sdk-checksum-algorithm")

    if auth.payload_mode not in STREAMING_MODES:
        checksums = _header_checksums(header_values, sdk_algorithm, [])
        claimed = auth.payload_sha256 if auth.payload_mode == PAYLOAD_SHA256 else None
        return _PlainBodyReader(wire, wire_length, claimed, checksums)

    trailer_names = [name.strip().lower() for name in ",".join(header_values.get("x-amz-trailer", [])).split(",")
                     if name.strip()]
    trailer_algorithms = []
    for name in trailer_names:
        algorithm = _checksum_algorithm(name) if name.startswith(CHECKSUM_HEADER_PREFIX) else None
        if algorithm is None:
            raise S3Error("InvalidRequest", f"x-amz-trailer: {name} is not a supported trailing header; only "
                          "x-amz-checksum-* checksums are.")
        trailer_algorithms.append(algorithm)
    checksums = _header_checksums(header_values, sdk_algorithm, trailer_algorithms)
    decoded_length = _length_header(header_values, "x-amz-decoded-content-length")
    return _AwsChunkedBodyReader(auth, wire, decoded_length, trailer_names, checksums)


def stored_content_encoding(headers: Mapping[str, str] | Any) -> str | None:
    """The Content-Encoding to store with the object: the header without ``aws-chunked``."""
    values = [str(value) for name, value in headers.items() if str(name).lower() == "content-encoding"]
    codings = [c.strip() for c in ",".join(values).split(",") if c.strip() and c.strip().lower() != "aws-chunked"]
    return ", ".join(codings) or None


def _first(header_values: dict[str, list[str]], name: str) -> str | None:
    values = header_values.get(name)
    return values[0] if values else None


def _length_header(header_values: dict[str, list[str]], name: str) -> int | None:
    text = _first(header_values, name)
    if text is None or not text.strip():
        return None
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise S3Error("InvalidArgument", f"The {name} header is not a valid length.", ArgumentName=name,
                      ArgumentValue=text[:64])
    return int(text)
