"""Start, watch and stop one `mlx_lm.server` process; read its log."""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import psutil

from ..config import SECRET_VARIABLES
from ..net import peer_closed
from .mlx_lm_entry import ALIVE_PATH

_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit)\b.*")
# Connections to a model server kept open for the next requests: a new one costs a few tenths
# of a millisecond on a request's way here (the connect, and the thread `mlx_lm.server`
# starts for it), and `mlx_lm.server` closes each connection after one answer.
SPARE_CONNECTIONS = 2
SPARE_CONNECT_SECONDS = 1.0  # a server that accepts no connection (stopped, backlog full) holds nobody long
# How often the process's children (a group's ranks) are looked for again: finding them reads every
# process of the machine (psutil's ppid map), a few ms a time, where the watchdog asks each second.
CHILDREN_EVERY = 30.0


@dataclass
class ServerProcess:
    """A running model server: the process, and where its log output starts."""

    popen: subprocess.Popen
    log_path: Path
    log_offset: int
    secret: str = field(default="", repr=False)  # what a request must carry (`Authorization: Bearer ...`), see `mlx_lm_entry`
    port: int = 0
    _spares: list[socket.socket] = field(default_factory=list, repr=False)
    _spares_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _spares_closed: bool = field(default=False, repr=False)
    _tree: list = field(default_factory=list, repr=False)  # the process and its children, found at `_tree_at`
    _tree_at: float = field(default=-CHILDREN_EVERY, repr=False)

    @property
    def auth_header(self) -> str:
        return f"Bearer {self.secret}"

    def connect(self) -> socket.socket:
        """A connection for one request: one opened ahead of time if one is still open, else a new one."""
        while True:
            with self._spares_lock:
                sock = self._spares.pop() if self._spares else None
            if sock is None:
                return self._dial(10)
            if not peer_closed(sock):
                return sock
            sock.close()

    def open_spares(self) -> None:
        """Open connections for the next requests (call it once a request is on its way)."""
        while True:
            with self._spares_lock:
                if len(self._spares) >= SPARE_CONNECTIONS or self._spares_closed:
                    return
            try:
                sock = self._dial(SPARE_CONNECT_SECONDS)
            except OSError:
                return
            with self._spares_lock:
                if len(self._spares) < SPARE_CONNECTIONS and not self._spares_closed:
                    self._spares.append(sock)
                    continue
            sock.close()
            return

    def _dial(self, timeout: float) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def _close_spares(self) -> None:
        with self._spares_lock:
            spares, self._spares, self._spares_closed = self._spares, [], True
        for sock in spares:
            sock.close()

    def alive_report(self, timeout: float = 5.0) -> dict | None:
        """What the server says of itself (`mlx_lm_entry.report_liveness`); None when it
        does not answer in time."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", ALIVE_PATH, headers={"Authorization": self.auth_header})
            response = conn.getresponse()
            return json.loads(response.read()) if response.status == 200 else None
        except (OSError, ValueError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        """SIGTERM, no waiting (see `stop`)."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.popen.stdin:
            self.popen.stdin.close()
        self._close_spares()

    def kill(self) -> None:
        """SIGKILL at once: works on a hung or stopped (SIGSTOP) process."""
        if self.alive():
            self.popen.kill()
            self.popen.wait()
        self._close_spares()

    def cpu_seconds(self) -> float | None:
        """CPU time the process and its children (a group's ranks) have used so far (None if
        it cannot be read)."""
        now = time.monotonic()
        if now - self._tree_at >= CHILDREN_EVERY:
            try:
                process = psutil.Process(self.pid)
                self._tree, self._tree_at = [process, *process.children(recursive=True)], now
            except psutil.Error:
                return None
        total, gone = 0.0, []
        for index, member in enumerate(self._tree):
            try:
                times = member.cpu_times()
            except psutil.Error:
                if index == 0:  # the process itself is gone
                    return None
                gone.append(member)  # a rank that ended: its pid may be another process's next
                continue
            total += times.user + times.system
        if gone:
            self._tree = [member for member in self._tree if member not in gone]
        return total

    def log_tail(self, lines: int = 20) -> list[str]:
        """The last lines this process wrote (not earlier runs in the same log)."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self.log_offset)
                text = handle.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def failure_reason(self) -> str:
        """The most telling line of the log: the last exception, else the last line."""
        tail = self.log_tail(60)
        errors = [line.strip() for line in tail if _ERROR_LINE.match(line.strip())]
        if errors:
            return errors[-1]
        return tail[-1].strip() if tail else "no output"


MLX_LM_ENTRY = ("-m", "mlxgate.wrapper.mlx_lm_entry")


def launch(model_path: Path, port: int, log_path: Path, extra_args: Sequence[str] = (),
           entry: Sequence[str] = MLX_LM_ENTRY) -> ServerProcess:
    """Start `mlx_lm.server` for `model_path` on 127.0.0.1:`port`, tied to this process
    (`entry`: what python runs; a group's head for a model across machines).

    The child gets a pipe on stdin whose write end only we hold: its first line is the
    secret requests must carry; the child exits when the pipe closes, so it cannot outlive
    us (see `mlx_lm_entry`).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {model_path} on port {port}\n".encode())
    log.flush()
    offset = log.tell()
    # the gateway's secrets stay out (its API key, a database URL with its password)
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, *entry, "--model", str(model_path),
               "--host", "127.0.0.1", "--port", str(port), *extra_args]
    try:
        popen = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                 env=env, close_fds=True)
    finally:
        log.close()
    secret = secrets.token_urlsafe(32)
    popen.stdin.write((secret + "\n").encode())
    popen.stdin.flush()
    return ServerProcess(popen, log_path, offset, secret, port)
