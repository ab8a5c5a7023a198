"""Small network helpers shared by the wrapper and the daemon control."""

from __future__ import annotations

import select
import socket
import ssl

TLS_ALERT = 0x15  # a TLS 1.2 record of this type from a client that is waiting is its close_notify


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the system's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def peer_closed(sock: socket.socket) -> bool:
    """True when the other end has closed the connection; never reads data and never waits.

    On a TLS connection the bytes are peeked below the encryption: a client that closes
    sends a close_notify alert first, which a TLS 1.2 record header shows (the relay's TLS
    listener speaks TLS 1.2 for that reason; TLS 1.3 hides record types)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        if isinstance(sock, ssl.SSLSocket):
            with socket.fromfd(sock.fileno(), sock.family, sock.type) as raw:
                head = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return head == b"" or head[0] == TLS_ALERT
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):
        return True
