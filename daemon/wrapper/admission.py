"""Who may use a model server now: a bounded first-come-first-served queue.

Each request takes a `Ticket`, waits its turn (at most `max_parallel` tickets are
active at once, granted in arrival order), and gives it back when done. When
`max_queue` tickets are already waiting, `join` refuses at once (`Overloaded`), so
a client never hangs on a full gateway. An unload `drain`s: no new turns are granted,
the active tickets may finish within a timeout, and those still running after it are
cancelled with a reason the client is shown. Each active ticket
records when its backend last sent something (status shows it). Several tickets run at
once by default: the model server batches them.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import Overloaded


@dataclass(eq=False)
class Ticket:
    seq: int
    route: str
    model: Any  # what the request must be answered by (the relay's `LocalModel`)
    joined: float
    clock: Callable[[], float]
    granted: float | None = None
    last_progress: float | None = None
    cancel_reason: str | None = None
    _cancel: Callable[[], None] | None = field(default=None, repr=False)

    def progress(self) -> None:
        self.last_progress = self.clock()

    def on_cancel(self, callback: Callable[[], None] | None) -> None:
        """`callback` ends this ticket's backend call (e.g. shuts its socket)."""
        self._cancel = callback
        if callback is not None and self.cancel_reason:
            callback()

    def cancel(self, reason: str) -> None:
        self.cancel_reason = reason
        callback = self._cancel  # the request's thread may clear it meanwhile
        if callback is not None:
            try:
                callback()
            except OSError:
                pass

    def describe(self) -> dict:
        now = self.clock()
        return {"id": self.seq, "route": self.route, "model": getattr(self.model, "name", self.model),
                "waited_s": round((self.granted or now) - self.joined, 3),
                "running_s": round(now - self.granted, 3) if self.granted else None,
                "idle_s": round(now - self.last_progress, 3) if self.last_progress else None}


class Admission:
    def __init__(self, name: str, max_parallel: int = 1, max_queue: int = 16,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.max_parallel = max_parallel
        self.max_queue = max_queue
        self.clock = clock
        self._cond = threading.Condition()
        self._waiting: list[Ticket] = []
        self._active: list[Ticket] = []
        self._holds = 0
        self._joined: set = set()  # every ticket not yet released: waiting, running or loading
        self._seq = itertools.count(1)
        self.served = 0
        self.refused = 0
        self.last_used = clock()  # when a ticket last joined or was released

    def join(self, route: str, model: Any) -> Ticket:
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                self.refused += 1
                raise Overloaded(f"model {self.name} is busy: {len(self._active)} request(s) running and "
                                 f"{len(self._waiting)} waiting (max_queue {self.max_queue}). Retry shortly.")
            ticket = Ticket(next(self._seq), route, model, self.clock(), self.clock)
            self._waiting.append(ticket)
            self._joined.add(ticket)
            self.last_used = self.clock()
            self._grant()
            return ticket

    def wait(self, ticket: Ticket, timeout: float | None = None) -> bool:
        """Block until `ticket` may run (True) or `timeout` passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: ticket.granted is not None or ticket.cancel_reason, timeout) \
                and ticket.granted is not None

    def release(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket in self._active:
                self._active.remove(ticket)
                self.served += 1
            elif ticket in self._waiting:
                self._waiting.remove(ticket)
            if ticket in self._joined:
                self._joined.discard(ticket)
                self.last_used = self.clock()
            self._grant()
            self._cond.notify_all()

    def step_out(self, ticket: Ticket) -> None:
        """Take `ticket` out of line (it keeps its place for `step_in`), e.g. to load its model."""
        with self._cond:
            for line in (self._active, self._waiting):
                if ticket in line:
                    line.remove(ticket)
            ticket.granted = None
            self._grant()

    def step_in(self, ticket: Ticket) -> None:
        """Put a ticket that stepped out back at the head of the line."""
        with self._cond:
            self._waiting.insert(0, ticket)
            self._grant()

    def _grant(self) -> None:
        while not self._holds and self._waiting and len(self._active) < self.max_parallel:
            ticket = self._waiting.pop(0)
            ticket.granted = ticket.last_progress = self.clock()
            self._active.append(ticket)
        self._cond.notify_all()

    def drain(self, timeout: float, reason: str) -> list[Ticket]:
        """Stop granting turns and wait for the active tickets; cancel those left after
        `timeout`. Call `resume()` afterwards. Returns the cancelled tickets."""
        with self._cond:
            self._holds += 1
            self._cond.wait_for(lambda: not self._active, timeout)
            left = list(self._active)
        for ticket in left:
            ticket.cancel(reason)
        return left

    def resume(self) -> None:
        with self._cond:
            self._holds = max(0, self._holds - 1)
            self._grant()

    def cancel_active(self, reason: str) -> list[Ticket]:
        with self._cond:
            active = list(self._active)
        for ticket in active:
            ticket.cancel(reason)
        return active

    @contextlib.contextmanager
    def holding(self):
        """Count as pending while the block runs (a load asked for by hand, not by a request)."""
        place = object()
        with self._cond:
            self._joined.add(place)
        try:
            yield
        finally:
            with self._cond:
                self._joined.discard(place)
                self.last_used = self.clock()

    def pending(self) -> int:
        """Tickets not yet released (waiting, running, or out of line for a load)."""
        with self._cond:
            return len(self._joined)

    def idle_for(self) -> float | None:
        """Seconds since the last ticket was released; None while any is pending."""
        with self._cond:
            return None if self._joined else self.clock() - self.last_used

    def status(self) -> dict:
        with self._cond:
            return {"queued": len(self._waiting), "active": [t.describe() for t in self._active],
                    "draining": self._holds > 0, "pending": len(self._joined),
                    "idle_s": None if self._joined else round(self.clock() - self.last_used, 3),
                    "max_queue": self.max_queue, "max_parallel": self.max_parallel,
                    "served": self.served, "refused": self.refused}
