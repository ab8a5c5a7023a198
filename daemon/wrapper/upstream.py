"""One streamed call from the relay to a model server, on a plain socket.

The relay always asks `mlx_lm.server` for a stream, even when its client wants one JSON
answer: a stream is what the model server stops generating when its reader goes away.
Reading waits on the model server *and* the relay's own client at once, so a client that
goes away is noticed even while the model server is silent (a long prompt, a tool call
being written, tokens that are not yet text). `close` ends the call from any thread.
"""

from __future__ import annotations

import json
import select
import socket
import time
from typing import Iterator

import orjson

from ..errors import BackendError, RequestRejected
from ..json_body import dump
from ..net import peer_closed
from .admission import Ticket
from .server_process import ServerProcess

SILENCE_TICK = 5.0  # seconds of model-server silence after which the caller gets a keep-alive


class ClientGone(BackendError):
    """The client closed its connection: the generation is stopped, nobody is left to answer."""


class Upstream:
    def __init__(self, process: ServerProcess, path: str, body: dict, client: socket.socket | None = None,
                 keepalives: bool = True):
        self.client = client
        self.keepalives = keepalives  # a stream's caller may ping its client during silences; a JSON answer not
        self.buffer = b""
        self.last_data = time.monotonic()
        self.status = 0
        self.received = False  # anything at all from the model server (before: the call may be made again)
        payload = dump(body)
        self.sock: socket.socket | None = None
        try:
            self.sock = process.connect()
            self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                              f"Authorization: {process.auth_header}\r\nContent-Length: {len(payload)}\r\n"
                              f"Connection: close\r\n\r\n".encode() + payload)
            self.sock.settimeout(None)
        except OSError as exc:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
            raise BackendError(f"the model server on port {process.port} did not answer: {exc}") from None

    def _fill(self, ticket: Ticket) -> bool:
        """Read more from the model server; False at its end of stream."""
        while True:
            if ticket.cancel_reason:
                raise BackendError(ticket.cancel_reason)
            watched = [self.sock] + ([self.client] if self.client is not None else [])
            try:
                readable, _, _ = select.select(watched, [], [], 1.0)
            except (OSError, ValueError):
                raise BackendError(ticket.cancel_reason or "the model server connection was closed") from None
            if self.client is not None and self.client in readable and peer_closed(self.client):
                raise ClientGone("the client went away")
            if self.keepalives and not readable and not self.buffer and time.monotonic() - self.last_data > SILENCE_TICK:
                self.last_data = time.monotonic()
                self.buffer = b":\n"  # a keep-alive of our own: the caller may ping its client
                return True
            if self.sock in readable:
                try:
                    data = self.sock.recv(65536)
                except OSError as exc:
                    raise BackendError(ticket.cancel_reason or f"the model server connection failed: {exc}") \
                        from None
                if not data:
                    return False
                ticket.progress()
                self.received = True
                self.last_data = time.monotonic()
                self.buffer += data
                return True

    def _line(self, ticket: Ticket) -> bytes | None:
        while b"\n" not in self.buffer:
            if not self._fill(ticket):
                rest, self.buffer = self.buffer, b""
                return rest or None
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def _open(self, ticket: Ticket) -> None:
        """Read the status line and headers; raise for an error answer."""
        status_line = self._line(ticket) or b""
        parts = status_line.split()
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        while (self._line(ticket) or b"").strip():
            pass
        if self.status != 200:
            while self._fill(ticket) and len(self.buffer) < 8192:
                pass
            text = self.buffer.decode("utf-8", "replace").strip()
            try:
                text = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                pass
            if self.status == 400:  # a value mlx_lm.server itself refuses
                raise RequestRejected(400, f"the model server refused the request: {text}", "invalid_request")
            raise BackendError(f"the model server refused the request (HTTP {self.status}): {text}")

    def events(self, ticket: Ticket) -> Iterator[dict | None]:
        """Chunks as dicts; None for a keep-alive (prompt progress). Ends at [DONE]."""
        self._open(ticket)
        while True:
            line = self._line(ticket)
            if line is None:
                raise BackendError(ticket.cancel_reason or "the model server closed the stream before "
                                   "the answer was complete (it may have crashed or been restarted)")
            line = line.strip()
            if line.startswith(b":"):
                yield None
            elif line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return
                try:
                    chunk = orjson.loads(payload)
                except ValueError:
                    raise BackendError(f"the model server sent a line that is not JSON: {payload[:80]!r}") from None
                if isinstance(chunk, dict) and "error" in chunk:
                    raise BackendError(f"the model server failed: {chunk['error']}")
                yield chunk

    def answer(self, ticket: Ticket) -> tuple[int, bytes]:
        """A whole JSON answer (status, body): what an embedding model server sends."""
        status_line = self._line(ticket) or b""
        parts = status_line.split()
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        while (self._line(ticket) or b"").strip():
            pass
        while self._fill(ticket):
            pass
        body, self.buffer = self.buffer, b""
        if not self.status:
            raise BackendError(ticket.cancel_reason or "the model server closed the connection without an answer")
        return self.status, body

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
