"""One request to the wrapper and its answer, whichever server received it: gunicorn (the
management port, through Flask) or one of the relay's own doors (`doors`). The relay
reads a `Call` and returns an `Answer`; the servers translate to and from the wire."""

from __future__ import annotations

import inspect
import socket
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterable, Mapping


@dataclass
class Call:
    method: str
    path: str
    headers: Mapping[str, str]  # read with lower-case names (`get`)
    body: bytes = b""
    args: Mapping[str, str] = field(default_factory=dict)  # the query string
    client: socket.socket | None = None  # the caller's connection, watched while it waits


class Stream:
    """The pieces of a streamed answer, as they come. Whoever sends them closes it however the
    sending ends; closing a stream that never started runs `abandon` (it gives the request's
    place in the queue back, which the pieces' own `finally` would have done)."""

    def __init__(self, pieces: Generator[bytes, None, None], abandon: Callable[[], None]):
        self._pieces, self._abandon = pieces, abandon

    def __iter__(self):
        return self._pieces

    def close(self) -> None:
        never_started = inspect.getgeneratorstate(self._pieces) == inspect.GEN_CREATED
        self._pieces.close()
        if never_started:
            self._abandon()


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes | Iterable[bytes]  # bytes, or a `Stream`

    @property
    def streamed(self) -> bool:
        return not isinstance(self.body, bytes)
