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

import httpx
import pytest
import yaml

from support import Gateway, claude, free_ports, gpt, mlxgate, wait_for

ADDRESSES = {"b": "127.0.0.2", "c": "127.0.0.3", "d": "127.0.0.4", "g": "127.0.0.5"}
DEFAULTS = {"b": "tiny-c", "c": "tiny-a", "d": "tiny-a", "g": "org/tiny-b"}

RECORDER = """
import os

import mlxgate


@mlxgate.hookimpl
def mlxgate_pre_call(ctx):
    with open(os.path.join(os.environ["MLXGATE_HOME"], "hook-calls.log"), "a") as log:
        log.write(f"{ctx.route} {ctx.requested_model}\\n")
"""


class Host(Gateway):
    def __init__(self, name: str, home, models, settings: dict | None = None):
        from support import free_port
        self.name, self.listen_port = name, free_port()
        super().__init__(home, models, "--default-model", DEFAULTS[name], "--listen", ADDRESSES[name],
                         "--listen-port", str(self.listen_port), https=False, max_tokens=2000)
        (home / "plugins" / "recorder.py").write_text(RECORDER)
        if settings:
            (home / "gateway.yaml").write_text(yaml.safe_dump(settings))

    @property
    def relay_url(self) -> str:
        return f"https://{ADDRESSES[self.name]}:{self.listen_port}"

    def dynamic(self) -> dict:
        """Its default model's server."""
        return self.server(DEFAULTS[self.name])


@pytest.fixture(scope="module")
def cluster(models_dir, tmp_path_factory):
    hosts = {name: Host(name, tmp_path_factory.mktemp(f"host-{name}"), models_dir) for name in "bcd"}
    front = Gateway(tmp_path_factory.mktemp("front"), models_dir, https=False, max_tokens=2000)
    (front.home / "plugins" / "recorder.py").write_text(RECORDER)
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


def backend_errors(gateway) -> float:
    """Requests the gateway recorded as failed by the place that answered (its /metrics)."""
    text = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {gateway.api_key}"},
                     timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mlxgate_request_errors_total{") and 'kind="backend_error"' in line)


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
    assert answer.status_code == 200 and answer.json()["servers"]["tiny-c"]["state"] == "ready"
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
    for _ in range(3):
        answer, where = ask(front, "tiny-c")
        assert where == "b" and answer["choices"][0]["message"]["content"] is not None
    assert {name: host.dynamic()["loads"] for name, host in hosts.items()} == loads
    assert {name: host.loaded() for name, host in hosts.items()} == {n: [DEFAULTS[n]] for n in "bcd"}
    assert front.server("tiny-c")["state"] == "stopped", "the front gateway loaded nothing"
    assert "chat_completions tiny-c" in (front.home / "hook-calls.log").read_text()  # the hooks ran once,
    assert not (hosts["b"].home / "hook-calls.log").exists()  # in the gateway that received the request


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
    assert {name: host.loaded() for name, host in hosts.items()} == {n: [DEFAULTS[n]] for n in "bcd"}


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


# ---------------------------------------------------------------- trust
def test_a_host_whose_certificate_is_not_from_its_pinned_authority_is_refused(cluster):
    front, hosts = cluster
    config_file = front.home / "gateway.yaml"
    before = config_file.read_text()
    config = yaml.safe_load(before)
    d = next(h for h in config["hosts"] if h["name"] == "d")
    # "evil" claims b's address but pins d's authority: b's certificate does not come from it
    config["hosts"].append({"name": "evil", "url": hosts["b"].relay_url, "ca_sha256": d["ca_sha256"]})
    shutil.copy(front.home / "hosts" / "d-ca.pem", front.home / "hosts" / "evil-ca.pem")
    (front.home / "hosts" / "evil.key").write_text(hosts["b"].api_key)
    config_file.write_text(yaml.safe_dump(config))
    try:
        mlxgate("restart", "proxy", env=front.env, check=True)
        listed = mlxgate("hosts", "list", env=front.env).stdout
        assert "host evil  REFUSED" in listed and "pinned authority" in listed, listed
        for _ in range(4):
            assert ask(front, "tiny-c")[1] == "b"
    finally:
        config_file.write_text(before)
        mlxgate("restart", "proxy", env=front.env, check=True)


# ---------------------------------------------------------------- failure
def _stream(front, text: str, lines: list[str], started: threading.Event) -> str:
    """A long OpenAI stream through the front; the host that serves it."""
    with httpx.stream("POST", front.url + "/v1/chat/completions", timeout=120, json={
            "model": "tiny-a", "stream": True, "max_tokens": 1500, "messages": [{"role": "user", "content": text}]},
            headers={"Authorization": f"Bearer {front.api_key}"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            lines.append(line)
            if '"content"' in line:
                started.set()
            elif '"error"' in line:
                started.error_at = time.monotonic()
        return response.headers["x-mlxgate-host"]


def test_killing_a_host_mid_load_costs_only_its_started_streams(cluster):
    front, hosts = cluster
    d = hosts["d"]
    streams = []
    for i in range(6):
        lines, started, where = [], threading.Event(), {}
        thread = threading.Thread(target=lambda i=i, lines=lines, started=started, where=where:
                                  where.setdefault("host", _stream(front, f"story {i}", lines, started)))
        thread.start()
        streams.append((thread, lines, started, where))
    for _, _, started, _ in streams:
        assert started.wait(60)
    errors_before = backend_errors(front)
    outcomes, stop = [], threading.Event()

    def steady():  # requests that had not started when the host went: none may fail
        while not stop.is_set():
            try:
                outcomes.append(ask(front, "tiny-a", "quick", max_tokens=4)[1])
            except AssertionError as exc:
                outcomes.append(f"failed: {exc}")
    flow = threading.Thread(target=steady)
    flow.start()
    wait_for(lambda: outcomes, 60, what="the steady requests to be answered before the kill")
    timeline = {"kill": time.monotonic()}
    for pid in d.our_pids():
        os.kill(pid, signal.SIGKILL)
    for thread, _, _, _ in streams:
        thread.join(120)
    timeline["streams_ended"] = time.monotonic()
    wait_for(lambda: "host d  DOWN" in mlxgate("hosts", "list", env=front.env).stdout, 30, what="d shown down")
    timeline["shown_down"] = time.monotonic()
    after = len(outcomes)
    wait_for(lambda: len(outcomes) >= after + 5, 60, what="five answers once d is shown down")
    stop.set()
    flow.join(60)
    assert not [o for o in outcomes if o.startswith("failed")], outcomes
    assert outcomes and "d" not in outcomes[-5:], outcomes
    cut = [(where["host"], [line for line in lines if line]) for _, lines, _, where in streams]
    cut = [(host, lines) for host, lines in cut if lines[-1] != "data: [DONE]"]
    assert cut, "no stream was on d when it was killed"
    for host, lines in cut:  # only d's streams, each ended by the API's error event
        assert host == "d" and '"error"' in lines[-1] and "host d" in lines[-1], lines[-3:]
    # d took its records down with it: the gateway records each cut stream as failed
    wait_for(lambda: backend_errors(front) >= errors_before + len(cut), 30, what="the cut streams recorded")
    d.start()
    timeline["restarted"] = time.monotonic()

    asked = iter(range(10_000))

    def d_serves():  # new conversations each time: one conversation rightly stays on its host (c)
        places = []
        threads = [threading.Thread(target=lambda n=next(asked): places.append(
            ask(front, "tiny-a", f"again {n}", max_tokens=32)[1])) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return "d" in places
    wait_for(d_serves, 60, interval=1, what="d to serve again")
    timeline["serves_again"] = time.monotonic()
    timeline["error_events"] = max(getattr(started, "error_at", 0) for _, _, started, _ in streams)
    report = {k: round(v - timeline["kill"], 2) for k, v in sorted(timeline.items(), key=lambda kv: kv[1])}
    report.update(requests_during=len(outcomes), streams_cut=len(cut))
    print("failover timeline (s after the kill):", json.dumps(report))
    (front.home / "failover.json").write_text(json.dumps(report))


# ---------------------------------------------------------------- one model across two ranks
def test_a_model_served_by_two_ranks_under_mlx_launch_answers_through_the_gateway(cluster, models_dir,
                                                                                      tmp_path_factory):
    front, _ = cluster
    group = Host("g", tmp_path_factory.mktemp("host-g"), models_dir,
                 settings={"distributed": {"hosts": ["127.0.0.1", "127.0.0.1"], "backend": "ring",
                                           "starting_port": free_ports(8)}})  # the ring's ports
    group.start()
    try:
        mlxgate("hosts", "add", "g", group.relay_url, "--key", group.api_key, "--yes", env=front.env, check=True)
        mlxgate("restart", "proxy", env=front.env, check=True)
        pid = group.dynamic()["pid"]
        ranks = [p for p in __import__("psutil").Process(pid).children(recursive=True)
                 if p.cmdline()[1:3] == ["-m", "mlxgate.wrapper.mlx_lm_entry"]]
        assert len(ranks) == 2
        answer = gpt(front).chat.completions.with_raw_response.create(
            model="org/tiny-b", max_tokens=16, messages=[{"role": "user", "content": "hello"}])
        assert answer.headers["x-mlxgate-host"] == "g"
        assert answer.parse().usage.completion_tokens > 0
    finally:
        group.stop()
        mlxgate("hosts", "remove", "g", env=front.env)
        mlxgate("restart", "proxy", env=front.env)
