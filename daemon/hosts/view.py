"""What the gateway knows of each place a request can go (this machine and each host):
which models it can serve, which of them its resident set holds, how full their queues
are, how much room its memory budget has, and whether it answers. Read from the place's
`GET /models` every second, plus the requests this gateway has sent it and not yet
finished (so a burst spreads before the next reading)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

READY_OR_LOADING = ("ready", "starting")


def weights_by_name(answer: dict) -> dict[str, str | None]:
    """A place's `GET /models` answer as model name -> weights digest."""
    return {row["name"]: row.get("weights") for row in answer.get("models") or []}


@dataclass
class HostView:
    name: str
    url: str = ""
    reachable: bool = False
    error: str | None = "not asked yet"
    models: dict[str, str | None] = field(default_factory=dict)  # name -> weights digest
    sizes: dict[str, int] = field(default_factory=dict)           # name -> weights bytes
    servers: dict[str, dict] = field(default_factory=dict)        # model -> its server's status (the resident set)
    memory: dict = field(default_factory=dict)                    # the place's budget, used and free
    checked: float = 0.0
    inflight: Counter = field(default_factory=Counter)           # model -> requests we sent, not finished

    def read(self, answer: dict, now: float | None = None) -> None:
        """Take a `GET /models` answer."""
        self.models = weights_by_name(answer)
        self.sizes = {row["name"]: int(row.get("size_bytes") or 0) for row in answer.get("models") or []}
        self.servers = dict(answer.get("servers") or {})
        self.memory = dict(answer.get("memory") or {})
        self.reachable, self.error, self.checked = True, None, now or time.time()

    def lost(self, error: str, now: float | None = None) -> None:
        self.reachable, self.error, self.checked = False, error, now or time.time()

    def has_model(self, model: str) -> bool:
        """The place's resident set holds `model` (loaded, or loading)."""
        return (self.servers.get(model) or {}).get("state") in READY_OR_LOADING

    def can_serve(self, model: str) -> bool:
        return model in self.models or self.has_model(model)

    def _queue(self, model: str) -> dict:
        return (self.servers.get(model) or {}).get("queue") or {}

    def load(self, model: str) -> int:
        """Requests waiting or running for `model` there."""
        queue = self._queue(model)
        seen = int(queue.get("queued", 0)) + len(queue.get("active") or ())
        return max(seen, self.inflight[model])

    def capacity(self, model: str) -> int:
        queue = self._queue(model) or next((s.get("queue") for s in self.servers.values() if s.get("queue")), {})
        return int(queue.get("max_parallel", 1)) + int(queue.get("max_queue", 16))

    def has_room(self, model: str) -> bool:
        return self.load(model) < self.capacity(model)

    def load_cost(self, model: str) -> int:
        """0: the model is resident there (loaded or loading); 1: it would load into free room;
        2: it would evict an idle model to load; 3: it would wait for busy models first."""
        if self.has_model(model):
            return 0
        free = self.memory.get("free")
        if free is None or free >= self.sizes.get(model, 0):
            return 1
        idle = any(s.get("state") == "ready" and not s.get("pinned") and not (s.get("queue") or {}).get("pending")
                   for s in self.servers.values())
        return 2 if idle else 3
