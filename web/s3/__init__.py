"""The S3-compatible API of a coordinator (placeholder until the S3 app lands)."""

from __future__ import annotations

from flask import Flask


def create_app() -> Flask:
    app = Flask(__name__)

    @app.get("/health")
    def health() -> tuple[str, int]:
        return "ok", 200

    return app
