"""The pieces of several-machine routing that need no running host: host entries and the
config block `hosts add` writes, the conversation key, and the ranking LiteLLM's Router
is fed with."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from mlxgate.config import load_config
from mlxgate.errors import ConfigError
from mlxgate.host_entries import HostEntry, parse_hosts, shown_fingerprint, write_hosts
from mlxgate.hosts.routing import Chooser
from mlxgate.hosts.view import HostView
from mlxgate.proxy.hosts import conversation_key

FP = "ab" * 32


def test_write_hosts_keeps_every_other_line_of_the_config(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("# my models\nmodel_dirs: [~/m]\nhosts:\n- name: old\n  url: https://10.0.0.9:1\n"
                    "  ca_sha256: x\nmax_tokens: 100  # mine\n")
    write_hosts(path, (HostEntry("studio", "https://192.168.1.20:11434", FP),))
    text = path.read_text()
    assert "# my models" in text and "max_tokens: 100  # mine" in text and "old" not in text
    assert yaml.safe_load(text)["hosts"] == [{"name": "studio", "url": "https://192.168.1.20:11434",
                                              "ca_sha256": FP}]
    assert load_config(path, env={}).hosts[0].name == "studio"


@pytest.mark.parametrize("hosts, problem", [
    ([{"name": "a", "url": "http://10.0.0.1:1", "ca_sha256": FP}], "over TLS only"),
    ([{"name": "local", "url": "https://10.0.0.1:1", "ca_sha256": FP}], "which is this machine"),
    ([{"name": "a", "url": "https://10.0.0.1:1", "ca_sha256": "12"}], "64 hex digits"),
    ([{"name": "a", "url": "https://10.0.0.1:1", "ca_sha256": FP}] * 2, "used twice"),
    ([{"name": "a", "url": "https://10.0.0.1:1"}], "exactly the keys"),
])
def test_bad_host_entries_fail_at_load(tmp_path, hosts, problem):
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"hosts": hosts}))
    with pytest.raises(ConfigError, match=problem):
        load_config(path, env={})


def test_listen_needs_one_address_and_distributed_two_ranks(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("listen: 0.0.0.0\n")
    with pytest.raises(ConfigError, match="not a wildcard"):
        load_config(path, env={})
    path.write_text("distributed: {hosts: [10.0.0.1]}\n")
    with pytest.raises(ConfigError, match="at least two addresses"):
        load_config(path, env={})
    path.write_text("distributed: {hosts: [10.0.0.1, 10.0.0.2], pipeline: true}\n")
    assert load_config(path, env={}).distributed["backend"] == "ring"
    assert parse_hosts(None) == () and shown_fingerprint("abcd") == "SHA256:AB:CD"


def test_a_conversation_keeps_its_key_across_turns():
    first = {"system": "be brief", "messages": [{"role": "user", "content": "hi"}]}
    later = {"system": "be brief", "messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"},
                                                {"role": "user", "content": "more"}]}
    other = {"system": "be brief", "messages": [{"role": "user", "content": "bye"}]}
    key = conversation_key("anthropic_messages", first)
    assert key == conversation_key("anthropic_messages", later) != conversation_key("anthropic_messages", other)
    assert conversation_key("chat_completions", {"prompt_cache_key": "s1", "messages": []}) == "key:s1"
    assert conversation_key("chat_completions", {"messages": []}) is None


def _view(name: str, resident: dict[str, int], free: int = 10 ** 12, pinned: tuple = ()) -> HostView:
    """A place whose resident set holds `resident` (model -> requests queued there)."""
    view = HostView(name, f"https://{name}:1")
    view.read({"models": [{"name": "m1", "size_bytes": 1000}, {"name": "m2", "size_bytes": 1000}],
               "servers": {model: {"state": "ready", "model": model, "pinned": model in pinned,
                                   "queue": {"queued": queued, "active": [], "max_parallel": 2, "max_queue": 2,
                                             "pending": queued}}
                           for model, queued in resident.items()},
               "memory": {"budget": 10 ** 12, "free": free}})
    return view


def test_the_router_prefers_the_resident_model_then_room_then_the_least_queued_and_keeps_conversations():
    views = {"local": _view("local", {}), "a": _view("a", {"m1": 1}), "b": _view("b", {"m1": 0}),
             "c": _view("c", {"m2": 0}, free=10)}
    chooser = Chooser(views, shuffle=lambda order: None)
    chooser.sync()

    async def scenario():
        assert await chooser.choose("m1", None) == ["b", "a", "local", "c"], "c would evict m2 first"
        assert (await chooser.choose("m2", None))[0] == "c"
        await chooser.served("a", "m1", "conv")
        assert (await chooser.choose("m1", "conv"))[0] == "a"  # its cache is there
        views["a"].servers["m1"]["state"] = "stopped"  # a unloaded it: the conversation moves
        assert (await chooser.choose("m1", "conv"))[0] == "b"
        views["b"].servers["m1"]["queue"]["queued"] = 4  # b full: a load elsewhere is better
        assert (await chooser.choose("m1", None))[0] == "local"
        chooser.failed("local", RuntimeError("down"))
        assert "local" not in await chooser.choose("m1", None)
    asyncio.run(scenario())


def test_a_place_that_would_wait_for_busy_models_ranks_after_one_that_evicts_an_idle_one():
    busy = _view("busy", {"m2": 1}, free=10)
    idle = _view("idle", {"m2": 0}, free=10)
    pinned = _view("pinned", {"m2": 0}, free=10, pinned=("m2",))
    assert (busy.load_cost("m1"), idle.load_cost("m1"), pinned.load_cost("m1")) == (3, 2, 3)
    assert (idle.load_cost("m2"), _view("room", {}).load_cost("m1")) == (0, 1)


def test_the_host_listener_keeps_a_connection_for_the_next_request_and_closes_idle_ones(tmp_path, monkeypatch):
    """The relay's TLS listener with a stand-in WSGI app: requests on one connection, and
    connections that stay silent (no handshake, or no next request) closed after the idle time."""
    import socket
    import ssl
    import threading
    import time

    from mlxgate.certs import CA_CERT, listener_context
    from mlxgate.wrapper import doors

    monkeypatch.setattr(doors._Handler, "timeout", 0.5)
    context = listener_context(tmp_path, "127.0.0.1")

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    server = doors._ListenServer(("127.0.0.1", 0), app, context, b"", 1024)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    client = ssl.create_default_context(cafile=str(tmp_path / CA_CERT))

    def closed_within(sock, seconds: float) -> bool:
        sock.settimeout(seconds)
        try:
            return sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True
        except TimeoutError:
            return False
    try:
        silent = socket.create_connection(("127.0.0.1", port))  # never says hello
        started = time.monotonic()
        assert closed_within(silent, 10) and time.monotonic() - started < 5
        with client.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1") as tls:
            for _ in range(2):  # two requests, one connection
                tls.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
                answer = b""
                while not answer.endswith(b"ok"):
                    answer += tls.recv(4096)
                assert answer.startswith(b"HTTP/1.1 200")
            assert closed_within(tls, 10)  # then nothing: closed
        silent.close()
    finally:
        server.shutdown()
        server.server_close()
