"""Where every request's `Record` goes, in the wrapper: counted at once (`Metrics`), kept in
memory for the status page (the last requests, per-minute totals of the last hour), and
written to the usage ledger by a thread of its own, in batches.

Nothing here can slow or fail a request: `add` only appends to a bounded queue. When the
database is down, each lost batch costs a warning (at most one a minute) and a counter,
not memory; a full queue drops the newest records, counted. `close` writes what is left,
so a clean stop loses none that were answered.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

from ..ledger import Ledger
from ..usage import Record
from .metrics import Metrics

log = logging.getLogger("mlxgate.usage")

MAX_PENDING = 10_000
BATCH = 500
INTERVAL = 0.5
RECENT = 50
MINUTES = 60


@dataclass
class Minute:
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0


class Recorder:
    def __init__(self, ledger: Ledger | None, metrics: Metrics, max_pending: int = MAX_PENDING,
                 clock=time.time):
        self.ledger = ledger
        self.metrics = metrics
        self.max_pending = max_pending
        self.clock = clock
        self.recent: collections.deque[Record] = collections.deque(maxlen=RECENT)
        self.minutes: dict[int, Minute] = {}
        self.started = clock()
        self.totals = Minute()
        self._pending: collections.deque[Record] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._warned = 0.0
        self._writer = None
        if ledger is not None:
            self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
            self._writer.start()

    def add(self, record: Record) -> None:
        self.metrics.record(record)
        minute = int(record.at // 60)
        with self._cond:
            self.recent.append(record)
            for bucket in (self.minutes.setdefault(minute, Minute()), self.totals):
                bucket.requests += 1
                bucket.errors += int(record.failed)
                bucket.input_tokens += record.input_tokens
                bucket.cached_tokens += record.cached_tokens
                bucket.output_tokens += record.output_tokens
            for old in [m for m in self.minutes if m <= minute - MINUTES]:
                del self.minutes[old]
            if self.ledger is None:
                return
            if len(self._pending) >= self.max_pending:
                self.metrics.dropped.inc()
                return
            self._pending.append(record)
            if len(self._pending) >= BATCH:
                self._cond.notify()

    def dropped_elsewhere(self, count: int) -> None:
        """Records a proxy program lost before they reached us."""
        if count > 0:
            self.metrics.dropped.inc(count)

    def _take(self) -> list[Record]:
        with self._cond:
            batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
        return batch

    def _write_loop(self) -> None:
        try:
            self.ledger.connect()  # the table exists from the start, before the first batch
        except Exception as exc:
            self._warned = self.clock()
            log.warning("usage ledger at %s cannot be opened yet: %s", self.ledger.where, exc)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closing or len(self._pending) >= BATCH, INTERVAL)
                closing = self._closing
            while True:
                batch = self._take()
                if not batch:
                    break
                self._write(batch)
            if closing:
                return

    def _write(self, batch: list[Record]) -> None:
        try:
            self.ledger.insert(batch)
        except Exception as exc:  # the database is down or refuses: count it, say so, keep no memory
            self.metrics.ledger_failures.inc()
            self.metrics.dropped.inc(len(batch))
            if self.clock() - self._warned > 60:
                self._warned = self.clock()
                log.warning("usage ledger at %s: %d record(s) not written: %s", self.ledger.where, len(batch), exc)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending, then stop the writer."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._writer is not None:
            self._writer.join(timeout)
        if self.ledger is not None:
            self.ledger.close()

    # ------------------------------------------------------------------ for the status page
    def snapshot(self) -> dict:
        now_minute = int(self.clock() // 60)
        with self._cond:
            series = []
            for minute in range(now_minute - MINUTES + 1, now_minute + 1):
                bucket = self.minutes.get(minute, Minute())
                series.append({"minute": minute * 60, "requests": bucket.requests,
                               "output_tokens": bucket.output_tokens, "cached_tokens": bucket.cached_tokens,
                               "input_tokens": bucket.input_tokens,
                               "tokens_per_second": round(bucket.output_tokens / 60, 2)})
            recent = [r.to_dict() for r in reversed(self.recent)]
            totals = dict(vars(self.totals))
        for row in recent:
            row.pop("detail", None)
        return {"since": self.started, "totals": totals, "series": series, "recent": recent}
