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
  (its socket is watched together with the model server's), a stop sequence matches,
  a switch's drain times out, or the watchdog restarts the server.
"""

from __future__ import annotations

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
from ..messages.openai_request import check_chat, check_common, check_completion
from ..messages.request import to_chat
from ..json_body import parse_object
from ..net import peer_closed
from . import tokens
from .admission import Overloaded, Ticket
from .fleet import Fleet
from .model_server import ModelServer, State

log = logging.getLogger("mlxgate.relay")

PING_EVERY = 10.0
SWITCH_RETRIES = 10
SILENCE_TICK = 5.0  # seconds of model-server silence after which the client gets a keep-alive
SERVER_SIDE_KEYS = ("model", "adapters", "draft_model", "role_mapping")


class BackendError(Exception):
    """The model server failed while answering (closed, crashed, or answered an error)."""


def _reject(exc: Exception) -> RequestRejected:
    if isinstance(exc, RequestRejected):
        return exc
    if isinstance(exc, BackendRefused) and exc.status == 400:
        return RequestRejected(400, str(exc), "invalid_request")
    if isinstance(exc, BackendError):
        return RequestRejected(502, str(exc), "api_error")
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


def _client_socket(environ):
    return environ.get("gunicorn.socket") if environ else None


class Upstream:
    """One streamed call to a model server on a plain socket, read line by line.

    Reading waits on the model server *and* the client at once, so a client that goes away
    is noticed even while the model server is silent (a long prompt, a tool call being
    written, tokens that are not yet text). `close` ends the call from any thread.
    """

    def __init__(self, port: int, path: str, body: dict, client=None):
        self.client = client
        self.buffer = b""
        self.last_data = time.monotonic()
        payload = json.dumps(body).encode()
        try:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
            self.sock.settimeout(None)
        except OSError as exc:
            self.sock = None
            raise BackendError(f"the model server on port {port} did not answer: {exc}") from None
        self.status = 0

    def _fill(self, ticket: Ticket) -> bool:
        """Read more from the model server; False at its end of stream."""
        while True:
            if ticket.cancel_reason:
                raise BackendError(ticket.cancel_reason)
            watched = [self.sock] + ([self.client] if self.client is not None else [])
            try:
                readable, _, _ = select.select(watched, [], [], 1.0)
            except (OSError, ValueError):
                raise BackendError(ticket.cancel_reason or "the model server connection was closed") from None
            if self.client is not None and self.client in readable and peer_closed(self.client):
                raise ClientGone()
            if not readable and not self.buffer and time.monotonic() - self.last_data > SILENCE_TICK:
                self.last_data = time.monotonic()
                self.buffer = b":\n"  # a keep-alive of our own: the caller may ping its client
                return True
            if self.sock in readable:
                try:
                    data = self.sock.recv(65536)
                except OSError as exc:
                    raise BackendError(ticket.cancel_reason or f"the model server connection failed: {exc}") \
                        from None
                if not data:
                    return False
                ticket.progress()
                self.last_data = time.monotonic()
                self.buffer += data
                return True

    def _line(self, ticket: Ticket) -> bytes | None:
        while b"\n" not in self.buffer:
            if not self._fill(ticket):
                rest, self.buffer = self.buffer, b""
                return rest or None
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def open(self, ticket: Ticket) -> None:
        """Read the status line and headers; raise `BackendError` for an error answer."""
        status_line = self._line(ticket) or b""
        parts = status_line.split()
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        while (self._line(ticket) or b"").strip():
            pass
        if self.status != 200:
            while self._fill(ticket) and len(self.buffer) < 8192:
                pass
            text = self.buffer.decode("utf-8", "replace").strip()
            try:
                text = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                pass
            raise BackendRefused(self.status, f"the model server refused the request: {text}")

    def events(self, ticket: Ticket) -> Iterator[dict | None]:
        """Chunks as dicts; None for a keep-alive (prompt progress). Ends at [DONE]."""
        self.open(ticket)
        while True:
            line = self._line(ticket)
            if line is None:
                raise BackendError(ticket.cancel_reason or "the model server closed the stream before "
                                   "the answer was complete (it may have crashed or been restarted)")
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
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


class BackendRefused(BackendError):
    """The model server answered with an error status before generating."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ClientGone(BackendError):
    """The client closed its connection: the generation is stopped, nobody is left to answer."""


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

    def _turn_steps(self, server: ModelServer, ticket: Ticket, model_path: str,
                    environ=None) -> Iterator[None]:
        """Wait for `ticket`'s turn with the model it was routed to still loaded, yielding
        every PING_EVERY seconds of waiting (a stream pings its client then). A client that
        leaves while waiting gives its place up at once.

        A switch may go first while the ticket waits: it then steps out of line, loads its
        model again (which drains the other model's requests) and steps back in at the head.
        """
        client = _client_socket(environ)
        for _ in range(SWITCH_RETRIES):
            waited = 0.0
            while not server.admission.wait(ticket, 1.0):
                if ticket.cancel_reason:
                    raise BackendError(ticket.cancel_reason)
                if client is not None and peer_closed(client):
                    raise ClientGone()
                waited += 1.0
                if waited >= PING_EVERY:
                    waited = 0.0
                    yield None
            if server.status()["path"] == model_path:
                return
            server.admission.step_out(ticket)
            try:
                self.fleet.load(ticket.model, server.role)
            finally:
                server.admission.step_in(ticket)
        raise RequestRejected(503, f"the {server.role} server switched to other models {SWITCH_RETRIES} times "
                              f"while this request waited; retry", "unavailable")

    def _turn(self, server: ModelServer, ticket: Ticket, model_path: str, environ=None) -> None:
        for _ in self._turn_steps(server, ticket, model_path, environ):
            pass

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
            check_common({"model": body.get("model")})
            status = self._model_for(server)
            input_tokens = self._check_context(status["path"], chat.body, anthropic=True)
            ticket = server.admission.join("messages", status["model"])
        except (MlxgateError, Overloaded) as exc:
            return error_response(exc, anthropic=True)
        model = str(body.get("model") or status["model"])
        translator = MessageTranslator(model, input_tokens, chat.stop_sequences)
        if chat.stream:
            return self._streamed(server, ticket, True,
                                  self._message_stream(server, ticket, status["path"], chat.body, translator))
        environ = request.environ
        try:
            self._turn(server, ticket, status["path"], environ)
            events = translator.start()
            for chunk in self._generate(server, ticket, chat.body, environ):
                if chunk is not None:
                    events += translator.feed(chunk)
                    if translator.stopped:
                        break
            events += translator.finish()
        except (MlxgateError, BackendError) as exc:
            return error_response(exc, anthropic=True)
        finally:
            server.admission.release(ticket)
        message = assemble(events)
        return Response(json.dumps(message), mimetype="application/json")

    def _message_stream(self, server, ticket, path, chat, translator) -> Iterator[bytes]:
        for name, data in translator.start():
            yield sse(name, data)
        for _ in self._turn_steps(server, ticket, path, request.environ):
            yield sse("ping", {"type": "ping"})
        last_ping = time.monotonic()
        for chunk in self._generate(server, ticket, chat, request.environ):
            if chunk is None:
                if time.monotonic() - last_ping > 2:  # a long prompt or a silent model: keep it waiting
                    last_ping = time.monotonic()
                    yield sse("ping", {"type": "ping"})
                continue
            out = b"".join(sse(n, d) for n, d in translator.feed(chunk))
            if out:
                yield out
            if translator.stopped:
                break
        yield b"".join(sse(n, d) for n, d in translator.finish())

    def _streamed(self, server: ModelServer, ticket: Ticket, anthropic: bool,
                  produce: Iterator[bytes]) -> Response:
        """A streamed answer whose failures arrive as the API's own error event, and whose
        ticket is given back however it ends."""
        def guarded() -> Iterator[bytes]:
            try:
                yield from produce
            except ClientGone:
                return  # nobody is left to tell
            except (MlxgateError, BackendError) as exc:
                rejected = _reject(exc)
                log.warning("%s stream ended with an error: %s", server.role, rejected)
                payload = error_body(anthropic, rejected.kind, str(rejected))
                yield sse("error", json.loads(payload)) if anthropic else b"data: " + payload + b"\n\n"
            finally:
                server.admission.release(ticket)
        return Response(stream_with_context(guarded()), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache"})

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
            (check_chat if chat else check_completion)(body)
            wants_stream = bool(body.get("stream"))
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            # mlx_lm.server loads whatever a request names (and unloads the current model first when
            # that fails): the model server serves its loaded model and nothing else.
            upstream = {k: v for k, v in body.items() if k not in SERVER_SIDE_KEYS}
            upstream.update(stream=True, stream_options={"include_usage": True})
            status = self._model_for(server)
            if chat:
                self._check_context(status["path"], upstream, anthropic=False)
            ticket = server.admission.join(kind, status["model"])
        except (MlxgateError, Overloaded) as exc:
            return error_response(exc, anthropic=False)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if wants_stream:
            return self._streamed(server, ticket, False,
                                  self._openai_stream(server, ticket, status["path"], path, upstream, wants_usage))
        environ = request.environ
        chunks = []
        try:
            self._turn(server, ticket, status["path"], environ)
            chunks = [c for c in self._generate(server, ticket, upstream, environ, path) if c is not None]
        except (MlxgateError, BackendError) as exc:
            return error_response(exc, anthropic=False)
        finally:
            server.admission.release(ticket)
        return Response(json.dumps(assemble_chat(chunks, chat)), mimetype="application/json")

    def _openai_stream(self, server, ticket, model_path, path, body, wants_usage) -> Iterator[bytes]:
        self._turn(server, ticket, model_path, request.environ)
        for chunk in self._generate(server, ticket, body, request.environ, path):
            if chunk is None:
                yield b": keepalive\n\n"
            elif chunk.get("choices") or wants_usage:
                yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    def _generate(self, server: ModelServer, ticket: Ticket, body: dict, environ,
                  path: str = "/v1/chat/completions") -> Iterator[dict | None]:
        """Stream from the model server; stop it as soon as the client is gone."""
        upstream = Upstream(server.port, path, body, _client_socket(environ))
        ticket.on_cancel(upstream.close)
        try:
            yield from upstream.events(ticket)
        except ClientGone:
            log.info("%s: the client went away; its generation is stopped", server.role)
            raise
        finally:
            ticket.on_cancel(None)
            upstream.close()


def _json_body() -> dict:
    try:
        return parse_object(request.get_data(cache=True))
    except ValueError as exc:
        raise RequestRejected(400, str(exc), "invalid_request") from None


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
