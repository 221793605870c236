"""The S3-compatible API of a coordinator (``gunicorn 'web.s3:create_app()'`` on ``s3.listen``).

Path-style (``/bucket/key``; virtual-host style too when the Host names the advertised S3 host),
AWS Signature Version 4, S3's XML and error documents, streamed bodies. Operations live in
buckets.py, objects.py, listing.py and multipart.py; routes.py dispatches to them.
"""

from __future__ import annotations

import base64
import logging
import secrets

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from storage.errors import StorageError
from tunnelmesh.config import Settings, load_config
from web.s3.errors import S3Error, from_storage_error
from web.s3.responses import S3Response, error_response, request_id
from web.s3.service import S3Service

log = logging.getLogger("tunnelmesh.s3")

# Werkzeug's own HTTP errors (raised before or around our code) in S3's vocabulary.
_HTTP_STATUS_CODES = {
    400: "InvalidRequest",
    404: "NoSuchKey",
    405: "MethodNotAllowed",
    411: "MissingContentLength",
    413: "EntityTooLarge",
    414: "InvalidURI",
    416: "InvalidRange",
    501: "NotImplemented",
}


def create_app(settings: Settings | None = None) -> Flask:
    """The S3 WSGI app; ``settings`` default to ``load_config()`` (``$TUNNELMESH_CONFIG``)."""
    from web.s3 import routes  # imported here: it pulls in the SigV4 and storage modules

    if settings is None:
        settings = load_config()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask(__name__, static_folder=None)
    app.response_class = S3Response
    app.extensions["tunnelmesh_s3"] = S3Service(settings)
    routes.register(app)

    @app.errorhandler(S3Error)
    def s3_error(exc: S3Error) -> Response:
        return error_response(exc)

    @app.errorhandler(StorageError)
    def storage_error(exc: StorageError) -> Response:
        error = from_storage_error(exc)
        if error.code == "InternalError":  # corrupt or unavailable data: worth an operator's look
            log.error("request %s %s %s: %s", request_id(), request.method, request.path, exc)
        return error_response(error)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_STATUS_CODES.get(status, "InternalError" if status >= 500 else "InvalidRequest")
        return error_response(S3Error(code, exc.description if code == "InvalidRequest" else None,
                                      status=status if code in ("InvalidRequest", "InternalError") else None))

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception) -> Response:
        log.exception("request %s %s %s failed", request_id(), request.method, request.path)
        return error_response(S3Error("InternalError"))

    @app.after_request
    def nudge_replication(response: Response) -> Response:
        # Issue 5: a committed mutation (PUT, POST, DELETE that succeeded) has an outbox row.
        if request.method in ("PUT", "POST", "DELETE") and response.status_code < 300:
            app.extensions["tunnelmesh_s3"].nudge_replication()
        return response

    @app.after_request
    def request_headers(response: Response) -> Response:
        response.headers["x-amz-request-id"] = request_id()
        response.headers["x-amz-id-2"] = base64.b64encode(secrets.token_bytes(24)).decode()
        return response

    return app
