"""What each API makes of a request, one small factory per API (a row of `GENERATING`).

A factory checks the body against its API's contract and translates it (Anthropic Messages
and the Responses API next to the model's own tokenizer), counts the prompt against the
model's window, and returns a `Plan`: the model server's body and route, and how the
model server's chunks become the client's answer, streamed (`start`, `feed`, `finish`)
or as one JSON object (`build`). A schema the answer is to be held to that cannot be held is
refused here, before the queue (`constraints.schemas`). The relay runs every plan on the same path: queue, load,
generation, cancellation, records (see `relay`). A new API adds a factory and a row.

The counting routes (`COUNTING`) generate nothing: they answer the prompt's tokens (and Ollama's
`/api/show`, what the model is). The forwarded routes (`FORWARDED`) send a body to an embedding
model's server and answer what it answers (reshaped for Ollama's clients).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from .. import relay_protocol as paths
from ..api_errors import ANTHROPIC, OLLAMA, OPENAI, RESPONSES
from ..api_paths import api_of
from ..catalog import LocalModel, context_length
from ..constraints.schemas import RESPONSE_SCHEMA, ConstraintError, check_request
from ..errors import RequestRejected
from ..fim import fim_of
from ..json_body import dump
from ..messages.chat import assemble_chat
from ..messages.events import MessageTranslator, assemble, sse
from ..messages.openai_request import check_chat, check_completion, thinking_of
from ..messages.request import to_chat
from ..model_kinds import CHAT, VISION, kind_of
from ..ollama import answer as ollama_answer, models as ollama_models, request as ollama_request
from ..responses import events as response_events
from ..responses.request import response_object, to_chat as responses_to_chat
from ..responses.store import ResponseStore
from ..vision import images as vision_images
from ..vision.tokens import image_tokens
from . import tokens
from .tally import Tally

SERVER_SIDE_KEYS = ("model", "adapters", "draft_model")  # the model server serves its own model only
Chunks = Iterable[dict]


@dataclass
class Plan:
    api: str                      # whose error shape the client reads
    body: dict                    # what goes to the model server
    path: str                     # the model server's route
    stream: bool
    build: Callable[[Chunks], dict]           # the whole answer, from every chunk
    feed: Callable[[dict], bytes]             # a stream's bytes for one chunk
    start: Callable[[], bytes] = lambda: b""  # a stream's first bytes (sent before its turn comes)
    finish: Callable[[], bytes] = lambda: b""
    keepalive: bytes = b": keepalive\n\n"
    stopped: Callable[[], bool] = lambda: False  # a stop sequence matched: generation ends here
    failure: Callable[[str, str], bytes] | None = None  # a started stream's error event, when the API has its own
    media_type: str = "text/event-stream"  # of a stream
    keep_alive: float | None = None  # the request's idle unload for its model from now on (seconds, -1 never)
    loads: bool = True       # its turn loads the model (Ollama's unload request: no)
    generates: bool = True   # it generates (Ollama's load and unload requests: no; the answer is `build(())`)


@dataclass
class Forward:
    """What a forwarded route sends to an embedding model's server, and how its answer comes back."""

    body: dict
    path: str                                        # the model server's route
    reshape: Callable[[dict], dict] | None = None    # its JSON answer → the client's (None: as it is)
    keep_alive: float | None = None                  # as `Plan.keep_alive`


@dataclass
class Context:
    """What a factory may use besides the body: the model, the record, the stored responses."""

    model: LocalModel
    tally: Tally
    store: ResponseStore
    models: Callable[[], list[LocalModel]] = list  # every local model (for messages naming the ones that can)
    kind: str = CHAT  # what the model's folder holds (`model_kinds`)
    fetch: vision_images.FetchPolicy = vision_images.FetchPolicy()  # where URL images may come from
    vision_fallback: str | None = None  # the vision model that answers a text model's images (a setting)


class ToVisionModel(Exception):
    """A request with images for a text model: the relay hands it to the `vision_fallback` model."""

    def __init__(self, model: str):
        super().__init__(model)
        self.model = model


def read_images(ctx: Context, chat: dict) -> int:
    """The prompt tokens of the chat body's images, each checked and made a data URL on the way
    (`vision.images`); a model that reads no images is a 400 naming the local ones that do."""
    found = vision_images.image_parts(chat)
    if not found:
        return 0
    ctx.tally.record.images = len(found)
    if ctx.kind != VISION:
        if ctx.vision_fallback:
            raise ToVisionModel(ctx.vision_fallback)
        able = [m.name for m in ctx.models() if kind_of(m.path).kind == VISION][:5]
        raise RequestRejected(400, f"{found[0].get(vision_images.AT) or 'image'}: model {ctx.model.name!r} reads "
                              f"text only, and this request holds {len(found)} image{'s' if len(found) > 1 else ''}. "
                              + (f"Local vision models: {', '.join(able)}." if able else
                                 "No local model reads images: add a vision-language model (Qwen2.5-VL, "
                                 "Gemma 3, ...) and install the vision extra (./install.sh --vision)."))
    return sum(image_tokens(ctx.model.path, i.width, i.height) for i in vision_images.resolve(found, ctx.fetch))


def prompt_tokens(ctx: Context, chat: dict) -> int:
    """The prompt's tokens as the model server makes them: its chat template's text and its images."""
    pictures = read_images(ctx, chat)
    return tokens.count_chat(ctx.model.path, chat) + pictures


def fit_context(ctx: Context, chat: dict, api: str) -> int:
    """The prompt's tokens; 400 when it does not fit the window, `max_tokens` lowered to what does."""
    import time

    started = time.perf_counter()
    count = prompt_tokens(ctx, chat)
    ctx.tally.counting_ms = (time.perf_counter() - started) * 1000
    limit = context_length(ctx.model.path)
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


# the chat body's names of what an answer is held to (patterns) → each API's own (the client's field at fault)
_SCHEMA, _PARAMETERS = "^" + re.escape(RESPONSE_SCHEMA), r"^tools\[(\d+)\]\.function\.parameters"
HELD_NAMES = {
    ANTHROPIC: ((_SCHEMA, "output_config.format.schema"), (_PARAMETERS, r"tools.\1.input_schema")),
    RESPONSES: ((_SCHEMA, "text.format.schema"), (_PARAMETERS, r"tools.\1.parameters")),
    OLLAMA: ((_SCHEMA, "format"), (_PARAMETERS, r"tools.\1.function.parameters")),
}


def check_held(chat: dict, api: str = OPENAI) -> None:
    """Refuse, before the queue, a schema the answer is to be held to that cannot be held; the
    error names the field as the client's API calls it."""
    try:
        check_request(chat)
    except ConstraintError as e:
        where = e.where
        for pattern, name in HELD_NAMES.get(api, ()):
            where = re.sub(pattern, name, where)
        if where != e.where:
            e.args = (str(e).replace(e.where, where, 1),)
            e.where = e.param = where
        raise


def check_held_completion(upstream: dict, api: str = OPENAI) -> None:
    """`check_held` for a text completion: only its `response_format` holds the answer (it renders no tools)."""
    check_held({"response_format": upstream.get("response_format")}, api)


def _sse_all(events: list[tuple[str, dict]]) -> bytes:
    return b"".join(sse(name, data) for name, data in events)


# ------------------------------------------------------------------ the generating routes
def messages(ctx: Context, body: dict) -> Plan:
    chat = to_chat(body)
    check_held(chat.body, ANTHROPIC)
    input_tokens = fit_context(ctx, chat.body, ANTHROPIC)
    translator = MessageTranslator(str(body.get("model") or ctx.model.name), input_tokens, chat.stop_sequences)

    def build(chunks: Chunks) -> dict:
        events = translator.start()
        for chunk in chunks:
            events += translator.feed(chunk)
            if translator.stopped:
                break
        return assemble(events + translator.finish())
    return Plan(ANTHROPIC, chat.body, paths.CHAT, chat.stream, build,
                feed=lambda chunk: _sse_all(translator.feed(chunk)),
                start=lambda: _sse_all(translator.start()), finish=lambda: _sse_all(translator.finish()),
                keepalive=sse("ping", {"type": "ping"}), stopped=lambda: translator.stopped)


def _openai(ctx: Context, body: dict, chat: bool) -> Plan:
    (check_chat if chat else check_completion)(body)
    wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    upstream = {k: v for k, v in body.items() if k not in SERVER_SIDE_KEYS}
    upstream.update(stream=True, stream_options={"include_usage": True})
    if not chat and body.get("suffix") is not None:
        fill_in_the_middle(ctx, upstream)
    (check_held if chat else check_held_completion)(upstream)
    if chat:
        thinking_of(upstream)
        fit_context(ctx, upstream, OPENAI)
    name = str(body.get("model") or ctx.model.name)  # answers name the model the client asked for

    def feed(chunk: dict) -> bytes:
        if not (chunk.get("choices") or wants_usage):
            return b""
        chunk["model"] = name
        return b"data: " + dump(chunk) + b"\n\n"

    def build(chunks: Chunks) -> dict:
        return {**assemble_chat(list(chunks), chat), "model": name}
    return Plan(OPENAI, upstream, paths.CHAT if chat else paths.COMPLETIONS, bool(body.get("stream")),
                build, feed, finish=lambda: b"data: [DONE]\n\n")


def fill_in_the_middle(ctx: Context, upstream: dict) -> None:
    """A completion with a `suffix`: the model's own FIM prompt around it, and its end-of-middle tokens
    added to the stop words; a model without FIM tokens is a 400 naming the local ones that have them."""
    suffix = upstream.pop("suffix")
    if not isinstance(suffix, str):
        raise RequestRejected(400, f"suffix: Input should be a string, got {type(suffix).__name__}")
    if upstream.get("echo"):
        raise RequestRejected(400, "echo: cannot be combined with suffix (fill-in-the-middle answers the middle only)")
    found = fim_of(ctx.model.path)
    if found is None:
        able = [m.name for m in ctx.models() if fim_of(m.path) is not None][:5]
        raise RequestRejected(400, f"suffix: model {ctx.model.name!r} has no fill-in-the-middle tokens in its "
                              f"tokenizer, so it cannot complete between a prompt and a suffix. "
                              + (f"Local models that can: {', '.join(able)}." if able else
                                 "No local model has them (Qwen2.5-Coder, StarCoder2, DeepSeek-Coder and "
                                 "Codestral do)."))
    upstream["prompt"] = found.prompt(upstream["prompt"], suffix)
    stop = upstream.get("stop") or []
    upstream["stop"] = [*([stop] if isinstance(stop, str) else stop), *found.stops]


def chat_completions(ctx: Context, body: dict) -> Plan:
    return _openai(ctx, body, chat=True)


def completions(ctx: Context, body: dict) -> Plan:
    return _openai(ctx, body, chat=False)


def responses(ctx: Context, body: dict) -> Plan:
    earlier = ctx.store.history(body.get("previous_response_id"))
    translated = responses_to_chat(body, earlier)
    check_held(translated.chat, RESPONSES)
    input_tokens = fit_context(ctx, translated.chat, RESPONSES)
    response = response_object(translated)
    response["model"] = response["model"] or ctx.model.name
    translator = response_events.ResponseTranslator(response, translated.tools, translated.max_calls, input_tokens,
                                                     tokens.counter(ctx.model.path).encode_len)

    def keep() -> None:
        if translated.store and translator.done:
            ctx.store.save(translator.response, translated.items, earlier)

    def build(chunks: Chunks) -> dict:
        translator.start()
        for chunk in chunks:
            translator.feed(chunk)
        translator.finish()
        keep()
        return translator.response

    def finish() -> bytes:
        last = translator.finish()
        keep()  # before the last event: a client may chain on it at once
        return response_events.encode(last)
    return Plan(RESPONSES, translated.chat, paths.CHAT, translated.stream, build,
                feed=lambda chunk: response_events.encode(translator.feed(chunk)),
                start=lambda: response_events.encode(translator.start()), finish=finish,
                keepalive=response_events.KEEPALIVE,
                failure=lambda kind, message: response_events.encode(translator.failed(kind, message)))


def _ollama(ctx: Context, body: dict, translated: ollama_request.Translated, chat: bool) -> Plan:
    """An Ollama chat or generate request on the chat or completions route; a chat's answer is
    `message`, a generate's `response`."""
    answer = ollama_answer.Answer(str(body.get("model") or ctx.model.name), ctx.tally, chat)
    upstream = translated.body
    if translated.nothing:  # Ollama's load (and, with keep_alive 0, unload) request
        reason = "unload" if translated.keep_alive == 0 else "load"
        return Plan(OLLAMA, upstream, paths.CHAT, False, lambda _: answer.nothing(reason), lambda _: b"",
                    keep_alive=translated.keep_alive, loads=reason == "load", generates=False)
    if translated.completion:
        if ctx.kind == VISION:
            raise RequestRejected(400, f"model {ctx.model.name!r} is a vision model: it answers prompts in its chat "
                                       f"template, not raw or fill-in-the-middle ones")
        check_completion(upstream)
        if upstream.get("suffix") is not None:
            fill_in_the_middle(ctx, upstream)
        check_held_completion(upstream, OLLAMA)
    else:
        check_chat(upstream)
        check_held(upstream, OLLAMA)
        fit_context(ctx, upstream, OLLAMA)
    upstream.update(stream=True, stream_options={"include_usage": True})
    return Plan(OLLAMA, upstream, paths.COMPLETIONS if translated.completion else paths.CHAT, translated.stream,
                answer.build, answer.feed, finish=answer.finish, keepalive=answer.keepalive(),
                media_type=ollama_answer.MEDIA_TYPE, keep_alive=translated.keep_alive)


def ollama_chat(ctx: Context, body: dict) -> Plan:
    return _ollama(ctx, body, ollama_request.chat(body, context_length(ctx.model.path)), chat=True)


def ollama_generate(ctx: Context, body: dict) -> Plan:
    return _ollama(ctx, body, ollama_request.generate(body, context_length(ctx.model.path)), chat=False)


# ------------------------------------------------------------------ the counting routes
def count_tokens(ctx: Context, body: dict) -> dict:
    chat = to_chat({"max_tokens": 1, **body})
    return {"input_tokens": prompt_tokens(ctx, chat.body)}


def response_input_tokens(ctx: Context, body: dict) -> dict:
    translated = responses_to_chat(body, ctx.store.history(body.get("previous_response_id")))
    return {"object": "response.input_tokens", "input_tokens": prompt_tokens(ctx, translated.chat)}


def ollama_show(ctx: Context, body: dict) -> dict:
    ollama_request.check_fields(body, ollama_request.SHOW_FIELDS, "/api/show")
    return ollama_models.show(ctx.model.name, ctx.model.path, ctx.kind)


# ------------------------------------------------------------------ the forwarded routes (embedding models)
def _forwarded(ctx: Context, body: dict) -> dict:
    """The body as the model server gets it: its answer names the model the client asked for."""
    return {**{k: v for k, v in body.items() if k not in SERVER_SIDE_KEYS},
            "model": str(body.get("model") or ctx.model.name)}


def embeddings(ctx: Context, body: dict) -> Forward:
    """The body as it goes to the embedding model's server, which checks the rest (it knows its window)."""
    if body.get("input") is None:
        raise RequestRejected(400, "input: Field required (a string, a list of strings, or token ids)")
    return Forward(_forwarded(ctx, body), paths.EMBEDDINGS)


def rerank(ctx: Context, body: dict) -> Forward:
    if not isinstance(body.get("query"), str):
        raise RequestRejected(400, "query: Field required (a string)")
    if not isinstance(body.get("documents"), list):
        raise RequestRejected(400, "documents: Field required (a list of strings or {\"text\": ...} objects)")
    return Forward(_forwarded(ctx, body), paths.RERANK)


def _ollama_embed(ctx: Context, body: dict, old: bool) -> Forward:
    sent, keep_alive = ollama_request.embed(body, old)
    name = str(body.get("model") or ctx.model.name)
    return Forward({**sent, "model": name}, paths.EMBEDDINGS,
                   lambda answer: ollama_answer.embedded(name, answer, ctx.tally, old), keep_alive)


def ollama_embed(ctx: Context, body: dict) -> Forward:
    return _ollama_embed(ctx, body, old=False)


def ollama_embeddings(ctx: Context, body: dict) -> Forward:
    return _ollama_embed(ctx, body, old=True)


@dataclass(frozen=True)
class Row:
    api: str      # whose error shape its clients read: the path's, from the one table (`api_paths`)
    route: str    # the record's route, as the hooks call it
    factory: Callable
    way: str = "generate"  # how the relay runs it: generate (a Plan), count (an answer), forward (a Forward)


def _rows(way: str, *rows: tuple[str, str, Callable]) -> dict[str, Row]:
    """The relay's rows for (path, route, factory) run the `way` way, each of its path's API."""
    return {path: Row(api_of(paths.RELAY_PREFIX + path), route, factory, way) for path, route, factory in rows}


GENERATING = _rows(
    "generate",
    (paths.MESSAGES, "anthropic_messages", messages),
    (paths.CHAT, "chat_completions", chat_completions),
    (paths.COMPLETIONS, "completions", completions),
    (paths.RESPONSES, "responses", responses),
    (paths.OLLAMA_CHAT, "ollama_chat", ollama_chat),
    (paths.OLLAMA_GENERATE, "ollama_generate", ollama_generate))
FORWARDED = _rows(  # answered by the model server as they are (one JSON answer)
    "forward",
    (paths.EMBEDDINGS, "embeddings", embeddings),
    (paths.RERANK, "rerank", rerank),
    (paths.OLLAMA_EMBED, "ollama_embed", ollama_embed),
    (paths.OLLAMA_EMBEDDINGS, "ollama_embed", ollama_embeddings))
COUNTING = _rows(
    "count",
    (paths.COUNT_TOKENS, "count_tokens", count_tokens),
    (paths.RESPONSE_INPUT_TOKENS, "responses_input_tokens", response_input_tokens),
    (paths.OLLAMA_SHOW, "ollama_show", ollama_show))


ROWS: dict[str, Row] = {**GENERATING, **FORWARDED, **COUNTING}


def chunks_of(stream: Iterator[dict | None]) -> Iterator[dict]:
    """The chunks of a model server's stream without its keep-alives."""
    return (chunk for chunk in stream if chunk is not None)
