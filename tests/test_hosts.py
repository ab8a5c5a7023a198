"""Several machines behind one gateway, as a team meets it: three hosts, each a full
mlxgate with its own home, key, authority and ports, serving its relay over TLS at its
own loopback address (127.0.0.2-4), and one gateway in front that has added them with
`mlxgate hosts add`. Clients only know the front gateway.

  host b: tiny-c loaded (no other place has it loaded)
  host c, host d: tiny-a loaded
  front: nothing loaded; a candidate like any host

The hosts are shared by every test here; the test that kills a host starts it again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import anthropic
import httpx
import pytest
import yaml

from support import Gateway, claude, gpt, mlxgate, pid_alive, wait_for

ADDRESSES = {"b": "127.0.0.2", "c": "127.0.0.3", "d": "127.0.0.4"}
DEFAULTS = {"b": "tiny-c", "c": "tiny-a", "d": "tiny-a"}


class Host(Gateway):
    def __init__(self, name: str, home, models):
        from support import free_port
        self.name, self.listen_port = name, free_port()
        super().__init__(home, models, "--default-model", DEFAULTS[name], "--listen", ADDRESSES[name],
                         "--listen-port", str(self.listen_port), https=False, max_tokens=2000)

    @property
    def relay_url(self) -> str:
        return f"https://{ADDRESSES[self.name]}:{self.listen_port}"

    def dynamic(self) -> dict:
        return self.wrapper_call("GET", "/models").json()["servers"]["dynamic"]


@pytest.fixture(scope="module")
def cluster(models_dir, tmp_path_factory):
    hosts = {name: Host(name, tmp_path_factory.mktemp(f"host-{name}"), models_dir) for name in ADDRESSES}
    front = Gateway(tmp_path_factory.mktemp("front"), models_dir, https=False, max_tokens=2000)
    started = []
    try:
        for host in hosts.values():
            host.start()
            started.append(host)
        for host in hosts.values():
            mlxgate("hosts", "add", host.name, host.relay_url, "--key", host.api_key, "--yes", env=front.env,
                    check=True)
        front.start()
        started.append(front)
        yield front, hosts
    finally:
        for running in started:
            running.stop()


def served(host) -> int:
    return host.dynamic()["queue"]["served"]


def ask(front, model: str, text: str = "hello", max_tokens: int = 8, **extra):
    """A chat completion through the front gateway; (answer, the host that served it)."""
    response = httpx.post(front.url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **extra},
        headers={"Authorization": f"Bearer {front.api_key}"})
    assert response.status_code == 200, response.text
    return response.json(), response.headers["x-mlxgate-host"]


# ---------------------------------------------------------------- adding hosts
def test_hosts_are_added_pinned_and_listed(cluster):
    front, hosts = cluster
    config = yaml.safe_load((front.home / "gateway.yaml").read_text())
    assert [h["name"] for h in config["hosts"]] == ["b", "c", "d"]
    assert all(len(h["ca_sha256"]) == 64 for h in config["hosts"]) and "key" not in config["hosts"][0]
    assert oct((front.home / "hosts" / "b.key").stat().st_mode)[-3:] == "600"
    listed = mlxgate("hosts", "list", env=front.env, check=True).stdout
    assert "host b" in listed and "UP" in listed and "tiny-c" in listed
    shown = mlxgate("status", env=hosts["b"].env).stdout
    assert f"https://{ADDRESSES['b']}:{hosts['b'].listen_port} (authority SHA256:" in shown


def test_a_host_is_reached_only_over_tls_with_the_key(cluster):
    _, hosts = cluster
    b = hosts["b"]
    with pytest.raises(httpx.ConnectError):  # TLS, verified: an unknown authority is refused
        httpx.get(b.relay_url + "/models", timeout=5)
    context = __import__("ssl").create_default_context(cafile=str(b.home / "ssl" / "ca.pem"))
    assert httpx.get(b.relay_url + "/models", verify=context, timeout=5).status_code == 401
    answer = httpx.get(b.relay_url + "/models", verify=context, timeout=5,
                       headers={"Authorization": f"Bearer {b.api_key}"})
    assert answer.status_code == 200 and answer.json()["servers"]["dynamic"]["model"] == "tiny-c"
    with pytest.raises(httpx.ConnectError):  # nothing beyond loopback on the plain address
        httpx.get(f"http://{ADDRESSES['b']}:{b.wrapper_port}/health", timeout=2)


def test_a_wrong_fingerprint_or_a_clashing_model_is_refused(cluster, models_dir, tmp_path):
    _, hosts = cluster
    b = hosts["b"]
    env = dict(b.env, MLXGATE_HOME=str(tmp_path / "other"), MLXGATE_CONFIG=str(tmp_path / "other.yaml"))
    wrong = mlxgate("hosts", "add", "b", b.relay_url, "--key", b.api_key, "--fingerprint", "ab" * 32, env=env)
    assert wrong.returncode == 1 and "Nothing was added" in wrong.stderr
    clash = tmp_path / "models"
    shutil.copytree(models_dir / "org" / "tiny-b", clash / "tiny-a")  # another model under tiny-a's name
    refused = mlxgate("hosts", "add", "b", b.relay_url, "--key", b.api_key, "--yes",
                      env=dict(env, MLXGATE_MODEL_DIRS=str(clash)))
    assert refused.returncode == 1 and "tiny-a (differs from this machine)" in refused.stderr
    bad_key = mlxgate("hosts", "add", "b", b.relay_url, "--key", "wrong", "--yes", env=env)
    assert bad_key.returncode == 1 and "refused the key" in bad_key.stderr
    assert not (tmp_path / "other.yaml").exists()


# ---------------------------------------------------------------- routing
def test_a_model_loaded_on_one_host_goes_there_and_loads_nowhere_else(cluster):
    front, hosts = cluster
    loads = {name: host.dynamic()["loads"] for name, host in hosts.items()}
    answer, where = ask(front, "tiny-c")
    assert where == "b" and answer["choices"][0]["message"]["content"] is not None
    for name in ("claude-x", "tiny-c"):  # hooks ran in the front: an alias resolves there
        _, where = ask(front, "tiny-c")
        assert where == "b"
    assert {name: host.dynamic()["loads"] for name, host in hosts.items()} == loads
    assert {name: host.dynamic()["model"] for name, host in hosts.items()} == DEFAULTS
    front_servers = front.wrapper_call("GET", "/models").json()["servers"]
    assert front_servers["dynamic"]["state"] == "stopped"
    assert not (hosts["b"].home / "hook-calls.log").exists()


def test_twelve_concurrent_clients_spread_over_the_hosts_with_the_model(cluster):
    front, hosts = cluster
    before = {name: served(host) for name, host in hosts.items()}
    places: list[str] = []

    def client(i: int):
        _, where = ask(front, "tiny-a", f"client {i}", max_tokens=64)
        places.append(where)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(places) == 12 and set(places) == {"c", "d"}, places
    assert min(places.count("c"), places.count("d")) >= 3, places
    after = {name: served(host) for name, host in hosts.items()}
    assert after["b"] == before["b"] and after["c"] + after["d"] - before["c"] - before["d"] >= 12
    assert {name: host.dynamic()["model"] for name, host in hosts.items()} == DEFAULTS


def test_a_conversation_stays_on_its_host_and_reads_its_prompt_cache(cluster):
    front, _ = cluster
    client = claude(front)
    for n in range(4):
        system = f"Conversation {n}. " + " ".join(f"Rule {i}: keep it short." for i in range(80))
        first = client.messages.with_raw_response.create(
            model="tiny-a", max_tokens=5, system=system, messages=[{"role": "user", "content": f"Hi {n}"}])
        turn = [{"role": "user", "content": f"Hi {n}"},
                {"role": "assistant", "content": first.parse().content[0].text or "ok"},
                {"role": "user", "content": "And then?"}]
        second = client.messages.with_raw_response.create(model="tiny-a", max_tokens=5, system=system,
                                                          messages=turn)
        assert second.headers["x-mlxgate-host"] == first.headers["x-mlxgate-host"]
        assert second.parse().usage.cache_read_input_tokens > 0, second.parse().usage


def test_a_prompt_cache_key_keeps_a_conversation_on_its_host(cluster):
    front, _ = cluster
    homes = set()
    for turn in range(4):
        _, where = ask(front, "tiny-a", f"turn {turn} says something else", prompt_cache_key="session-42")
        homes.add(where)
    assert len(homes) == 1
