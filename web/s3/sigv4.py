"""AWS Signature Version 4 verification, as Amazon S3 does it.

Two ways to authenticate are accepted:

- the ``Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...`` header,
  with ``x-amz-content-sha256`` required and the request time within ``max_skew`` of ours;
- a presigned URL (``X-Amz-Algorithm``, ``X-Amz-Credential``, ``X-Amz-Date``, ``X-Amz-Expires``,
  ``X-Amz-SignedHeaders``, ``X-Amz-Signature`` in the query string), valid until date + expires.

Optionally (``allow_sigv2_presigned=True``) a legacy SigV2 presigned URL (``AWSAccessKeyId``,
``Expires``, ``Signature``) is accepted too, because ``aws s3 presign`` and boto3's
``generate_presigned_url`` produce those for a custom endpoint unless the client configures
``signature_version = s3v4``. Every other mechanism (SigV2 headers, SigV4a, anonymous) is refused.

Canonicalisation follows S3, which differs from the other AWS services: the URI path is *not*
normalised (``//`` and ``..`` stay as they are) and is encoded once. A server sees the path as the
client sent it, and clients encode differently (botocore encodes everything but ``/~`` and the
unreserved characters; others leave ``=``, ``+``, ``$``... as they are), so the path is tried in
its RFC 3986 form (percent-decoded, then encoded exactly as SigV4 specifies: what S3 computes)
and, only if that does not match, exactly as sent. The same two forms are tried for the query
string. Both forms denote the same decoded resource, so accepting either one binds the signature
to the same request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from tunnelmesh.identity import peer_id_from_access_key
from web.s3.errors import S3Error

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "s3"
TERMINATOR = "aws4_request"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# x-amz-content-sha256 values and the payload modes of AuthResult.
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
PAYLOAD_SHA256 = "SHA256"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_MODES = frozenset({STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER})
_TOKEN_PAYLOAD_MODES = STREAMING_MODES | {UNSIGNED_PAYLOAD}

_AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_AMZ_DATE_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
_CREDENTIAL_FORMAT = '"<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request"'
_HEADER_MALFORMED = "The authorization header is malformed; "
_QUERY_MALFORMED = "Error parsing the X-Amz-Credential parameter; "
_PRESIGN_PARAMS = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature", "X-Amz-Date",
                   "X-Amz-SignedHeaders", "X-Amz-Expires")
_UNSUPPORTED_MECHANISM = ("The authorization mechanism you have provided is not supported. "
                          "Please use AWS4-HMAC-SHA256.")


@dataclass(frozen=True)
class AuthResult:
    """Who signed a verified request, and what the body reader needs to check its payload."""

    access_key: str
    peer_id: str                 # from identity.peer_id_from_access_key
    payload_mode: str            # UNSIGNED-PAYLOAD, SHA256 or one of the STREAMING-* modes
    payload_sha256: str | None   # the hex digest claimed (lowercase), when payload_mode == "SHA256"
    signing_key: bytes           # for chunk and trailer signatures
    seed_signature: str          # the request's signature: the first "previous signature"
    amz_date: str                # YYYYMMDDTHHMMSSZ, as signed
    scope: str                   # date/region/s3/aws4_request
    presigned: bool


def derive_signing_key(secret_key: str, date: str, region: str, service: str = SERVICE) -> bytes:
    """The SigV4 signing key: HMAC chain over the date, region, service and terminator."""
    return _derive_signing_key(secret_key, date, region, service)


@lru_cache(maxsize=512)  # one entry per (secret, day, region): saves four HMACs per request
def _derive_signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret_key).encode("utf-8")
    for part in (date, region, service, TERMINATOR):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def sign(signing_key: bytes, string_to_sign: str) -> str:
    """Hex HMAC-SHA256 of ``string_to_sign``: a SigV4 signature."""
    return hmac.new(signing_key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def payload_mode_of(content_sha256: str) -> tuple[str, str | None] | None:
    """(payload_mode, claimed hex digest) for an ``x-amz-content-sha256`` value; None if invalid."""
    if content_sha256 in _TOKEN_PAYLOAD_MODES:
        return content_sha256, None
    if _HEX64_RE.fullmatch(content_sha256):
        return PAYLOAD_SHA256, content_sha256.lower()
    return None


def verify_request(method: str, raw_path: str, raw_query: str, headers: Mapping[str, str] | Any, *,
                   lookup_secret: Callable[[str], str | None], region: str, now: datetime,
                   max_skew: float = 900, max_presign_expiry: float = 604800,
                   peer_id_of: Callable[[str], str | None] = peer_id_from_access_key,
                   allow_sigv2_presigned: bool = False) -> AuthResult:
    """Verify the signature of one request; raise :class:`S3Error` as S3 would, or return who signed.

    ``raw_path`` and ``raw_query`` must be the request target exactly as sent, before any
    percent-decoding (gunicorn and werkzeug give it as ``environ["RAW_URI"]``; split it at the
    first ``?``). ``headers`` is any mapping whose ``items()`` yields every (name, value) pair,
    e.g. werkzeug ``Headers``/``EnvironHeaders`` or a dict. ``peer_id_of`` maps an access key to
    its peer ID (None: not one of ours, answered InvalidAccessKeyId).
    """
    path, query = _split_target(_wsgi_text(raw_path), _wsgi_text(raw_query))
    header_values = _collect_headers(headers)
    params = _parse_query(query)
    now = now.astimezone(UTC) if now.tzinfo else now.replace(tzinfo=UTC)
    authorization = _first(header_values, "authorization")
    if authorization is not None and not authorization.strip():
        authorization = None  # an empty header is no authentication at all

    if "x-amz-security-token" in header_values or "X-Amz-Security-Token" in params:
        # Mesh credentials are long-term keys: no session token is ever valid here.
        raise S3Error("InvalidToken", "The provided token is malformed or otherwise invalid.", status=400)
    if "X-Amz-Algorithm" in params or "X-Amz-Credential" in params or "X-Amz-Signature" in params:
        if authorization is not None:
            raise S3Error("InvalidArgument", "Only one auth mechanism allowed; only the X-Amz-Algorithm "
                          "query parameter, Signature query string parameter or the Authorization header "
                          "should be specified", ArgumentName="Authorization", ArgumentValue=authorization)
        return _verify_presigned(method.upper(), path, query, params, header_values, lookup_secret,
                                 region, now, max_skew, max_presign_expiry, peer_id_of)
    if authorization is not None:
        return _verify_header(method.upper(), path, query, authorization, header_values, lookup_secret,
                              region, now, max_skew, peer_id_of)
    if "AWSAccessKeyId" in params or "Signature" in params:
        if not allow_sigv2_presigned:
            raise S3Error("InvalidRequest", _UNSUPPORTED_MECHANISM)
        return _verify_sigv2_presigned(method.upper(), path, params, header_values, lookup_secret,
                                       now, max_presign_expiry, peer_id_of)
    raise S3Error("AccessDenied", "Access Denied")


# --- Authorization header -------------------------------------------------------------------------

def _verify_header(method: str, path: str, query: str, authorization: str,
                   header_values: dict[str, list[str]], lookup_secret: Callable[[str], str | None],
                   region: str, now: datetime, max_skew: float,
                   peer_id_of: Callable[[str], str | None]) -> AuthResult:
    scheme, _, rest = authorization.strip().partition(" ")
    if scheme != ALGORITHM:
        if scheme in ("AWS", "AWS4-ECDSA-P256-SHA256"):  # SigV2 and SigV4a: known, not supported
            raise S3Error("InvalidRequest", _UNSUPPORTED_MECHANISM)
        raise S3Error("InvalidArgument", "Unsupported Authorization Type",
                      ArgumentName="Authorization", ArgumentValue=authorization)
    components = _parse_authorization_components(rest)
    credential = _parse_credential(components["Credential"], _HEADER_MALFORMED, "AuthorizationHeaderMalformed")
    signed_headers = _parse_signed_headers(components["SignedHeaders"], "AuthorizationHeaderMalformed",
                                           _HEADER_MALFORMED + "the SignedHeaders component is empty or malformed.")

    # X-Amz-Date wins over Date; the string to sign always carries the ISO 8601 basic form.
    date_header = "x-amz-date" if "x-amz-date" in header_values else "date"
    request_time = _header_time(_first(header_values, date_header))
    if request_time is None:
        raise S3Error("AccessDenied", "AWS authentication requires a valid Date or x-amz-date header")
    amz_date = request_time.strftime(_AMZ_DATE_FORMAT)
    _check_scope(credential, amz_date[:8], region, "AuthorizationHeaderMalformed", _HEADER_MALFORMED,
                 f'Invalid credential date "{credential[1]}". This date is not the same as '
                 f'X-Amz-Date: "{amz_date[:8]}".')

    content_sha256 = _first(header_values, "x-amz-content-sha256")
    if content_sha256 is None:
        raise S3Error("InvalidRequest", "Missing required header for this request: x-amz-content-sha256")
    mode = payload_mode_of(content_sha256.strip())
    if mode is None:
        raise S3Error("InvalidArgument", "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, "
                      "STREAMING-UNSIGNED-PAYLOAD-TRAILER, STREAMING-AWS4-HMAC-SHA256-PAYLOAD, "
                      "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER or a valid sha256 value.",
                      ArgumentName="x-amz-content-sha256", ArgumentValue=content_sha256)

    access_key = credential[0]
    secret, peer_id = _lookup(access_key, lookup_secret, peer_id_of)
    skew = abs((now - request_time).total_seconds())
    if skew > max_skew:
        raise S3Error("RequestTimeTooSkewed", "The difference between the request time and the current "
                      "time is too large.", RequestTime=_first(header_values, date_header) or "",
                      ServerTime=_iso(now), MaxAllowedSkewMilliseconds=str(int(max_skew * 1000)))
    _check_signed_headers(signed_headers, header_values, extra_required=(date_header,))

    scope = "/".join(credential[1:])
    signing_key = derive_signing_key(secret, credential[1], region)
    signature = _match_signature(method, path, query, header_values, signed_headers,
                                 components["SignedHeaders"], content_sha256.strip(), amz_date, scope,
                                 signing_key, components["Signature"], exclude_param=None)
    return AuthResult(access_key=access_key, peer_id=peer_id, payload_mode=mode[0], payload_sha256=mode[1],
                      signing_key=signing_key, seed_signature=signature, amz_date=amz_date, scope=scope,
                      presigned=False)


def _parse_authorization_components(rest: str) -> dict[str, str]:
    components: dict[str, str] = {}
    for part in rest.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in ("Credential", "SignedHeaders", "Signature") or name in components:
            raise S3Error("AuthorizationHeaderMalformed",
                          _HEADER_MALFORMED + f'the authorization component "{part}" is malformed.')
        components[name] = value.strip()
    if len(components) != 3:
        raise S3Error("AuthorizationHeaderMalformed", _HEADER_MALFORMED + "the authorization header "
                      "requires three components: Credential, SignedHeaders, and Signature.")
    return components


# --- Presigned URLs (SigV4 query string) --------------------------------------------------------------

def _verify_presigned(method: str, path: str, query: str, params: dict[str, list[str]],
                      header_values: dict[str, list[str]], lookup_secret: Callable[[str], str | None],
                      region: str, now: datetime, max_skew: float, max_expiry: float,
                      peer_id_of: Callable[[str], str | None]) -> AuthResult:
    error = "AuthorizationQueryParametersError"
    values: dict[str, str] = {}
    for name in _PRESIGN_PARAMS:
        given = params.get(name)
        if not given or len(given) != 1:
            raise S3Error(error, "Query-string authentication version 4 requires the X-Amz-Algorithm, "
                          "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, and "
                          "X-Amz-Expires parameters.")
        values[name] = given[0]
    if values["X-Amz-Algorithm"] != ALGORITHM:
        raise S3Error(error, 'X-Amz-Algorithm only supports "AWS4-HMAC-SHA256"')
    credential = _parse_credential(values["X-Amz-Credential"], _QUERY_MALFORMED, error)
    amz_date = values["X-Amz-Date"]
    request_time = _amz_time(amz_date)
    if request_time is None:
        raise S3Error(error, "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\"")
    _check_scope(credential, amz_date[:8], region, error, _QUERY_MALFORMED,
                 f'Invalid credential date "{credential[1]}". This date is not the same as '
                 f'X-Amz-Date: "{amz_date[:8]}".')
    expires_text = values["X-Amz-Expires"]
    if not re.fullmatch(r"-?[0-9]{1,18}", expires_text):
        raise S3Error(error, "X-Amz-Expires should be a number")
    expires = int(expires_text)
    if expires < 0:
        raise S3Error(error, "X-Amz-Expires must be non-negative")
    if expires > max_expiry:
        raise S3Error(error, f"X-Amz-Expires must be less than a week (in seconds) that is {int(max_expiry)}")
    signed_headers = _parse_signed_headers(values["X-Amz-SignedHeaders"], error,
                                           "X-Amz-SignedHeaders is empty or malformed.")

    access_key = credential[0]
    secret, peer_id = _lookup(access_key, lookup_secret, peer_id_of)
    age = (now - request_time).total_seconds()  # no datetime arithmetic: X-Amz-Date may be year 9999
    if age > expires:
        raise S3Error("AccessDenied", "Request has expired", **{
            "X-Amz-Expires": expires_text, "Expires": _iso(request_time + timedelta(seconds=expires)),
            "ServerTime": _iso(now)})
    if -age > max_skew:
        raise S3Error("AccessDenied", "Request is not valid yet")
    _check_signed_headers(signed_headers, header_values, extra_required=())

    # A presigned URL signs no payload unless the signer chose to sign x-amz-content-sha256.
    content_sha256 = _first(header_values, "x-amz-content-sha256")
    if content_sha256 is None:
        content_sha256 = (params.get("X-Amz-Content-Sha256") or [UNSIGNED_PAYLOAD])[0]
    mode = payload_mode_of(content_sha256.strip())
    if mode is None:
        raise S3Error("InvalidArgument", "x-amz-content-sha256 must be UNSIGNED-PAYLOAD or a valid sha256 "
                      "value.", ArgumentName="x-amz-content-sha256", ArgumentValue=content_sha256)

    scope = "/".join(credential[1:])
    signing_key = derive_signing_key(secret, credential[1], region)
    signature = _match_signature(method, path, query, header_values, signed_headers,
                                 values["X-Amz-SignedHeaders"], content_sha256.strip(), amz_date, scope,
                                 signing_key, values["X-Amz-Signature"], exclude_param="X-Amz-Signature")
    return AuthResult(access_key=access_key, peer_id=peer_id, payload_mode=mode[0], payload_sha256=mode[1],
                      signing_key=signing_key, seed_signature=signature, amz_date=amz_date, scope=scope,
                      presigned=True)


# --- Legacy SigV2 presigned URLs (opt-in) --------------------------------------------------------------

# Sub-resources that SigV2 includes in the canonical resource (botocore's HmacV1Auth list, which
# follows the S3 SigV2 documentation).
_SIGV2_SUBRESOURCES = frozenset({
    "accelerate", "acl", "cors", "defaultObjectAcl", "location", "logging", "partNumber", "policy",
    "requestPayment", "torrent", "versioning", "versionId", "versions", "website", "uploads", "uploadId",
    "response-content-type", "response-content-language", "response-expires", "response-cache-control",
    "response-content-disposition", "response-content-encoding", "delete", "lifecycle", "tagging",
    "restore", "storageClass", "notification", "replication", "analytics", "metrics", "inventory",
    "select", "select-type", "object-lock"})


def _verify_sigv2_presigned(method: str, path: str, params: dict[str, list[str]],
                            header_values: dict[str, list[str]], lookup_secret: Callable[[str], str | None],
                            now: datetime, max_expiry: float,
                            peer_id_of: Callable[[str], str | None]) -> AuthResult:
    access_key = (params.get("AWSAccessKeyId") or [""])[0]
    provided = (params.get("Signature") or [""])[0]
    expires_text = (params.get("Expires") or [""])[0]
    if not access_key or not provided or not re.fullmatch(r"[0-9]{1,18}", expires_text):
        raise S3Error("AccessDenied", "Query-string authentication requires the Signature, Expires and "
                      "AWSAccessKeyId parameters")
    secret, peer_id = _lookup(access_key, lookup_secret, peer_id_of)
    expires_at = int(expires_text)  # seconds since the epoch
    if now.timestamp() > expires_at:
        raise S3Error("AccessDenied", "Request has expired", Expires=_iso(datetime.fromtimestamp(expires_at, UTC)),
                      ServerTime=_iso(now))
    if expires_at - now.timestamp() > max_expiry:
        raise S3Error("AuthorizationQueryParametersError",
                      f"Expires must be less than a week (in seconds) that is {int(max_expiry)}")

    # x-amz-* headers, and x-amz-* parameters hoisted into the query by the signer.
    amz_headers: dict[str, list[str]] = {n: v for n, v in header_values.items() if n.startswith("x-amz-")}
    for name, vals in params.items():
        if name.lower().startswith("x-amz-"):
            amz_headers.setdefault(name.lower(), []).extend(vals)
    amz_lines = "".join(f"{name}:{','.join(v.strip() for v in amz_headers[name])}\n"
                        for name in sorted(amz_headers))
    sub_resources = sorted((name, vals[0]) for name, vals in params.items() if name in _SIGV2_SUBRESOURCES)
    suffix = ("?" + "&".join(f"{n}={v}" if v != "" else n for n, v in sub_resources)) if sub_resources else ""
    secret_bytes = secret.encode("utf-8")
    for candidate_path in _unique(path, _rfc3986_path(path)):
        string_to_sign = "\n".join([
            method, _first(header_values, "content-md5") or "", _first(header_values, "content-type") or "",
            expires_text, amz_lines + candidate_path + suffix])
        expected = base64.b64encode(hmac.new(secret_bytes, string_to_sign.encode("utf-8"),
                                             hashlib.sha1).digest()).decode("ascii")
        if hmac.compare_digest(expected.encode(), provided.encode("utf-8", "replace")):
            return AuthResult(access_key=access_key, peer_id=peer_id, payload_mode=UNSIGNED_PAYLOAD,
                              payload_sha256=None, signing_key=b"", seed_signature=expected,
                              amz_date=now.strftime(_AMZ_DATE_FORMAT), scope="", presigned=True)
    raise S3Error("SignatureDoesNotMatch", "The request signature we calculated does not match the "
                  "signature you provided. Check your key and signing method.")


# --- Shared checks ---------------------------------------------------------------------------------

def _parse_credential(value: str, prefix: str, error: str) -> tuple[str, str, str, str, str]:
    parts = value.split("/")
    if len(parts) != 5:
        raise S3Error(error, prefix + f"the Credential is mal-formed; expecting {_CREDENTIAL_FORMAT}.")
    if not parts[0]:
        raise S3Error(error, prefix + "a non-empty Access Key (AKID) must be provided in the credential.")
    return parts[0], parts[1], parts[2], parts[3], parts[4]


def _check_scope(credential: tuple[str, str, str, str, str], request_day: str, region: str, error: str,
                 prefix: str, date_message: str) -> None:
    _, day, cred_region, service, terminator = credential
    if day != request_day:
        raise S3Error(error, prefix + date_message)
    if cred_region != region:
        raise S3Error(error, prefix + f"the region '{cred_region}' is wrong; expecting '{region}'",
                      Region=region)
    if service != SERVICE:
        raise S3Error(error, prefix + f'incorrect service "{service}". This endpoint belongs to "{SERVICE}".')
    if terminator != TERMINATOR:
        raise S3Error(error, prefix + f'incorrect terminal "{terminator}". This endpoint uses "{TERMINATOR}".')


def _parse_signed_headers(value: str, error: str, message: str) -> list[str]:
    names = [name.strip().lower() for name in value.split(";")]
    if not value.strip() or any(not name for name in names):
        raise S3Error(error, message)
    return names


def _check_signed_headers(signed: list[str], header_values: dict[str, list[str]],
                          extra_required: tuple[str, ...]) -> None:
    """Host, the date used and every x-amz-* header sent must be covered by the signature."""
    signed_set = set(signed)
    unsigned = [name for name in ("host", *extra_required) if name not in signed_set]
    unsigned += sorted(name for name in header_values
                       if name.startswith("x-amz-") and name not in signed_set and name not in unsigned)
    if unsigned:
        raise S3Error("AccessDenied", "There were headers present in the request which were not signed",
                      HeadersNotSigned=", ".join(unsigned))


def _lookup(access_key: str, lookup_secret: Callable[[str], str | None],
            peer_id_of: Callable[[str], str | None]) -> tuple[str, str]:
    peer_id = peer_id_of(access_key)
    secret = lookup_secret(access_key) if peer_id is not None else None
    if peer_id is None or secret is None:
        raise S3Error("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.",
                      AWSAccessKeyId=access_key)
    return secret, peer_id


def _match_signature(method: str, path: str, query: str, header_values: dict[str, list[str]],
                     signed_headers: list[str], signed_headers_text: str, payload_hash: str, amz_date: str,
                     scope: str, signing_key: bytes, provided: str, exclude_param: str | None) -> str:
    """The signature that matches ``provided``, trying the canonical forms S3 clients produce."""
    provided = provided.strip()
    if _HEX64_RE.fullmatch(provided):
        provided = provided.lower()
        headers_block = "".join(f"{name}:{_canonical_header_value(header_values.get(name, []))}\n"
                                for name in signed_headers)
        # The signed-headers line is what the client declared (lowercased), in its order.
        signed_line = ";".join(name.strip().lower() for name in signed_headers_text.split(";"))
        for candidate_path, candidate_query in _canonical_targets(path, query, exclude_param):
            canonical_request = "\n".join([method, candidate_path, candidate_query, headers_block,
                                           signed_line, payload_hash])
            string_to_sign = "\n".join([
                ALGORITHM, amz_date, scope,
                hashlib.sha256(canonical_request.encode("utf-8", "replace")).hexdigest()])
            expected = sign(signing_key, string_to_sign)
            if hmac.compare_digest(expected, provided):
                return expected
    raise S3Error("SignatureDoesNotMatch", "The request signature we calculated does not match the "
                  "signature you provided. Check your key and signing method.")


def _canonical_targets(path: str, query: str, exclude_param: str | None) -> Iterator[tuple[str, str]]:
    # S3's own form first; the as-sent forms are only computed when that does not match.
    rfc_path, rfc_query = _rfc3986_path(path), _rfc3986_query(query, exclude_param)
    yield rfc_path, rfc_query
    paths = _unique(rfc_path, path or "/")
    queries = _unique(rfc_query, _raw_sorted_query(query, exclude_param))
    for candidate_query in queries:
        for candidate_path in paths:
            if (candidate_path, candidate_query) != (rfc_path, rfc_query):
                yield candidate_path, candidate_query


def _canonical_header_value(values: list[str]) -> str:
    # Trimall: strip, and collapse inner whitespace runs to one space (as botocore does).
    return ",".join(" ".join(value.split()) for value in values)


# --- URI canonicalisation ------------------------------------------------------------------------------

def _rfc3986_path(path: str) -> str:
    """The path percent-decoded once, then encoded as SigV4 specifies (``/`` kept, no normalising)."""
    if not path:
        return "/"
    return quote(unquote_to_bytes(path), safe="/~")


def _query_pairs(query: str) -> Iterator[tuple[str, str]]:
    for piece in query.split("&"):
        if piece:
            name, _, value = piece.partition("=")
            yield name, value


def _decode_query_component(text: str) -> bytes:
    # "+" is a space in a query string (form encoding, which is how werkzeug reads request.args).
    return unquote_to_bytes(text.replace("+", " "))


def _rfc3986_query(query: str, exclude_param: str | None) -> str:
    pairs = []
    for name, value in _query_pairs(query):
        decoded_name = _decode_query_component(name)
        if exclude_param is not None and decoded_name == exclude_param.encode():
            continue
        pairs.append((quote(decoded_name, safe="~"), quote(_decode_query_component(value), safe="~")))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def _raw_sorted_query(query: str, exclude_param: str | None) -> str:
    pairs = [(name, value) for name, value in _query_pairs(query) if name != exclude_param]
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def _parse_query(query: str) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for name, value in _query_pairs(query):
        decoded_name = _decode_query_component(name).decode("utf-8", "replace")
        params.setdefault(decoded_name, []).append(_decode_query_component(value).decode("utf-8", "replace"))
    return params


def _split_target(raw_path: str, raw_query: str) -> tuple[str, str]:
    # Accept a full request target too ("/b/k?x=y", or the absolute form a proxy may send).
    if raw_path.startswith(("http://", "https://")):
        after_scheme = raw_path.split("//", 1)[1]
        slash = after_scheme.find("/")
        raw_path = after_scheme[slash:] if slash >= 0 else "/"
    path, sep, query = raw_path.partition("?")
    if sep and not raw_query:
        raw_query = query
    path = path.partition("#")[0]
    return path or "/", raw_query.lstrip("?")


# --- Small helpers -------------------------------------------------------------------------------------

def _wsgi_text(text: str) -> str:
    """WSGI hands raw bytes over as latin-1 text; recover UTF-8 text when that is what was sent."""
    if text.isascii():
        return text
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _collect_headers(headers: Mapping[str, str] | Any) -> dict[str, list[str]]:
    collected: dict[str, list[str]] = {}
    for name, value in headers.items():
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        collected.setdefault(str(name).lower(), []).append(_wsgi_text(str(value)))
    return collected


def _first(header_values: dict[str, list[str]], name: str) -> str | None:
    values = header_values.get(name)
    return values[0] if values else None


def _amz_time(text: str) -> datetime | None:
    if not _AMZ_DATE_RE.fullmatch(text):
        return None
    try:  # (strptime is slow: a quarter of the verification time)
        return datetime(int(text[0:4]), int(text[4:6]), int(text[6:8]), int(text[9:11]), int(text[11:13]),
                        int(text[13:15]), tzinfo=UTC)
    except (ValueError, OverflowError):
        return None


def _header_time(text: str | None) -> datetime | None:
    if text is None:
        return None
    text = text.strip()
    parsed = _amz_time(text)
    if parsed is not None:
        return parsed
    try:  # the Date header: RFC 7231 (IMF-fixdate and the obsolete forms)
        parsed = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _unique(*items: str) -> list[str]:
    seen: list[str] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen
