"""One thread does the disk tier's disk work, so a request never waits on a disk write.

It never calls MLX. MLX streams are per thread: an unevaluated array handed to another thread makes
`mx.save_safetensors` there fail ("There is no Stream(cpu, 1) in current thread") or write wrong data,
and MLX calls on a second thread aborted the process at exit. So the generation thread evaluates a
snapshot and hands over numpy views of its buffers; this thread does plain file and SQLite work on them.

A snapshot waits here until its deadline (or until `flush`); entries that leave memory are written at
once. A full disk pauses writing for a while and drops what is pending: requests never see it. The bytes
waiting here are bounded: a snapshot past the bound is not taken."""

from __future__ import annotations

import heapq
import itertools
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .store import DISK_FULL, DiskStore, Snapshot, log

IDLE_WAKE = 5.0  # seconds between looks when nothing is due
TOTALS_EVERY = 30.0  # the disk totals are read again at least this often (another process may change them)


@dataclass(eq=False)
class Job:
    """A snapshot on its way to the disk."""

    snapshot: Snapshot | None
    deadline: float
    nbytes: int
    done: bool = False
    cancelled: bool = False

    @property
    def settled(self) -> bool:
        return self.done or self.cancelled


class Writer(threading.Thread):
    """The writer thread of one store. `counts` and `totals` (per fingerprint: chunks, bytes, entries on disk)
    are read by the other threads as they are."""

    def __init__(self, store: DiskStore, *, max_pending_bytes: int = 4 << 30, enospc_pause: float = 60.0):
        super().__init__(name="prompt-disk-writer", daemon=True)
        self.store = store
        self.max_pending_bytes, self.enospc_pause = max_pending_bytes, enospc_pause
        self.counts = dict(chunks_written=0, sequences_written=0, bytes_written=0, chunks_evicted=0,
                           bytes_evicted=0, write_errors=0, enospc=0, skipped_paused=0, skipped_backlog=0,
                           eager_writes=0)
        self.totals: dict[str, dict[str, int]] = {}
        self.pending_bytes = 0
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, Job]] = []
        self._tasks: list[tuple[Callable, tuple]] = []
        self._uses: dict[tuple[str, str, int], tuple[str, bytes, int, float]] = {}
        self._order = itertools.count()
        self._paused_until = 0.0
        self._closing = False
        self._idle = threading.Event()
        self._totals_at = 0.0

    # ------------------------------------------------------------ called from the generation thread

    def submit(self, snapshot: Snapshot, deadline: float) -> Job | None:
        """Queue a snapshot for `deadline`; None when writing is paused or the backlog is full."""
        with self._cv:
            if time.time() < self._paused_until:
                self.counts["skipped_paused"] += 1
                return None
            if self.pending_bytes + snapshot.nbytes > self.max_pending_bytes:
                self.counts["skipped_backlog"] += 1
                return None
            job = Job(snapshot, deadline, snapshot.nbytes)
            self.pending_bytes += job.nbytes
            heapq.heappush(self._heap, (deadline, next(self._order), job))
            self._cv.notify()
            return job

    def reschedule(self, job: Job, deadline: float) -> None:
        """Write `job` by `deadline` if that is sooner than its own."""
        with self._cv:
            if job.settled or deadline >= job.deadline:
                return
            job.deadline = deadline
            heapq.heappush(self._heap, (deadline, next(self._order), job))  # the stale item is skipped
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        with self._cv:
            if not job.settled:
                job.cancelled = True
                self._release(job)

    def task(self, work: Callable, *args) -> None:
        """Run `work(*args)` on this thread, before any due snapshot."""
        with self._cv:
            self._tasks.append((work, args))
            self._cv.notify()

    def use(self, root: str, key: str, fp: str, ntok: int, extra: bytes) -> None:
        """Count one serving of a prefix (written with the next batch of work)."""
        with self._cv:
            _, _, count, _ = self._uses.get((root, key, ntok), (fp, extra, 0, 0.0))
            self._uses[(root, key, ntok)] = (fp, extra, count + 1, time.time())

    def write_soon_if_new(self, job: Job, eager_tokens: int) -> None:
        """Write `job` now rather than at its deadline when `eager_tokens` of it are not on disk yet: a long
        fresh prefill should survive a crash right after it."""
        self.task(self._eager, job, eager_tokens)

    # ------------------------------------------------------------ any thread

    def flush(self, timeout: float) -> bool:
        """Write everything pending now; True once all is written within `timeout` seconds."""
        self._due_now()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._cv:
                busy = self._tasks or self._uses or any(not job.settled for _, _, job in self._heap)
            if not busy and self._idle.is_set():
                return True
            time.sleep(0.02)
        return False

    def close(self, timeout: float) -> bool:
        """Write what is pending, then stop; True if the thread stopped within `timeout` seconds."""
        self._due_now()
        with self._cv:
            self._closing = True
            self._cv.notify()
        self.join(timeout)
        return not self.is_alive()

    def _due_now(self) -> None:
        with self._cv:
            now = time.time()
            for _, _, job in list(self._heap):
                if not job.settled and job.deadline > now:
                    job.deadline = now
                    heapq.heappush(self._heap, (now, next(self._order), job))
            self._cv.notify()

    # ------------------------------------------------------------ this thread

    def _release(self, job: Job) -> None:
        """Under the lock: the job no longer counts in the backlog and lets go of its arrays."""
        self.pending_bytes -= job.nbytes
        job.snapshot = None

    def _next(self):
        with self._cv:
            while True:
                if self._tasks:
                    return "task", self._tasks.pop(0)
                now = time.time()
                while self._heap and (self._heap[0][2].settled or self._heap[0][0] != self._heap[0][2].deadline):
                    heapq.heappop(self._heap)
                if self._heap and self._heap[0][0] <= now:
                    job = heapq.heappop(self._heap)[2]
                    job.done = True
                    snapshot = job.snapshot
                    self._release(job)
                    return "write", snapshot
                if self._uses:
                    uses, self._uses = self._uses, {}
                    return "uses", uses
                if self._closing and not self._heap:
                    return "exit", None
                if now - self._totals_at > TOTALS_EVERY:
                    return "totals", None
                self._idle.set()
                wait = self._heap[0][0] - now if self._heap else IDLE_WAKE
                self._cv.wait(max(0.01, min(wait, IDLE_WAKE)))
                self._idle.clear()

    def run(self) -> None:
        while True:
            kind, item = self._next()
            if kind == "exit":
                self._idle.set()
                return
            try:
                if kind == "write":
                    self._write(item)
                elif kind == "uses":
                    self.store.record_uses(item)
                elif kind == "task":
                    work, args = item
                    work(*args)
                if kind != "uses":
                    self._totals_at = time.time()
                    self.totals = self.store.totals()
            except Exception as e:
                self.counts["write_errors"] += 1
                log.exception("prompt cache on disk: %s failed: %s", kind, e)

    def _eager(self, job: Job, eager_tokens: int) -> None:
        snapshot = job.snapshot
        if job.settled or snapshot is None:
            return
        match = self.store.lookup([(snapshot.root, snapshot.layout)], [*snapshot.tokens, 0])
        if len(snapshot.tokens) - (match.n if match else 0) >= eager_tokens:
            self.counts["eager_writes"] += 1
            self.reschedule(job, time.time())

    def _write(self, snapshot: Snapshot) -> None:
        if time.time() < self._paused_until:
            self.counts["skipped_paused"] += 1
            return
        try:
            written = self.store.write(snapshot)
        except (OSError, sqlite3.OperationalError) as e:
            if not ((isinstance(e, OSError) and e.errno in DISK_FULL) or "full" in str(e).lower()):
                raise
            self._pause(e)
            return
        self.counts["chunks_written"] += written.chunks
        self.counts["bytes_written"] += written.bytes
        self.counts["sequences_written"] += 1
        self.counts["chunks_evicted"] += written.evicted_chunks
        self.counts["bytes_evicted"] += written.evicted_bytes

    def _pause(self, error: Exception) -> None:
        self.counts["enospc"] += 1
        with self._cv:
            self._paused_until = time.time() + self.enospc_pause
            dropped = [job for _, _, job in self._heap if not job.settled]
            for job in dropped:
                job.cancelled = True
                self._release(job)
            self._heap.clear()
        log.warning("prompt cache on disk: disk full while writing (%s); writes paused %.0f s, %d pending "
                    "snapshot(s) dropped; requests are not affected", error, self.enospc_pause, len(dropped))
