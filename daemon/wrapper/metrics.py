"""The gateway's Prometheus metrics. The wrapper is their one owner: the relay records the
requests local models answer, the proxy programs send theirs (see `usage`), the model
servers report loads, switches and restarts here. `GET /metrics` on any proxy listener (key
required) shows them, whichever listener serves the scrape.

Names follow Prometheus' conventions: counters end in `_total`, durations are `_seconds`,
sizes `_bytes`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

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
                                    "model's load)", ["server"], buckets=LATENCY_BUCKETS, registry=r)
        self.cancellations = Counter("mlxgate_cancellations", "Requests whose client left before the end",
                                     ["api"], registry=r)
        self.loads = Counter("mlxgate_model_loads", "Model loads, by server and outcome", ["server", "outcome"],
                             registry=r)
        self.load_time = Histogram("mlxgate_model_load_duration_seconds", "Time a model load took",
                                   ["server"], buckets=LATENCY_BUCKETS, registry=r)
        self.switches = Counter("mlxgate_model_switches", "Loads that replaced another model", ["server"],
                                registry=r)
        self.switch_time = Histogram("mlxgate_model_switch_duration_seconds", "Time a switch took: waiting for "
                                     "the running requests (drain), then the load", ["server"],
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.restarts = Counter("mlxgate_watchdog_restarts", "Model servers the watchdog replaced", ["server"],
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
        if rec.queue_ms is not None and rec.server:
            self.queue_wait.labels(rec.server).observe(rec.queue_ms / 1000)

    def load(self, server: str, seconds: float | None, ok: bool, switch: bool) -> None:
        self.loads.labels(server, "ok" if ok else "failed").inc()
        if seconds is not None:
            self.load_time.labels(server).observe(seconds)
        if switch and ok:
            self.switches.labels(server).inc()

    def switched(self, server: str, seconds: float) -> None:
        self.switch_time.labels(server).observe(seconds)

    def restart(self, server: str) -> None:
        self.restarts.labels(server).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _FleetCollector:
    """What is true at scrape time: queues, requests in flight, model server memory."""

    def __init__(self, fleet: "Fleet"):
        self.fleet = fleet

    def collect(self):
        import psutil

        depth = GaugeMetricFamily("mlxgate_queue_depth", "Requests waiting for their turn", labels=["server"])
        flight = GaugeMetricFamily("mlxgate_requests_in_flight", "Requests a model server works on now",
                                   labels=["server"])
        loaded = GaugeMetricFamily("mlxgate_model_loaded", "1 when the server serves this model", labels=["server",
                                                                                                        "model"])
        memory = GaugeMetricFamily("mlxgate_model_server_resident_memory_bytes", "Resident memory of each model "
                                   "server process", labels=["server", "model"])
        for role, server in self.fleet.servers.items():
            queue = server.admission.status()
            depth.add_metric([role], queue["queued"])
            flight.add_metric([role], len(queue["active"]))
            model = server.serving()
            if model is not None:
                loaded.add_metric([role, model.name], 1)
            process = server.process
            if process is not None and process.alive():
                try:
                    memory.add_metric([role, model.name if model else "-"], psutil.Process(process.pid).memory_info().rss)
                except psutil.Error:
                    pass
        yield from (depth, flight, loaded, memory)
