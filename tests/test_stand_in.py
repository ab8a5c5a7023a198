"""Standing in for api.anthropic.com, for real: in a network namespace of its own, the install
adds the hosts line and the nftables redirect of 443, the gateway serves a certificate for the
domain, and the official `anthropic` SDK with its default base URL and someone's own key (or
OAuth token) gets an answer from the local model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import Sandbox, ensure_tool, free_port

CLIENT = r'''
import json, os, ssl, sys
import anthropic

ca = os.environ["SSL_CERT_FILE"]            # the bundle `mlxgate env` printed: certifi's roots + ours
context = ssl.create_default_context(cafile=ca)
http = anthropic.DefaultHttpxClient(verify=context)
out = {}
for name, kwargs in {"api_key": {"api_key": "sk-ant-api03-somebody-elses-key"},
                     "oauth": {"auth_token": "sk-ant-oat01-somebody-elses-token"}}.items():
    client = anthropic.Anthropic(http_client=http, max_retries=0, **kwargs)  # the default base URL
    message = client.messages.create(model="claude-opus-4-8", max_tokens=5,
                                     messages=[{"role": "user", "content": "hi"}])
    out[name] = {"base_url": str(client.base_url), "stop_reason": message.stop_reason,
                 "output_tokens": message.usage.output_tokens}
bare = http.post("https://api.anthropic.com/v1/messages", json={"model": "claude-opus-4-8", "max_tokens": 5,
                 "messages": [{"role": "user", "content": "hi"}]})  # no credential at all
out["no_key"] = bare.status_code
plain = anthropic.Anthropic(base_url=sys.argv[1], api_key="sk-ant-api03-somebody-elses-key", max_retries=0)
try:
    plain.messages.create(model="claude-opus-4-8", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
except anthropic.AuthenticationError as exc:
    out["http_listener"] = exc.status_code
print(json.dumps(out))
'''


@pytest.fixture
def sandbox(tmp_path):
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux (network namespace, nftables)")
    if ensure_tool("nft", "nftables") is None:
        pytest.skip("nftables is not here and cannot be installed")
    made = Sandbox(tmp_path / "sandbox")
    yield made
    made.close()


def test_the_anthropic_sdk_with_its_default_url_gets_the_local_model(sandbox, models_dir, tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXGATE_", "ANTHROPIC_"))}
    env.update(MLXGATE_HOME=str(home), MLXGATE_CONFIG=str(tmp_path / "none.yaml"), MLXGATE_SSL_DIR=str(tmp_path / "ssl"),
               MLXGATE_MODEL_DIRS=str(models_dir), HF_HUB_CACHE=str(tmp_path / "hf"))
    port, https_port = free_port(), free_port()
    flags = ["--port", str(port), "--https-port", str(https_port), "--ssl-domain", "api.anthropic.com",
             "--stand-in-any-key", "--default-model", "tiny-a"]
    mlxgate = [sys.executable, "-m", "mlxgate.cli"]
    sandbox.run([*mlxgate, "service", "install", "--no-service", "--enable-port-forward", *flags], env=env, check=True)
    assert "127.0.0.1\tapi.anthropic.com" in (sandbox.etc / "hosts").read_text()
    assert f"tcp dport 443 redirect to :{https_port}" in sandbox.nft_ruleset()
    try:
        started = sandbox.run([*mlxgate, "start", *flags], env=env)
        assert started.returncode == 0, started.stdout + started.stderr
        exports = dict(line.removeprefix("export ").split("=", 1)
                       for line in sandbox.run([*mlxgate, "env"], env=env, check=True).stdout.splitlines()
                       if line.startswith("export "))
        bundle = Path(exports["SSL_CERT_FILE"])
        assert exports["REQUESTS_CA_BUNDLE"] == str(bundle)
        assert exports["NODE_EXTRA_CA_CERTS"] == str(tmp_path / "ssl" / "ca.pem")
        assert exports["CLAUDE_CODE_AUTO_COMPACT_WINDOW"] == "2048"  # tiny-a's max_position_embeddings
        ours = (tmp_path / "ssl" / "ca.pem").read_text().strip()
        assert bundle.read_text().count("BEGIN CERTIFICATE") > 100 and ours in bundle.read_text()

        result = sandbox.run([sys.executable, "-c", CLIENT, f"http://127.0.0.1:{port}"],
                             env={**env, "SSL_CERT_FILE": str(bundle)}, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        import json
        out = json.loads(result.stdout)
        for name in ("api_key", "oauth"):
            assert out[name]["base_url"] == "https://api.anthropic.com"
            assert out[name]["output_tokens"] >= 1 and out[name]["stop_reason"] in ("max_tokens", "end_turn")
        assert out["no_key"] == 401, "standing in lets in a credential, not its absence"
        assert out["http_listener"] == 401, "the HTTP listener keeps the gateway's key"
    finally:
        sandbox.run([*mlxgate, "stop"], env=env)
        sandbox.run([*mlxgate, "service", "uninstall"], env=env)
    assert sandbox.changed_in_etc() == []
    assert sandbox.nft_ruleset().strip() == ""


def test_standing_in_refuses_an_anthropic_deployment_that_would_call_the_gateway(models_dir, tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text("litellm:\n  model_list:\n  - model_name: claude-opus-4-8\n    litellm_params:\n"
                      "      model: anthropic/claude-opus-4-8\n      api_key: os.environ/ANTHROPIC_API_KEY\n")
    env = dict(os.environ, MLXGATE_HOME=str(tmp_path / "home"), MLXGATE_CONFIG=str(config),
               MLXGATE_MODEL_DIRS=str(models_dir), MLXGATE_SSL_DIR=str(tmp_path / "ssl"))
    result = subprocess.run([sys.executable, "-m", "mlxgate.cli", "start", "--ssl-domain", "api.anthropic.com",
                             "--port", str(free_port()), "--https-port", str(free_port())], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert ("litellm.model_list.0 (claude-opus-4-8: anthropic/claude-opus-4-8) would call api.anthropic.com, "
            "which this gateway stands in for") in result.stderr
    assert "Fix: give it an `api_base`" in result.stderr
    assert not (tmp_path / "home" / "supervisord.pid").exists()
