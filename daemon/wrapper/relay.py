"""The data path: requests for a model server pass through here, in arrival order.

    /backends/<server>/v1/messages               Anthropic Messages (translated here)
    /backends/<server>/v1/messages/count_tokens  exact prompt tokens
    /backends/<server>/v1/chat/completions       OpenAI chat
    /backends/<server>/v1/completions            OpenAI text completions

The proxy's deployments point here, so every request to a model is
- for the model it was routed to (header `x-mlxgate-model`; loaded if another is),
- checked against the model's context window with the model's own tokenizer,
- admitted by the server's queue (full queue: 529 / 503 at once),
- cancellable: the relay always reads a *stream* from `mlx_lm.server`, which stops
  generating when its reader goes away, and it goes away as soon as the client does
  (a failed write for streams, a closed socket seen between chunks otherwise), a stop
  sequence matches, a switch's drain times out, or the watchdog restarts the server.
"""

from __future__ import annotations

import http.client
import json
import logging
import select
import socket
import time
from typing import Callable, Iterator

from flask import Flask, Response, request, stream_with_context

from ..api_errors import error_body
from ..client import MODEL_HEADER, THINKING_HEADER
from ..errors import MlxgateError, ModelLoadFailed, RequestRejected, UnknownModel, UnsafeModelName
from ..messages.chat import assemble_chat
from ..messages.events import MessageTranslator, assemble, sse
from ..messages.request import to_chat
from . import tokens
from .admission import Overloaded, Ticket
from .fleet import Fleet
from .model_server import ModelServer, State

log = logging.getLogger("mlxgate.relay")

PING_EVERY = 10.0


class BackendError(Exception):
    """The model server failed while answering (closed, crashed, or answered an error)."""


def _reject(exc: Exception) -> RequestRejected:
    if isinstance(exc, RequestRejected):
        return exc
    if isinstance(exc, UnsafeModelName):
        return RequestRejected(400, str(exc), "invalid_request")
    if isinstance(exc, UnknownModel):
        return RequestRejected(404, str(exc), "not_found")
    if isinstance(exc, ModelLoadFailed):
        return RequestRejected(503, str(exc), "unavailable")
    if isinstance(exc, Overloaded):
        return RequestRejected(529, str(exc), "overloaded")
    return RequestRejected(500, f"{type(exc).__name__}: {exc}", "api_error")


def error_response(exc: Exception, anthropic: bool) -> Response:
    rejected = _reject(exc)
    status = rejected.status
    headers = {}
    if rejected.kind == "overloaded":
        headers["Retry-After"] = str(getattr(exc, "retry_after", 5))
        status = 529 if anthropic else 503
    return Response(error_body(anthropic, rejected.kind, str(rejected)), status=status,
                    mimetype="application/json", headers=headers)


def _client_gone(environ) -> bool:
    """True when the client has closed its connection (seen without reading its data)."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Upstream:
    """One streamed call to a model server, read line by line; `close` ends it from any thread."""

    def __init__(self, port: int, path: str, body: dict, timeout: float):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            self.conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            self.response = self.conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise BackendError(f"the model server on port {port} did not answer: {exc}") from None
        if self.response.status != 200:
            text = self.response.read(4096).decode("utf-8", "replace")
            self.close()
            try:
                text = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                pass
            raise BackendError(f"the model server refused the request: {text}")

    def events(self, ticket: Ticket) -> Iterator[dict | None]:
        """Chunks as dicts; None for a keep-alive (prompt progress). Ends at [DONE]."""
        while True:
            try:
                line = self.response.readline()
            except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:
                raise BackendError(ticket.cancel_reason or f"the model server connection failed: {exc}") \
                    from None
            if not line:
                raise BackendError(ticket.cancel_reason or "the model server closed the stream before "
                                   "the answer was complete (it may have crashed or been restarted)")
            ticket.progress()
            line = line.strip()
            if line.startswith(b":"):
                yield None
            elif line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                chunk = json.loads(payload)
                if isinstance(chunk, dict) and "error" in chunk:
                    raise BackendError(f"the model server failed: {chunk['error']}")
                yield chunk

    def close(self) -> None:
        sock = getattr(self.conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conn.close()


class Relay:
    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.config = fleet.config

    # ------------------------------------------------------------------ model and turn
    def _model_for(self, server: ModelServer):
        wanted = request.headers.get(MODEL_HEADER)
        if wanted:
            self.fleet.load(wanted, server.role)
        status = server.status()
        if status["state"] != State.READY.value or not status["path"]:
            raise RequestRejected(503, f"no model is serving on the {server.role} server "
                                  f"(state {status['state']}). Load one: `mlxgate load NAME`.", "unavailable")
        return status

    def _turn(self, server: ModelServer, ticket: Ticket, model_path: str,
              wait_tick: Callable[[], None] | None = None) -> None:
        """Wait for `ticket`'s turn with the model it was routed to still loaded.

        A switch may go first while the ticket waits: it then steps out of line, loads its
        model again (which drains the other model's requests) and steps back in at the head.
        """
        for _ in range(3):
            while not server.admission.wait(ticket, PING_EVERY):
                if ticket.cancel_reason:
                    raise BackendError(ticket.cancel_reason)
                if wait_tick:
                    wait_tick()
            if server.status()["path"] == model_path:
                return
            server.admission.step_out(ticket)
            try:
                self.fleet.load(ticket.model, server.role)
            finally:
                server.admission.step_in(ticket)
        raise RequestRejected(503, f"the {server.role} server kept switching to other models while this "
                              f"request waited; retry", "unavailable")

    def _check_context(self, path: str, chat: dict, anthropic: bool) -> int:
        count = tokens.count_chat(path, chat)
        limit = tokens.context_length(path)
        if limit:
            if count >= limit:
                message = (f"prompt is too long: {count} tokens > {limit} maximum" if anthropic else
                           f"This model's maximum context length is {limit} tokens. However, your messages "
                           f"resulted in {count} tokens. Please reduce the length of the messages.")
                raise RequestRejected(400, message, "invalid_request")
            if chat.get("max_tokens") and count + chat["max_tokens"] > limit:
                chat["max_tokens"] = limit - count
        return count

    # ------------------------------------------------------------------ routes
    def messages(self, role: str) -> Response:
        server = self.fleet.server(role)
        try:
            body = _json_body()
            thinking = request.headers.get(THINKING_HEADER)
            if thinking:
                body["thinking"] = json.loads(thinking)
            chat = to_chat(body)
            status = self._model_for(server)
            input_tokens = self._check_context(status["path"], chat.body, anthropic=True)
            ticket = server.admission.join("messages", status["model"])
        except (MlxgateError, Overloaded) as exc:
            return error_response(exc, anthropic=True)
        model = str(body.get("model") or status["model"])
        translator = MessageTranslator(model, input_tokens, chat.stop_sequences)
        if chat.stream:
            return Response(stream_with_context(
                self._message_stream(server, ticket, status["path"], chat.body, translator)),
                mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
        environ = request.environ
        try:
            self._turn(server, ticket, status["path"])
            events = translator.start()
            for chunk in self._generate(server, ticket, chat.body, environ):
                if chunk is not None:
                    events += translator.feed(chunk)
                    if translator.stopped:
                        break
            events += translator.finish()
        except (MlxgateError, BackendError) as exc:
            return error_response(exc if isinstance(exc, MlxgateError) else
                                  RequestRejected(502, str(exc), "api_error"), anthropic=True)
        finally:
            server.admission.release(ticket)
        message = assemble(events)
        return Response(json.dumps(message), mimetype="application/json")

    def _message_stream(self, server, ticket, path, chat, translator) -> Iterator[bytes]:
        pending: list[bytes] = []
        try:
            for name, data in translator.start():
                yield sse(name, data)
            self._turn(server, ticket, path, wait_tick=lambda: pending.append(sse("ping", {"type": "ping"})))
            yield b"".join(pending)
            last_ping = time.monotonic()
            for chunk in self._generate(server, ticket, chat, None):
                if chunk is None:
                    if time.monotonic() - last_ping > 2:  # prompt progress keeps the client waiting
                        last_ping = time.monotonic()
                        yield sse("ping", {"type": "ping"})
                    continue
                out = b"".join(sse(n, d) for n, d in translator.feed(chunk))
                if out:
                    yield out
                if translator.stopped:
                    break
            yield b"".join(sse(n, d) for n, d in translator.finish())
        except (MlxgateError, BackendError) as exc:
            rejected = _reject(exc) if isinstance(exc, MlxgateError) else RequestRejected(502, str(exc), "api_error")
            log.warning("%s stream ended with an error: %s", server.role, rejected)
            yield sse("error", json.loads(error_body(True, rejected.kind, str(rejected))))
        finally:
            server.admission.release(ticket)

    def count_tokens(self, role: str) -> Response:
        server = self.fleet.server(role)
        try:
            body = _json_body()
            chat = to_chat({"max_tokens": 1, **body})
            wanted = request.headers.get(MODEL_HEADER)
            model = self.fleet.catalog.resolve(wanted) if wanted else None
            path = str(model.path) if model else server.status()["path"]
            if not path:
                raise RequestRejected(503, f"no model is serving on the {role} server", "unavailable")
            count = tokens.count_chat(path, chat.body)
        except MlxgateError as exc:
            return error_response(exc, anthropic=True)
        return Response(json.dumps({"input_tokens": count}), mimetype="application/json")

    def openai(self, role: str, kind: str) -> Response:
        server = self.fleet.server(role)
        chat = kind == "chat"
        try:
            body = _json_body()
            wants_stream = bool(body.get("stream"))
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            upstream = dict(body, stream=True, stream_options={"include_usage": True})
            status = self._model_for(server)
            if chat:
                self._check_context(status["path"], upstream, anthropic=False)
            ticket = server.admission.join(kind, status["model"])
        except (MlxgateError, Overloaded) as exc:
            return error_response(exc, anthropic=False)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if wants_stream:
            return Response(stream_with_context(
                self._openai_stream(server, ticket, status["path"], path, upstream, wants_usage)),
                mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})
        environ = request.environ
        chunks = []
        try:
            self._turn(server, ticket, status["path"])
            chunks = [c for c in self._generate(server, ticket, upstream, environ, path) if c is not None]
        except (MlxgateError, BackendError) as exc:
            return error_response(exc if isinstance(exc, MlxgateError) else
                                  RequestRejected(502, str(exc), "api_error"), anthropic=False)
        finally:
            server.admission.release(ticket)
        return Response(json.dumps(assemble_chat(chunks, chat)), mimetype="application/json")

    def _openai_stream(self, server, ticket, model_path, path, body, wants_usage) -> Iterator[bytes]:
        try:
            self._turn(server, ticket, model_path)
            for chunk in self._generate(server, ticket, body, None, path):
                if chunk is None:
                    yield b": keepalive\n\n"
                elif chunk.get("choices") or wants_usage:
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        except (MlxgateError, BackendError) as exc:
            rejected = _reject(exc) if isinstance(exc, MlxgateError) else RequestRejected(502, str(exc), "api_error")
            log.warning("%s stream ended with an error: %s", server.role, rejected)
            yield f"data: {error_body(False, rejected.kind, str(rejected)).decode()}\n\n".encode()
        finally:
            server.admission.release(ticket)

    def _generate(self, server: ModelServer, ticket: Ticket, body: dict, environ,
                  path: str = "/v1/chat/completions") -> Iterator[dict | None]:
        """Stream from the model server; stop it when the client is gone (`environ` given)."""
        upstream = Upstream(server.port, path, body, timeout=self.config.stall_timeout + 60)
        ticket.on_cancel(upstream.close)
        try:
            for chunk in upstream.events(ticket):
                if environ is not None and _client_gone(environ):
                    log.info("%s: client went away; stopping its generation", server.role)
                    raise BackendError("the client closed the connection")
                yield chunk
        finally:
            ticket.on_cancel(None)
            upstream.close()


def _json_body() -> dict:
    raw = request.get_data(cache=True)
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise RequestRejected(400, "the request body is not valid UTF-8", "invalid_request") from None
    except ValueError as exc:
        raise RequestRejected(400, f"the request body is not valid JSON: {exc}", "invalid_request") from None
    if not isinstance(data, dict):
        raise RequestRejected(400, "the request body must be a JSON object", "invalid_request")
    return data


def register(app: Flask, fleet: Fleet) -> Relay:
    relay = Relay(fleet)
    app.add_url_rule("/backends/<role>/v1/messages", "messages", relay.messages, methods=["POST"])
    app.add_url_rule("/backends/<role>/v1/messages/count_tokens", "count_tokens", relay.count_tokens,
                     methods=["POST"])
    app.add_url_rule("/backends/<role>/v1/chat/completions", "chat", lambda role: relay.openai(role, "chat"),
                     methods=["POST"])
    app.add_url_rule("/backends/<role>/v1/completions", "completions",
                     lambda role: relay.openai(role, "completions"), methods=["POST"])
    return relay
