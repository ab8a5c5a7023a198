"""The relay: where the proxy hands a request for a local model, after the hooks ran.

    /backends/<server>/v1/messages               Anthropic Messages (translated here)
    /backends/<server>/v1/messages/count_tokens  exact prompt tokens
    /backends/<server>/v1/chat/completions       OpenAI chat
    /backends/<server>/v1/completions            OpenAI text completions
    /backends/<server>/v1/responses              OpenAI Responses (translated here)
    /backends/<server>/v1/responses/input_tokens exact prompt tokens of a Responses request
    /responses/<id>[/input_items]                stored responses (GET, DELETE), whichever server

Every request to a model server passes here, and its queue is the one place it waits:
- the body is checked against its API's contract and translated (Anthropic Messages and
  the Responses API next to the model's own tokenizer), and the prompt counted against
  the model's context window, all before anything is sent back;
- it joins the server's queue (full queue: 529 / 503 at once) for the model the proxy
  named (header `x-mlxgate-model`); when its turn comes and another model is loaded, the
  switch happens then, inside the queue;
- it is cancellable: the relay always reads a *stream* from `mlx_lm.server`, which stops
  generating when its reader goes away, and it goes away as soon as the client does
  (its socket is watched together with the model server's), a stop sequence matches,
  a switch's drain times out, or the watchdog restarts the server.
Errors before the answer starts are shaped by the one table (`api_errors`); a stream that
has started ends with the API's error event.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

from flask import Flask, Response, request, stream_with_context

from .. import relay_protocol as paths
from ..api_errors import ANTHROPIC, OPENAI, RESPONSES, error_event, exception_response, kind_of
from ..catalog import LocalModel, context_length
from ..errors import BackendError, MlxgateError, RequestRejected, Unavailable
from ..json_body import dump, parse_object
from ..messages.chat import assemble_chat
from ..messages.events import MessageTranslator, assemble, sse
from ..messages.openai_request import check_chat, check_completion
from ..messages.request import to_chat
from ..net import peer_closed
from ..responses import events as response_events
from ..responses.request import ResponsesRequest, response_object, to_chat as responses_to_chat
from ..responses.store import ResponseStore
from . import tokens
from .admission import Ticket
from .fleet import Fleet
from .listen import SOCKET_KEY  # the client connection of a request that came over the host listener
from .model_server import ModelServer
from .recorder import Recorder
from .tally import Tally
from .upstream import ClientGone, Upstream

log = logging.getLogger("mlxgate.relay")

PING_EVERY = 10.0
SWITCH_RETRIES = 10
SERVER_SIDE_KEYS = ("model", "adapters", "draft_model")  # the model server serves its own model only


@dataclass
class Job:
    """One admitted request: the server and place in its queue, the model that must answer,
    and what goes to the model server."""

    server: ModelServer
    ticket: Ticket
    body: dict
    path: str
    client: socket.socket | None
    tally: Tally


class Relay:
    def __init__(self, fleet: Fleet, recorder: Recorder | None = None, store: ResponseStore | None = None):
        self.fleet = fleet
        self.recorder = recorder
        self.store = store or ResponseStore(fleet.config.home / "responses")

    # ------------------------------------------------------------------ the record of each request
    def _tally(self, api: str, route: str, role: str) -> Tally:
        detail = request.get_data(as_text=True)[:20000] if self.fleet.config.detailed_debug else ""
        tally = Tally(api, route, request.headers, role, detail)
        tally.record.requested_model = request.headers.get(paths.REQUESTED_HEADER, "")
        return tally

    def _done(self, tally: Tally) -> None:
        if self.recorder is not None:
            self.recorder.add(tally.finish())

    def _refuse(self, tally: Tally, api: str, exc: BaseException) -> Response:
        """The error answer for `exc`, recorded."""
        status, headers, body = exception_response(api, exc)
        tally.failed(exc, status)
        tally.record.cancelled = isinstance(exc, ClientGone)
        self._done(tally)
        return Response(body, status=status, headers=headers)

    def _finish(self, job: Job) -> None:
        job.server.admission.release(job.ticket)
        self._done(job.tally)

    # ------------------------------------------------------------------ admission
    def _server(self, role: str) -> ModelServer:
        if role not in self.fleet.servers:
            raise RequestRejected(404, f"no model server named {role!r}; expected one of "
                                  f"{', '.join(self.fleet.servers)}", "not_found")
        return self.fleet.servers[role]

    def _model(self, role: str) -> LocalModel:
        return self.fleet.model(role, request.headers.get(paths.MODEL_HEADER))

    def _fit_context(self, tally: Tally, model: LocalModel, chat: dict, api: str) -> int:
        """The prompt's tokens; 400 when it does not fit the window, `max_tokens` lowered to what does."""
        started = time.perf_counter()
        count = tokens.count_chat(model.path, chat)
        tally.counting_ms = (time.perf_counter() - started) * 1000
        limit = context_length(model.path)
        if limit:
            if count >= limit:
                raise RequestRejected(400, f"prompt is too long: {count} tokens > {limit} maximum"
                                      if api == ANTHROPIC else
                                      f"This model's maximum context length is {limit} tokens. However, your "
                                      f"messages resulted in {count} tokens. Please reduce the length of the "
                                      f"messages.", "context_length_exceeded")
            if chat.get("max_tokens") and count + chat["max_tokens"] > limit:
                chat["max_tokens"] = limit - count
        return count

    def _join(self, server: ModelServer, route: str, model: LocalModel, body: dict, path: str,
              tally: Tally) -> Job:
        tally.record.served_model = model.name
        ticket = server.admission.join(route, model)
        client = request.environ.get("gunicorn.socket") or request.environ.get(SOCKET_KEY)
        return Job(server, ticket, body, path, client, tally)

    # ------------------------------------------------------------------ turn and generation
    def _turn(self, job: Job) -> Iterator[None]:
        """Wait for the job's turn with its model serving, yielding every PING_EVERY seconds
        of waiting (a stream pings its client then). A client that leaves gives its place up.

        When the turn comes and another model is serving, the job steps out of line and
        loads its model (which first drains the other model's requests; jobs wanting the
        same model share the load), then steps back in at the head.
        """
        server, ticket = job.server, job.ticket
        for _ in range(SWITCH_RETRIES):
            yield from self._waiting(job, lambda: server.admission.wait(ticket, 1.0))
            serving = server.serving()
            if serving is not None and serving.path == ticket.model.path:
                return
            server.admission.step_out(ticket)
            try:
                yield from self._waiting(job, _in_background(lambda: server.ensure(ticket.model)))
            finally:
                server.admission.step_in(ticket)
        raise Unavailable(f"the {server.role} server switched to other models {SWITCH_RETRIES} times while "
                          f"this request waited; retry")

    @staticmethod
    def _waiting(job: Job, done: Callable[[], bool]) -> Iterator[None]:
        """Call `done` (it waits up to a second) until it says so; between calls, give up if
        the request was cancelled or its client left, and yield every PING_EVERY seconds."""
        waited = 0.0
        while not done():
            if job.ticket.cancel_reason:
                raise BackendError(job.ticket.cancel_reason)
            if job.client is not None and peer_closed(job.client):
                raise ClientGone("the client went away while waiting")
            waited += 1.0
            if waited >= PING_EVERY:
                waited = 0.0
                yield None

    def _generate(self, job: Job) -> Iterator[dict | None]:
        """Stream from the model server; stop it as soon as the client is gone."""
        process = job.server.process
        if process is None:
            raise BackendError(f"the {job.server.role} model server is not running")
        job.tally.generation_starts()
        upstream = Upstream(job.server.port, job.path, job.body, process.auth_header, job.client)
        job.ticket.on_cancel(upstream.close)
        try:
            for chunk in upstream.events(job.ticket):
                if chunk is not None:
                    job.tally.chunk(chunk)
                yield chunk
        except ClientGone:
            log.info("%s: the client went away; its generation is stopped", job.server.role)
            raise
        finally:
            job.ticket.on_cancel(None)
            upstream.close()

    def _answer(self, api: str, job: Job, build: Callable[[Iterator[dict | None]], dict]) -> Response:
        """A non-streamed answer: wait, generate, build the JSON."""
        failure = None
        try:
            for _ in self._turn(job):
                pass
            with contextlib.closing(self._generate(job)) as chunks:
                answer = build(chunks)
        except MlxgateError as exc:
            failure = exc
        except Exception as exc:  # a bug: the client gets a 500 without its text, the log the traceback
            log.exception("%s: the answer failed", job.server.role)
            failure = _unexpected(exc)
        finally:
            job.server.admission.release(job.ticket)
        if failure is not None:
            return self._refuse(job.tally, api, failure)
        self._done(job.tally)
        return Response(dump(answer), mimetype="application/json",
                        headers={"Server-Timing": job.tally.server_timing()})

    def _stream(self, api: str, job: Job, produce: Iterator[bytes],
                failure: Callable[[str, str], bytes] | None = None) -> Response:
        """A streamed answer whose failures arrive as the API's own error event (`failure`
        of the kind and message, when the API's translation has its own), and whose place
        in the queue is given back however it ends."""
        def guarded() -> Iterator[bytes]:
            try:
                yield from produce
            except ClientGone:
                job.tally.record.cancelled = True  # nobody is left to tell
            except MlxgateError as exc:
                kind, _ = kind_of(exc)
                job.tally.failed(exc)
                log.warning("%s stream ended with an error: %s", job.server.role, exc)
                yield (failure or partial(error_event, api))(kind, str(exc))
            except GeneratorExit:  # the client left while we were sending
                job.tally.record.cancelled = True
                raise
            except Exception as exc:  # a bug: end the stream in the API's shape, the log has the traceback
                log.exception("%s stream failed", job.server.role)
                failed = _unexpected(exc)
                job.tally.failed(failed)
                yield (failure or partial(error_event, api))("backend_error", str(failed))
            finally:
                self._finish(job)
        return Response(stream_with_context(guarded()), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ Anthropic Messages
    def messages(self, role: str) -> Response:
        tally = self._tally(ANTHROPIC, "anthropic_messages", role)
        try:
            server = self._server(role)
            body = _json_body()
            chat = to_chat(body)
            tally.record.stream = chat.stream
            model = self._model(role)
            input_tokens = self._fit_context(tally, model, chat.body, ANTHROPIC)
            job = self._join(server, "messages", model, chat.body, paths.CHAT, tally)
        except MlxgateError as exc:
            return self._refuse(tally, ANTHROPIC, exc)
        translator = MessageTranslator(str(body.get("model") or model.name), input_tokens, chat.stop_sequences)
        if chat.stream:
            return self._stream(ANTHROPIC, job, self._message_events(job, translator))

        def build(chunks) -> dict:
            events = translator.start()
            for chunk in chunks:
                if chunk is not None:
                    events += translator.feed(chunk)
                    if translator.stopped:
                        break
            return assemble(events + translator.finish())
        return self._answer(ANTHROPIC, job, build)

    def _message_events(self, job: Job, translator: MessageTranslator) -> Iterator[bytes]:
        for name, data in translator.start():
            yield sse(name, data)
        for _ in self._turn(job):
            yield sse("ping", {"type": "ping"})
        last_ping = time.monotonic()
        with contextlib.closing(self._generate(job)) as chunks:
            for chunk in chunks:
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

    def count_tokens(self, role: str) -> Response:
        tally = self._tally(ANTHROPIC, "count_tokens", role)
        try:
            self._server(role)
            chat = to_chat({"max_tokens": 1, **_json_body()})
            model = self._model(role)
            tally.record.served_model = model.name
            count = tokens.count_chat(model.path, chat.body)
        except MlxgateError as exc:
            return self._refuse(tally, ANTHROPIC, exc)
        self._done(tally)
        return Response(json.dumps({"input_tokens": count}), mimetype="application/json")

    # ------------------------------------------------------------------ OpenAI
    def openai(self, role: str, kind: str) -> Response:
        chat = kind == "chat"
        tally = self._tally(OPENAI, "chat_completions" if chat else "completions", role)
        try:
            server = self._server(role)
            body = _json_body()
            (check_chat if chat else check_completion)(body)
            wants_stream = tally.record.stream = bool(body.get("stream"))
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            upstream = {k: v for k, v in body.items() if k not in SERVER_SIDE_KEYS}
            upstream.update(stream=True, stream_options={"include_usage": True})
            model = self._model(role)
            if chat:
                self._fit_context(tally, model, upstream, OPENAI)
            job = self._join(server, kind, model, upstream, paths.CHAT if chat else paths.COMPLETIONS, tally)
        except MlxgateError as exc:
            return self._refuse(tally, OPENAI, exc)
        if wants_stream:
            return self._stream(OPENAI, job, self._openai_events(job, wants_usage))
        return self._answer(OPENAI, job, lambda chunks: assemble_chat([c for c in chunks if c is not None], chat))

    def _openai_events(self, job: Job, wants_usage: bool) -> Iterator[bytes]:
        for _ in self._turn(job):
            yield b": keepalive\n\n"
        with contextlib.closing(self._generate(job)) as chunks:
            for chunk in chunks:
                if chunk is None:
                    yield b": keepalive\n\n"
                elif chunk.get("choices") or wants_usage:
                    yield b"data: " + dump(chunk) + b"\n\n"
        yield b"data: [DONE]\n\n"

    # ------------------------------------------------------------------ OpenAI Responses
    def _responses_request(self, role: str, body: dict) -> tuple[ResponsesRequest, list[dict], LocalModel]:
        """The request translated, with the chain it continues, and the model that answers."""
        earlier = self.store.history(body.get("previous_response_id"))
        return responses_to_chat(body, earlier), earlier, self._model(role)

    def responses(self, role: str) -> Response:
        tally = self._tally(OPENAI, "responses", role)
        try:
            server = self._server(role)
            translated, earlier, model = self._responses_request(role, _json_body())
            tally.record.stream = translated.stream
            input_tokens = self._fit_context(tally, model, translated.chat, RESPONSES)
            job = self._join(server, "responses", model, translated.chat, paths.CHAT, tally)
        except MlxgateError as exc:
            return self._refuse(tally, RESPONSES, exc)
        response = response_object(translated)
        response["model"] = response["model"] or model.name
        translator = response_events.ResponseTranslator(response, translated.tools, translated.max_calls,
                                                         input_tokens)

        def keep() -> None:
            if translated.store and translator.done:
                self.store.save(translator.response, translated.items, earlier)

        if translated.stream:
            def failed(kind: str, message: str) -> bytes:
                return response_events.encode(translator.failed(kind, message))
            return self._stream(RESPONSES, job, self._response_events(job, translator, keep), failed)

        def build(chunks) -> dict:
            translator.start()
            for chunk in chunks:
                if chunk is not None:
                    translator.feed(chunk)
            translator.finish()
            keep()
            return translator.response
        return self._answer(RESPONSES, job, build)

    def _response_events(self, job: Job, translator: response_events.ResponseTranslator,
                         keep: Callable[[], None]) -> Iterator[bytes]:
        yield response_events.encode(translator.start())
        for _ in self._turn(job):
            yield response_events.KEEPALIVE
        with contextlib.closing(self._generate(job)) as chunks:
            for chunk in chunks:
                if chunk is None:
                    yield response_events.KEEPALIVE
                    continue
                out = response_events.encode(translator.feed(chunk))
                if out:
                    yield out
        last = translator.finish()
        keep()  # before the last event: a client may chain on it at once
        yield response_events.encode(last)

    def response_input_tokens(self, role: str) -> Response:
        tally = self._tally(OPENAI, "responses_input_tokens", role)
        try:
            self._server(role)
            translated, _, model = self._responses_request(role, _json_body())
            tally.record.served_model = model.name
            count = tokens.count_chat(model.path, translated.chat)
        except MlxgateError as exc:
            return self._refuse(tally, OPENAI, exc)
        self._done(tally)
        return Response(json.dumps({"object": "response.input_tokens", "input_tokens": count}),
                        mimetype="application/json")

    def stored(self, response_id: str) -> Response:
        if request.method == "DELETE":
            return Response(json.dumps(self.store.delete(response_id)), mimetype="application/json")
        return Response(dump(self.store.record(response_id)["response"]), mimetype="application/json")

    def stored_input_items(self, response_id: str) -> Response:
        order = request.args.get("order", "desc")
        limit = request.args.get("limit", "20")
        if order not in ("asc", "desc"):
            raise RequestRejected(400, f"order: Input should be 'asc' or 'desc', got {order!r}")
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise RequestRejected(400, f"limit: Input should be an integer from 1 to 100, got {limit!r}")
        page = self.store.input_items(response_id, order, int(limit), request.args.get("after"))
        return Response(dump(page), mimetype="application/json")


def _in_background(call: Callable[[], object]) -> Callable[[], bool]:
    """Start `call` in a thread; the returned function waits up to a second and says whether
    it has finished (raising what it raised)."""
    outcome: dict = {}

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the waiting request
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="relay-load", daemon=True)
    thread.start()

    def done() -> bool:
        thread.join(1.0)
        if thread.is_alive():
            return False
        if "error" in outcome:
            raise outcome["error"]
        return True
    return done


def _unexpected(exc: Exception) -> BackendError:
    """What the client is told of a failure that is a bug: its kind, never its text."""
    return BackendError(f"the answer failed ({type(exc).__name__}); `mlxgate logs wrapper` has the traceback")


def _json_body() -> dict:
    try:
        return parse_object(request.get_data(cache=True))
    except ValueError as exc:
        raise RequestRejected(400, str(exc), "invalid_request") from None


def register(app: Flask, fleet: Fleet, recorder: Recorder | None = None) -> Relay:
    relay = Relay(fleet, recorder)
    app.add_url_rule(paths.relay_path("<role>", paths.MESSAGES), "messages", relay.messages, methods=["POST"])
    app.add_url_rule(paths.relay_path("<role>", paths.COUNT_TOKENS), "count_tokens", relay.count_tokens,
                     methods=["POST"])
    app.add_url_rule(paths.relay_path("<role>", paths.CHAT), "chat", lambda role: relay.openai(role, "chat"),
                     methods=["POST"])
    app.add_url_rule(paths.relay_path("<role>", paths.COMPLETIONS), "completions",
                     lambda role: relay.openai(role, "completions"), methods=["POST"])
    app.add_url_rule(paths.relay_path("<role>", paths.RESPONSES), "responses", relay.responses, methods=["POST"])
    app.add_url_rule(paths.relay_path("<role>", paths.RESPONSE_INPUT_TOKENS), "response_input_tokens",
                     relay.response_input_tokens, methods=["POST"])
    app.add_url_rule(f"{paths.STORED_RESPONSES}/<response_id>", "stored_response", relay.stored,
                     methods=["GET", "DELETE"])
    app.add_url_rule(f"{paths.STORED_RESPONSES}/<response_id>/input_items", "stored_input_items",
                     relay.stored_input_items, methods=["GET"])
    return relay
