"""The management API (Flask): list, load and unload models.

Errors are JSON: ``{"error": {"type": ..., "message": ...}}`` with a matching status.
When an API key is configured every route but ``/health`` requires
``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import hmac
import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from ..errors import ModelLoadFailed, ModelLoadTimeout, UnknownModel, UnsafeModelName
from .fleet import Fleet
from .relay import register as register_relay

log = logging.getLogger("mlxgate.wrapper")

MANAGEMENT_BODY = 64 * 1024  # /models/...; the relay (/backends/...) takes up to max_body

# Most specific first: ModelLoadTimeout is a ModelLoadFailed.
_ERRORS = (
    (UnsafeModelName, 400, "invalid_model_name"),
    (UnknownModel, 404, "model_not_found"),
    (ModelLoadTimeout, 504, "model_load_timeout"),
    (ModelLoadFailed, 502, "model_load_failed"),
)


def error(status: int, kind: str, message: str):
    response = jsonify({"error": {"type": kind, "message": message}})
    response.status_code = status
    return response


def create_app(fleet: Fleet, api_key: str | None = None) -> Flask:
    app = Flask("mlxgate.wrapper")
    app.config["MAX_CONTENT_LENGTH"] = fleet.config.max_body
    app.json.sort_keys = False

    @app.before_request
    def small_management_bodies():
        if not request.path.startswith("/backends/") and (request.content_length or 0) > MANAGEMENT_BODY:
            return error(413, "request_too_large", f"a management request body is limited to "
                                                   f"{MANAGEMENT_BODY} bytes")
        return None

    @app.before_request
    def require_key():
        if not api_key or request.path == "/health":
            return None
        header = request.headers.get("Authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        given = given or request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            return error(401, "authentication_error",
                         "missing or wrong API key: send `Authorization: Bearer <key>` "
                         "(the key is MLXGATE_API_KEY or the api_key file in the runtime folder)")
        return None

    def body() -> dict:
        try:
            data = request.get_json(silent=True)
        except RecursionError:
            data = None
        if not isinstance(data, dict):
            raise _BadRequest("the request body must be a JSON object, e.g. {\"model\": \"tiny-a\"}")
        return data

    def role_of(data: dict) -> str:
        role = data.get("server", "dynamic")
        if role not in fleet.servers:
            raise _BadRequest(f"server must be one of {sorted(fleet.servers)}, got {role!r}")
        return role

    @app.get("/health")
    def health():
        return jsonify({"status": "ok",
                        "servers": {r: s.state.value for r, s in fleet.servers.items()}})

    @app.get("/models")
    def models():
        return jsonify({"models": fleet.models(), "servers": fleet.status()})

    @app.post("/models/load")
    def load():
        data = body()
        name = data.get("model")
        if not isinstance(name, str) or not name.strip():
            raise _BadRequest("`model` is required: the name of a model from GET /models")
        return jsonify(fleet.load(name, role_of(data)))

    @app.post("/models/unload")
    def unload():
        data = body() if request.content_length else {}
        return jsonify(fleet.unload(role_of(data)))

    register_relay(app, fleet)

    @app.errorhandler(_BadRequest)
    def bad_request(exc):
        return error(400, "invalid_request", str(exc))

    for exc_type, status, kind in _ERRORS:
        app.register_error_handler(exc_type, _handler(status, kind))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return error(exc.code or 500, kinds.get(exc.code, "invalid_request"),
                     f"{exc.name}: {exc.description}")

    @app.errorhandler(Exception)
    def internal(exc: Exception):
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    return app


class _BadRequest(Exception):
    pass


def _handler(status: int, kind: str):
    def handle(exc: Exception):
        log.warning("%s %s -> %s: %s", request.method, request.path, status, exc)
        return error(status, kind, str(exc))
    return handle
