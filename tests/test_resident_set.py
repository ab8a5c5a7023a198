"""Models that stay loaded, as a user meets them: several models resident side by side within a
memory budget, the least recently used idle one unloaded for room (never a busy or a pinned
one), a model too large for the budget refused at once, idle unloads, bounded prompt caches,
and a watchdog that replaces a wedged model server whether or not anyone waits on it.

One daemon for the module, started several times with different settings: the autocomplete
model tiny-a (pinned) and three more tiny models loaded on demand. Its first start measures
what each model costs (the figures are kept in the runtime folder), so the budget of the next
start can be chosen to hold exactly the pinned model and two others.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import threading
import time

import anthropic
import httpx
import psutil
import pytest
import yaml

from support import Gateway, claude, gpt, mlxgate, pid_alive, wait_for

PROMPT = [{"role": "user", "content": "Write a story"}]
MODELS = ("tiny-a", "org/tiny-b", "tiny-c", "tiny-d")
ALLOWANCE = 64 * 1024 ** 2


def huge_model(folder, size: int) -> None:
    """A model folder whose safetensors header describes `size` bytes of weights (a sparse file:
    it takes no disk), so every check that reads files passes and only its size is wrong."""
    folder.mkdir(parents=True)
    shutil.copy(folder.parent / "tiny-a" / "config.json", folder / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder.parent / "tiny-a" / name, folder / name)
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [size // 4],
                                                       "data_offsets": [0, size // 4 * 4]}}).encode()
    with (folder / "model.safetensors").open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + size // 4 * 4)


@pytest.fixture(scope="module")
def models(models_dir, tmp_path_factory):
    """Copies of the session's tiny models (a request's model name never follows a symlink out of
    the model folder), a fourth tiny model, a 100 GB one, and one whose KV cache is large."""
    folder = tmp_path_factory.mktemp("resident-models")
    for name in ("tiny-a", "org/tiny-b", "tiny-c"):
        shutil.copytree(models_dir / name, folder / name)
    mlxgate("demo-model", str(folder / "tiny-d"), "--seed", "3", "--context", "32768", env=dict(os.environ),
            check=True)
    mlxgate("demo-model", str(folder / "kv-heavy"), "--seed", "4", "--layers", "4", "--hidden", "256",
            "--context", "16384", env=dict(os.environ), check=True)
    huge_model(folder / "huge", 100 * 1024 ** 3)
    return folder


@pytest.fixture(scope="module")
def gw(models, tmp_path_factory):
    running = Gateway(tmp_path_factory.mktemp("resident-home"), models, "--autocomplete-model", "tiny-a",
                      https=False, max_tokens=100000)
    running.configure = lambda **settings: (running.home / "gateway.yaml").write_text(yaml.safe_dump(
        {"prompt_cache": "64M", "keep_alive": -1, **settings}))
    running.configure(memory_budget="8G")
    running.start()
    try:
        for name in MODELS[1:]:
            ask(running, name)
        running.costs = {name: running.server(name)["cost_bytes"] for name in MODELS}
        yield running
    finally:
        running.stop()


def restart(gw, **settings) -> None:
    gw.stop()
    gw.configure(**settings)
    gw.start()


def ask(gw, model: str, max_tokens: int = 2, timeout: float = 120) -> int:
    return gpt(gw, timeout=timeout).chat.completions.create(model=model, max_tokens=max_tokens,
                                                             messages=PROMPT).usage.completion_tokens


def stream(gw, model: str, max_tokens: int):
    """A streamed Anthropic request read up to its first text delta; (client, response, lines)."""
    client = httpx.Client(timeout=120)
    response = client.send(client.build_request(
        "POST", gw.url + "/v1/messages", headers={"x-api-key": gw.api_key},
        json={"model": model, "max_tokens": max_tokens, "stream": True, "messages": PROMPT}), stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    next(line for line in lines if "text_delta" in line)
    return client, response, lines


def finish(opened) -> str:
    client, response, lines = opened
    rest = "\n".join(lines)
    client.close()
    return rest


def test_each_model_is_measured_once_and_the_figure_outlives_a_restart(gw):
    costs = gw.costs
    assert all(ALLOWANCE < cost < ALLOWANCE + 400 * 1024 ** 2 for cost in costs.values()), costs
    kept = json.loads((gw.home / "measured.json").read_text())
    assert len(kept) == len(MODELS) and all(entry["bytes"] > 0 for entry in kept.values())
    used = gw.wrapper_call("GET", "/models").json()["memory"]["used"]
    assert used == sum(costs.values()), "the budget holds what the resident models cost"


def test_the_least_recently_used_idle_model_makes_room_and_the_pinned_one_stays(gw):
    costs = gw.costs
    others = sorted(costs[name] for name in MODELS[1:])
    budget = costs["tiny-a"] + others[1] + others[2] + others[0] // 2  # the pinned one and any two others
    restart(gw, memory_budget=str(budget))
    pinned = gw.server("tiny-a")["pid"]
    ask(gw, "org/tiny-b")
    ask(gw, "tiny-c")
    ask(gw, "org/tiny-b")  # now tiny-c is the least recently used
    assert gw.loaded() == ["org/tiny-b", "tiny-a", "tiny-c"]
    assert ask(gw, "tiny-d") == 2
    assert gw.loaded() == ["org/tiny-b", "tiny-a", "tiny-d"]
    assert gw.server("tiny-c")["stopped_because"] == "to make room for tiny-d"
    memory = gw.wrapper_call("GET", "/models").json()["memory"]
    assert memory["evictions"] == {"budget": 1} and memory["used"] <= memory["budget"] == budget
    assert gw.server("tiny-a")["pid"] == pinned, "the pinned model never left"
    metrics = httpx.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=30).text
    assert 'mlxgate_model_evictions_total{model="tiny-c",reason="budget"} 1.0' in metrics


def test_a_busy_model_is_never_evicted_and_its_answers_complete(gw):
    """tiny-d streams while tiny-c is asked for: the idle org/tiny-b goes, tiny-d stays."""
    if gw.loaded() != ["org/tiny-b", "tiny-a", "tiny-d"]:
        pytest.skip("depends on the state the previous test leaves")
    busy = stream(gw, "tiny-d", 4000)
    ask(gw, "org/tiny-b")  # org/tiny-b is used after tiny-d: tiny-d would go first if it were idle
    pid = gw.server("tiny-d")["pid"]
    assert ask(gw, "tiny-c") == 2
    assert '"output_tokens":4000' in finish(busy), "the busy model's answer ran to its end"
    assert gw.loaded() == ["tiny-a", "tiny-c", "tiny-d"] and gw.server("tiny-d")["pid"] == pid


def test_a_load_waits_for_busy_models_and_status_says_so(gw):
    if gw.loaded() != ["tiny-a", "tiny-c", "tiny-d"]:
        pytest.skip("depends on the state the previous test leaves")
    busy = [stream(gw, name, 50000) for name in ("tiny-c", "tiny-d")]
    answered = []
    waiting = threading.Thread(target=lambda: answered.append(ask(gw, "org/tiny-b")))
    waiting.start()
    try:
        row = wait_for(lambda: next((line for line in mlxgate("ps", env=gw.env).stdout.splitlines()
                                     if line.startswith("org/tiny-b ") and " waiting " in line), None), 30,
                       what="ps to show org/tiny-b waiting for room")
        assert "room in the memory budget" in row and "tiny-c" in row and "tiny-d" in row
        assert gw.loaded() == ["tiny-a", "tiny-c", "tiny-d"], "nothing busy was evicted"
    finally:
        for client, response, _ in busy:  # their clients leave: both models go idle
            response.close()
            client.close()
    waiting.join(120)
    assert answered == [2]
    assert "org/tiny-b" in gw.loaded() and len(gw.loaded()) == 3


def test_two_resident_models_answer_at_once_with_no_load(gw):
    loaded = gw.loaded()
    others = [name for name in loaded if name != "tiny-a"]
    loads = {name: gw.server(name)["loads"] for name in loaded}
    opened = [stream(gw, name, 300) for name in others]
    ends = [finish(one) for one in opened]
    assert all('"output_tokens":300' in end for end in ends)
    assert {name: gw.server(name)["loads"] for name in loaded} == loads


def test_a_model_larger_than_the_budget_is_refused_at_once_and_nothing_loads(gw):
    before = {name: (s["pid"], s["loads"]) for name, s in gw.servers().items()}
    started = time.monotonic()
    with pytest.raises(anthropic.APIStatusError) as caught:
        anthropic.Anthropic(base_url=gw.url, api_key=gw.api_key).messages.create(  # default retries
            model="huge", max_tokens=3, messages=PROMPT)
    took = time.monotonic() - started
    error = caught.value
    assert error.status_code == 503 and error.response.headers["x-should-retry"] == "false" and took < 1
    assert re.search(r"'huge' needs 100\.\d GiB \(weights 100\.0 GiB, prompt cache 64 MiB", error.message)
    assert "cannot fit in the memory budget of" in error.message and "smaller quantization" in error.message
    assert {name: (s["pid"], s["loads"]) for name, s in gw.servers().items() if name in before} == before
    assert gw.server("huge")["loads"] == 0


def test_an_idle_model_unloads_after_its_keep_alive(gw):
    restart(gw, memory_budget="8G", keep_alive=2)
    ask(gw, "tiny-c")
    pid = gw.server("tiny-c")["pid"]
    assert "tiny-c" in gw.loaded()
    wait_for(lambda: gw.server("tiny-c")["state"] == "stopped", 15, what="tiny-c to unload when idle")
    assert "keep_alive 2 s" in gw.server("tiny-c")["stopped_because"] and not pid_alive(pid)
    assert "tiny-a" in gw.loaded(), "pinned: it stays"
    assert ask(gw, "tiny-c") == 2, "asked for again, it loads again"


# ---------------------------------------------------------------- bounded prompt caches
def test_distinct_long_prompts_keep_a_model_server_within_its_prompt_cache_allowance(gw):
    """Each distinct 7,600-token prompt leaves its KV cache in the prompt cache: 4 MB for tiny-c
    (several GB for a real model). mlx_lm.server alone keeps 10 such entries, so its memory grows
    by about 60 MB over these prompts (measured); bounded to 8 MB it stays put."""
    restart(gw, memory_budget="8G", models={"tiny-c": {"prompt_cache": "8M"}})
    client = claude(gw, timeout=300)
    words = [" ".join(f"w{i}x{j}" for j in range(1250)) for i in range(10)]  # distinct from the first token
    count = client.messages.count_tokens(model="tiny-c", messages=[{"role": "user", "content": words[0]}])
    assert 7000 < count.input_tokens < 9500, count
    rss = []
    for text in words:
        client.messages.create(model="tiny-c", max_tokens=1, messages=[{"role": "user", "content": text}])
        rss.append(psutil.Process(gw.server("tiny-c")["pid"]).memory_info().rss)
    grew = max(rss) - rss[1]
    print(f"\ntiny-c RSS after each prompt (MiB): {[r // 2 ** 20 for r in rss]}")
    assert grew < 16 * 1024 ** 2, f"grew {grew // 2 ** 20} MiB over 8 more prompts (allowance 8 MiB)"
    assert gw.server("tiny-c")["prompt_cache_bytes"] == 8 * 1024 ** 2


# ---------------------------------------------------------------- the watchdog, on its defaults
def test_a_stopped_idle_model_server_is_replaced_within_a_minute_and_the_others_serve_meanwhile(gw):
    restart(gw, memory_budget="8G")
    ask(gw, "tiny-c")
    old = gw.server("tiny-c")["pid"]
    os.kill(old, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        assert ask(gw, "tiny-a") == 2 and ask(gw, "org/tiny-b") == 2, "the other models answer meanwhile"
        wait_for(lambda: gw.server("tiny-c")["state"] == "ready" and gw.server("tiny-c")["pid"] not in (None, old),
                 70, interval=0.5, what="the replacement model server")
        replaced = time.monotonic() - stopped
    finally:
        if pid_alive(old):
            os.kill(old, signal.SIGCONT)
    assert replaced < 60, f"replaced after {replaced:.0f} s"
    assert not pid_alive(old) and ask(gw, "tiny-c") == 2
    print(f"\nSIGSTOP while idle: replaced after {replaced:.1f} s")


def test_a_stopped_model_server_is_replaced_while_every_client_gives_up_after_5_s(gw):
    old = gw.server("tiny-c")["pid"]
    os.kill(old, signal.SIGSTOP)
    stopped, outcomes = time.monotonic(), []
    try:
        while gw.server("tiny-c")["pid"] in (None, old) and time.monotonic() - stopped < 70:
            try:
                outcomes.append(ask(gw, "tiny-c", timeout=5))
            except Exception as exc:  # they time out: that is the point
                outcomes.append(type(exc).__name__)
        wait_for(lambda: gw.server("tiny-c")["state"] == "ready", 30, what="the replacement to be ready")
        replaced = time.monotonic() - stopped
    finally:
        if pid_alive(old):
            os.kill(old, signal.SIGCONT)
    assert replaced < 60, f"replaced after {replaced:.0f} s; the clients saw {outcomes}"
    assert "APITimeoutError" in outcomes
    assert ask(gw, "tiny-c", timeout=30) == 2, "the first request after the replacement is answered"
    print(f"\nSIGSTOP under clients that give up after 5 s: replaced after {replaced:.1f} s ({len(outcomes)} tries)")


def test_a_killed_model_server_is_loaded_again_by_itself(gw):
    ask(gw, "org/tiny-b")
    old = gw.server("org/tiny-b")["pid"]
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    assert ask(gw, "tiny-a") == 2
    wait_for(lambda: gw.server("org/tiny-b")["state"] == "ready" and gw.server("org/tiny-b")["pid"] != old, 60,
             what="org/tiny-b to load again")
    print(f"\nkill -9: loaded again after {time.monotonic() - killed:.1f} s, with no request for it")
