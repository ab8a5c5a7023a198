"""A prompt cache that outlives its model server, as a user meets it: a long prefix asked for
again after `mlxgate restart`, after an unload or an idle unload, is read back from disk
instead of prefilled, and the usage each API reports says so; a damaged entry, a full disk and
a model server killed while it writes cost a prefill at most, never an answer; two models never
read each other's entries; `mlxgate cache` lists and clears what is kept.

One daemon for the module (HTTP only): default model tiny-c (a 128K window), and tiny-e beside it
(the same architecture and config, other weights), which unloads after 2 s idle. The long prefix
is a system prompt of ~3,200 tokens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from support import Gateway, claude, gpt, mlxgate, wait_for

SYSTEM = "You are a careful coding agent. " + " ".join(f"Rule {i}: read the file before you edit it."
                                                        for i in range(100))


@pytest.fixture(scope="module")
def gw(models_dir, tmp_path_factory):
    models = tmp_path_factory.mktemp("disk-models")
    shutil.copytree(models_dir / "tiny-c", models / "tiny-c")
    mlxgate("demo-model", str(models / "tiny-e"), "--seed", "5", "--context", "131072", env=dict(os.environ),
            check=True)
    running = Gateway(tmp_path_factory.mktemp("disk-home"), models, "--default-model", "tiny-c",
                      https=False, max_tokens=4096)
    running.settings = "models: {tiny-e: {keep_alive: 2}}\n"
    (running.home / "gateway.yaml").write_text(running.settings)
    running.start()
    yield running
    running.stop()


def ask(gw, task: str, model: str = "claude-opus-4-8", system: str = SYSTEM):
    """An Anthropic request with the long system prompt; its usage."""
    return claude(gw, timeout=300).messages.create(model=model, max_tokens=1, system=system,
                                                   messages=[{"role": "user", "content": task}]).usage


def prompt_of(usage) -> int:
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


def server_log(gw, name: str = "dynamic") -> str:
    return (gw.home / "logs" / f"{name}-server.log").read_text(errors="replace")


def disk_tokens(gw) -> float:
    """Prompt tokens read back from disk (the metrics, since each model server started)."""
    text = httpx.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mlxgate_prompt_cache_tokens_total{") and 'tier="disk"' in line)


def test_a_new_session_after_a_restart_reads_its_prefix_from_disk_in_every_api(gw):
    first = ask(gw, "Task one.")
    assert first.cache_read_input_tokens < 16 and first.input_tokens > 3000  # (the template's first tokens)
    mlxgate("restart", env=gw.env, timeout=300, check=True)
    started = time.monotonic()
    again = ask(gw, "Task two.")  # a new session: same system prompt, another task
    took = time.monotonic() - started
    shared = prompt_of(again)
    assert again.cache_read_input_tokens >= 0.95 * shared, again
    assert again.input_tokens < 0.05 * shared, "only the new task was prefilled"
    print(f"\nafter a restart: {again.cache_read_input_tokens} of {shared} tokens from the cache in {took:.2f} s")
    # the other APIs say so in their own words
    chat = gpt(gw).chat.completions.create(model="gpt-4o", max_tokens=1, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Task three."}])
    assert chat.usage.prompt_tokens_details.cached_tokens >= 0.95 * chat.usage.prompt_tokens
    response = gpt(gw).responses.create(model="gpt-5.5", max_output_tokens=16, instructions=SYSTEM, input="Task four.")
    assert response.usage.input_tokens_details.cached_tokens >= 0.9 * response.usage.input_tokens
    assert disk_tokens(gw) >= 0.95 * shared, "the metrics count what came from disk"


def test_an_unload_and_an_idle_unload_keep_the_prefix_on_disk(gw):
    mlxgate("unload", "tiny-c", env=gw.env, check=True)
    usage = ask(gw, "After mlxgate unload.")
    assert usage.cache_read_input_tokens >= 0.95 * prompt_of(usage), usage
    ask(gw, "Load tiny-e with it.", model="tiny-e")
    wait_for(lambda: gw.server("tiny-e")["state"] == "stopped", 30, what="tiny-e to unload when idle")
    assert "keep_alive" in gw.server("tiny-e")["stopped_because"]
    usage = ask(gw, "After the idle unload.", model="tiny-e")
    assert usage.cache_read_input_tokens >= 0.95 * prompt_of(usage), usage


def test_two_models_never_read_each_others_entries(gw):
    """tiny-e and tiny-c have the same architecture; each has its own entries for the same prompt."""
    system = SYSTEM.replace("careful", "tidy")  # a prefix neither has seen
    ask(gw, "On tiny-c first.", system=system)
    mlxgate("restart", env=gw.env, timeout=300, check=True)
    other = ask(gw, "Then on tiny-e.", model="tiny-e", system=system)
    assert other.cache_read_input_tokens < 0.02 * prompt_of(other), "tiny-e read nothing tiny-c wrote"
    assert ask(gw, "Then tiny-c again.", system=system).cache_read_input_tokens > 3000


def test_mlxgate_cache_lists_the_entries_and_clears_one_model(gw):
    for model in ("tiny-e", "tiny-c"):  # an unload writes what is pending, so nothing lands after the clear
        mlxgate("unload", model, env=gw.env, check=True)
    listing = mlxgate("cache", env=gw.env, check=True).stdout
    rows = [line.split() for line in listing.splitlines()[1:] if line.startswith(("tiny-e ", "tiny-c "))]
    assert {row[0] for row in rows} == {"tiny-e", "tiny-c"}
    assert all(int(row[1].replace(",", "")) > 3000 for row in rows)
    assert re.search(r"on disk in .*kv \(limit 20\.0 GiB\)", listing)
    shown = json.loads(mlxgate("cache", "--json", env=gw.env, check=True).stdout)
    folder = Path(shown["root"])
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in folder.rglob("*.safetensors"))
    cleared = mlxgate("cache", "clear", "tiny-e", env=gw.env, check=True).stdout
    assert "of tiny-e" in cleared
    left = json.loads(mlxgate("cache", "--json", env=gw.env, check=True).stdout)["models"]
    assert [m["name"] for m in left] == ["tiny-c"]
    missing = mlxgate("cache", "clear", "no-such-model", env=gw.env)
    assert missing.returncode == 1 and "no prompt cache on disk for 'no-such-model'" in missing.stderr


def chunk_files(gw) -> set[Path]:
    return set(Path(json.loads(mlxgate("cache", "--json", env=gw.env, check=True).stdout)["root"])
               .rglob("*.safetensors"))


def chunk_meta(path: Path) -> dict:
    """The metadata in a chunk's safetensors header (where in its prompt it starts, how many tokens)."""
    data = path.read_bytes()
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]


def test_a_damaged_entry_costs_a_prefill_and_a_log_line_not_an_answer(gw):
    system = SYSTEM.replace("careful", "patient")
    gw.stop()  # what the tests before wrote is on disk now (a stop writes what is pending)
    gw.start()
    before = chunk_files(gw)
    ask(gw, "Write it.", system=system)
    gw.stop()
    written = [(int(m["start"]), f) for f in chunk_files(gw) - before
               if int((m := chunk_meta(f))["ntok"]) == 256]  # this prefix's full blocks, in prompt order
    starts, blocks = zip(*sorted(written))
    assert len(blocks) >= 10, f"{len(blocks)} full blocks of a ~3,100-token prefix"
    damaged, cut = blocks[len(blocks) // 2], blocks[len(blocks) // 2 + 2]  # two ways, past the middle
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with cut.open("r+b") as handle:
        handle.truncate(cut.stat().st_size // 2)
    gw.start()
    usage = ask(gw, "Read it back.", system=system)
    assert usage.output_tokens == 1, "a normal answer"
    good = starts[len(blocks) // 2]  # the tokens before the damaged block
    assert 0.9 * good <= usage.cache_read_input_tokens <= good, "the good chunks before the damage, no more"
    assert re.search(r"prompt cache on disk: unusable chunk, prefilling instead: .*(crc32|truncated|size)",
                     server_log(gw)), "a log line says why"
    mlxgate("cache", "verify", env=gw.env, check=True)  # any damaged chunk the request did not meet goes too
    assert "; 0 discarded" in mlxgate("cache", "verify", env=gw.env, check=True).stdout


def test_a_model_server_killed_while_it_writes_leaves_nothing_that_is_read_back(gw):
    mlxgate("cache", "verify", env=gw.env, check=True)  # damage another test left is not this test's
    for attempt in range(4):
        system = SYSTEM.replace("careful", f"quick{attempt}")
        ask(gw, "Fresh prefix.", system=system)  # its chunks are written right away (a long new prefill)
        time.sleep(0.05 * attempt)
        os.kill(gw.server("tiny-c")["pid"], signal.SIGKILL)
        usage = ask(gw, "After the kill.", system=system)  # it loads again in this request's queue
        assert usage.output_tokens == 1
    verified = mlxgate("cache", "verify", env=gw.env, check=True).stdout
    assert re.match(r"\d+ chunks read back whole; 0 discarded", verified), verified


def test_a_full_disk_stops_the_writing_not_the_serving(gw, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    kv = gw.home / "kv"
    gw.stop()
    moved = gw.home / "kv-before-tmpfs"
    kv.rename(moved)
    kv.mkdir(mode=0o700)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(kv)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        kv.rmdir()
        moved.rename(kv)
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        gw.start()
        for n in range(4):  # each prefix is ~1.7 MB on disk: the 2 MB disk is full after the first
            usage = ask(gw, f"Full disk {n}.", system=SYSTEM.replace("careful", f"full{n}"))
            assert usage.output_tokens == 1
        assert ask(gw, "Still here.").output_tokens == 1
        wait_for(lambda: re.search(r"prompt cache on disk: disk full while writing", server_log(gw)), 30,
                 what="the log line about the full disk")
    finally:
        gw.stop()
        subprocess.run(["umount", str(kv)], capture_output=True)
        kv.rmdir()
        moved.rename(kv)
        gw.start()


def test_the_size_bound_evicts_the_oldest_entries(gw):
    gw.stop()
    (gw.home / "gateway.yaml").write_text(gw.settings + "prompt_cache_disk: 4M\n")
    gw.start()
    try:
        for n in range(4):  # ~1.7 MB each on disk: the bound holds two
            ask(gw, "Bounded.", system=SYSTEM.replace("careful", f"bounded{n}"))
            time.sleep(1)
        mlxgate("unload", "tiny-c", env=gw.env, check=True)  # memory forgets; what is pending is written
        shown = json.loads(mlxgate("cache", "--json", env=gw.env, check=True).stdout)
        assert sum(m["bytes"] for m in shown["models"]) <= 4 * 1024 ** 2
        newest = ask(gw, "The last one again.", system=SYSTEM.replace("careful", "bounded3"))
        oldest = ask(gw, "The first one again.", system=SYSTEM.replace("careful", "bounded0"))
        assert newest.cache_read_input_tokens > 3000 > oldest.cache_read_input_tokens
    finally:
        gw.stop()
        (gw.home / "gateway.yaml").write_text(gw.settings)
        gw.start()
