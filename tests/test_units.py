"""Units that need no running daemon: listener protocol, certificates, routing rules, generated config."""

from __future__ import annotations

import io
import ssl
from pathlib import Path

import pytest
import yaml

from mlxgate.config import load_config
from mlxgate.errors import RequestRejected
from mlxgate.hookspecs import CallContext, Target
from mlxgate.plugins import make_manager
from mlxgate.proxy import litellm_config
from mlxgate.redaction import redact
from mlxgate.supervision.programs import program_env
from mlxgate.supervision.listener import GroupDownListener


# ---------------------------------------------------------------- group-down listener
class FakeRPC:
    def __init__(self):
        self.calls = []
        self.supervisor = self

    def shutdown(self):
        self.calls.append("shutdown")


def _frame(event: str, payload: str) -> str:
    header = (f"ver:3.0 server:supervisor serial:1 pool:group_down poolserial:1 eventname:{event} "
              f"len:{len(payload)}\n")
    return header + payload


@pytest.mark.parametrize("event, payload, shuts_down", [
    ("PROCESS_STATE_EXITED", "processname:proxy groupname:proxy from_state:RUNNING expected:0 pid:42", True),
    ("PROCESS_STATE_EXITED", "processname:wrapper groupname:wrapper from_state:RUNNING expected:1 pid:7", True),
    ("PROCESS_STATE_FATAL", "processname:proxy_https groupname:proxy_https from_state:BACKOFF", True),
    ("PROCESS_STATE_EXITED", "processname:other groupname:other from_state:RUNNING expected:0 pid:9", False),
])
def test_listener_acknowledges_then_shuts_the_group_down(event, payload, shuts_down):
    rpc, stdout, stderr = FakeRPC(), io.StringIO(), io.StringIO()
    listener = GroupDownListener(rpc, stdin=io.StringIO(_frame(event, payload)), stdout=stdout, stderr=stderr)
    assert listener.run_once() is shuts_down
    assert stdout.getvalue() == "READY\nRESULT 2\nOK"  # the protocol only, nothing else on stdout
    assert rpc.calls == (["shutdown"] if shuts_down else [])
    if shuts_down:
        assert "bringing the whole mlxgate group down" in stderr.getvalue()


def test_listener_shuts_down_once():
    rpc = FakeRPC()
    listener = GroupDownListener(rpc, stdout=io.StringIO(), stderr=io.StringIO())
    payload = "processname:proxy groupname:proxy from_state:RUNNING expected:0 pid:1"
    assert listener.handle("PROCESS_STATE_EXITED", payload)
    assert not listener.handle("PROCESS_STATE_EXITED", payload.replace("proxy", "wrapper"))
    assert rpc.calls == ["shutdown"]


# ---------------------------------------------------------------- certificates
def test_cert_makes_an_authority_and_leaves_with_proper_names(tmp_path):
    from cryptography import x509

    from mlxgate.certs import ensure_leaf

    cert, key, made = ensure_leaf(tmp_path)
    assert made and cert.name == "cert.pem" and key.name == "key.pem"
    assert (tmp_path / "ca.pem").exists() and (tmp_path / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert key.stat().st_mode & 0o777 == 0o600
    assert ensure_leaf(tmp_path)[2] is False, "kept when still good"
    dcert, dkey, _ = ensure_leaf(tmp_path, "api.anthropic.com")
    assert dcert.name == "cert_apianthropiccom.pem" and dkey.name == "key_apianthropiccom.pem"
    sans = x509.load_pem_x509_certificate(dcert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert {"localhost", "api.anthropic.com"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    # A real TLS handshake: Python's verifier accepts the chain for each name, and no other.
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(dcert, dkey)
    for name, ok in (("api.anthropic.com", True), ("localhost", True), ("example.com", False)):
        assert _handshake(server, client, name) is ok, name


def _handshake(server, client, name: str) -> bool:
    import socket
    import threading

    left, right = socket.socketpair()
    with left, right:
        served = server.wrap_socket(left, server_side=True, do_handshake_on_connect=False)
        calling = client.wrap_socket(right, server_hostname=name, do_handshake_on_connect=False)
        worker = threading.Thread(target=lambda: _quiet(served.do_handshake))
        worker.start()
        try:
            calling.do_handshake()
            return True
        except ssl.SSLCertVerificationError:
            return False
        finally:
            calling.close()
            worker.join(5)


def _quiet(call):
    try:
        call()
    except (ssl.SSLError, OSError):
        pass


# ---------------------------------------------------------------- routing rules (built-in plugins)
def _route(requested: str, **settings):
    config = load_config(Path("/nonexistent.yaml"), env={}, overrides=settings)
    pm = make_manager(entry_points=False)
    ctx = CallContext("chat_completions", requested, {"model": requested}, config)
    return pm.hook.mlxgate_resolve_model(ctx=ctx)


@pytest.mark.parametrize("requested, settings, model", [
    ("claude-opus-4-8[1m]", {"default_model": "tiny-a"}, "tiny-a"),
    ("gpt-4o", {"default_model": "tiny-a"}, "tiny-a"),
    ("openai/gpt-4o-mini", {"default_model": "tiny-a"}, "tiny-a"),
    ("tiny-c", {"default_model": "tiny-a"}, "tiny-c"),
    ("autocomplete", {"autocomplete_model": "org/tiny-b"}, "org/tiny-b"),
    ("claude-3-5-haiku-latest", {"default_model": "tiny-a", "autocomplete_model": "org/tiny-b"}, "org/tiny-b"),
    ("openai/org/tiny-b", {"autocomplete_model": "org/tiny-b"}, "org/tiny-b"),
    ("coder", {"aliases": {"coder": "tiny-c"}}, "tiny-c"),
    ("anything", {"fixed_model": "tiny-a"}, "tiny-a"),
    ("claude-3-haiku", {"fixed_model": "tiny-a", "autocomplete_model": "org/tiny-b"}, "tiny-a"),
])
def test_model_names_route_to_local_models(requested, settings, model):
    assert _route(requested, **settings) == Target(model)


def test_a_plugin_of_the_old_contract_still_routes_and_is_named_in_the_log(caplog):
    """Before the resident set a target named one of two servers; such a plugin still works
    (its server is read as "local"), and the log says where and what to change, once."""
    with caplog.at_level("WARNING", logger="mlxgate.plugins"):
        for _ in range(3):
            old = Target("tiny-b", "autocomplete")
        assert old == Target("tiny-b") and old.local and old.via == "local"
        assert Target("tiny-b", server="dynamic") == Target("tiny-b")
        assert old.server == "local"
    warnings = [r.getMessage() for r in caplog.records]
    assert len([w for w in warnings if "Target(..., 'autocomplete')" in w]) == 1, warnings
    assert any("test_units.py" in w and "return Target(model)" in w for w in warnings), warnings
    with pytest.raises(ValueError, match="via must be 'local' or 'litellm'"):
        Target("tiny-b", "gpu")


def test_claude_names_without_a_default_model_are_refused_clearly():
    with pytest.raises(RequestRejected, match="set default_model|Set default_model") as caught:
        _route("claude-opus-4-8")
    assert caught.value.status == 404


def test_token_cap_lowers_and_sets():
    config = load_config(Path("/nonexistent.yaml"), env={}, overrides={"max_tokens": 100})
    pm = make_manager(entry_points=False)
    for data, expected in (({"max_tokens": 5000}, {"max_tokens": 100}), ({}, {"max_tokens": 100}),
                           ({"max_tokens": 7}, {"max_tokens": 7}),
                           ({"max_completion_tokens": 900}, {"max_completion_tokens": 100}),
                           ({"max_tokens": 10 ** 30}, {"max_tokens": 10 ** 30}),  # invalid: left to the checks
                           ({"max_tokens": "9"}, {"max_tokens": "9"})):
        ctx = CallContext("chat_completions", "x", dict(data), config)
        pm.hook.mlxgate_pre_call(ctx=ctx)
        assert ctx.data == expected
    for route, data, expected in (("responses", {}, {"max_output_tokens": 100}),
                                  ("responses", {"max_output_tokens": 5000}, {"max_output_tokens": 100}),
                                  ("responses_input_tokens", {}, {}), ("count_tokens", {}, {}),
                                  ("anthropic_messages", {}, {})):  # required there: the check refuses it
        ctx = CallContext(route, "x", dict(data), config)
        pm.hook.mlxgate_pre_call(ctx=ctx)
        assert ctx.data == expected, route


# ---------------------------------------------------------------- generated config and environment
CLOUD = {"model_list": [{"model_name": "claude-cloud", "litellm_params": {
    "model": "anthropic/claude-opus-4-8", "api_key": "os.environ/ANTHROPIC_API_KEY"}}],
    "router_settings": {"fallbacks": [{"claude-cloud": ["claude-other"]}]}}


def test_litellm_is_configured_only_for_the_deployments_of_the_litellm_section(tmp_path):
    env = {"MLXGATE_HOME": str(tmp_path)}
    assert litellm_config.write(load_config(tmp_path / "none.yaml", env=env)) is None, "no section: no LiteLLM"
    config = load_config(tmp_path / "none.yaml", env=env, overrides={"litellm": CLOUD})
    data = yaml.safe_load(litellm_config.write(config).read_text())
    assert data["model_list"] == CLOUD["model_list"] and data["router_settings"] == CLOUD["router_settings"]
    assert "callbacks" not in data["litellm_settings"], "the hooks run once, in the edge"
    assert data["general_settings"]["master_key"] == "os.environ/MLXGATE_LITELLM_KEY"


def test_names_the_litellm_section_lists_go_to_litellm_before_the_catch_all():
    assert _route("claude-cloud", default_model="tiny-a", litellm=CLOUD) == Target("claude-cloud", "litellm")
    assert _route("claude-opus-4-8", default_model="tiny-a", litellm=CLOUD) == Target("tiny-a")


def test_program_environment_carries_the_effective_settings(tmp_path):
    config = load_config(tmp_path / "none.yaml", env={"MLXGATE_HOME": str(tmp_path), "MLXGATE_API_KEY": "k"},
                         overrides={"port": 12000, "max_tokens": 77, "enable_https": True})
    env = program_env(config, use_sudo=True)
    assert env["MLXGATE_PORT"] == "12000" and env["MAX_TOKENS"] == "77" and env["MLXGATE_ENABLE_HTTPS"] == "true"
    assert env["MLXGATE_PROXY_PREFIX"] == "sudo -n -E " and env["MLXGATE_HOME"] == str(tmp_path)
    assert program_env(config)["MLXGATE_PROXY_PREFIX"] == ""


def test_debug_logging_redacts_keys():
    data = {"model": "x", "max_tokens": 5, "api_key": "sk-1", "metadata": {"user_api_key": "sk-1",
            "headers": {"Authorization": "Bearer sk-1"}}, "messages": [{"content": "my key is sk-1"}]}
    shown = redact(data, ("sk-1",))
    assert "sk-1" not in repr(shown) and shown["max_tokens"] == 5 and shown["model"] == "x"


def test_the_documented_example_plugin_works(tmp_path):
    from mlxgate import PROJECT_ROOT

    readme = (PROJECT_ROOT / "docs" / "plugins.md").read_text()
    source = readme.split("# plugins/house_rules.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "house_rules.py").write_text(source)
    config = load_config(Path("/nonexistent.yaml"), env={}, overrides={"default_model": "tiny-a"})
    pm = make_manager([tmp_path], entry_points=False)
    ctx = CallContext("chat_completions", "fast-x", {"messages": [{"content": "hi"}]}, config)
    assert pm.hook.mlxgate_resolve_model(ctx=ctx).model == "mlx-community/Qwen2.5-Coder-0.5B-8bit"
    pm.hook.mlxgate_pre_call(ctx=ctx)
    assert ctx.data["temperature"] == 0.2 and ctx.data["max_tokens"] == config.max_tokens
    refused = CallContext("chat_completions", "x", {"messages": [{"content": "forbidden"}]}, config)
    with pytest.raises(RequestRejected, match="does not answer that"):
        pm.hook.mlxgate_pre_call(ctx=refused)


@pytest.mark.parametrize("listener, client, headers, status", [
    ("https", ("127.0.0.1", 50000), {"x-api-key": "sk-ant-someone"}, 404),        # let in (then: no route)
    ("https", ("::1", 50000), {"authorization": "Bearer sk-ant-oat01-someone"}, 404),
    ("https", ("127.0.0.1", 50000), {}, 401),                                       # no credential at all
    ("https", ("192.168.1.20", 50000), {"x-api-key": "sk-ant-someone"}, 401),     # not from this machine
    ("http", ("127.0.0.1", 50000), {"x-api-key": "sk-ant-someone"}, 401),         # the HTTP listener
    ("http", ("192.168.1.20", 50000), {"x-api-key": "gateway-key"}, 404),         # the gateway's key: anywhere
])
def test_standing_in_lets_loopback_clients_in_with_their_own_credentials(listener, client, headers, status):
    import asyncio

    from mlxgate.proxy.edge import build

    config = load_config(Path("/nonexistent.yaml"), env={"MLXGATE_API_KEY": "gateway-key"},
                         overrides={"ssl_domain": "api.anthropic.com", "stand_in_any_key": True})
    edge = build(config, https=listener == "https")
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}
    scope = {"type": "http", "method": "GET", "path": "/v1/nowhere", "client": client,
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(edge(scope, receive, send))
    assert sent[0]["status"] == status


def test_the_proxy_reaches_the_relay_at_its_door_unless_the_folder_is_too_deep_for_a_socket():
    """A Unix socket's path has at most 103 bytes on macOS; deeper, the management port serves."""
    from mlxgate.proxy.relay_client import RelayClient

    near = load_config(env={"MLXGATE_HOME": "/tmp/mlxgate-home"})  # nothing is opened: the choice only
    assert RelayClient(near).door == Path("/tmp/mlxgate-home/relay.sock")
    deep = load_config(env={"MLXGATE_HOME": "/tmp/" + "d" * 100, "MLX_WRAPPER_URL": "http://127.0.0.1:9"})
    client = RelayClient(deep)
    assert client.door is None and client.base == "http://127.0.0.1:9"


def test_a_plugin_with_the_old_name_of_the_availability_check_is_still_called_and_told_to_rename(tmp_path, caplog):
    from mlxgate.proxy.pipeline import Hooks

    (tmp_path / "old_check.py").write_text("import mlxgate\n\nCALLS = []\n\n@mlxgate.hookimpl\n"
                                           "def mlxgate_ensure_loaded(ctx):\n    CALLS.append(ctx.target.model)\n")
    config = load_config(tmp_path / "none.yaml", env={}, overrides={"default_model": "tiny-a",
                                                                    "plugin_dirs": [str(tmp_path)]})
    with caplog.at_level("WARNING", logger="mlxgate.plugins"):
        hooks = Hooks(config, make_manager(config.plugin_dirs, entry_points=False))
    assert any("old_check.py" in r.getMessage() and "is now mlxgate_check_available" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    import sys
    hooks.pm.hook.mlxgate_check_available = lambda ctx: True  # the built-in would look for the folder
    hooks.run("chat_completions", {"model": "gpt-4o"})
    assert sys.modules["mlxgate_user_plugins.old_check"].CALLS == ["tiny-a"]


def test_claude_codes_billing_line_is_dropped_for_local_models_and_kept_for_deployments():
    """Its last part is a digest of the session's first prompt: two sessions would differ from
    the first token, and none of the system prompt would be read from the cache."""
    config = load_config(Path("/nonexistent.yaml"), env={}, overrides={"default_model": "tiny-a", "litellm": CLOUD})
    pm = make_manager(entry_points=False)
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.16f; cc_entrypoint=sdk-cli;"},
              {"type": "text", "text": "You are a Claude agent.", "cache_control": {"type": "ephemeral"}}]
    for model, kept in (("claude-opus-4-8", 1), ("claude-cloud", 2)):
        ctx = CallContext("anthropic_messages", model, {"model": model, "system": list(system)}, config)
        ctx.target = pm.hook.mlxgate_resolve_model(ctx=ctx)
        pm.hook.mlxgate_pre_call(ctx=ctx)
        assert len(ctx.data["system"]) == kept and ctx.data["system"][-1]["text"] == "You are a Claude agent."


def test_a_ledger_written_before_a_column_was_added_gets_it_and_keeps_its_rows(tmp_path):
    import sqlite3

    from mlxgate.ledger import Ledger
    from mlxgate.usage import COLUMNS, Record

    path = tmp_path / "usage.sqlite"
    old = [c for c in COLUMNS if c != "images"]
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE requests (id INTEGER PRIMARY KEY AUTOINCREMENT, {', '.join(old)})")
        db.execute("INSERT INTO requests (api, route, at, input_tokens) VALUES ('openai', 'chat_completions', 1.0, 7)")
    ledger = Ledger(str(path))
    assert ledger.insert([Record("anthropic", "anthropic_messages", images=2, input_tokens=300)]) == 1
    ledger.close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT api, input_tokens, images FROM requests ORDER BY id").fetchall()
    assert rows == [("openai", 7, None), ("anthropic", 300, 2)]


def test_the_auto_memory_budget_on_macos_and_elsewhere(monkeypatch):
    """`memory_budget: auto`: on macOS the Metal recommended working set less 10 % (at least
    1 GiB); elsewhere 70 % of physical memory. This machine has no Metal, so the macOS branch
    is given its working set; the probe itself runs for real, and where MLX has no Metal device
    (here) it says so with None, which falls back to the physical-memory share."""
    from mlxgate.wrapper import memory

    gib = memory.GIB
    assert memory.budget(None, working_set=lambda: 48 * gib).bytes == 48 * gib - int(48 * gib * 0.1)
    small = memory.budget(None, working_set=lambda: 8 * gib)
    assert small.bytes == 7 * gib and "Metal recommended working set 8.0 GiB less 1.0 GiB" in small.source
    linux = memory.budget(None, working_set=lambda: None, total=24 * gib)
    assert linux.bytes == int(24 * gib * 0.7) and linux.source == "auto: 70% of 24.0 GiB physical memory"
    assert memory.budget(3 * gib).bytes == 3 * gib
    assert memory.metal_working_set() is None  # not macOS: no probe at all
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory.metal_working_set() is None  # the probe ran: MLX on the CPU reports no working set
