"""The proxy program's usage records: requests it answered itself (a refused key, a malformed
body, a hook's refusal, the wrapper down) and requests LiteLLM answered. They go to the
wrapper, the one owner of the counts and the ledger, in batches, off the request path:
`add` only appends to a bounded buffer; a background task posts it every half second. When
the wrapper cannot be reached the batch is dropped and counted, and the count goes with
the next batch that arrives. Records of local models' requests are made by the relay.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from ..json_body import dump
from ..usage import Record

log = logging.getLogger("mlxgate.proxy")

MAX_PENDING = 5000
INTERVAL = 0.5
BATCH = 500


class RecordSender:
    def __init__(self, post, enabled: bool = True):
        """`post(path, body_bytes)` sends to the wrapper (the relay client's session)."""
        self.post = post
        self.enabled = enabled
        self.pending: collections.deque[Record] = collections.deque()
        self.dropped = 0
        self._task: asyncio.Task | None = None
        self._warned = 0.0

    def add(self, record: Record) -> None:
        if not self.enabled:
            return
        if len(self.pending) >= MAX_PENDING:
            self.dropped += 1
        else:
            self.pending.append(record)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.pending:
            await asyncio.sleep(INTERVAL)
            await self.flush()

    async def flush(self) -> None:
        while self.pending or self.dropped:
            batch = [self.pending.popleft() for _ in range(min(BATCH, len(self.pending)))]
            dropped, self.dropped = self.dropped, 0
            try:
                await self.post("/usage/records", dump({"records": [r.to_dict() for r in batch],
                                                        "dropped": dropped}))
            except Exception as exc:  # the wrapper is down: count what is lost, say so once a minute
                self.dropped += dropped + len(batch)
                if time.monotonic() - self._warned > 60:
                    self._warned = time.monotonic()
                    log.warning("usage records not delivered to the wrapper (%s); counted as dropped", exc)
                return
