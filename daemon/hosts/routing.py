"""Where a request goes: LiteLLM's Router chooses among this machine and the hosts.

Each model is a model group whose deployments are the places that can serve it. The Router keeps what it is good at: cooldowns (a place that failed is left out for
`COOLDOWN` seconds, then tried again by itself) and deployment affinity (a conversation,
keyed by `session_id`, stays on the place that served its previous turn while that
place is healthy, so its prompt cache is hit). The ranking itself is a custom routing
strategy fed with mlxgate's view of every place (`HostView`): a place whose resident set
holds the model first (no load), then one with free room for it, then the least loaded. A
conversation's place is not kept when it would have to load the model while another place
has it loaded and room.

The Router only chooses: the request is sent by the gateway itself, on its own path,
after the hooks ran once (see `proxy.hosts`).
"""

from __future__ import annotations

import os
import random
from typing import Callable

from .view import HostView

COOLDOWN = 10.0       # seconds a failed place is left out
AFFINITY_TTL = 3600   # seconds a conversation stays pinned to its place
ORDER = "mlxgate_order"


def deployment_id(host: str, group: str) -> str:
    return f"{host}|{group}"


def host_of(deployment: dict) -> str:
    return deployment["model_info"]["host"]


class Chooser:
    """The Router, its deployments kept in step with the views, and our strategy."""

    def __init__(self, views: dict[str, HostView], cooldown: float = COOLDOWN,
                 shuffle: Callable[[list], None] = random.shuffle):
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        from litellm import Router
        from litellm.router_utils.pre_call_checks.deployment_affinity_check import DeploymentAffinityCheck

        self.views = views
        self.shuffle = shuffle
        self.router = Router(model_list=[], optional_pre_call_checks=["session_affinity"], cooldown_time=cooldown,
                             num_retries=0, allowed_fails=0, deployment_affinity_ttl_seconds=AFFINITY_TTL)
        self.router.set_custom_routing_strategy(_Strategy(self))
        self.affinity = next(c for c in self.router.optional_callbacks if isinstance(c, DeploymentAffinityCheck))
        self.cooldown = cooldown
        self._groups: set[tuple[str, str]] = set()

    # ---------------------------------------------------------------- deployments
    def _deployments(self) -> list[dict]:
        out = []
        for (host, group) in sorted(self._groups):
            out.append({"model_name": group,
                        "litellm_params": {"model": f"openai/{group}", "api_base": self.views[host].url or host,
                                           "api_key": "unused"},
                        "model_info": {"id": deployment_id(host, group), "host": host}})
        return out

    def sync(self) -> None:
        """Make the Router's deployments the (place, group) pairs the views show."""
        wanted = set()
        for host, view in self.views.items():
            for model in {*view.models, *view.servers}:
                if view.can_serve(model):
                    wanted.add((host, model))
        if wanted != self._groups:
            self._groups = wanted
            self.router.set_model_list(self._deployments())

    def ensure(self, host: str, model: str) -> None:
        if self.views[host].can_serve(model) and (host, model) not in self._groups:
            self._groups.add((host, model))
            self.router.set_model_list(self._deployments())

    # ---------------------------------------------------------------- choosing
    async def choose(self, model: str, conversation: str | None) -> list[str]:
        """The places to try, best first (empty: none can serve it now)."""
        group = model
        kwargs: dict = {"metadata": {"session_id": conversation} if conversation else {}}
        try:
            await self.router.async_get_available_deployment(model=group, request_kwargs=kwargs)
        except Exception:  # no deployment: unknown everywhere, or every place cooling down
            pass
        if kwargs.get(ORDER):
            return [host_of(d) for d in kwargs[ORDER]]
        # every place that could serve it is cooling down: try them anyway, reachable ones first
        able = [d for d in self._deployments() if d["model_name"] == group]
        return [host_of(d) for d in sorted(self.rank(able, model),
                                           key=lambda d: not self.views[host_of(d)].reachable)]

    async def served(self, host: str, model: str, conversation: str | None) -> None:
        """`host` answered this conversation: pin it there (the first pin holds while its place is healthy)."""
        if conversation:
            group = model
            await self.affinity.async_pre_call_deployment_hook({"metadata": {
                "session_id": conversation, "deployment_model_name": group,
                "model_info": {"id": deployment_id(host, group)}}}, None)

    def failed(self, host: str, error: Exception) -> None:
        """Leave `host` out of every group for the cooldown."""
        for (place, group) in self._groups:
            if place == host:
                self.router.cooldown_cache.add_deployment_to_cooldown(
                    deployment_id(place, group), error, 503, self.cooldown)

    # ---------------------------------------------------------------- ranking
    def rank(self, deployments: list[dict], model: str) -> list[dict]:
        """Resident first (then: free room for it, then an idle model to evict, then busy ones
        to wait for); among equals the least loaded, ties in random order; places without room last."""
        views = [self.views[host_of(d)] for d in deployments]
        order = list(range(len(deployments)))
        self.shuffle(order)
        order.sort(key=lambda i: (not views[i].has_room(model), views[i].load_cost(model),
                                  views[i].load(model) / max(1, views[i].capacity(model))))
        return [deployments[i] for i in order]

    def keeps_conversation(self, pinned: dict, others: list[dict], model: str) -> bool:
        """A pinned place is kept unless it would load the model while another place has it and room."""
        view = self.views[host_of(pinned)]
        if view.has_model(model):
            return True
        return not any(self.views[host_of(d)].has_model(model) and self.views[host_of(d)].has_room(model)
                       for d in others)


class _Strategy:
    """LiteLLM's custom routing strategy hook: the healthy deployments (cooldowns and the
    conversation's pin applied by the Router), ranked by mlxgate's view."""

    def __init__(self, chooser: Chooser):
        self.chooser = chooser

    async def async_get_available_deployment(self, model: str, messages=None, input=None,
                                             specific_deployment=False, request_kwargs=None):
        router = self.chooser.router
        request_kwargs = request_kwargs if request_kwargs is not None else {}
        model_name = model
        healthy = await _healthy(router, model, dict(request_kwargs))
        if len(healthy) == 1 and request_kwargs.get("metadata", {}).get("session_id"):
            everyone = await _healthy(router, model, {"metadata": {}})
            others = [d for d in everyone if host_of(d) != host_of(healthy[0])]
            if self.chooser.keeps_conversation(healthy[0], others, model_name):
                healthy = [healthy[0], *self.chooser.rank(others, model_name)]  # the rest: retries
            else:
                healthy = self.chooser.rank(everyone, model_name)
            request_kwargs[ORDER] = healthy
            return healthy[0] if healthy else None
        ranked = self.chooser.rank(healthy, model_name)
        request_kwargs[ORDER] = ranked
        return ranked[0] if ranked else None

    def get_available_deployment(self, *args, **kwargs):
        raise NotImplementedError("mlxgate chooses asynchronously")


async def _healthy(router, model: str, request_kwargs: dict) -> list[dict]:
    """The Router's healthy deployments of `model` (its pre-call checks applied) as a list:
    it answers one deployment alone as a dict."""
    found = await router.async_get_healthy_deployments(model=model, request_kwargs=request_kwargs)
    return [found] if isinstance(found, dict) else list(found)
