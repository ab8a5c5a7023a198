"""The watchdog: finds a wedged model server, busy or idle, and replaces it.

Every `LOOK_EVERY` seconds it asks each ready server `GET /mlxgate/alive` (see
`mlx_lm_entry`), which says how long ago the generation loop last went round and whether
its thread lives. It needs no waiting client: a server that was stopped (SIGSTOP), hangs or
deadlocks while idle, or whose every client gave up after a few seconds, is found the same
way. A server is wedged when its generation thread died (at once), or when for
`stall_timeout` seconds it gave no fresh answer (no reply, or a loop that did not go round)
while using almost no CPU: a server busy with one long step (a big prefill, a long
sequential generation) computes, so it is left alone. A wedged server is restarted with the
same model; the requests it held end with the reason, waiting ones are served after.
"""

from __future__ import annotations

import faulthandler
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("mlxgate.wrapper")

LOOK_EVERY = 5.0
LOOK_TIMEOUT = 5.0
BUSY_CPU_SHARE = 0.10  # a server that used more than this share of a core is computing, not wedged


@dataclass
class _Seen:
    process: object
    last_fresh: float
    cpu: float | None
    cpu_at: float
    looking: bool = False


class Watchdog:
    def __init__(self, servers: Callable[[], list], stall_timeout: float, observer=None,
                 clock: Callable[[], float] = time.monotonic, look_every: float = LOOK_EVERY):
        self.servers = servers
        self.stall_timeout = stall_timeout
        self.observer = observer
        self.clock = clock
        self.look_every = look_every
        self._seen: dict[object, _Seen] = {}
        self._lock = threading.Lock()

    def start(self, stopping: threading.Event, interval: float = 1.0) -> threading.Thread:
        def run():
            last_look = 0.0
            while not stopping.wait(interval):
                now = self.clock()
                look = now - last_look >= self.look_every
                if look:
                    last_look = now
                for server in self.servers():
                    try:
                        self.check(server, look)
                    except Exception:  # keep watching the others
                        log.exception("%s: the watchdog's check failed", server.label)
        thread = threading.Thread(target=run, name="watchdog", daemon=True)
        thread.start()
        return thread

    def check(self, server, look: bool) -> None:
        proc = server.process
        if proc is None or not server.ready():
            self._seen.pop(server, None)
            return
        now = self.clock()
        seen = self._seen.get(server)
        if seen is None or seen.process is not proc:  # a new process: fresh from its readiness probe
            seen = self._seen[server] = _Seen(proc, now, proc.cpu_seconds(), now)
        if look and not seen.looking:
            seen.looking = True
            threading.Thread(target=self._look, args=(server, seen), name="watchdog-look", daemon=True).start()
        cpu = proc.cpu_seconds()
        if cpu is not None and seen.cpu is not None and cpu - seen.cpu > BUSY_CPU_SHARE * (now - seen.cpu_at):
            seen.cpu, seen.cpu_at = cpu, now  # computing: the quiet window starts again
        if now - seen.last_fresh > self.stall_timeout and now - seen.cpu_at > self.stall_timeout:
            self._replace(server, f"{server.model.name}'s server answered nothing and did no work for "
                                  f"{self.stall_timeout:g} s (stall_timeout); it was restarted")

    def _look(self, server, seen: _Seen) -> None:
        try:
            report = seen.process.alive_report(LOOK_TIMEOUT)
            if report is None:
                return
            server.last_report = report  # the metrics read its prompt cache counters
            if report.get("generation") is False:
                self._replace(server, f"{server.model.name}'s server lost its generation thread; it was restarted")
            elif report.get("idle_s", 0) < self.stall_timeout:
                seen.last_fresh = self.clock() - report.get("idle_s", 0)
        finally:
            seen.looking = False

    def _replace(self, server, reason: str) -> None:
        with self._lock:
            if self._seen.pop(server, None) is None:
                return  # being replaced already
        faulthandler.dump_traceback(all_threads=True)  # to the log: where we were waiting
        threading.Thread(target=self._restart, args=(server, reason), name="watchdog-restart", daemon=True).start()

    @staticmethod
    def _restart(server, reason: str) -> None:
        try:
            server.restart(reason)
        except Exception as exc:  # the state shows it
            log.error("%s: restart failed: %s", server.label, exc)
