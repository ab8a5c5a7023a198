"""The server of one resident model as an explicit state machine.

States and the only transitions allowed between them::

    stopped ──► starting ──► ready ──► stopping ──► stopped
                   │  ▲         │
                   ▼  │         ▼
                  failed ◄──────┘   (process died or load failed)

A server serves one model for its whole life (`mlx_lm_entry` refuses any other). Every
change goes through `_transition`, which checks the table and records the change; a
server that stops or fails holds no memory in the budget any more (`cost` 0). Loads are
serialized by one lock: callers asking while a load runs wait for it and share its
result. Before a load, `ensure` asks the resident set for room (`reserve`), which may
evict idle models, wait for busy ones, or refuse at once.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..catalog import LocalModel, verify_model_folder
from ..errors import ModelLoadFailed
from ..net import free_port, port_in_use
from . import server_process as processes
from ..model_kinds import CHAT
from .admission import Admission
from .kinds import SERVING, Serving
from .readiness import wait_until_ready

log = logging.getLogger("mlxgate.wrapper")


class State(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.READY, State.FAILED, State.STOPPING}),
    State.READY: frozenset({State.STOPPING, State.FAILED}),
    State.STOPPING: frozenset({State.STOPPED}),
    State.FAILED: frozenset({State.STARTING, State.STOPPED}),
}
HOLDS_MEMORY = (State.STARTING, State.READY, State.STOPPING)
EXIT_GRACE = 4.0  # seconds a model server has at the wrapper's exit (its disk tier writes in 3)


class IllegalTransition(RuntimeError):
    pass


@dataclass
class Launcher:
    """How a model server process is started; tests may pass another `launch`."""

    log_dir: Path
    extra_args: Sequence[str] = ()
    launch: Callable[..., processes.ServerProcess] = processes.launch
    probe: Callable[..., None] = wait_until_ready


@dataclass
class _Status:
    state: State = State.STOPPED
    process: processes.ServerProcess | None = None
    port: int | None = None
    error: str | None = None
    loads: int = 0
    load_seconds: float | None = None
    changed: float = field(default_factory=time.time)
    stopped_because: str | None = None


class ModelServer:
    """A `mlx_lm.server` that serves `model`, on the seat's port or one chosen at each start."""

    def __init__(self, model: LocalModel, launcher: Launcher, load_timeout: float, *,
                 serving: Serving = SERVING[CHAT], kind: str = CHAT,
                 port: int | None = None, name: str | None = None, pinned: bool = False,
                 keep_alive: float = -1, server_args: Sequence[str] = (), admission: Admission | None = None,
                 drain_timeout: float = 120.0, observer=None, avoid_ports: frozenset[int] = frozenset(), clock: Callable[[], float] = time.monotonic):
        self.model = model
        self.kind, self.serving = kind, serving  # what the folder holds, and how its kind is served
        self.name = name or model.name  # a seat's name ("dynamic", "autocomplete"), else the model's
        self.seat_port = port
        self.pinned = pinned
        self.keep_alive = keep_alive
        self.server_args = tuple(server_args)
        self.launcher = launcher
        self.load_timeout = load_timeout
        self.clock = clock
        self.admission = admission or Admission(model.name)
        self.drain_timeout = drain_timeout
        self.observer = observer  # told of loads and restarts (`Metrics`), when given
        self.avoid_ports = avoid_ports  # the config's own ports: a chosen port is never one
        self.cost = 0              # bytes it holds in the budget while it holds memory
        self.allowance = 0         # of which its prompt cache may use this much
        self.waiting_for: str | None = None  # what its load waits for (room in the budget)
        self.crashed: float | None = None    # when its process died on its own while it served
        self.last_crash_restart = float("-inf")
        self.last_report: dict = {}          # the process's last `GET /mlxgate/alive` answer (the watchdog's)
        self._status = _Status()
        self._lock = threading.Lock()        # guards _status
        self._turn = threading.Lock()        # one load or stop at a time
        self._closing = False

    # ------------------------------------------------------------------ state
    def _transition(self, to: State, expected: State | None = None, **changes) -> None:
        with self._lock:
            current = self._status.state
            if expected is not None and current is not expected:
                raise IllegalTransition(f"{self.name}: expected {current.value} to be {expected.value}")
            if to not in TRANSITIONS[current]:
                raise IllegalTransition(f"{self.name}: {current.value} -> {to.value} is not allowed")
            for key, value in changes.items():
                setattr(self._status, key, value)
            self._status.state = to
            self._status.changed = time.time()
        detail = f" ({self._status.error})" if to is State.FAILED and self._status.error else ""
        log.info("%s: %s -> %s%s", self.label, current.value, to.value, detail)
        if to not in HOLDS_MEMORY:
            self.cost = 0

    @property
    def label(self) -> str:
        """How logs and messages call this server."""
        return self.model.name if self.name == self.model.name else f"{self.model.name} ({self.name} server)"

    @property
    def process(self):
        """The running process, if any."""
        return self._status.process

    @property
    def port(self) -> int | None:
        return self._status.port or self.seat_port

    @property
    def state(self) -> State:
        return self._status.state

    def ready(self) -> bool:
        with self._lock:
            s = self._status
            return s.state is State.READY and s.process is not None and s.process.alive()

    def status(self) -> dict:
        with self._lock:
            s = self._status
            queue = self.admission.status()
            return {
                "name": self.name,
                "model": self.model.name,
                "kind": self.kind,
                "path": str(self.model.path),
                "port": self.port,
                "state": s.state.value,
                "pid": s.process.pid if s.process and s.process.alive() else None,
                "error": s.error,
                "loads": s.loads,
                "load_seconds": s.load_seconds,
                "since": s.changed,
                "pinned": self.pinned,
                "keep_alive": self.keep_alive,
                "cost_bytes": self.cost,
                "prompt_cache_bytes": self.allowance,
                "waiting_for": self.waiting_for,
                "stopped_because": s.stopped_because,
                "prompt_cache": {k: v for k, v in self.last_report.items() if k.startswith("prompt_")},
                "queue": queue,
            }

    # ------------------------------------------------------------------ actions
    def ensure(self, reserve: Callable[["ModelServer"], None] = lambda server: None) -> dict:
        """Start this model's server unless it is ready; block until it answers.

        `reserve` makes room for it in the budget first (it may wait, or raise). Raises
        `ModelLoadFailed` (or `ModelLoadTimeout`) when it cannot serve.
        """
        with self._turn:
            if self.ready():
                return self.status()
            try:
                verify_model_folder(self.model.path)
            except (ValueError, OSError) as exc:
                raise ModelLoadFailed(self._failure(str(exc))) from None
            self._stop_process()
            if self.state is State.FAILED:
                self._transition(State.STOPPED)
            reserve(self)  # sets `cost`; the state it leaves is STOPPED until the launch
            try:
                self._start()
            except ModelLoadFailed as exc:
                raise ModelLoadFailed(self._failure(str(exc))) from None
            return self.status()

    def restart(self, reason: str) -> None:
        """Kill the process (it may be stopped or hung) and start the same model again.
        Requests it held end with `reason`; waiting ones are served afterwards."""
        with self._lock:
            proc = self._status.process
        log.warning("%s: restarting: %s", self.label, reason)
        if self.observer is not None:
            self.observer.restart(self.model.name)
        self.admission.cancel_active(reason)
        if proc is not None:
            proc.kill()
        with self._turn:
            cost = self.cost
            self._stop_process()
            if self.state is State.FAILED:
                self._transition(State.STOPPED)
            if not self._closing:
                self.cost = cost  # the same model again: the same room
                self._start()

    def stop(self, reason: str = "") -> dict:
        """Stop the server process (after its requests, up to drain_timeout); `stopped` after."""
        with self._turn:
            self._drain(f"{self.model.name} was unloaded ({reason or 'asked'}) after waiting "
                        f"{self.drain_timeout:g} s (drain_timeout) for this request")
            try:
                self._stop_process(reason)
            finally:
                self.admission.resume()
            if self.state is State.FAILED:
                self._transition(State.STOPPED, stopped_because=reason or None)
            return self.status()

    def kill_now(self, wait: bool = True) -> None:
        """Stop the process without waiting for a load in progress (wrapper exit): SIGTERM, and
        with `wait`, SIGKILL after the few seconds it has to write what is pending."""
        self._closing = True
        proc = self._status.process
        if proc is not None:
            proc.stop(grace=EXIT_GRACE) if wait else proc.terminate()

    # ------------------------------------------------------------------ internals
    def _drain(self, reason: str) -> None:
        """Let the requests in progress finish (new ones wait); end those left after the timeout."""
        left = self.admission.drain(self.drain_timeout, reason)
        if left:
            log.warning("%s: %d request(s) still running after %g s; ending them",
                        self.label, len(left), self.drain_timeout)

    def _failure(self, reason: str) -> str:
        reason = reason.replace(str(self.model.path), self.model.name)  # clients see names, not paths
        return f"model {self.model.name!r} failed to load: {reason}"

    def _log_path(self) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)
        return self.launcher.log_dir / f"{safe}-server.log"

    def _choose_port(self) -> int:
        if self.seat_port is not None:
            return self.seat_port
        while True:
            port = free_port()
            if port not in self.avoid_ports:
                return port

    def _start(self) -> None:
        try:
            seconds = self._launch()
        except ModelLoadFailed:
            if self.observer is not None:
                self.observer.load(self.model.name, None, ok=False)
            raise
        if self.observer is not None:
            self.observer.load(self.model.name, seconds, ok=True)

    def _launch(self) -> float:
        """Start the process and wait until it answers; the seconds it took."""
        port = self._choose_port()
        if port_in_use(port):
            self._transition(State.STARTING, process=None, port=port, error=None)
            reason = (f"port {port} is already in use by another process; stop it or choose another "
                      f"{self.name}_port")
            self._transition(State.FAILED, error=reason)
            raise ModelLoadFailed(reason)
        started = self.clock()
        extra = [*self.launcher.extra_args, *self.server_args] if self.serving.prompt_cache else self.server_args
        proc = self.launcher.launch(self.model.path, port, self._log_path(), extra, entry=self.serving.entry)
        self._transition(State.STARTING, process=proc, port=port, error=None, stopped_because=None,
                         loads=self._status.loads + 1, load_seconds=None)
        threading.Thread(target=self._watch, args=(proc,), name=f"watch-{proc.pid}", daemon=True).start()
        try:
            self.launcher.probe(proc, port, self.load_timeout, clock=self.clock, request=self.serving.probe)
        except ModelLoadFailed as exc:
            proc.stop()
            with self._lock:
                still_ours = self._status.process is proc and self._status.state is State.STARTING
            if still_ours:
                self._transition(State.FAILED, error=str(exc))
            raise
        seconds = self.clock() - started
        self._transition(State.READY, expected=State.STARTING, load_seconds=round(seconds, 3))
        return seconds

    def _stop_process(self, reason: str = "") -> None:
        with self._lock:
            state, proc = self._status.state, self._status.process
        if state in (State.READY, State.STARTING):
            self._transition(State.STOPPING)
            if proc is not None:
                proc.stop()
            self._transition(State.STOPPED, process=None, stopped_because=reason or None)
        elif proc is not None:
            proc.stop()

    def _watch(self, proc: processes.ServerProcess) -> None:
        """Mark the server failed when its process dies on its own."""
        code = proc.popen.wait()
        with self._lock:
            unexpected = (self._status.process is proc and self._status.state is State.READY
                          and not self._closing)
        if unexpected:
            try:
                self._transition(State.FAILED, expected=State.READY,
                                 error=f"the server exited with code {code}: {proc.failure_reason()}")
                self.crashed = time.monotonic()
            except IllegalTransition:
                pass  # a stop or load got there first
