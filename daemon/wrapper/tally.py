"""One relay request's `Record`, filled in as it goes: who asked, which model answered, when
the first content came, the usage the model server reported, how it ended."""

from __future__ import annotations

import time

from ..api_errors import kind_of
from ..usage import Record, apply_openai_usage, client_name


class Tally:
    def __init__(self, api: str, route: str, headers, server: str, detail: str = ""):
        self.record = Record(api=api, route=route, server=server, detail=detail,
                             client=client_name(headers.get("user-agent"), headers.get("originator")))
        self.started = time.perf_counter()
        self.first: float | None = None
        self.generating: float | None = None
        self.counting_ms = 0.0

    def chunk(self, chunk: dict) -> None:
        """A chunk from the model server: the first content, and the usage at the end."""
        if self.first is None:
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("reasoning") or delta.get("tool_calls") or choice.get("text"):
                    self.first = time.perf_counter()
                    break
        usage = chunk.get("usage")
        if usage:
            apply_openai_usage(self.record, usage)

    def generation_starts(self) -> None:
        self.generating = time.perf_counter()

    def failed(self, exc: BaseException, status: int | None = None) -> None:
        kind, explicit = kind_of(exc)
        self.record.error = kind
        if status is not None or explicit is not None:
            self.record.status = status if status is not None else explicit

    def server_timing(self) -> str:
        """Where the relay's time went, as a `Server-Timing` header: counting the prompt, waiting
        (for a turn, a load, and the relay's own work before the call), the model server's call,
        and the relay's whole time; milliseconds."""
        now = time.perf_counter()
        generating = self.generating if self.generating is not None else now
        parts = (("count", self.counting_ms), ("wait", (generating - self.started) * 1000 - self.counting_ms),
                 ("model", (now - generating) * 1000), ("relay", (now - self.started) * 1000))
        return ", ".join(f"{name};dur={max(ms, 0.0):.2f}" for name, ms in parts)

    def finish(self) -> Record:
        now = time.perf_counter()
        record = self.record
        record.total_ms = (now - self.started) * 1000
        if self.first is not None:
            record.ttft_ms = (self.first - self.started) * 1000
        if self.generating is not None:
            record.queue_ms = (self.generating - self.started) * 1000
        return record
