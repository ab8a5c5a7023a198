"""The wrapper's HTTP API (Flask): the management routes (list, load, unload models) and
the relay's routes (`/relay/...`, see `relay`).

Errors are shaped by the one table (`api_errors`), in the shape of the path's API (`api_paths`):
the relay's Anthropic and Ollama routes in theirs, everything else in OpenAI's
``{"error": {"message", "type", "code"}}``.
When an API key is configured every route but ``/health`` requires it
(``Authorization: Bearer KEY`` or ``x-api-key``).
"""

from __future__ import annotations

import logging

from flask import Flask, Response, abort, jsonify, request
from werkzeug.exceptions import HTTPException

from ..api_errors import OPENAI, error_response, exception_response, kind_for_status
from ..api_paths import api_of
from ..errors import MlxgateError, invalid
from ..json_body import parse_object
from ..relay_protocol import RELAY_PREFIX, STORED_RESPONSES
from ..usage import Record
from . import access
from .exchange import Call
from .fleet import Fleet
from .metrics import Metrics
from .recorder import Recorder
from .relay import Relay

log = logging.getLogger("mlxgate.wrapper")

MANAGEMENT_BODY = 64 * 1024  # /models/...; the relay (/relay/...) takes up to max_body
RECORDS_BODY = 4 * 1024 * 1024  # /usage/records: a batch from a proxy program


def _reply(status: int, headers: list, body: bytes) -> Response:
    return Response(body, status=status, headers=headers)


def create_app(fleet: Fleet, relay: Relay, api_key: str | None = None, metrics: Metrics | None = None,
               recorder: Recorder | None = None) -> Flask:
    app = Flask("mlxgate.wrapper")
    app.config["MAX_CONTENT_LENGTH"] = fleet.config.max_body
    app.json.sort_keys = False

    @app.before_request
    def small_management_bodies():
        limit = RECORDS_BODY if request.path == "/usage/records" else MANAGEMENT_BODY
        if not request.path.startswith(RELAY_PREFIX + "/") and (request.content_length or 0) > limit:
            return _reply(*error_response(OPENAI, "request_too_large",
                                          f"a management request body is limited to {limit} bytes"))
        return None

    @app.before_request
    def require_key():
        refused = access.refusal(api_key, request.path, request.headers, api_of(request.path))
        return _reply(*refused) if refused else None

    def body() -> dict:
        try:
            return parse_object(request.get_data(cache=True))
        except ValueError as exc:
            raise invalid(f"{exc}, e.g. {{\"model\": \"tiny-a\"}}") from None

    def model_of(data: dict) -> str:
        """The one field of a load or unload: `model` (there are no fixed servers to name)."""
        extra = sorted(set(data) - {"model"})
        if extra:
            raise invalid(f"{extra[0]}: unknown field; send only `model` (each model has its own server in "
                          f"the resident set)")
        name = data.get("model")
        if not isinstance(name, str) or not name.strip():
            raise invalid("`model` is required: the name of a model from GET /models")
        return name.strip()

    @app.get("/health")
    def health():
        return jsonify({"status": "ok", "servers": {s.model.name: s.state.value for s in fleet.servers}})

    @app.get("/models")
    def models():
        return jsonify({"models": fleet.models(), "servers": fleet.status(), "memory": fleet.memory()})

    @app.post("/models/load")
    def load():
        return jsonify(fleet.load(model_of(body())))

    @app.post("/models/unload")
    def unload():
        return jsonify(fleet.unload(model_of(body())))

    def relay_route(**_) -> Response:
        """The relay's routes on this port (its doors answer them without Flask, see `doors`)."""
        answer = relay.route(Call(request.method, request.path, request.headers, request.get_data(cache=True),
                                  request.args, request.environ.get("gunicorn.socket")))
        if answer is None:
            abort(404)
        return Response(answer.body, status=answer.status, headers=answer.headers)

    app.add_url_rule(f"{RELAY_PREFIX}/<path:rest>", "relay", relay_route, methods=["POST"])
    app.add_url_rule(f"{STORED_RESPONSES}/<path:rest>", "stored_responses", relay_route, methods=["GET", "DELETE"])

    @app.get("/metrics")
    def prometheus():
        body = metrics.exposition() if metrics is not None else b""
        return Response(body, mimetype="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/usage/records")
    def records():
        """Records of requests a proxy program answered itself or handed to LiteLLM."""
        data = body()
        if recorder is not None:
            for item in data.get("records") or ():
                if isinstance(item, dict):
                    recorder.add(Record.from_dict(item))
            recorder.dropped_elsewhere(int(data.get("dropped") or 0))
        return jsonify({"ok": True})

    @app.get("/status")
    def status_page_data():
        """What the status page shows: the servers, and the recorder's recent requests and last hour."""
        usage = recorder.snapshot() if recorder is not None else {}
        return jsonify({"servers": fleet.status(), "memory": fleet.memory(), **usage})

    @app.errorhandler(MlxgateError)
    def refused(exc: MlxgateError):
        log.warning("%s %s: %s", request.method, request.path, exc)
        return _reply(*exception_response(api_of(request.path), exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return _reply(*error_response(api_of(request.path), kind_for_status(exc.code or 500),
                                      f"{exc.name}: {exc.description}", exc.code))

    @app.errorhandler(Exception)
    def internal(exc: Exception):
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _reply(*error_response(api_of(request.path), "api_error",
                                      f"internal error ({type(exc).__name__}); see `mlxgate logs wrapper`"))

    return app
