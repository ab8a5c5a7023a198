"""A vision model's server: mlx-vlm's generation API behind the model-process contract.

It answers `POST /v1/chat/completions` (what the relay sends for all three APIs, images as
data URLs the gateway has checked) in `mlx_lm.server`'s streamed chunk format
(`data: {choices: [{delta: {content}}]}`, a usage chunk with `prompt_tokens_details`, then
`data: [DONE]`), or as one JSON answer without `stream`; `GET /health`; `GET /mlxgate/alive`.

One generation at a time, on one worker thread (`Worker`): mlx-vlm's continuous batcher
(`ResponseGenerator`) batches image requests, but it applies the first request's sampler to
every request in its batch and lives in `mlx_vlm.server` (FastAPI and mlx-audio come with the
import); the relay's queue already orders the requests, and a client that leaves stops its
generation at the next token. What this server cannot honour is refused by name (a JSON
schema or a required tool call: grammar-held decoding is `mlx_lm.server`'s, not mlx-vlm's).
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson

from ..errors import RequestRejected
from ..wrapper.mlx_lm_entry import ALIVE_PATH
from .tokens import capped_max_pixels

log = logging.getLogger("mlxgate.vision")

MAX_BODY = 256 * 1024 * 1024
LOOK_EVERY = 0.5  # seconds the idle worker waits for a job before it beats again
UNHONOURED = {  # chat fields this server cannot hold the answer to
    "response_format": "answers held to a JSON schema are not served by vision models (mlx-vlm); use a text model",
    "logprobs": "log probabilities are not served",
}
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "seed")


class Refused(RequestRejected):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request"):
        super().__init__(status, message, kind)


@dataclass
class Job:
    prompt: str
    images: list
    kwargs: dict
    out: "queue.Queue" = field(default_factory=queue.Queue)  # results, then None; an exception on failure
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """The model and its processor, and how a chat body becomes a prompt and images."""

    def __init__(self, folder: Path):
        from mlx_vlm import load

        self.model, self.processor = load(str(folder))
        self.folder = folder
        image_processor = getattr(self.processor, "image_processor", None)
        cap = capped_max_pixels(folder)
        if image_processor is not None and cap and hasattr(image_processor, "max_pixels"):
            image_processor.max_pixels = cap  # the gateway counts with the same cap (`tokens`)

    def prompt(self, body: dict) -> tuple[str, list]:
        from mlx_vlm.prompt_utils import get_chat_template

        images: list = []
        messages = [self._message(i, m, images) for i, m in enumerate(body.get("messages") or [])]
        kwargs = body.get("chat_template_kwargs") if isinstance(body.get("chat_template_kwargs"), dict) else {}
        if body.get("tools"):
            kwargs = {**kwargs, "tools": body["tools"]}
        try:
            return get_chat_template(self.processor, messages, True, **kwargs), images
        except Exception as exc:
            raise Refused(f"the model's chat template cannot render this conversation: {exc}") from None

    @staticmethod
    def _message(i: int, message: dict, images: list) -> dict:
        out = dict(message)
        content = message.get("content")
        if content is None:
            out["content"] = ""
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.get("type") == "image_url":
                    images.append(_decoded(part, f"messages.{i}.content.{j}"))
                    parts.append({"type": "image"})
                elif part.get("type") == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
            out["content"] = parts
        if message.get("tool_calls"):
            out["tool_calls"] = [_parsed_call(call) for call in message["tool_calls"]]
        return out

    def run(self, job: Job):
        from mlx_vlm import stream_generate

        return stream_generate(self.model, self.processor, job.prompt, image=job.images or None, **job.kwargs)


def _decoded(part: dict, where: str):
    """A data URL image as a PIL image (the gateway fetched and checked it; nothing else is opened here)."""
    from PIL import Image

    url = (part.get("image_url") or {}).get("url")
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise Refused(f"{where}: this model server takes data URL images only (the gateway fetches URLs)")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        image.load()
    except Exception as exc:
        raise Refused(f"{where}: the image cannot be decoded: {exc}") from None
    return image.convert("RGB")


def _parsed_call(call: dict) -> dict:
    function = call.get("function") or {}
    try:
        return {**call, "function": {**function, "arguments": json.loads(function.get("arguments") or "{}")}}
    except (ValueError, TypeError):
        return call


class Worker:
    """The one thread that generates; `report` is what `/mlxgate/alive` says of it."""

    def __init__(self, engine: Engine, clock=time.monotonic):
        self.engine, self.clock = engine, clock
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.beat = clock()
        self.busy = False
        self.served = 0
        self.thread = threading.Thread(target=self._loop, name="vision-generation", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def _loop(self) -> None:
        while True:
            self.beat = self.clock()
            try:
                job = self.jobs.get(timeout=LOOK_EVERY)
            except queue.Empty:
                continue
            if job.cancelled.is_set():
                continue
            self.busy = True
            try:
                for result in self.engine.run(job):
                    self.beat = self.clock()
                    job.out.put(result)
                    if job.cancelled.is_set():
                        break
                job.out.put(None)
            except Exception as exc:  # the request fails; the worker goes on
                log.exception("generation failed")
                job.out.put(exc)
            finally:
                self.busy = False
                self.served += 1

    def report(self) -> dict:
        return {"generation": self.thread.is_alive(), "idle_s": round(self.clock() - self.beat, 3),
                "busy": self.busy, "queued": self.jobs.qsize(), "served": self.served}


def generation_kwargs(body: dict, default_max: int) -> dict:
    for key, why in UNHONOURED.items():
        if body.get(key) not in (None, False):
            raise Refused(f"{key}: cannot be honoured: {why}")
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise Refused("tool_choice: cannot be honoured: a required tool call is held by grammar, which vision "
                      "models (mlx-vlm) do not serve; use a text model")
    kwargs = {key: body[key] for key in SAMPLING if body.get(key) is not None}
    kwargs.setdefault("temperature", 0.0)
    kwargs["max_tokens"] = body.get("max_completion_tokens") or body.get("max_tokens") or default_max
    thinking = (body.get("chat_template_kwargs") or {}).get("enable_thinking")
    if thinking is not None:
        kwargs["enable_thinking"] = bool(thinking)
    return kwargs


class App:
    def __init__(self, engine: Engine, worker: Worker, name: str, secret: str, default_max: int = 8192):
        self.engine, self.worker, self.name = engine, worker, name
        self.expected = f"Bearer {secret}".encode()
        self.default_max = default_max

    def check_secret(self, authorization: str) -> None:
        if not hmac.compare_digest(authorization.encode(), self.expected):
            raise Refused("this model server answers the mlxgate relay only; send requests to the gateway",
                          403, "permission")

    def start(self, body: dict) -> Job:
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise Refused("messages: Field required (a non-empty list of messages)")
        kwargs = generation_kwargs(body, self.default_max)
        prompt, images = self.engine.prompt(body)
        return self.worker.submit(Job(prompt, images, kwargs))

    def alive(self) -> dict:
        import mlx.core as mx

        return {**self.worker.report(), "mlx_active": mx.get_active_memory(), "mlx_cache": mx.get_cache_memory(),
                "mlx_peak": mx.get_peak_memory()}


def chunks(job: Job, name: str):
    """The job's results as `mlx_lm.server`'s chunks (dicts), the usage chunk last."""
    made, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    base = {"id": made, "object": "chat.completion.chunk", "created": created, "model": name,
            "system_fingerprint": "mlxgate-vision"}
    last = None
    first = True
    while True:
        result = job.out.get()
        if result is None:
            break
        if isinstance(result, Exception):
            raise result
        last = result
        delta = {"content": result.text} if result.text else {}
        if first:
            delta, first = {"role": "assistant", **delta}, False
        if delta:
            yield {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
    finish = (getattr(last, "finish_reason", None) or "stop") if last is not None else "stop"
    yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                "finish_reason": "length" if finish == "length" else "stop"}]}
    prompt_tokens = getattr(last, "prompt_tokens", 0) or 0
    completion = getattr(last, "generation_tokens", 0) or 0
    yield {**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                            "total_tokens": prompt_tokens + completion,
                                            "prompt_tokens_details": {"cached_tokens": 0}}}


def error_body(exc: BaseException) -> tuple[int, dict]:
    status = getattr(exc, "status", 500) if isinstance(exc, RequestRejected) else 500
    kind = getattr(exc, "kind", "api_error") if isinstance(exc, RequestRejected) else "api_error"
    message = str(exc) if isinstance(exc, RequestRejected) else f"the model failed: {type(exc).__name__}: {exc}"
    return status, {"error": {"message": message, "type": "invalid_request_error" if status == 400 else kind,
                              "param": None, "code": None}}


class Handler(BaseHTTPRequestHandler):
    server_version = "mlxgate-vision"
    disable_nagle_algorithm = True
    app: App

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        try:
            self.app.check_secret(self.headers.get("Authorization", ""))
            path = self.path.split("?")[0]
            if path == ALIVE_PATH:
                return self._json(200, self.app.alive())
            if path == "/health":
                return self._json(200, {"status": "ok", "model": self.app.name})
            raise Refused(f"no route GET {path}", 404, "not_found")
        except Exception as exc:
            self._json(*error_body(exc))

    def do_POST(self) -> None:
        try:
            self.app.check_secret(self.headers.get("Authorization", ""))
            path = self.path.split("?")[0]
            if path != "/v1/chat/completions":
                raise Refused(f"no route POST {path}", 404, "not_found")
            body = self._body()
            job = self.app.start(body)
        except Exception as exc:
            status, answer = error_body(exc)
            if status >= 500:
                log.exception("POST %s failed", self.path)
            return self._json(status, answer)
        name = str(body.get("model") or self.app.name)
        try:
            if body.get("stream"):
                self._stream(job, name)
            else:
                self._whole(job, name)
        finally:
            job.cancelled.set()  # a client gone mid-stream: the worker stops at its next token

    def _stream(self, job: Job, name: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            for chunk in chunks(job, name):
                self.wfile.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            return
        except Exception as exc:
            log.exception("generation failed")
            self.wfile.write(b"data: " + orjson.dumps({"error": str(exc)}) + b"\n\n")

    def _whole(self, job: Job, name: str) -> None:
        try:
            got = list(chunks(job, name))
        except Exception as exc:
            return self._json(*error_body(exc))
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in got if c["choices"])
        finish = next(c["choices"][0]["finish_reason"] for c in got
                      if c["choices"] and c["choices"][0]["finish_reason"])
        self._json(200, {"id": got[-1]["id"], "object": "chat.completion", "created": got[-1]["created"],
                         "model": name, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                     "finish_reason": finish}], "usage": got[-1]["usage"]})

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise Refused("a request body needs a Content-Length header")
        if int(length) > MAX_BODY:
            raise Refused(f"the request body is {length} bytes; at most {MAX_BODY}", 413, "request_too_large")
        try:
            body = orjson.loads(self.rfile.read(int(length)))
        except orjson.JSONDecodeError:
            raise Refused("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise Refused("the request body must be a JSON object")
        return body

    def _json(self, status: int, answer: dict) -> None:
        data = orjson.dumps(answer)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


def make_server(app: App, host: str, port: int) -> Server:
    return Server((host, port), type("BoundHandler", (Handler,), {"app": app}))
