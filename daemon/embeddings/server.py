"""The HTTP side of an embedding or reranker model server: the secret, the routes, the request
fields, the answers and the errors (shapes in the package's docstring).

`ThreadingHTTPServer` with HTTP/1.1 keep-alive: each connection has a thread, which checks the
secret, parses and tokenizes, then waits on the batch worker. Each answer leaves in one write with
TCP_NODELAY: a body sent as a second small segment waits for the client's delayed ACK (40 ms a
request, measured). Errors take their status and type from `api_errors.KINDS` (the gateway's one table) in
OpenAI's shape, with `param` naming the field at fault.
"""

from __future__ import annotations

import base64
import hmac
import logging
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlx.core as mx
import numpy as np
import orjson

from .. import api_errors
from ..errors import MlxgateError
from ..wrapper.mlx_lm_entry import ALIVE_PATH
from .batcher import Batcher
from .engine import TRUNCATIONS, Engine, Refused, Sequence

log = logging.getLogger("mlxgate.embeddings")

MAX_INPUTS = 2048  # OpenAI's limit per embeddings request
MAX_DOCUMENTS = 10000
MAX_BODY = 64 * 1024 * 1024
PROMPT_NAMES = {"search_query": "query", "search_document": "document", "passage": "document"}  # Cohere's, E5's


def _positive(body: dict, name: str, also: tuple = ()) -> int | None:
    value = body.get(name)
    if value is not None and value not in also and (not isinstance(value, int) or isinstance(value, bool)
                                                    or value < 1):
        raise Refused(f"{name} must be a positive integer" + (f" or {also[0]}" if also else ""), param=name)
    return value


def _truncation(body: dict, default: str) -> tuple[str, int | None]:
    """(mode, token limit) from `truncate` (true/false, "NONE", "END", "START") and vLLM's
    `truncate_prompt_tokens` (N, or -1 for the model's window)."""
    mode = default
    given = body.get("truncate")
    if isinstance(given, bool):
        mode = "end" if given else "none"
    elif isinstance(given, str) and given.lower() in TRUNCATIONS:
        mode = given.lower()
    elif given is not None:
        raise Refused('truncate must be true, false, "NONE", "END" or "START"', param="truncate")
    limit = _positive(body, "truncate_prompt_tokens", also=(-1,))
    if limit is not None and mode == "none":
        mode = "end"
    return mode, None if limit == -1 else limit


def _prompt_name(body: dict) -> str | None:
    name = body.get("input_type", body.get("prompt_name"))
    if name is not None and not isinstance(name, str):
        raise Refused("input_type must be a string", param="input_type")
    return PROMPT_NAMES.get(name, name)


def _inputs(engine: Engine, body: dict) -> list[Sequence]:
    if "input" not in body:
        raise Refused("missing required parameter: 'input'", param="input")
    given = body["input"]
    items = [given] if isinstance(given, str) else given
    if not isinstance(items, list) or not items:
        raise Refused("input must be a string, or a non-empty array of strings, of token ids, or of arrays of token "
                      "ids", param="input")
    if len(items) > MAX_INPUTS:
        raise Refused(f"input has {len(items)} items; at most {MAX_INPUTS} per request", param="input")
    truncate, limit = _truncation(body, "none")
    if all(isinstance(item, str) for item in items):
        return engine.encode_texts(items, engine.prompt(_prompt_name(body)), truncate, limit)
    if all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        return engine.encode_ids([items], truncate, limit)
    if all(isinstance(item, list) for item in items):
        return engine.encode_ids(items, truncate, limit)
    raise Refused("input mixes strings, token ids and arrays; use one form per request", param="input")


def _documents(body: dict) -> list[str]:
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise Refused("documents must be a non-empty array", param="documents")
    if len(documents) > MAX_DOCUMENTS:
        raise Refused(f"documents has {len(documents)} items; at most {MAX_DOCUMENTS} per request", param="documents")
    texts = []
    for i, document in enumerate(documents):
        if isinstance(document, dict):
            document = document.get("text")
        if not isinstance(document, str):
            raise Refused(f"documents[{i}] must be a string or an object with a 'text' string", param="documents")
        texts.append(document)
    return texts


class App:
    """What each route answers; every route takes the parsed body (empty for GET) and returns the answer."""

    def __init__(self, engine: Engine, batcher: Batcher, name: str, secret: str):
        self.engine, self.batcher, self.name = engine, batcher, name
        self.expected = f"Bearer {secret}".encode()

    def check_secret(self, authorization: str) -> None:
        if not hmac.compare_digest(authorization.encode(), self.expected):
            raise Refused("this model server answers the mlxgate relay only; send requests to the gateway",
                          kind="permission", status=403)

    def embeddings(self, body: dict) -> dict:
        engine = self.engine
        if engine.is_reranker:
            raise Refused("this model is a cross-encoder reranker: it scores pairs (POST /v1/rerank) and makes no "
                          "embeddings", param="model")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise Refused("encoding_format must be 'float' or 'base64'", param="encoding_format")
        dimensions = engine.check_dimensions(body.get("dimensions"))
        seqs = _inputs(engine, body)
        vectors = engine.shorten(self.batcher.submit(seqs), dimensions).astype(np.float32)
        if encoding == "base64":
            rows = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            rows = list(vectors)
        return {"object": "list", "model": body.get("model") or self.name,
                "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
                "usage": _usage(seqs)}

    def rerank(self, body: dict) -> dict:
        query = body.get("query")
        if not isinstance(query, str) or not query:
            raise Refused("query must be a non-empty string", param="query")
        texts = _documents(body)
        top_n = _positive(body, "top_n") or len(texts)
        truncate, _ = _truncation(body, "end")
        seqs = self.engine.rerank_inputs(query, texts, truncate, _positive(body, "max_tokens_per_doc"))
        scores = self.engine.rerank_scores(self.batcher.submit(seqs))
        with_documents = body.get("return_documents", True) is not False
        results = [{"index": int(i), "relevance_score": float(scores[i]),
                    **({"document": {"text": texts[i]}} if with_documents else {})}
                   for i in np.argsort(-scores, kind="stable")[:top_n]]
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": body.get("model") or self.name, "results": results,
                "usage": _usage(seqs)}

    def health(self, body: dict) -> dict:
        return {"status": "ok", "model": self.name, **self.engine.describe()}

    def alive(self, body: dict) -> dict:
        return {**self.batcher.report(), "mlx_active": mx.get_active_memory(), "mlx_cache": mx.get_cache_memory(),
                "mlx_peak": mx.get_peak_memory()}


def _usage(seqs: list[Sequence]) -> dict:
    tokens = sum(len(s.ids) for s in seqs)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


ROUTES = {
    ("POST", "/v1/embeddings"): App.embeddings,
    ("POST", "/v1/rerank"): App.rerank,
    ("POST", "/rerank"): App.rerank,
    ("POST", "/v2/rerank"): App.rerank,
    ("GET", "/health"): App.health,
    ("GET", ALIVE_PATH): App.alive,
}


def error_answer(exc: BaseException) -> tuple[int, dict]:
    """(status, body) of the error answer for `exc`; an exception of ours keeps its message."""
    kind, status = api_errors.kind_of(exc)
    spec = api_errors.KINDS.get(kind, api_errors.KINDS["api_error"])
    message = str(exc) if isinstance(exc, MlxgateError) else f"the model failed: {type(exc).__name__}: {exc}"
    return status or spec.status, {"error": {"message": message, "type": spec.openai_type,
                                             "param": getattr(exc, "param", None), "code": spec.openai_code}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = 1 << 16  # head and body go out in one write, at the end of the request
    server_version = "mlxgate-embeddings"
    app: App

    def log_message(self, format, *args) -> None:  # a line per request is noise at thousands a second
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        self.body_read = method == "GET"
        try:
            self.app.check_secret(self.headers.get("Authorization", ""))
            path = self.path.split("?")[0]
            route = ROUTES.get((method, path))
            if route is None:
                raise Refused(f"no route {method} {path}", status=404)
            status, answer = 200, route(self.app, self._body() if method == "POST" else {})
        except Exception as exc:
            status, answer = error_answer(exc)
            if status >= 500:
                log.exception("%s %s failed", method, self.path)
        self._send(status, answer)

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise Refused("a request body needs a Content-Length header")
        if int(length) > MAX_BODY:
            raise Refused(f"the request body is {length} bytes; at most {MAX_BODY}", kind="request_too_large",
                          status=413)
        raw = self.rfile.read(int(length))
        self.body_read = True
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise Refused("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise Refused("the request body must be a JSON object")
        return body

    def _send(self, status: int, answer: dict) -> None:
        data = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if not self.body_read:  # what is left of the body would be read as the next request
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of clients connecting at once is not turned away


def make_server(app: App, host: str, port: int) -> Server:
    """A server bound to host:port that answers with `app` (call `serve_forever`)."""
    handler = type("BoundHandler", (Handler,), {"app": app})
    return Server((host, port), handler)
