"""S3 errors: one exception type carrying S3's code, HTTP status and message.

Every error the S3 API returns is raised as :class:`S3Error` and rendered as S3 XML by one
app-level handler, so no request ever gets a bare 500 or a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping

from storage.errors import StorageError

# code -> (HTTP status, default message), as documented by AWS for S3.
S3_ERRORS: dict[str, tuple[int, str]] = {
    "AccessDenied": (403, "Access Denied"),
    "AuthorizationHeaderMalformed": (400, "The authorization header is malformed."),
    "AuthorizationQueryParametersError": (400, "The query-string authentication parameters are malformed."),
    "BadDigest": (400, "The Content-MD5 or checksum you specified did not match what we received."),
    "BucketAlreadyExists": (409, "The requested bucket name is not available."),
    "BucketAlreadyOwnedByYou": (409, "Your previous request to create the named bucket succeeded and you already own it."),
    "BucketNotEmpty": (409, "The bucket you tried to delete is not empty."),
    "EntityTooLarge": (400, "Your proposed upload exceeds the maximum allowed object size."),
    "EntityTooSmall": (400, "Your proposed upload is smaller than the minimum allowed object size."),
    "ExpiredToken": (400, "The provided token has expired."),
    "IncompleteBody": (400, "You did not provide the number of bytes specified by the Content-Length HTTP header."),
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "InsufficientStorage": (507, "The coordinator does not have enough free disk space to store the object."),
    "IllegalLocationConstraintException": (400, "The location constraint you specified is not valid for this endpoint."),
    "InvalidAccessKeyId": (403, "The AWS access key ID you provided does not exist in our records."),
    "InvalidArgument": (400, "Invalid Argument"),
    "InvalidBucketName": (400, "The specified bucket is not valid."),
    "InvalidDigest": (400, "The Content-MD5 you specified is not valid."),
    "InvalidPart": (400, "One or more of the specified parts could not be found."),
    "InvalidPartOrder": (400, "The list of parts was not in ascending order."),
    "InvalidRange": (416, "The requested range is not satisfiable"),
    "InvalidRequest": (400, "Invalid Request"),
    "InvalidURI": (400, "Couldn't parse the specified URI."),
    "KeyTooLongError": (400, "Your key is too long."),
    "MaxMessageLengthExceeded": (400, "Your request was too big."),
    "MetadataTooLarge": (400, "Your metadata headers exceed the maximum allowed metadata size."),
    "MalformedTrailerError": (400, "The request contained trailing data that was not well-formed or did not conform to our published schema."),
    "MalformedXML": (400, "The XML you provided was not well-formed or did not validate against our published schema."),
    "MethodNotAllowed": (405, "The specified method is not allowed against this resource."),
    "MissingContentLength": (411, "You must provide the Content-Length HTTP header."),
    "MissingSecurityHeader": (400, "Your request is missing a required header."),
    "NoSuchBucket": (404, "The specified bucket does not exist."),
    "NoSuchKey": (404, "The specified key does not exist."),
    "NoSuchUpload": (404, "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed."),
    "NotImplemented": (501, "A header or query you provided implies functionality that is not implemented."),
    "NotModified": (304, "Not Modified"),
    "PreconditionFailed": (412, "At least one of the preconditions you specified did not hold."),
    "RequestTimeTooSkewed": (403, "The difference between the request time and the server's time is too large."),
    "ServiceUnavailable": (503, "Please reduce your request rate."),
    "SignatureDoesNotMatch": (403, "The request signature we calculated does not match the signature you provided."),
    "XAmzContentSHA256Mismatch": (400, "The provided 'x-amz-content-sha256' header does not match what was computed."),
}


class S3Error(Exception):
    """An S3 error response. ``extra`` adds elements to the <Error> document (e.g. BucketName);
    ``headers`` adds response headers (e.g. ``Content-Range: bytes */size`` on InvalidRange)."""

    def __init__(self, code: str, message: str | None = None, *, resource: str | None = None,
                 status: int | None = None, headers: Mapping[str, str] | None = None,
                 **extra: str) -> None:
        default_status, default_message = S3_ERRORS.get(code, (400, code))
        self.code = code
        self.status = status or default_status
        self.message = message or default_message
        self.resource = resource
        self.headers = dict(headers or {})
        self.extra = extra
        super().__init__(f"{code}: {self.message}")


def from_storage_error(exc: StorageError, *, resource: str | None = None) -> S3Error:
    """The S3 error for a storage error: the one place where storage errors become S3 codes.

    Storage errors carry their S3 code (``exc.code``); integrity failures (corrupt or missing
    chunks) become InternalError with a message that does not leak chunk hashes to clients.
    """
    code = getattr(exc, "code", "InternalError")
    if code not in S3_ERRORS:
        code = "InternalError"
    if code == "InternalError":
        return S3Error(code, resource=resource)
    return S3Error(code, exc.message[:1].upper() + exc.message[1:] + ".", resource=resource)
