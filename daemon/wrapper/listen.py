"""The relay beyond loopback: a host started with `--listen ADDRESS` also serves the
wrapper's routes at ADDRESS:`listen_port`, for the gateways that have it in their `hosts:`.

Over TLS only, with the key only (every route but `/health` and `/ca.pem`), and with a
certificate from this machine's authority that carries ADDRESS, so a gateway that pinned
the authority (`mlxgate hosts add`) verifies it is talking to this host. The same Flask
app and the same fleet answer as on loopback: a request from a gateway joins the same
queue as a local one, and its hooks ran once, in that gateway.

The server runs in the wrapper's worker process (the fleet lives there), one thread per
connection so gateways keep their connections alive. It speaks TLS 1.2: a client that
leaves is seen by the record header of its close_notify (see `net.peer_closed`).
"""

from __future__ import annotations

import logging
import ssl
import threading

from werkzeug.serving import WSGIRequestHandler, make_server

from ..config import Config
from ..errors import MlxgateError
from ..hosts.pinning import CA_PATH

log = logging.getLogger("mlxgate.wrapper")


class _Handler(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked streams

    def log_request(self, code="-", size="-") -> None:  # the relay logs what matters
        pass


def tls_context(config: Config) -> ssl.SSLContext:
    from ..certs import ensure_leaf

    cert, key, _ = ensure_leaf(config.ssl_path, config.listen)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def _with_authority(app, ca_pem: bytes):
    """`GET /ca.pem` answers the authority's certificate (public: `hosts add` shows its
    fingerprint to be compared); everything else is the wrapper's app."""
    def serve(environ, start_response):
        if environ.get("PATH_INFO") == CA_PATH and environ.get("REQUEST_METHOD") == "GET":
            start_response("200 OK", [("Content-Type", "application/x-pem-file"),
                                      ("Content-Length", str(len(ca_pem)))])
            return [ca_pem]
        return app(environ, start_response)
    return serve


def start(config: Config, app) -> threading.Thread:
    """Serve `app` on the listen address in a background thread."""
    if not config.api_key:
        raise MlxgateError("listen: a host serves beyond loopback only with an API key; run `mlxgate start`, "
                           "which makes one")
    context = tls_context(config)
    ca_pem = (config.ssl_path / "ca.pem").read_bytes()
    server = make_server(config.listen, config.listen_port, _with_authority(app, ca_pem), threaded=True,
                         request_handler=_Handler, ssl_context=context)
    thread = threading.Thread(target=server.serve_forever, name="listen", daemon=True)
    thread.start()
    log.info("relay listening on https://%s:%d for other gateways", config.listen, config.listen_port)
    return thread
