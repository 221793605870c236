"""The app's last line of defence, in process (Flask's test client): an unexpected exception is
logged with its request ID and answered InternalError in S3 XML, never a traceback page."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tunnelmesh import identity
from tunnelmesh.config import settings_from_dict
from web.s3 import create_app

pytestmark = pytest.mark.integration


@pytest.fixture()
def app_and_headers(tmp_path: Path):
    token = identity.generate_token()
    identity.store_token(tmp_path, token)
    peer_id = identity.load_or_create_identity(tmp_path).peer_id
    creds = identity.s3_credentials(token, peer_id)
    app = create_app(settings_from_dict({"name": "inproc", "coordinator": {"data_dir": str(tmp_path)}}))

    def headers(method: str, path: str) -> dict[str, str]:
        request = AWSRequest(method=method, url=f"http://localhost{path}", data=b"")
        S3SigV4Auth(Credentials(creds.access_key, creds.secret_key), "s3", "us-east-1").add_auth(request)
        return dict(request.headers.items())

    return app, headers


def test_unexpected_exception_is_internal_error_xml(app_and_headers, caplog, monkeypatch) -> None:
    app, headers = app_and_headers
    service = app.extensions["tunnelmesh_s3"]

    def explode() -> list:
        raise RuntimeError("boom: a bug")

    monkeypatch.setattr(service.store, "list_buckets", explode)
    with caplog.at_level(logging.ERROR, logger="tunnelmesh.s3"):
        response = app.test_client().get("/", headers=headers("GET", "/"))
    assert response.status_code == 500
    assert response.content_type == "application/xml"
    root = ET.fromstring(response.data)
    assert root.findtext("Code") == "InternalError"
    assert b"Traceback" not in response.data and b"boom" not in response.data
    request_id = response.headers["x-amz-request-id"]
    assert root.findtext("RequestId") == request_id
    assert any(request_id in record.getMessage() and record.exc_info for record in caplog.records)


def test_health_needs_no_credentials(app_and_headers) -> None:
    app, _ = app_and_headers
    response = app.test_client().get("/_health")
    assert response.status_code == 200 and response.data == b"ok\n"
