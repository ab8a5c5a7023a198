"""The relay: where the proxy hands a request for a local model, after the hooks ran.

    /backends/<server>/v1/messages               Anthropic Messages (translated here)
    /backends/<server>/v1/messages/count_tokens  exact prompt tokens
    /backends/<server>/v1/chat/completions       OpenAI chat
    /backends/<server>/v1/completions            OpenAI text completions
    /backends/<server>/v1/responses              OpenAI Responses (translated here)
    /backends/<server>/v1/responses/input_tokens exact prompt tokens of a Responses request
    /responses/<id>[/input_items]                stored responses (GET, DELETE), whichever server

It reads a `Call` and returns an `Answer` (`exchange`), whichever server received the
request: its doors (`doors`: the proxies' Unix socket, the host listener) or the
management port (gunicorn and Flask, `app`).

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
import re
import socket
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

from .. import relay_protocol as paths
from ..api_errors import ANTHROPIC, OPENAI, RESPONSES, error_event, error_response, exception_response, kind_of
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
from .exchange import Answer, Call, Stream
from .fleet import Fleet
from .model_server import ModelServer
from .recorder import Recorder
from .tally import Tally
from .upstream import ClientGone, Upstream

log = logging.getLogger("mlxgate.relay")

PING_EVERY = 10.0
SWITCH_RETRIES = 10
SERVER_SIDE_KEYS = ("model", "adapters", "draft_model")  # the model server serves its own model only
BACKEND_PATH = re.compile(r"/backends/([^/]+)(/v1/[a-z_/]+)")
STORED_PATH = re.compile(paths.STORED_RESPONSES + r"/([^/]+)(/input_items)?")
JSON = ("content-type", "application/json")


def api_of(path: str) -> str:
    """Whose error shape a relay path answers in (Anthropic's for /v1/messages...)."""
    return ANTHROPIC if path.startswith("/backends/") and "/v1/messages" in path else OPENAI


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
        self._api_routes: dict[str, Callable[[Call, str], Answer]] = {
            paths.MESSAGES: self.messages, paths.COUNT_TOKENS: self.count_tokens,
            paths.CHAT: lambda call, role: self.openai(call, role, "chat"),
            paths.COMPLETIONS: lambda call, role: self.openai(call, role, "completions"),
            paths.RESPONSES: self.responses, paths.RESPONSE_INPUT_TOKENS: self.response_input_tokens}

    # ------------------------------------------------------------------ routing
    def route(self, call: Call) -> Answer | None:
        """The relay's answer to `call`; None when its path is not one of the relay's."""
        backend = BACKEND_PATH.fullmatch(call.path)
        if backend is not None:
            name, api_path = backend.groups()  # name: the model server's role
            handle = self._api_routes.get(api_path)
            allowed = ("POST",)
        else:
            stored = STORED_PATH.fullmatch(call.path)
            if stored is None:
                return None
            name, items = stored.groups()  # name: the response's id
            handle = self.stored_input_items if items else self.stored
            allowed = ("GET", "HEAD") if items else ("GET", "HEAD", "DELETE")
        if handle is None:
            return None
        api = api_of(call.path)
        if call.method not in allowed:
            return Answer(*error_response(api, "invalid_request", f"{call.method} is not allowed on {call.path}; "
                                                                  f"use {' or '.join(allowed)}", 405))
        try:
            return handle(call, name)
        except MlxgateError as exc:
            log.warning("%s %s: %s", call.method, call.path, exc)
            return Answer(*exception_response(api, exc))
        except Exception as exc:  # a bug: the log has the traceback, the client its kind
            log.exception("unexpected error in %s %s", call.method, call.path)
            return Answer(*error_response(api, "api_error", str(_unexpected(exc))))

    # ------------------------------------------------------------------ the record of each request
    def _tally(self, call: Call, api: str, route: str, role: str) -> Tally:
        detail = call.body.decode("utf-8", "replace")[:20000] if self.fleet.config.detailed_debug else ""
        tally = Tally(api, route, call.headers, role, detail)
        tally.record.requested_model = call.headers.get(paths.REQUESTED_HEADER, "")
        return tally

    def _done(self, tally: Tally) -> None:
        if self.recorder is not None:
            self.recorder.add(tally.finish())

    def _refuse(self, tally: Tally, api: str, exc: BaseException) -> Answer:
        """The error answer for `exc`, recorded."""
        answer = Answer(*exception_response(api, exc))
        tally.failed(exc, answer.status)
        tally.record.cancelled = isinstance(exc, ClientGone)
        self._done(tally)
        return answer

    def _finish(self, job: Job) -> None:
        job.server.admission.release(job.ticket)
        self._done(job.tally)

    # ------------------------------------------------------------------ admission
    def _server(self, role: str) -> ModelServer:
        if role not in self.fleet.servers:
            raise RequestRejected(404, f"no model server named {role!r}; expected one of "
                                  f"{', '.join(self.fleet.servers)}", "not_found")
        return self.fleet.servers[role]

    def _model(self, call: Call, role: str) -> LocalModel:
        return self.fleet.model(role, call.headers.get(paths.MODEL_HEADER))

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

    def _join(self, call: Call, server: ModelServer, route: str, model: LocalModel, body: dict, path: str,
              tally: Tally) -> Job:
        tally.record.served_model = model.name
        ticket = server.admission.join(route, model)
        return Job(server, ticket, body, path, call.client, tally)

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
        upstream = Upstream(process, job.path, job.body, job.client)
        process.open_spares()  # for the next requests, while the model server works on this one
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

    def _answer(self, api: str, job: Job, build: Callable[[Iterator[dict | None]], dict]) -> Answer:
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
        return Answer(200, [JSON, ("server-timing", job.tally.server_timing())], dump(answer))

    def _stream(self, api: str, job: Job, produce: Iterator[bytes],
                failure: Callable[[str, str], bytes] | None = None) -> Answer:
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

        def abandoned() -> None:  # the caller left before the stream started
            job.tally.record.cancelled = True
            self._finish(job)
        return Answer(200, [("content-type", "text/event-stream"), ("cache-control", "no-cache")],
                      Stream(guarded(), abandoned))

    # ------------------------------------------------------------------ Anthropic Messages
    def messages(self, call: Call, role: str) -> Answer:
        tally = self._tally(call, ANTHROPIC, "anthropic_messages", role)
        try:
            server = self._server(role)
            body = _json_body(call)
            chat = to_chat(body)
            tally.record.stream = chat.stream
            model = self._model(call, role)
            input_tokens = self._fit_context(tally, model, chat.body, ANTHROPIC)
            job = self._join(call, server, "messages", model, chat.body, paths.CHAT, tally)
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

    def count_tokens(self, call: Call, role: str) -> Answer:
        tally = self._tally(call, ANTHROPIC, "count_tokens", role)
        try:
            self._server(role)
            chat = to_chat({"max_tokens": 1, **_json_body(call)})
            model = self._model(call, role)
            tally.record.served_model = model.name
            count = tokens.count_chat(model.path, chat.body)
        except MlxgateError as exc:
            return self._refuse(tally, ANTHROPIC, exc)
        self._done(tally)
        return Answer(200, [JSON], json.dumps({"input_tokens": count}).encode())

    # ------------------------------------------------------------------ OpenAI
    def openai(self, call: Call, role: str, kind: str) -> Answer:
        chat = kind == "chat"
        tally = self._tally(call, OPENAI, "chat_completions" if chat else "completions", role)
        try:
            server = self._server(role)
            body = _json_body(call)
            (check_chat if chat else check_completion)(body)
            wants_stream = tally.record.stream = bool(body.get("stream"))
            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            upstream = {k: v for k, v in body.items() if k not in SERVER_SIDE_KEYS}
            upstream.update(stream=True, stream_options={"include_usage": True})
            model = self._model(call, role)
            if chat:
                self._fit_context(tally, model, upstream, OPENAI)
            job = self._join(call, server, kind, model, upstream, paths.CHAT if chat else paths.COMPLETIONS, tally)
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
    def _responses_request(self, call: Call, role: str) -> tuple[ResponsesRequest, list[dict], LocalModel]:
        """The request translated, with the chain it continues, and the model that answers."""
        body = _json_body(call)
        earlier = self.store.history(body.get("previous_response_id"))
        return responses_to_chat(body, earlier), earlier, self._model(call, role)

    def responses(self, call: Call, role: str) -> Answer:
        tally = self._tally(call, OPENAI, "responses", role)
        try:
            server = self._server(role)
            translated, earlier, model = self._responses_request(call, role)
            tally.record.stream = translated.stream
            input_tokens = self._fit_context(tally, model, translated.chat, RESPONSES)
            job = self._join(call, server, "responses", model, translated.chat, paths.CHAT, tally)
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

    def response_input_tokens(self, call: Call, role: str) -> Answer:
        tally = self._tally(call, OPENAI, "responses_input_tokens", role)
        try:
            self._server(role)
            translated, _, model = self._responses_request(call, role)
            tally.record.served_model = model.name
            count = tokens.count_chat(model.path, translated.chat)
        except MlxgateError as exc:
            return self._refuse(tally, OPENAI, exc)
        self._done(tally)
        return Answer(200, [JSON], json.dumps({"object": "response.input_tokens", "input_tokens": count}).encode())

    def stored(self, call: Call, response_id: str) -> Answer:
        if call.method == "DELETE":
            return Answer(200, [JSON], dump(self.store.delete(response_id)))
        return Answer(200, [JSON], dump(self.store.record(response_id)["response"]))

    def stored_input_items(self, call: Call, response_id: str) -> Answer:
        order = call.args.get("order", "desc")
        limit = call.args.get("limit", "20")
        if order not in ("asc", "desc"):
            raise RequestRejected(400, f"order: Input should be 'asc' or 'desc', got {order!r}")
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise RequestRejected(400, f"limit: Input should be an integer from 1 to 100, got {limit!r}")
        page = self.store.input_items(response_id, order, int(limit), call.args.get("after"))
        return Answer(200, [JSON], dump(page))


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


def _json_body(call: Call) -> dict:
    try:
        return parse_object(call.body)
    except ValueError as exc:
        raise RequestRejected(400, str(exc), "invalid_request") from None
