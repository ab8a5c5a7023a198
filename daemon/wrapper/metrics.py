"""The gateway's Prometheus metrics. The wrapper is their one owner: the relay records the
requests local models answer, the proxy programs send theirs (see `usage`), the model
servers report loads, evictions and restarts here. `GET /metrics` on any proxy listener (key
required) shows them, whichever listener serves the scrape.

Names follow Prometheus' conventions: counters end in `_total`, durations are `_seconds`,
sizes `_bytes`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..usage import Record

if TYPE_CHECKING:
    from .fleet import Fleet

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800, 1600, 3200)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mlxgate_requests", "Requests answered, by API, route, served model and HTTP status",
                                ["api", "route", "model", "status"], registry=r)
        self.errors = Counter("mlxgate_request_errors", "Requests that failed, by API and error kind",
                              ["api", "kind"], registry=r)
        self.input_tokens = Counter("mlxgate_input_tokens", "Prompt tokens the model processed (not cached)",
                                    ["model"], registry=r)
        self.cached_tokens = Counter("mlxgate_cached_input_tokens", "Prompt tokens read from the prompt cache",
                                     ["model"], registry=r)
        self.output_tokens = Counter("mlxgate_output_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("mlxgate_time_to_first_token_seconds", "Time from the request to the first content",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("mlxgate_request_duration_seconds", "Time from the request to the end of its answer",
                                  ["api", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.rate = Histogram("mlxgate_output_tokens_per_second", "Generation speed of each answer",
                              ["model"], buckets=RATE_BUCKETS, registry=r)
        self.queue_wait = Histogram("mlxgate_queue_wait_seconds", "Time a request waited for its turn (and its "
                                    "model's load)", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.cancellations = Counter("mlxgate_cancellations", "Requests whose client left before the end",
                                     ["api"], registry=r)
        self.loads = Counter("mlxgate_model_loads", "Model loads, by model and outcome", ["model", "outcome"],
                             registry=r)
        self.load_time = Histogram("mlxgate_model_load_duration_seconds", "Time a model load took",
                                   ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.evictions = Counter("mlxgate_model_evictions", "Models unloaded, by reason: budget (room for "
                                 "another), idle (keep_alive), unload (asked)", ["model", "reason"], registry=r)
        self.restarts = Counter("mlxgate_watchdog_restarts", "Model servers the watchdog replaced", ["model"],
                                registry=r)
        self.dropped = Counter("mlxgate_usage_records_dropped", "Request records lost before the ledger (a full "
                               "queue, or a proxy that could not reach the wrapper)", registry=r)
        self.ledger_failures = Counter("mlxgate_ledger_write_failures", "Ledger batches that could not be written",
                                       registry=r)

    def watch(self, fleet: "Fleet") -> None:
        """Report the fleet's queues, requests in flight and model server memory at each scrape."""
        self.registry.register(_FleetCollector(fleet))

    def record(self, rec: Record) -> None:
        model = rec.served_model or "-"  # never the client's name for a refused request: labels stay few
        self.requests.labels(rec.api, rec.route, model, str(rec.status)).inc()
        if rec.error:
            self.errors.labels(rec.api, rec.error).inc()
        if rec.cancelled:
            self.cancellations.labels(rec.api).inc()
        if rec.input_tokens:
            self.input_tokens.labels(model).inc(rec.input_tokens)
        if rec.cached_tokens:
            self.cached_tokens.labels(model).inc(rec.cached_tokens)
        if rec.output_tokens:
            self.output_tokens.labels(model).inc(rec.output_tokens)
        if rec.ttft_ms is not None:
            self.ttft.labels(model).observe(rec.ttft_ms / 1000)
        self.duration.labels(rec.api, model).observe(rec.total_ms / 1000)
        speed = rec.tokens_per_second
        if speed is not None:
            self.rate.labels(model).observe(speed)
        if rec.queue_ms is not None and rec.server == "local":
            self.queue_wait.labels(model).observe(rec.queue_ms / 1000)

    def load(self, model: str, seconds: float | None, ok: bool) -> None:
        self.loads.labels(model, "ok" if ok else "failed").inc()
        if seconds is not None:
            self.load_time.labels(model).observe(seconds)

    def evicted(self, model: str, reason: str) -> None:
        self.evictions.labels(model, reason).inc()

    def restart(self, model: str) -> None:
        self.restarts.labels(model).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _FleetCollector:
    """What is true at scrape time: the resident set, its memory and the budget, the queues."""

    def __init__(self, fleet: "Fleet"):
        self.fleet = fleet

    def collect(self):
        from .memory import process_tree_rss

        depth = GaugeMetricFamily("mlxgate_queue_depth", "Requests waiting for their turn", labels=["model"])
        flight = GaugeMetricFamily("mlxgate_requests_in_flight", "Requests a model's server works on now",
                                   labels=["model"])
        loaded = GaugeMetricFamily("mlxgate_model_loaded", "1 while the model is loaded (ready)", labels=["model"])
        cost = GaugeMetricFamily("mlxgate_model_cost_bytes", "What a resident model holds in the memory budget",
                                 labels=["model"])
        memory = GaugeMetricFamily("mlxgate_model_server_resident_memory_bytes", "Resident memory of each model "
                                   "server process", labels=["model"])
        budget = GaugeMetricFamily("mlxgate_memory_budget_bytes", "The memory budget of the resident set")
        used = GaugeMetricFamily("mlxgate_memory_reserved_bytes", "What the resident models hold of the budget")
        hits = CounterMetricFamily("mlxgate_prompt_cache_hits", "Requests whose prompt began with a cached prefix, "
                                   "by model and tier (memory; disk: read back instead of prefilled); since the "
                                   "model's server started", labels=["model", "tier"])
        saved = CounterMetricFamily("mlxgate_prompt_cache_tokens", "Prompt tokens read from the prompt cache "
                                    "instead of prefilled, by model and tier", labels=["model", "tier"])
        disk = GaugeMetricFamily("mlxgate_prompt_disk_bytes", "What the prompt caches hold on disk (all models)")
        state = self.fleet.memory()
        budget.add_metric([], state["budget"])
        used.add_metric([], state["used"])
        reports = {s: _fresh_report(s) for s in self.fleet.servers if s.ready()}
        on_disk = [r.get("prompt_disk_bytes") for r in reports.values()]
        if any(b is not None for b in on_disk):
            disk.add_metric([], max(b for b in on_disk if b is not None))
        for server in self.fleet.servers:
            name = server.model.name
            queue = server.admission.status()
            depth.add_metric([name], queue["queued"])
            flight.add_metric([name], len(queue["active"]))
            loaded.add_metric([name], 1 if server.ready() else 0)
            cost.add_metric([name], server.cost)
            process = server.process
            if process is not None and process.alive():
                memory.add_metric([name], process_tree_rss(process.pid))
            report = reports.get(server, {})
            for tier in ("memory", "disk"):
                if tier in (report.get("prompt_cache_hits") or {}):
                    hits.add_metric([name, tier], report["prompt_cache_hits"][tier])
                    saved.add_metric([name, tier], report["prompt_cache_tokens"][tier])
        yield from (depth, flight, loaded, cost, memory, budget, used, hits, saved, disk)


def _fresh_report(server) -> dict:
    """What the model server says of itself now (its prompt cache counters), else its last look."""
    process = server.process
    report = process.alive_report(1.0) if process is not None else None
    return report or server.last_report
