"""The relay's doors: where requests reach the relay without going through gunicorn.

- **The local door**, a Unix socket in the runtime folder (`relay.sock`, mode 600): the
  proxy programs of this machine hand their requests to the relay here. The management
  port (gunicorn, `wrapper_url`) answers the same routes, but each request there passes
  gunicorn's poller, a second thread and Flask: some 1-2 ms per request on these
  machines, most of what the gateway adds to a local model's answer. Here the
  connection's own thread reads the request and calls the relay.
- **The host listener**: a host started with `--listen ADDRESS` also serves the
  wrapper's routes at ADDRESS:`listen_port`, for the gateways that have it in their
  `hosts:`. Over TLS only, and with a certificate from this machine's authority that
  carries ADDRESS, so a gateway that pinned the authority (`mlxgate hosts add`) verifies
  it is talking to this host. A request from a gateway joins the same queue as a local
  one, and its hooks ran once, in that gateway.

Both run in the wrapper's worker process (the fleet lives there), one thread per
connection, with the key required (every route but `/health`, and the listener's
`/ca.pem`), and keep
connections alive: a proxy or a gateway sends request after request on the same one (a
TLS handshake per request would cost more than the whole hop). The relay's routes are
answered by the relay directly; the management routes by the same Flask app as on the
management port. It is a small HTTP/1.1 server of its own because werkzeug's closes
every connection. Each body is read whole before anything runs (so an answer that leaves
it unread cannot spoil the next request), answers without a length are sent chunked, and
the listener speaks TLS 1.2: a client that leaves is seen by the record header of its
close_notify (see `net.peer_closed`).
"""

from __future__ import annotations

import io
import logging
import os
import socket
import socketserver
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

from ..api_paths import api_of
from ..certs import listener_context
from ..config import Config
from ..errors import MlxgateError
from ..relay_protocol import CA_PATH, door_path
from . import access
from .exchange import Answer, Call
from .relay import Relay

log = logging.getLogger("mlxgate.wrapper")
# A connection that sends nothing for this long (no handshake, no next request), or takes
# nothing we write for this long (a reader that stopped reading), is closed, so idle or
# abandoned connections do not hold threads. Proxies and gateways drop their idle ones
# sooner (`RelayClient`: 30 s), so a caller never reuses a connection this side is closing.
IDLE_SECONDS = 120.0


class _Doorway:
    """What both doors' servers carry: the Flask app, the relay, the key and the size limit."""

    # the listen backlog: the proxy opens a connection per request at once, and a full backlog
    # turns a Unix-socket connect away at once (EAGAIN) where TCP would retry (socketserver: 5)
    request_queue_size = 1024

    def setup_door(self, app, relay: Relay | None, api_key: str | None, max_body: int, ca_pem: bytes = b"") -> None:
        self.app, self.relay, self.api_key, self.max_body, self.ca_pem = app, relay, api_key, max_body, ca_pem

    def handle_error(self, request, client_address) -> None:
        log.info("connection from %s ended: %s", _peer(client_address), sys.exc_info()[1])


class _ListenServer(_Doorway, ThreadingHTTPServer):
    """The host listener: TCP on the listen address, TLS on every connection."""

    daemon_threads = True
    block_on_close = False  # closing does not wait for callers' kept-alive connections

    def __init__(self, address, app, context: ssl.SSLContext, ca_pem: bytes, max_body: int,
                 relay: Relay | None = None, api_key: str | None = None):
        self.context = context
        self.setup_door(app, relay, api_key, max_body, ca_pem)
        super().__init__(address, _Handler)

    def finish_request(self, request, client_address) -> None:
        # the handshake in the connection's own thread: a slow client holds up nobody else
        request.settimeout(_Handler.timeout)
        try:
            request = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS handshake with %s failed: %s", client_address[0], exc)
            request.close()
            return
        super().finish_request(request, client_address)


class _DoorServer(_Doorway, socketserver.ThreadingUnixStreamServer):
    """The local door: a Unix socket only this user can open (made with umask 177, so open it
    before the process starts anything that could inherit that umask)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, path: Path, app, relay: Relay, api_key: str | None, max_body: int):
        self.setup_door(app, relay, api_key, max_body)
        path.unlink(missing_ok=True)  # left by a wrapper that was killed
        old_mask = os.umask(0o177)
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old_mask)
        self.path = path

    def finish_request(self, request, client_address) -> None:
        request.settimeout(_Handler.timeout)
        super().finish_request(request, client_address)

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.path.unlink(missing_ok=True)


def _peer(client_address) -> str:
    return client_address[0] if isinstance(client_address, tuple) and client_address else "this machine"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_SECONDS  # on every read and write of the connection (the stdlib closes it on expiry)
    server: _ListenServer | _DoorServer

    def setup(self) -> None:
        super().setup()
        if self.connection.family != socket.AF_UNIX:
            # headers and body go out in separate writes: without this, Nagle holds the body
            # back until the client's delayed ACK, some 20-40 ms per answer
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args) -> None:  # the relay logs what matters
        pass

    def do_GET(self) -> None:
        if self.path == CA_PATH and self.server.ca_pem:
            return self._send(Answer(200, [("content-type", "application/x-pem-file")], self.server.ca_pem))
        return self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def _plain(self, status: int, text: bytes) -> None:
        self.close_connection = True
        self._send(Answer(status, [("content-type", "text/plain")], text))

    def _serve(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._plain(411, b"send the body with a Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            return self._plain(400, b"a bad Content-Length")
        if length > self.server.max_body:
            return self._plain(413, b"request body too large")
        body = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        path = unquote(path, "latin-1")
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        refused = access.refusal(self.server.api_key, path, headers, api_of(path))
        if refused is not None:
            return self._send(Answer(*refused))
        if self.server.relay is not None:
            args = {name: values[0] for name, values in parse_qs(query, keep_blank_values=True).items()}
            answer = self.server.relay.route(Call(self.command, path, headers, body, args, self.connection))
            if answer is not None:
                return self._send(answer)
        return self._wsgi(path, query, headers, body)

    def _send(self, answer: Answer) -> None:
        """Write `answer`: bytes with their length, a stream chunked as its pieces come. A
        stream is closed however it ends (a caller gone before its headers included): its
        place in the queue is given back."""
        body = answer.body
        try:
            self.send_response(answer.status)
            names = set()
            for name, value in answer.headers:
                self.send_header(name, value)
                names.add(name.lower())
            streamed = answer.streamed and self.command != "HEAD"
            if streamed:
                self.send_header("Transfer-Encoding", "chunked")
            elif "content-length" not in names:
                self.send_header("Content-Length", str(len(body) if isinstance(body, bytes) else 0))
            self.end_headers()
            if not streamed:
                if isinstance(body, bytes) and body and self.command != "HEAD":
                    self.wfile.write(body)
                return
            for piece in body:
                if piece:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        finally:
            if hasattr(body, "close"):
                body.close()

    def _wsgi(self, path: str, query: str, headers: dict[str, str], body: bytes) -> None:
        """A management route: the Flask app answers it, as on the management port."""
        started: dict = {}

        def start_response(status, headers, exc_info=None):
            started.update(status=status, headers=headers)
            return self.wfile.write

        result = self.server.app(self._environ(path, query, headers, body), start_response)
        try:
            chunks = list(result)
            code, _, _ = started["status"].partition(" ")
            self._send(Answer(int(code), started["headers"], b"".join(chunks)))
        finally:
            if hasattr(result, "close"):
                result.close()

    def _environ(self, path: str, query: str, headers: dict[str, str], body: bytes) -> dict:
        environ = {
            "REQUEST_METHOD": self.command, "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": query,
            "SERVER_NAME": "localhost", "SERVER_PORT": "0", "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": _peer(self.client_address), "CONTENT_TYPE": headers.get("content-type", ""),
            "CONTENT_LENGTH": str(len(body)), "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if isinstance(self.server, _ListenServer) else "http",
            "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
            "wsgi.multiprocess": False, "wsgi.run_once": False,
        }
        environ.update(("HTTP_" + name.upper().replace("-", "_"), value) for name, value in headers.items()
                       if name not in ("content-type", "content-length"))
        return environ


def _serve(server, name: str) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return thread


def open_door(config: Config, app, relay: Relay) -> _DoorServer | None:
    """The local door, in a thread; None when the runtime folder's path is too long for a
    Unix socket (the proxies then use the management port, see `door_path`)."""
    path = door_path(config.home)
    if path is None:
        log.warning("the runtime folder's path is too long for the relay's socket; the proxies use %s",
                    config.wrapper_url)
        return None
    server = _DoorServer(path, app, relay, config.api_key, config.max_body)
    _serve(server, "door")
    log.info("relay door at %s", path)
    return server


def listen(config: Config, app, relay: Relay) -> threading.Thread:
    """The host listener, in a background thread."""
    if not config.api_key:
        raise MlxgateError("listen: a host serves beyond loopback only with an API key; run `mlxgate start`, "
                           "which makes one")
    server = _ListenServer((config.listen, config.listen_port), app, listener_context(config.ssl_path, config.listen),
                           (config.ssl_path / "ca.pem").read_bytes(), config.max_body, relay, config.api_key)
    log.info("relay listening on https://%s:%d for other gateways", config.listen, config.listen_port)
    return _serve(server, "listen")
