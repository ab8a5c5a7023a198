"""The relay beyond loopback: a host started with `--listen ADDRESS` also serves the
wrapper's routes at ADDRESS:`listen_port`, for the gateways that have it in their `hosts:`.

Over TLS only, with the key only (every route but `/health` and `/ca.pem`), and with a
certificate from this machine's authority that carries ADDRESS, so a gateway that pinned
the authority (`mlxgate hosts add`) verifies it is talking to this host. The same Flask
app and the same fleet answer as on loopback: a request from a gateway joins the same
queue as a local one, and its hooks ran once, in that gateway.

The server runs in the wrapper's worker process (the fleet lives there), one thread per
connection, and keeps connections alive: a gateway sends request after request on the
same one, since a TLS handshake per request would cost more than the whole hop. It is a
small HTTP/1.1 server of its own because werkzeug's closes every connection. Each body is
read whole before the app runs (so an answer that leaves it unread cannot spoil the next
request), answers without a length are sent chunked, and it speaks TLS 1.2: a client
that leaves is seen by the record header of its close_notify (see `net.peer_closed`).
"""

from __future__ import annotations

import io
import logging
import socket
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from ..certs import listener_context
from ..config import Config
from ..errors import MlxgateError
from ..relay_protocol import CA_PATH

log = logging.getLogger("mlxgate.wrapper")
SOCKET_KEY = "mlxgate.socket"  # the client's connection, which the relay watches
# A connection that sends nothing for this long (no handshake, no next request), or takes
# nothing we write for this long (a reader that stopped reading), is closed, so idle or
# abandoned connections do not hold threads. Gateways drop their idle ones sooner
# (`RelayClient`: 30 s), so a gateway never reuses a connection this side is closing.
IDLE_SECONDS = 120.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, app, context: ssl.SSLContext, ca_pem: bytes, max_body: int):
        self.app, self.context, self.ca_pem, self.max_body = app, context, ca_pem, max_body
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

    def handle_error(self, request, client_address) -> None:
        log.info("connection from %s ended: %s", client_address[0], sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_SECONDS  # on every read and write of the connection (the stdlib closes it on expiry)
    server: _Server

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle holds the body back
        # until the client's delayed ACK, some 20-40 ms per answer
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args) -> None:  # the relay logs what matters
        pass

    def do_GET(self) -> None:
        if self.path == CA_PATH:
            return self._plain(200, self.server.ca_pem, "application/x-pem-file")
        return self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def _plain(self, status: int, body: bytes, kind: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _serve(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            return self._plain(411, b"send the body with a Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            return self._plain(400, b"a bad Content-Length")
        if length > self.server.max_body:
            self.close_connection = True
            return self._plain(413, b"request body too large")
        body = self.rfile.read(length) if length else b""
        started: dict = {}

        def start_response(status, headers, exc_info=None):
            started.update(status=status, headers=headers)
            return self.wfile.write

        result = self.server.app(self._environ(body), start_response)
        try:
            chunks = iter(result)
            first = next(chunks, None)  # an app may call start_response with its first chunk
            code, _, reason = started["status"].partition(" ")
            self.send_response(int(code), reason)
            names = set()
            for name, value in started["headers"]:
                self.send_header(name, value)
                names.add(name.lower())
            chunked = "content-length" not in names and self.command != "HEAD"
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for data in ([first] if first is not None else []) + [chunks]:
                for piece in ([data] if isinstance(data, bytes) else data):
                    if not piece:
                        continue
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    self.wfile.flush()
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        finally:
            if hasattr(result, "close"):
                result.close()

    def _environ(self, body: bytes) -> dict:
        path, _, query = self.path.partition("?")
        environ = {
            "REQUEST_METHOD": self.command, "SCRIPT_NAME": "", "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query, "SERVER_NAME": self.server.server_address[0],
            "SERVER_PORT": str(self.server.server_address[1]), "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": self.client_address[0], "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)), "wsgi.version": (1, 0), "wsgi.url_scheme": "https",
            "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
            "wsgi.multiprocess": False, "wsgi.run_once": False, SOCKET_KEY: self.connection,
        }
        for name, value in self.headers.items():
            key = "HTTP_" + name.upper().replace("-", "_")
            if key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ


def start(config: Config, app) -> threading.Thread:
    """Serve `app` on the listen address in a background thread."""
    if not config.api_key:
        raise MlxgateError("listen: a host serves beyond loopback only with an API key; run `mlxgate start`, "
                           "which makes one")
    server = _Server((config.listen, config.listen_port), app, listener_context(config.ssl_path, config.listen),
                     (config.ssl_path / "ca.pem").read_bytes(), config.max_body)
    thread = threading.Thread(target=server.serve_forever, name="listen", daemon=True)
    thread.start()
    log.info("relay listening on https://%s:%d for other gateways", config.listen, config.listen_port)
    return thread
