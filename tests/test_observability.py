"""Watching the gateway, as a user does: the usage ledger in a real PostgreSQL, the metrics as a
real Prometheus scrapes them, `mlxgate usage`, the status page in a real (headless) Chromium,
and the Docker stack's dashboard checked against /metrics (the stack itself: test_docker_stack.py).

One daemon for the module (HTTP only, default model tiny-a, autocomplete org/tiny-b), its
ledger in a PostgreSQL cluster the module starts, scraped every second by a Prometheus the
module starts.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import anthropic
import httpx
import openai
import pytest
import psutil

from services import Postgres, Prometheus, chromium
from support import ROOT, Gateway, claude, gpt, mlxgate, wait_for

PROMPT = [{"role": "user", "content": "Tell me about the sea"}]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "mlxgate.json"


@pytest.fixture(scope="module")
def postgres():
    server = Postgres()
    yield server
    server.remove()


@pytest.fixture(scope="module")
def watched(models_dir, tmp_path_factory, postgres):
    running = Gateway(tmp_path_factory.mktemp("watched-home"), models_dir, "--default-model", "tiny-a",
                      "--autocomplete-model", "org/tiny-b", https=False,
                      extra_env={"MLXGATE_DATABASE_URL": postgres.url})
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def prometheus(watched, tmp_path_factory):
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), watched.port, watched.api_key)
    yield server
    server.stop()


def ledger_rows(postgres, since: float) -> list[dict]:
    rows = postgres.query("SELECT api, route, requested_model, served_model, server, client, status, error, "
                          "input_tokens, cached_tokens, output_tokens, ttft_ms, cancelled, detail FROM requests "
                          "WHERE at >= %s ORDER BY at", since)
    keys = ("api", "route", "requested_model", "served_model", "server", "client", "status", "error",
            "input_tokens", "cached_tokens", "output_tokens", "ttft_ms", "cancelled", "detail")
    return [dict(zip(keys, row)) for row in rows]


def settled(postgres, since: float, count: int) -> list[dict]:
    """The ledger's rows since `since`, once there are `count` (writes are batched, every half second)."""
    return wait_for(lambda: len(rows := ledger_rows(postgres, since)) >= count and rows, 15,
                    what=f"{count} rows in the ledger")


def test_the_ledger_table_is_there_from_the_start(watched, postgres):
    wait_for(lambda: postgres.query("SELECT to_regclass('requests')")[0][0] == "requests", 15,
             what="the requests table")


def metric_families(text: str) -> set[str]:
    """The metric names /metrics declares (counters without their `_total`)."""
    return {re.sub(r"_total$", "", line.split()[2]) for line in text.splitlines() if line.startswith("# TYPE ")}


# ---------------------------------------------------------------- the ledger
def test_every_request_is_in_the_ledger_once_with_its_tokens_and_client(watched, postgres):
    since = time.time()
    message = claude(watched).messages.create(model="claude-opus-4-8", max_tokens=5, messages=PROMPT)
    stream = list(gpt(watched).chat.completions.create(model="gpt-4o", max_tokens=4, messages=PROMPT, stream=True,
                                                       stream_options={"include_usage": True}))
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=watched.url, api_key="wrong", max_retries=0).messages.create(
            model="claude-opus-4-8", max_tokens=5, messages=PROMPT)
    with pytest.raises(openai.NotFoundError):
        gpt(watched).chat.completions.create(model="no-such-model", max_tokens=5, messages=PROMPT)
    curl = subprocess.run(["curl", "-s", watched.url + "/v1/completions", "-H", f"Authorization: Bearer {watched.api_key}",
                           "-d", json.dumps({"model": "autocomplete", "prompt": "def add(a, b):", "max_tokens": 3})],
                          capture_output=True, text=True, timeout=60)
    assert json.loads(curl.stdout)["usage"]["completion_tokens"] == 3
    rows = settled(postgres, since, 5)
    assert len(rows) == 5, rows  # each request once
    first, second, refused, unknown, completion = rows
    assert (first["api"], first["route"], first["requested_model"], first["served_model"], first["server"],
            first["client"], first["status"]) == ("anthropic", "anthropic_messages", "claude-opus-4-8", "tiny-a",
                                                  "local", "anthropic SDK (Python)", 200)
    assert first["output_tokens"] == message.usage.output_tokens == 5
    assert first["input_tokens"] + first["cached_tokens"] == message.usage.input_tokens + \
        (message.usage.cache_read_input_tokens or 0)
    assert first["ttft_ms"] > 0 and not first["cancelled"] and first["detail"] == "", "no prompt text"
    assert (second["client"], second["output_tokens"]) == ("openai SDK (Python)", stream[-1].usage.completion_tokens)
    assert (refused["status"], refused["error"]) == (401, "authentication")
    assert (unknown["status"], unknown["error"], unknown["requested_model"]) == (404, "not_found", "no-such-model")
    assert (completion["client"], completion["server"], completion["served_model"], completion["output_tokens"]) == \
        ("curl", "local", "org/tiny-b", 3)


def test_mlxgate_usage_prints_a_table_from_the_ledger(watched, postgres):
    asked = time.time()
    claude(watched).messages.create(model="claude-opus-4-8", max_tokens=3, messages=PROMPT)
    settled(postgres, asked, 1)  # this request's row is written (earlier ones were already)
    by_model = mlxgate("usage", "--since", "1h", env=watched.env)
    assert by_model.returncode == 0, by_model.stderr
    header, *rows = by_model.stdout.splitlines()
    assert header.split()[:3] == ["MODEL", "REQUESTS", "ERRORS"]
    tiny = next(row.split() for row in rows if row.startswith("tiny-a "))
    totals = postgres.query("SELECT COUNT(*), SUM(output_tokens) FROM requests WHERE served_model = 'tiny-a'")[0]
    assert int(tiny[1]) == totals[0] and tiny[6].replace(",", "") == str(totals[1])
    for by in ("day", "api", "client"):
        result = mlxgate("usage", "--by", by, env=watched.env)
        assert result.returncode == 0 and result.stdout.splitlines()[0].startswith(by.upper())
    as_json = json.loads(mlxgate("usage", "--by", "client", "--json", env=watched.env).stdout)
    assert any(row["key"] == "anthropic SDK (Python)" for row in as_json)
    assert mlxgate("usage", "--since", "soon", env=watched.env).returncode == 1


# ---------------------------------------------------------------- metrics and Prometheus
def test_metrics_need_the_key_and_follow_prometheus_conventions(watched):
    assert httpx.get(watched.url + "/metrics", timeout=30).status_code == 401
    text = httpx.get(watched.url + "/metrics", headers={"Authorization": f"Bearer {watched.api_key}"},
                     timeout=30).text
    families = metric_families(text)
    for name in ("mlxgate_requests", "mlxgate_input_tokens", "mlxgate_cached_input_tokens", "mlxgate_output_tokens",
                 "mlxgate_time_to_first_token_seconds", "mlxgate_output_tokens_per_second",
                 "mlxgate_queue_wait_seconds", "mlxgate_queue_depth", "mlxgate_requests_in_flight",
                 "mlxgate_model_loads", "mlxgate_model_evictions", "mlxgate_model_load_duration_seconds",
                 "mlxgate_watchdog_restarts", "mlxgate_cancellations", "mlxgate_model_server_resident_memory_bytes",
                 "mlxgate_model_cost_bytes", "mlxgate_memory_budget_bytes", "mlxgate_memory_reserved_bytes"):
        assert name in families, name
    counters = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ") and line.endswith("counter")]
    assert counters and all(re.search(r"^mlxgate_[a-z_]+_total$", name) for name in counters)
    assert re.search(r'mlxgate_model_server_resident_memory_bytes\{model="tiny-a"\} \d', text)
    assert re.search(r'mlxgate_requests_in_flight\{model="org/tiny-b"\} 0', text)
    assert re.search(r'mlxgate_model_loaded\{model="tiny-a"\} 1', text)
    budget = float(re.search(r"^mlxgate_memory_budget_bytes (\S+)", text, re.M).group(1))
    held = float(re.search(r"^mlxgate_memory_reserved_bytes (\S+)", text, re.M).group(1))
    assert budget == watched.wrapper_call("GET", "/models").json()["memory"]["budget"] and 0 < held < budget


def test_prometheus_scrapes_the_token_counters_and_they_equal_the_ledger(watched, postgres, prometheus):
    for _ in range(3):
        claude(watched).messages.create(model="claude-opus-4-8", max_tokens=6, messages=PROMPT)
    gpt(watched).chat.completions.create(model="gpt-4o", max_tokens=4, messages=PROMPT)
    wait_for(lambda: _counted_requests(watched) == postgres.query("SELECT COUNT(*) FROM requests")[0][0], 20,
             what="the ledger to hold every request the wrapper counted")
    asked = time.time()
    wait_for(lambda: prometheus.scraped_after(asked + 0.5), 30, what="a scrape after the requests")
    ledger = postgres.query("SELECT SUM(input_tokens), SUM(cached_tokens), SUM(output_tokens), COUNT(*) "
                            "FROM requests")[0]
    assert prometheus.query("sum(mlxgate_output_tokens_total)") == ledger[2]
    assert prometheus.query("sum(mlxgate_input_tokens_total)") == ledger[0]
    assert (prometheus.query("sum(mlxgate_cached_input_tokens_total)") or 0) == ledger[1]
    assert prometheus.query("sum(mlxgate_requests_total)") == ledger[3]


def _counted_requests(gateway) -> int:
    """The requests the wrapper has counted (its counters are updated at once, its ledger in batches)."""
    text = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {gateway.api_key}"}, timeout=30).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("mlxgate_requests_total{")))


# ---------------------------------------------------------------- the status page
def test_the_status_page_shows_what_the_api_says(watched, tmp_path):
    claude(watched).messages.create(model="claude-opus-4-8", max_tokens=4, messages=PROMPT)
    screenshot = tmp_path / "status.png"
    dom = chromium(watched.url + "/", tmp_path, screenshot)
    status = watched.wrapper_call("GET", "/status").json()
    assert "<h1>mlxgate</h1>" in dom and "uplot" in dom.lower(), "the page and its charts rendered"
    for key in ("requests", "input_tokens", "cached_tokens", "output_tokens", "errors"):
        shown = re.search(rf'data-total="{key}">(\d+)<', dom)
        assert shown and int(shown.group(1)) == status["totals"][key], key
    servers = watched.servers()
    for model, port in (("tiny-a", watched.dynamic_port), ("org/tiny-b", watched.autocomplete_port)):
        row = re.search(rf"<tr data-server=\"{model}\">(.*?)</tr>", dom, re.S).group(1)
        assert servers[model]["state"] in row and f">{port}<" in row and "never (pinned)" in row
        assert f'data-queued="{servers[model]["queue"]["queued"]}"' in row
    assert "memory budget" in dom
    assert "tiny-a" in dom.split("Recent requests")[1], "the last request is listed"
    assert screenshot.stat().st_size > 20_000


def test_the_status_page_asks_other_machines_for_the_key(models_dir, tmp_path):
    address = next((a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                    if a.family.name == "AF_INET" and not a.address.startswith("127.")), None)
    if address is None:
        pytest.skip("this machine has no address but loopback")
    gateway = Gateway(tmp_path / "home", models_dir, https=False, extra_env={"MLXGATE_HOST": "0.0.0.0"})
    gateway.start()
    try:
        base = f"http://{address}:{gateway.port}"
        assert httpx.get(base + "/", timeout=30).headers["location"] == "/login"
        wrong = httpx.post(base + "/login", data={"key": "nope"}, timeout=30)
        assert wrong.status_code == 401 and "That is not the gateway" in wrong.text
        with httpx.Client(base_url=base, timeout=30) as browser:
            logged = browser.post("/login", data={"key": gateway.api_key})
            assert logged.status_code == 303 and "HttpOnly" in logged.headers["set-cookie"]
            page = browser.get("/")
            assert page.status_code == 200 and "<h1>mlxgate</h1>" in page.text
        assert httpx.get(gateway.url + "/", timeout=30).status_code == 200, "loopback: open"
    finally:
        gateway.stop()


# ---------------------------------------------------------------- durability
def test_a_clean_stop_loses_no_answered_request(models_dir, tmp_path):
    gateway = Gateway(tmp_path / "home", models_dir, "--default-model", "tiny-a", https=False)
    gateway.start()
    try:
        for _ in range(12):
            gpt(gateway).chat.completions.create(model="gpt-4o", max_tokens=2, messages=PROMPT)
        with pytest.raises(openai.BadRequestError):
            gpt(gateway).chat.completions.create(model="../x", max_tokens=2, messages=PROMPT)
    finally:
        gateway.stop()  # at once: what is still queued for the ledger must be written
    import sqlite3

    with sqlite3.connect(gateway.home / "usage.sqlite") as db:
        assert db.execute("SELECT COUNT(*), SUM(output_tokens) FROM requests").fetchone() == (13, 24)
    assert oct((gateway.home / "usage.sqlite").stat().st_mode & 0o777) == "0o600"


def test_a_database_that_is_down_costs_a_counter_not_a_request(watched, postgres):
    postgres.stop()
    try:
        for _ in range(3):
            assert claude(watched).messages.create(model="claude-opus-4-8", max_tokens=2,
                                                   messages=PROMPT).usage.output_tokens == 2
        metrics = lambda: httpx.get(watched.url + "/metrics", timeout=30,  # noqa: E731
                                    headers={"Authorization": f"Bearer {watched.api_key}"}).text
        wait_for(lambda: re.search(r"^mlxgate_ledger_write_failures_total [1-9]", metrics(), re.M), 20,
                 what="the ledger failure to be counted")
        assert re.search(r"^mlxgate_usage_records_dropped_total [1-9]", metrics(), re.M)
        log = (watched.home / "logs" / "wrapper.log").read_text()
        assert "usage ledger at 127.0.0.1" in log and "not written" in log
        assert watched.api_key not in log
    finally:
        postgres.start()
    since = time.time()
    claude(watched).messages.create(model="claude-opus-4-8", max_tokens=2, messages=PROMPT)
    assert settled(postgres, since, 1)[0]["output_tokens"] == 2, "written again once the database is back"


# ---------------------------------------------------------------- the Docker stack's dashboard
def test_the_dashboard_queries_metrics_that_exist(watched):
    text = httpx.get(watched.url + "/metrics", headers={"Authorization": f"Bearer {watched.api_key}"},
                     timeout=30).text
    families = metric_families(text)
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {re.sub(r"_(bucket|sum|count|total)$", "", name)
               for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"mlxgate_[a-z_]+", target["expr"])}
    assert queried and queried <= families, queried - families
