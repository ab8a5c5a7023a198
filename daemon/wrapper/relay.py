"""The relay: where the proxy hands a request for a local model, after the hooks ran.

    /relay/v1/messages               Anthropic Messages (translated here)
    /relay/v1/messages/count_tokens  exact prompt tokens
    /relay/v1/chat/completions       OpenAI chat
    /relay/v1/completions            OpenAI text completions
    /relay/v1/responses              OpenAI Responses (translated here)
    /relay/v1/responses/input_tokens exact prompt tokens of a Responses request
    /relay/v1/ollama/...             Ollama's chat, generate, embed, embeddings and show (translated here)
    /responses/<id>[/input_items]    stored responses (GET, DELETE)

The model is the one the header `x-mlxgate-model` names (the hooks decided it). The relay
reads a `Call` and returns an `Answer` (`exchange`), whichever server received the request:
its doors (`doors`: the proxies' Unix socket, the host listener) or the management port
(gunicorn and Flask, `app`).

Every request to a model server passes here, on one path fed by one small factory per API
(`apis`), and the model's queue is the one place it waits:
- the factory checks the body against its API's contract and translates it, and the prompt
  is counted against the model's window, all before anything is sent back;
- a model that can never fit in the memory budget is refused at once; otherwise the
  request joins its model's queue (full queue: 529 / 503 at once); when its turn comes and
  the model is not loaded, it loads then, inside the queue (making room in the resident set
  first, see `fleet`);
- it is cancellable: the relay always reads a *stream* from `mlx_lm.server`, which stops
  generating when its reader goes away, and it goes away as soon as the client does
  (its socket is watched together with the model server's), a stop sequence matches,
  an unload's drain times out, or the watchdog restarts the server.
Errors before the answer starts are shaped by the one table (`api_errors`); a stream that
has started ends with the API's error event.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

from .. import relay_protocol as paths
from ..api_errors import OPENAI, error_body, error_event, error_response, exception_response, kind_of
from ..api_paths import family_of
from ..errors import BackendError, MlxgateError, RequestRejected, Unavailable
from ..json_body import dump, parse_object
from ..model_kinds import VISION
from ..net import peer_closed
from ..responses.store import ResponseStore
from ..vision.images import FetchPolicy
from . import apis, kinds
from .admission import Ticket
from .exchange import Answer, Call, Stream
from .fleet import Fleet
from .model_server import ModelServer
from .recorder import Recorder
from .server_process import ServerProcess
from .tally import Tally
from .upstream import ClientGone, Upstream

log = logging.getLogger("mlxgate.relay")

PING_EVERY = 10.0     # seconds of waiting for a turn or a load between a stream's keep-alives
SILENT_PING = 2.0     # seconds of a silent model (a long prompt) between a stream's keep-alives
LOAD_RETRIES = 10
RELAY_PATH = re.compile(re.escape(paths.RELAY_PREFIX) + r"(/v1/[a-z_/]+)")
STORED_PATH = re.compile(paths.STORED_RESPONSES + r"/([^/]+)(/input_items)?")
JSON = ("content-type", "application/json")


@dataclass
class Job:
    """One admitted request: its model's server and place in its queue, and what goes to the
    model server."""

    server: ModelServer
    ticket: Ticket
    plan: apis.Plan
    client: socket.socket | None
    tally: Tally


class Relay:
    def __init__(self, fleet: Fleet, recorder: Recorder | None = None, store: ResponseStore | None = None):
        self.fleet = fleet
        self.recorder = recorder
        self.store = store or ResponseStore(fleet.config.home / "responses")
        self.fetch = FetchPolicy.of(fleet.config.image_fetch_allow)

    # ------------------------------------------------------------------ routing
    def route(self, call: Call) -> Answer | None:
        """The relay's answer to `call`; None when its path is not one of the relay's."""
        relayed = RELAY_PATH.fullmatch(call.path)
        if relayed is not None:
            api_path = relayed.group(1)
            row = apis.ROWS.get(api_path)
            if row is None:
                return None
            handle = partial(getattr(self, row.way), row, api_path=api_path)
            allowed, api = ("POST",), row.api
        else:
            stored = STORED_PATH.fullmatch(call.path)
            if stored is None:
                return None
            response_id, items = stored.groups()
            handle = partial(self.stored_input_items if items else self.stored, response_id=response_id)
            allowed, api = (("GET", "HEAD") if items else ("GET", "HEAD", "DELETE")), OPENAI
        if call.method not in allowed:
            return Answer(*error_response(api, "invalid_request", f"{call.method} is not allowed on {call.path}; "
                                                                  f"use {' or '.join(allowed)}", 405))
        try:
            return handle(call)
        except MlxgateError as exc:
            log.warning("%s %s: %s", call.method, call.path, exc)
            return Answer(*exception_response(api, exc))
        except Exception as exc:  # a bug: the log has the traceback, the client its kind
            log.exception("unexpected error in %s %s", call.method, call.path)
            return Answer(*error_response(api, "api_error", str(_unexpected(exc))))

    # ------------------------------------------------------------------ the record of each request
    def _tally(self, call: Call, row: apis.Row) -> Tally:
        detail = call.body.decode("utf-8", "replace")[:20000] if self.fleet.config.detailed_debug else ""
        tally = Tally(family_of(row.api), row.route, call.headers, "local", detail)
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
    def _server(self, call: Call) -> ModelServer:
        """The server of the model the call names."""
        name = call.headers.get(paths.MODEL_HEADER)
        if not name:
            raise RequestRejected(400, f"the relay needs the {paths.MODEL_HEADER} header: the local model "
                                  f"that answers (the proxy sends it)")
        return self.fleet.server_for(name)

    def _context(self, server: ModelServer, tally: Tally, api_path: str) -> apis.Context:
        tally.record.served_model = server.model.name
        refused = kinds.refusal(server.kind, server.model.name, api_path)
        if refused:
            raise RequestRejected(400, refused)
        return apis.Context(server.model, tally, self.store, self.fleet.catalog.list, server.kind, self.fetch,
                            self.fleet.config.vision_fallback)

    def _made(self, row: apis.Row, call: Call, tally: Tally, api_path: str) -> tuple[object, ModelServer]:
        """What the row's factory makes of the call, and the server that answers it: the named model's,
        or the `vision_fallback` model's when the request holds images and the named model reads text only."""
        body = _json_body(call)
        server = self._server(call)
        try:
            return row.factory(self._context(server, tally, api_path), body), server
        except apis.ToVisionModel as handed:
            server = self._fallback(handed.model)
        log.info("%s holds images for a text model; %s answers it (vision_fallback)", call.path, server.model.name)
        # parsed again (the first factory may have changed it); its answer names the model that answered
        body = {**_json_body(call), "model": server.model.name}
        return row.factory(self._context(server, tally, api_path), body), server

    def _fallback(self, name: str) -> ModelServer:
        try:
            server = self.fleet.server_for(name)
        except MlxgateError as exc:
            raise RequestRejected(500, f"vision_fallback: {exc}", "api_error") from None
        if server.kind != VISION:
            raise RequestRejected(500, f"vision_fallback names {name!r}, which is not a vision model; set it to one "
                                  f"(`mlxgate models` shows each model's kind)", "api_error")
        return server

    def count(self, row: apis.Row, call: Call, api_path: str) -> Answer:
        tally = self._tally(call, row)
        try:
            answer, _ = self._made(row, call, tally, api_path)
        except MlxgateError as exc:
            return self._refuse(tally, row.api, exc)
        self._done(tally)
        return Answer(200, [JSON], dump(answer))

    def forward(self, row: apis.Row, call: Call, api_path: str) -> Answer:
        """A request an embedding model's server answers as it is: queue, load, one JSON answer."""
        tally = self._tally(call, row)
        try:
            sent, server = self._made(row, call, tally, api_path)
            self.fleet.check_fits(server)
            self.fleet.keep_alive(server, sent.keep_alive)
            ticket = server.admission.join(row.route, server.model)
        except MlxgateError as exc:
            return self._refuse(tally, row.api, exc)
        job = Job(server, ticket, apis.Plan(row.api, sent.body, sent.path, False, dict, lambda _: b""),
                  call.client, tally)
        upstream = None
        try:
            for _ in self._turn(job):
                pass
            process = _running(server)
            tally.generation_starts()
            upstream = _call(process, sent.path, sent.body, call.client, keepalives=False)
            ticket.on_cancel(upstream.close)
            status, answer = upstream.answer(ticket)
        except MlxgateError as exc:
            return self._refuse(tally, row.api, exc)
        finally:
            ticket.on_cancel(None)
            if upstream is not None:
                upstream.close()
            server.admission.release(ticket)
        tally.record.status = status
        try:
            parsed = parse_object(answer)
        except ValueError:
            parsed = None
        if status == 200 and parsed is not None:
            tally.chunk({"usage": parsed.get("usage") or {}})
            if sent.reshape is not None:
                answer = dump(sent.reshape(parsed))
        elif status != 200 and row.api != OPENAI:  # the model server's error, in the client's API's shape
            error = (parsed or {}).get("error")
            message = (error.get("message") if isinstance(error, dict) else error) or answer[:500].decode(
                "utf-8", "replace")
            answer = error_body(row.api, "invalid_request" if status < 500 else "backend_error", str(message))
        self._done(tally)
        return Answer(status, [JSON, ("server-timing", tally.server_timing())], answer)

    def generate(self, row: apis.Row, call: Call, api_path: str) -> Answer:
        """One generating request, whatever its API: plan, queue, load, generate, answer."""
        tally = self._tally(call, row)
        try:
            plan, server = self._made(row, call, tally, api_path)
            tally.record.stream = plan.stream
            self.fleet.check_fits(server)
            self.fleet.keep_alive(server, plan.keep_alive)
            job = Job(server, server.admission.join(row.route, server.model), plan, call.client, tally)
        except MlxgateError as exc:
            return self._refuse(tally, row.api, exc)
        if plan.stream:
            return self._stream(job)
        return self._answer(job)

    # ------------------------------------------------------------------ turn and generation
    def _turn(self, job: Job) -> Iterator[None]:
        """Wait for the job's turn with its model serving, yielding every PING_EVERY seconds
        of waiting (a stream pings its client then). A client that leaves gives its place up.

        When the turn comes and the model is not loaded, the job steps out of line and loads
        it (jobs wanting it share the load; the resident set makes room first), then steps
        back in at the head.
        """
        server, ticket = job.server, job.ticket
        for _ in range(LOAD_RETRIES):
            yield from self._waiting(job, lambda: server.admission.wait(ticket, 1.0))
            if server.ready():
                return
            server.admission.step_out(ticket)
            try:
                yield from self._waiting(job, _in_background(lambda: self.fleet.ensure(server)))
            finally:
                server.admission.step_in(ticket)
        raise Unavailable(f"{server.model.name} stopped {LOAD_RETRIES} times while this request waited; retry")

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
        """Stream from the model server; stop it as soon as the client is gone. A model server
        that died before it sent anything (killed, crashed as the call went out) is loaded again
        in the request's place and the call made again, once; None while that happens. A plan
        that generates nothing (Ollama's load request) has nothing to stream."""
        if not job.plan.generates:
            return
        for attempt in (1, 2):
            upstream = process = None
            try:
                process = _running(job.server)
                job.tally.generation_starts()
                upstream = _call(process, job.plan.path, job.plan.body, job.client)
                job.ticket.on_cancel(upstream.close)
                for chunk in upstream.events(job.ticket):
                    if chunk is not None:
                        job.tally.chunk(chunk)
                    yield chunk
                return
            except ClientGone:
                log.info("%s: the client went away; its generation is stopped", job.server.label)
                raise
            except BackendError:
                # died: the process it called has gone (the fleet may have started the next one already)
                # (a killed process's sockets close a moment before it can be reaped: wait that moment)
                died = process is None or process is not job.server.process or not _alive_after(process, 0.5)
                if attempt == 2 or job.ticket.cancel_reason or not died or (upstream and upstream.received):
                    raise
                log.warning("%s: its server died before it answered; loading it again for this request",
                            job.server.label)
            finally:
                job.ticket.on_cancel(None)
                if upstream is not None:
                    upstream.close()
            yield from self._turn(job)

    def _answer(self, job: Job) -> Answer:
        """A non-streamed answer: wait, generate, build the JSON."""
        failure = None
        try:
            for _ in (self._turn(job) if job.plan.loads else ()):
                pass
            with contextlib.closing(self._generate(job)) as chunks:
                answer = job.plan.build(apis.chunks_of(chunks))
        except MlxgateError as exc:
            failure = exc
        except Exception as exc:  # a bug: the client gets a 500 without its text, the log the traceback
            log.exception("%s: the answer failed", job.server.label)
            failure = _unexpected(exc)
        finally:
            job.server.admission.release(job.ticket)
        if failure is not None:
            return self._refuse(job.tally, job.plan.api, failure)
        self._done(job.tally)
        return Answer(200, [JSON, ("server-timing", job.tally.server_timing())], dump(answer))

    def _events(self, job: Job) -> Iterator[bytes]:
        """A stream's bytes: its start, keep-alives while it waits, the translated chunks, its end."""
        plan = job.plan
        first = plan.start()
        if first:
            yield first
        for _ in self._turn(job):
            yield plan.keepalive
        last_ping = time.monotonic()
        with contextlib.closing(self._generate(job)) as chunks:
            for chunk in chunks:
                if chunk is None:
                    if time.monotonic() - last_ping > SILENT_PING:  # a long prompt or a silent model
                        last_ping = time.monotonic()
                        yield plan.keepalive
                    continue
                out = plan.feed(chunk)
                if out:
                    yield out
                if plan.stopped():
                    break
        yield plan.finish()

    def _stream(self, job: Job) -> Answer:
        """A streamed answer whose failures arrive as the API's own error event, and whose place
        in the queue is given back however it ends."""
        api = job.plan.api
        failure = job.plan.failure or partial(error_event, api)

        def guarded() -> Iterator[bytes]:
            try:
                yield from self._events(job)
            except ClientGone:
                job.tally.record.cancelled = True  # nobody is left to tell
            except MlxgateError as exc:
                kind, _ = kind_of(exc)
                job.tally.failed(exc)
                log.warning("%s stream ended with an error: %s", job.server.label, exc)
                yield failure(kind, str(exc))
            except GeneratorExit:  # the client left while we were sending
                job.tally.record.cancelled = True
                raise
            except Exception as exc:  # a bug: end the stream in the API's shape, the log has the traceback
                log.exception("%s stream failed", job.server.label)
                failed = _unexpected(exc)
                job.tally.failed(failed)
                yield failure("backend_error", str(failed))
            finally:
                self._finish(job)

        def abandoned() -> None:  # the caller left before the stream started
            job.tally.record.cancelled = True
            self._finish(job)
        return Answer(200, [("content-type", job.plan.media_type), ("cache-control", "no-cache")],
                      Stream(guarded(), abandoned))

    # ------------------------------------------------------------------ stored responses
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


def _running(server: ModelServer) -> ServerProcess:
    """The server's process as it is now, read once (a restart or an eviction may swap it meanwhile)."""
    process = server.process
    if process is None:
        raise BackendError(f"the server of {server.model.name} is not running")
    return process


def _call(process: ServerProcess, path: str, body: dict, client: socket.socket | None,
          keepalives: bool = True) -> Upstream:
    """A call to the model server, and spare connections opened for the next requests while it works."""
    upstream = Upstream(process, path, body, client, keepalives)
    process.open_spares()
    return upstream


def _alive_after(process, seconds: float) -> bool:
    """Whether `process` still runs `seconds` from now (at once False when it has exited)."""
    deadline = time.monotonic() + seconds
    while process.alive():
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.02)
    return False
