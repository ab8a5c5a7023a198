"""The batch worker: the one thread that runs the model, and the rule by which it forms batches.

A request thread tokenizes, hands its sequences to `Batcher.submit` as one job and waits. The
worker moves queued jobs into its pool of pending ones, forms a batch (`form_batch`), runs it, gives
each row's answer to its job, and looks at the queue again: requests that arrive while a batch runs
join the next one, and a big request is cut into batches that small ones share. Nothing waits for
company: a lone request runs at once.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .engine import Sequence

# Rows x longest row: the padded size of one forward pass. It bounds the activations one batch
# holds and how long a batch runs, which is how long a request that arrives meanwhile waits.
MAX_BATCH_TOKENS = 8192
MAX_BATCH_ROWS = 64  # more rows of short inputs add no speed on MLX's CPU backend
CANDIDATES_PER_ROW = 4  # rows dealt from the pool per row a batch may take: the choice of lengths
LOOK_EVERY = 1.0  # seconds an idle worker waits for a job before it goes round (the heartbeat)


class Job:
    """One request's sequences and, once the worker has run them all, their answers."""

    __slots__ = ("seqs", "out", "left", "done", "error")

    def __init__(self, seqs: list[Sequence]):
        self.seqs, self.out, self.left = seqs, [None] * len(seqs), len(seqs)
        self.done, self.error = threading.Event(), None


@dataclass
class Pending:
    """A job in the worker's pool and the rows of it not yet run."""

    job: Job
    rows: list[int] = field(default_factory=list)


def form_batch(pool: list[Pending], max_tokens: int, max_rows: int) -> list[tuple[Job, int]]:
    """Take the next batch out of `pool` (oldest job first).

    The candidates are the pending rows dealt round-robin over the jobs, so a small request waiting
    behind a 2,048-input one gets into the next batch. The batch is the first candidate (the oldest
    job's next row: nothing starves, and a row longer than `max_tokens` runs alone) and the candidates
    nearest to it in length, within `max_tokens` rows x longest row and `max_rows`.
    """
    candidates: list[tuple[Job, int]] = []
    for depth in range(max(len(p.rows) for p in pool)):
        candidates += [(p.job, p.rows[depth]) for p in pool if depth < len(p.rows)]
        if len(candidates) >= max_rows * CANDIDATES_PER_ROW:
            break
    sizes = [len(job.seqs[row].ids) for job, row in candidates]
    chosen, longest = [], 0
    for k in sorted(range(len(candidates)), key=lambda k: (abs(sizes[k] - sizes[0]), k)):
        widest = max(longest, sizes[k])
        if chosen and (len(chosen) >= max_rows or (len(chosen) + 1) * widest > max_tokens):
            continue
        chosen.append(k)
        longest = widest
    batch = [candidates[k] for k in sorted(chosen)]
    taken: dict[int, set[int]] = {}
    for job, row in batch:
        taken.setdefault(id(job), set()).add(row)
    for p in pool:
        p.rows = [row for row in p.rows if row not in taken.get(id(p.job), ())]
    pool[:] = [p for p in pool if p.rows]
    return batch


class Batcher:
    """Runs `run` (a list of sequences -> one answer row each) on its own thread, over batches of
    the sequences submitted from any thread."""

    def __init__(self, run: Callable[[list[Sequence]], np.ndarray], max_tokens: int = MAX_BATCH_TOKENS,
                 max_rows: int = MAX_BATCH_ROWS, clock: Callable[[], float] = time.monotonic):
        self.run, self.max_tokens, self.max_rows, self.clock = run, max_tokens, max_rows, clock
        self.queue: queue.Queue[Job] = queue.Queue()
        self.beat = clock()
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "padded_tokens": 0, "largest_batch": 0}
        self.thread = threading.Thread(target=self._loop, name="batch-worker", daemon=True)
        self.thread.start()

    def submit(self, seqs: list[Sequence]) -> np.ndarray:
        """The answers to `seqs`, in order, once the worker has run them; raises what the model raised."""
        if not seqs:
            return np.zeros((0,), dtype=np.float32)
        job = Job(seqs)
        self.queue.put(job)
        while not job.done.wait(LOOK_EVERY):
            if not self.thread.is_alive():
                raise RuntimeError("the batch worker has stopped; this model server must be restarted")
        if job.error is not None:
            raise job.error
        return np.stack(job.out)

    def report(self) -> dict:
        """What `/mlxgate/alive` says of the worker."""
        return {"generation": self.thread.is_alive(), "idle_s": round(self.clock() - self.beat, 3),
                "queued": self.queue.qsize(), **self.stats}

    def _take(self, pool: list[Pending], wait: bool) -> None:
        """Move the queued jobs into `pool`, waiting up to `LOOK_EVERY` for one when `wait`."""
        try:
            job = self.queue.get(timeout=LOOK_EVERY) if wait else self.queue.get_nowait()
            while True:
                pool.append(Pending(job, list(range(len(job.seqs)))))
                job = self.queue.get_nowait()
        except queue.Empty:
            return

    def _loop(self) -> None:
        pool: list[Pending] = []
        while True:
            self.beat = self.clock()
            self._take(pool, wait=not pool)
            if pool:
                self._run(pool, form_batch(pool, self.max_tokens, self.max_rows))

    def _run(self, pool: list[Pending], batch: list[tuple[Job, int]]) -> None:
        seqs = [job.seqs[row] for job, row in batch]
        try:
            out, error = self.run(seqs), None
        except Exception as exc:  # a failed batch fails its requests, not the worker
            out, error = None, exc
        for k, (job, row) in enumerate(batch):
            if error is not None:
                job.error = error
                job.done.set()
                continue
            job.out[row] = out[k]
            job.left -= 1
            if job.left == 0:
                job.done.set()
        if error is not None:  # the failed jobs' other rows are not run
            failed = {id(job) for job, _ in batch}
            pool[:] = [p for p in pool if id(p.job) not in failed]
        lengths = [len(s.ids) for s in seqs]
        stats = self.stats
        stats["batches"] += 1
        stats["rows"] += len(seqs)
        stats["tokens"] += sum(lengths)
        stats["padded_tokens"] += len(seqs) * max(lengths)
        stats["largest_batch"] = max(stats["largest_batch"], len(seqs))
