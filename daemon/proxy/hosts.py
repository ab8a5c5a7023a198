"""The gateway in front of several machines: after the hooks ran once, a request for a
local model goes to the best place that can serve it, this machine or a host.

Every second each place's `GET /models` is read (over TLS verified against the host's
pinned authority, with its key); LiteLLM's Router, fed with those views, ranks the
places (`hosts.routing`). The request then goes straight to the chosen place's relay, on
a pooled keep-alive connection, never through that host's hooks. A place that does not
answer, or answers that its queue is full, before anything went to the client is left
out (cooldown, when it failed) and the next one is tried; once the answer has started
it is never replayed: a stream cut short ends with the API's error event.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from ..config import Config
from ..errors import BackendError, MlxgateError, Unavailable
from ..host_entries import LOCAL
from ..hosts.pinning import pinned_context, read_key
from ..hosts.routing import Chooser
from ..hosts.view import HostView
from ..json_body import dump
from .relay_client import RelayClient

log = logging.getLogger("mlxgate.proxy")

HOST_HEADER = b"x-mlxgate-host"  # on every answer: which place served it
POLL_EVERY = 1.0
POLL_TIMEOUT = 5.0
POLL_MISSES = 2  # readings in a row a host may miss (a busy machine answers late) before it is down
NEXT_PLACE_STATUSES = (503, 529)  # full queue or nothing serving there: another place may take it


def conversation_key(route: str, data: dict) -> str | None:
    """What keeps a conversation on one place: `prompt_cache_key` when the client names one,
    else a digest of its stable prefix (system prompt and first message), which every
    later turn of the conversation repeats."""
    if isinstance(data.get("prompt_cache_key"), str) and data["prompt_cache_key"]:
        return "key:" + data["prompt_cache_key"]
    if route == "completions":
        prompt = data.get("prompt")
        head = prompt[:2000] if isinstance(prompt, str) else None
    else:
        messages = data.get("messages") if isinstance(data.get("messages"), list) else []
        first = next((m for m in messages if isinstance(m, dict) and m.get("role") not in ("system", "developer")),
                     None)
        system = [m for m in messages[:2] if isinstance(m, dict) and m.get("role") in ("system", "developer")]
        head = None if first is None else [data.get("system"), system, first]
    if head is None:
        return None
    return "prefix:" + hashlib.blake2b(dump(head), digest_size=12).hexdigest()


class HostRouting:
    def __init__(self, config: Config, local: RelayClient, chooser: Chooser | None = None):
        self.config = config
        self.views: dict[str, HostView] = {LOCAL: HostView(LOCAL, config.wrapper_url)}
        self.clients: dict[str, RelayClient] = {LOCAL: local}
        self.refused: dict[str, str] = {}
        for entry in config.hosts:
            self.views[entry.name] = HostView(entry.name, entry.url)
            try:
                self.clients[entry.name] = RelayClient(base=entry.url, key=read_key(entry, config.home),
                                                       ssl=pinned_context(entry, config.home),
                                                       what=f"host {entry.name}")
            except MlxgateError as exc:
                self.refused[entry.name] = str(exc)
                self.views[entry.name].lost(str(exc))
        self.chooser = chooser or Chooser(self.views)
        self._misses: dict[str, int] = {}
        self._poller: asyncio.Task | None = None
        self._first_poll: asyncio.Task | None = None

    # ---------------------------------------------------------------- host state
    async def _poll_one(self, name: str) -> None:
        view = self.views[name]
        if name in self.refused:
            return
        try:
            view.read(await self.clients[name].get_json("/models", timeout=POLL_TIMEOUT))
            self._misses[name] = 0
        except Unavailable as exc:
            self._misses[name] = self._misses.get(name, 0) + 1
            if self._misses[name] < POLL_MISSES and view.reachable and "Timeout" in str(exc):
                return
            if view.reachable:
                log.warning("%s went down: %s", name, exc)
            view.lost(_why(exc))
            self.chooser.failed(name, exc)

    async def poll(self) -> None:
        await asyncio.gather(*(self._poll_one(name) for name in self.views))
        self.chooser.sync()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_EVERY)
            try:
                await self.poll()
            except Exception:  # keep polling whatever one reading did
                log.exception("reading the hosts' state failed")

    async def started(self) -> None:
        """The first reading is done and the poller runs (started by the first request)."""
        if self._first_poll is None:
            self._first_poll = asyncio.ensure_future(self.poll())
            self._poller = asyncio.ensure_future(self._poll_forever())
        await asyncio.shield(self._first_poll)

    # ---------------------------------------------------------------- requests
    async def forward(self, send, api: str, target, route: str, api_path: str, data: dict,
                      client_headers: dict | None = None) -> bool:
        """Send the request to the best place; try the next while nothing reached the client.
        False when the answer from the place broke off mid-way (the place died, or dropped a
        connection it could not write to: either way the gateway records the failure)."""
        await self.started()
        conversation = conversation_key(route, data) if route != "count_tokens" else None
        places = await self.chooser.choose(target.model, conversation)
        if not places:
            raise Unavailable(self._nowhere(target.model))
        last: MlxgateError | None = None
        for index, name in enumerate(places):
            view, client = self.views[name], self.clients[name]
            view.inflight[target.model] += 1
            try:
                try:
                    response = await client.open(api_path, target.model, data, client_headers)
                except Unavailable as exc:
                    log.warning("%s did not take a request for %s: %s", name, target.model, exc)
                    view.lost(_why(exc))
                    self.chooser.failed(name, exc)
                    last = exc
                    continue
                if response.status in NEXT_PLACE_STATUSES and index + 1 < len(places):
                    response.release()
                    last = Unavailable(f"{name} answered {response.status}")
                    continue
                if response.status < 400:
                    await self.chooser.served(name, target.model, conversation)
                try:
                    complete = await client.pipe(response, _tagged(send, name), api)
                except BackendError as exc:  # a JSON answer cut short: nothing reached the client yet
                    complete, last = None, exc
                if not complete:
                    view.lost(f"{client.what} closed an answer mid-way")
                    self.chooser.failed(name, Unavailable("closed mid-answer"))
                if complete is not None:
                    return complete
                if index + 1 == len(places):
                    raise last
                # else the next place, as for a host that did not take it
            finally:
                view.inflight[target.model] -= 1
        raise Unavailable(f"no place could take the request for {target.model!r}: {last}. "
                          f"Check `mlxgate status`.")

    def _nowhere(self, model: str) -> str:
        down = [n for n, v in self.views.items() if not v.reachable]  # why is for the operator: `mlxgate status`
        return (f"no place can serve {model!r} now: no reachable host has it"
                + (f"; down: {', '.join(down)}" if down else "") + ". `mlxgate status` says why.")

    def model_names(self) -> tuple[str, ...]:
        """The models the reachable hosts serve, for `GET /v1/models`."""
        return tuple(sorted({m for n, v in self.views.items() if n != LOCAL and v.reachable for m in v.models}))

    async def close(self) -> None:
        for task in (self._poller, self._first_poll):
            if task is not None:
                task.cancel()
        for name, client in self.clients.items():
            if name != LOCAL:
                await client.close()


def _tagged(send, name: str):
    """`send` that names the place in the answer's headers."""
    async def tagged(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = dict(message, headers=[*message.get("headers", []), (HOST_HEADER, name.encode())])
        await send(message)
    return tagged


def _why(exc: Exception) -> str:
    text = str(exc)
    if "Certificate" in text or "SSL" in text:
        return f"refused: its certificate does not come from its pinned authority ({text})"
    return text
