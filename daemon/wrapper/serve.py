"""Run the wrapper under gunicorn: one worker (the model state lives in one process),
threads for concurrent requests. The fleet is built in the worker and shut down
with it; the model servers also die with it on SIGKILL (see `mlx_lm_entry`).

The proxies hand their requests to the relay at its local door (`doors`, a thread per
connection), not here; this port serves the management routes and the same relay routes
for tools. Each relay request holds a thread while it waits in its queue or streams, so
there are threads for two models' queue places (running and waiting) and some to spare for
the management routes; the proxies' requests use the door's threads, not these."""

from __future__ import annotations

import logging

from gunicorn.app.base import BaseApplication

from ..config import Config
from ..ledger import Ledger
from . import doors
from .app import create_app
from .fleet import Fleet
from .metrics import Metrics
from .recorder import Recorder
from .relay import Relay

SPARE_THREADS = 16


def thread_count(config: Config) -> int:
    return 2 * (config.max_parallel + config.max_queue) + SPARE_THREADS


class WrapperApplication(BaseApplication):
    def __init__(self, config: Config):
        self.config = config
        self.fleet: Fleet | None = None
        self.recorder: Recorder | None = None
        self.door = None
        super().__init__()

    def load_config(self) -> None:
        settings = {
            "bind": f"{self.config.wrapper_host}:{self.config.wrapper_port}",
            "workers": 1,
            "worker_class": "gthread",
            "threads": thread_count(self.config),
            "timeout": 60,
            "keepalive": 75,
            "graceful_timeout": 10,
            "proc_name": "mlxgate-wrapper",
            "loglevel": "info",
            "worker_exit": self._worker_exit,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        metrics = Metrics()
        self.fleet = Fleet(self.config, observer=metrics)
        metrics.watch(self.fleet)
        if self.config.record_usage:
            self.recorder = Recorder(Ledger.for_config(self.config), metrics)
        relay = Relay(self.fleet, self.recorder)
        app = create_app(self.fleet, relay, self.config.api_key, metrics, self.recorder)
        self.door = doors.open_door(self.config, app, relay)  # the proxies' way in: before any model server starts
        if self.config.listen:  # other gateways reach this host's relay
            doors.listen(self.config, app, relay)
        self.fleet.start_configured()
        self.fleet.start_maintenance()
        return app

    def _worker_exit(self, server, worker) -> None:
        if self.door is not None:
            self.door.close()
        if self.recorder is not None:
            self.recorder.close()  # what was answered is written before the worker goes
        if self.fleet is not None:
            self.fleet.shutdown()


def run(config: Config) -> None:
    WrapperApplication(config).run()
