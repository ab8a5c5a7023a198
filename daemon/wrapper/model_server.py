"""One model server (dynamic or autocomplete) as an explicit state machine.

States and the only transitions allowed between them::

    stopped ──► starting ──► ready ──► stopping ──► stopped
                   │  ▲         │
                   ▼  │         ▼
                  failed ◄──────┘   (process died or load failed)

Every change goes through `_transition`, which checks the table, records the change
and wakes waiters. Loads are serialized by one lock: callers asking for the model
that is loading wait for that load and share its result; a caller asking for another
model waits its turn. A failed load restores the model that was serving before.
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
from ..net import port_in_use
from . import process as processes
from .admission import Admission
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
    model: LocalModel | None = None
    process: processes.ServerProcess | None = None
    error: str | None = None
    loads: int = 0
    load_seconds: float | None = None
    changed: float = field(default_factory=time.time)


class ModelServer:
    """A `mlx_lm.server` on a fixed port that serves one model at a time."""

    def __init__(self, role: str, port: int, launcher: Launcher, load_timeout: float,
                 clock: Callable[[], float] = time.monotonic, admission: Admission | None = None,
                 drain_timeout: float = 120.0, observer=None):
        self.role = role
        self.observer = observer  # told of loads and restarts (`Metrics`), when given
        self.port = port
        self.launcher = launcher
        self.load_timeout = load_timeout
        self.clock = clock
        self.admission = admission or Admission(role)
        self.drain_timeout = drain_timeout
        self._status = _Status()
        self._lock = threading.Lock()        # guards _status
        self._turn = threading.Lock()        # one load or stop at a time
        self._closing = False

    # ------------------------------------------------------------------ state
    def _transition(self, to: State, expected: State | None = None, **changes) -> None:
        with self._lock:
            current = self._status.state
            if expected is not None and current is not expected:
                raise IllegalTransition(f"{self.role}: expected {current.value} to be {expected.value}")
            if to not in TRANSITIONS[current]:
                raise IllegalTransition(f"{self.role}: {current.value} -> {to.value} is not allowed")
            for key, value in changes.items():
                setattr(self._status, key, value)
            self._status.state = to
            self._status.changed = time.time()
        model = self._status.model.name if self._status.model else "-"
        detail = f" ({self._status.error})" if to is State.FAILED and self._status.error else ""
        log.info("%s server: %s -> %s [%s]%s", self.role, current.value, to.value, model, detail)

    @property
    def process(self):
        """The running process, if any."""
        return self._status.process

    @property
    def state(self) -> State:
        return self._status.state

    def serving(self) -> LocalModel | None:
        """The model this server answers with now (None unless it is ready)."""
        with self._lock:
            s = self._status
            return s.model if s.state is State.READY else None

    def status(self) -> dict:
        with self._lock:
            s = self._status
            return {
                "role": self.role,
                "port": self.port,
                "state": s.state.value,
                "model": s.model.name if s.model else None,
                "path": str(s.model.path) if s.model else None,
                "pid": s.process.pid if s.process and s.process.alive() else None,
                "error": s.error,
                "loads": s.loads,
                "load_seconds": s.load_seconds,
                "since": s.changed,
                "queue": self.admission.status(),
            }

    # ------------------------------------------------------------------ actions
    def ensure(self, model: LocalModel) -> dict:
        """Make `model` the one this server serves; block until it answers.

        Raises `ModelLoadFailed` (or `ModelLoadTimeout`); the model that served
        before is then serving again.
        """
        with self._turn:
            with self._lock:
                current = self._status
                serving = current.state is State.READY and current.process.alive()
                previous = current.model if current.state is State.READY else None
            if serving and previous == model:
                return self.status()
            try:
                verify_model_folder(model.path)
            except (ValueError, OSError) as exc:
                kept = f"{previous.name!r} is still serving" if previous else None
                raise ModelLoadFailed(self._failure(model, str(exc), kept)) from None
            switching = self.clock()
            self._drain(f"the {self.role} server switched from {previous.name!r} to {model.name!r} "
                        f"after waiting {self.drain_timeout:g} s (drain_timeout) for this request"
                        if previous else "")
            try:
                self._stop_process()
                self._start(model, switch=previous is not None)
                if previous is not None and self.observer is not None:
                    self.observer.switched(self.role, self.clock() - switching)
            except ModelLoadFailed as exc:
                note = None
                if previous is not None:
                    try:
                        self._start(previous)
                        note = f"{previous.name!r} is serving again"
                    except ModelLoadFailed as again:
                        log.error("%s server: could not restore %s: %s", self.role, previous.name, again)
                        note = (f"{previous.name!r} could not be restored; see "
                                f"`mlxgate logs {self._log_path().stem}`")
                raise ModelLoadFailed(self._failure(model, str(exc), note)) from None
            finally:
                self.admission.resume()
            return self.status()

    def restart(self, reason: str) -> None:
        """Kill the process (it may be stopped or hung) and start the same model again.
        Requests it held end with `reason`; waiting ones are served afterwards."""
        with self._lock:
            model, proc = self._status.model, self._status.process
        log.warning("%s server: restarting %s: %s", self.role, model.name if model else "-", reason)
        if self.observer is not None:
            self.observer.restart(self.role)
        self.admission.cancel_active(reason)
        if proc is not None:
            proc.kill()
        with self._turn:
            self._stop_process()
            if self.state is State.FAILED:
                self._transition(State.STOPPED)
            if model is not None and not self._closing:
                self._start(model)

    def stop(self) -> dict:
        """Stop the server process (after its requests, up to drain_timeout); it is `stopped` afterwards."""
        with self._turn:
            self._drain(f"the {self.role} server was stopped after waiting {self.drain_timeout:g} s "
                        f"(drain_timeout) for this request")
            try:
                self._stop_process()
            finally:
                self.admission.resume()
            if self.state is State.FAILED:
                self._transition(State.STOPPED)
            return self.status()

    def kill_now(self) -> None:
        """Stop the process without waiting for a load in progress (wrapper exit)."""
        self._closing = True
        proc = self._status.process
        if proc is not None:
            proc.stop(grace=2.0)

    # ------------------------------------------------------------------ internals
    def _drain(self, reason: str) -> None:
        """Let the requests in progress finish (new ones wait); end those left after the timeout."""
        left = self.admission.drain(self.drain_timeout, reason)
        if left:
            log.warning("%s server: %d request(s) still running after %g s; ending them",
                        self.role, len(left), self.drain_timeout)

    def _failure(self, model: LocalModel, reason: str, note: str | None) -> str:
        reason = reason.replace(str(model.path), model.name)  # clients see names, not this machine's paths
        message = f"model {model.name!r} failed to load on the {self.role} server: {reason}"
        return f"{message}. {note}" if note else message

    def _log_path(self) -> Path:
        return self.launcher.log_dir / f"{self.role}-server.log"

    def _start(self, model: LocalModel, switch: bool = False) -> None:
        try:
            seconds = self._launch(model)
        except ModelLoadFailed:
            if self.observer is not None:
                self.observer.load(self.role, None, ok=False, switch=switch)
            raise
        if self.observer is not None:
            self.observer.load(self.role, seconds, ok=True, switch=switch)

    def _launch(self, model: LocalModel) -> float:
        """Start the process for `model` and wait until it answers; the seconds it took."""
        if port_in_use(self.port):
            self._transition(State.STARTING, model=model, process=None, error=None)
            reason = (f"port {self.port} is already in use by another process; stop it or choose "
                      f"another {self.role}_port")
            self._transition(State.FAILED, error=reason)
            raise ModelLoadFailed(reason)
        started = self.clock()
        proc = self.launcher.launch(model.path, self.port, self._log_path(), self.launcher.extra_args)
        self._transition(State.STARTING, model=model, process=proc, error=None,
                         loads=self._status.loads + 1, load_seconds=None)
        threading.Thread(target=self._watch, args=(proc,), name=f"watch-{self.role}-{proc.pid}",
                         daemon=True).start()
        try:
            self.launcher.probe(proc, self.port, self.load_timeout, clock=self.clock)
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

    def _stop_process(self) -> None:
        with self._lock:
            state, proc = self._status.state, self._status.process
        if state in (State.READY, State.STARTING):
            self._transition(State.STOPPING)
            if proc is not None:
                proc.stop()
            self._transition(State.STOPPED, process=None)
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
            except IllegalTransition:
                pass  # a stop or load got there first
