"""The wrapper's model servers together: which model is where, loaded on request."""

from __future__ import annotations

import faulthandler
import logging
import threading
import time

from ..catalog import Catalog, LocalModel, for_config, weights_digest
from ..config import Config
from ..errors import Unavailable
from . import tokens
from .admission import Admission
from .model_server import Launcher, ModelServer

log = logging.getLogger("mlxgate.wrapper")

ROLES = ("dynamic", "autocomplete")


class Fleet:
    """The dynamic and autocomplete servers, and the catalog they load from."""

    def __init__(self, config: Config, catalog: Catalog | None = None,
                 launcher: Launcher | None = None, observer=None):
        self.config = config
        self._stopping = threading.Event()
        self.catalog = catalog or for_config(config)
        launcher = launcher or Launcher(config.log_dir, config.server_args)
        launchers = {"dynamic": _group_launcher(config, launcher), "autocomplete": launcher}
        self.servers = {
            role: ModelServer(role, port, launchers[role], config.load_timeout,
                              admission=Admission(role, config.max_parallel, config.max_queue),
                              drain_timeout=config.drain_timeout, observer=observer)
            for role, port in (("dynamic", config.dynamic_port), ("autocomplete", config.autocomplete_port))
        }

    def server(self, role: str) -> ModelServer:
        if role not in self.servers:
            raise ValueError(f"unknown server {role!r}; expected one of: {', '.join(ROLES)}")
        return self.servers[role]

    def load(self, name: str, role: str = "dynamic") -> dict:
        """Resolve `name` and make `role`'s server serve it; blocks until ready."""
        server = self.server(role)
        model = self.catalog.resolve(name)
        return server.ensure(model)

    def model(self, role: str, name: str | None):
        """The local model a request routed to `role` names (the serving one when it names
        none); resolved from disk only when it is not the one serving."""
        serving = self.server(role).serving()
        if name is None or (serving is not None and name == serving.name):
            if serving is None:
                raise Unavailable(f"no model is serving on the {role} server. Load one: `mlxgate load NAME`.")
            return serving
        return self.catalog.resolve(name)

    def unload(self, role: str = "dynamic") -> dict:
        return self.server(role).stop()

    def models(self) -> list[dict]:
        loaded: dict[str, list[dict]] = {}
        for status in (s.status() for s in self.servers.values()):
            if status["model"]:
                loaded.setdefault(status["path"], []).append(status)
        rows = []
        for model in self.catalog.list():
            where = loaded.get(str(model.path), [])
            rows.append(_model_row(model, where))
        return rows

    def status(self) -> dict:
        return {role: server.status() for role, server in self.servers.items()}

    def start_configured(self) -> list[threading.Thread]:
        """Load the configured default and autocomplete models in the background."""
        threads = []
        for role, name in (("dynamic", self.config.default_model),
                           ("autocomplete", self.config.autocomplete_model)):
            if name:
                thread = threading.Thread(target=self._load_logged, args=(name, role),
                                          name=f"initial-{role}", daemon=True)
                thread.start()
                threads.append(thread)
        return threads

    def _load_logged(self, name: str, role: str) -> None:
        try:
            self.load(name, role)
            tokens.counter(self.catalog.resolve(name).path)  # the first request need not load the tokenizer
        except Exception as exc:  # the state shows it; the log says why
            log.error("initial load of %r on the %s server failed: %s", name, role, exc)

    def start_watchdog(self, interval: float = 1.0) -> threading.Thread:
        """Restart a model server that is stuck: it has work, sent nothing for `stall_timeout`
        seconds, and used no CPU in that time either (a model writing a long tool call sends
        nothing but keeps computing; a hung or SIGSTOPped one does neither)."""
        cpu_seen: dict[str, tuple[float | None, float]] = {}

        def stuck(server) -> bool:
            now = time.monotonic()
            proc = server.process
            cpu = proc.cpu_seconds() if proc is not None else None
            last_cpu, since = cpu_seen.get(server.role, (None, now))
            if cpu is None or cpu != last_cpu:
                cpu_seen[server.role] = (cpu, now)
                since = now
            quiet_cpu = cpu is not None and now - since > self.config.stall_timeout
            return server.admission.quiet(self.config.stall_timeout) and quiet_cpu

        def watch():
            while not self._stopping.wait(interval):
                for server in self.servers.values():
                    if not stuck(server):
                        continue
                    faulthandler.dump_traceback(all_threads=True)  # to the log: where we were waiting
                    reason = (f"the {server.role} model server sent nothing and did no work for "
                              f"{self.config.stall_timeout:g} s (stall_timeout); it was restarted")
                    try:
                        server.restart(reason)
                    except Exception as exc:  # the state shows it; keep watching the others
                        log.error("%s server: restart failed: %s", server.role, exc)
                    cpu_seen.pop(server.role, None)
        thread = threading.Thread(target=watch, name="watchdog", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        self._stopping.set()
        for server in self.servers.values():
            server.kill_now()


def _group_launcher(config: Config, launcher: Launcher) -> Launcher:
    """The dynamic server runs across machines when `distributed` says so (see `distributed`)."""
    if not config.distributed:
        return launcher
    from dataclasses import replace

    from .distributed import launcher as group
    return replace(launcher, launch=group(config.distributed))


def _model_row(model: LocalModel, where: list[dict]) -> dict:
    return {
        "name": model.name,
        "path": str(model.path),
        "source": model.source,
        "weights": weights_digest(model.path),  # what `hosts add` compares across machines
        "loaded": any(s["state"] == "ready" for s in where),
        "servers": [{"role": s["role"], "state": s["state"], "port": s["port"]} for s in where],
    }
