"""What the gateway knows of each place a request can go (this machine and each host):
which models it can serve, which one each of its model servers has loaded, how full
their queues are, and whether it answers. Read from the place's `GET /models` every
second, plus the requests this gateway has sent it and not yet finished (so a burst
spreads before the next reading)."""

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
    servers: dict[str, dict] = field(default_factory=dict)        # role -> the server's status
    checked: float = 0.0
    inflight: Counter = field(default_factory=Counter)           # role -> requests we sent, not finished

    def read(self, answer: dict, now: float | None = None) -> None:
        """Take a `GET /models` answer."""
        self.models = weights_by_name(answer)
        self.servers = dict(answer.get("servers") or {})
        self.reachable, self.error, self.checked = True, None, now or time.time()

    def lost(self, error: str, now: float | None = None) -> None:
        self.reachable, self.error, self.checked = False, error, now or time.time()

    def has_model(self, model: str, role: str) -> bool:
        """The `role` server has `model` loaded, or is loading it."""
        server = self.servers.get(role) or {}
        return server.get("model") == model and server.get("state") in READY_OR_LOADING

    def can_serve(self, model: str, role: str) -> bool:
        return role in self.servers and (model in self.models or self.has_model(model, role))

    def load(self, role: str) -> int:
        """Requests waiting or running on the `role` server."""
        queue = (self.servers.get(role) or {}).get("queue") or {}
        seen = int(queue.get("queued", 0)) + len(queue.get("active") or ())
        return max(seen, self.inflight[role])

    def capacity(self, role: str) -> int:
        queue = (self.servers.get(role) or {}).get("queue") or {}
        return int(queue.get("max_parallel", 1)) + int(queue.get("max_queue", 0))

    def has_room(self, role: str) -> bool:
        return self.load(role) < self.capacity(role)

    def switch_cost(self, model: str, role: str) -> int:
        """0: the model is there (loaded or loading); 1: the server has nothing to give up
        (stopped, failed); 2: a switch would replace another model; 3: and cut its requests short."""
        if self.has_model(model, role):
            return 0
        server = self.servers.get(role) or {}
        if server.get("state") not in READY_OR_LOADING:
            return 1
        return 3 if self.load(role) else 2
