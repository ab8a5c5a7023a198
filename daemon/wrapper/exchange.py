"""One request to the wrapper and its answer, whichever server received it: gunicorn (the
management port, through Flask) or one of the relay's own doors (`doors`). The relay
reads a `Call` and returns an `Answer`; the servers translate to and from the wire."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Iterable, Mapping


@dataclass
class Call:
    method: str
    path: str
    headers: Mapping[str, str]  # read with lower-case names (`get`)
    body: bytes = b""
    args: Mapping[str, str] = field(default_factory=dict)  # the query string
    client: socket.socket | None = None  # the caller's connection, watched while it waits


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes | Iterable[bytes]  # bytes, or the pieces of a stream as they come

    @property
    def streamed(self) -> bool:
        return not isinstance(self.body, bytes)
