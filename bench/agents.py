"""The coding-agent matrix with the newest version of each agent: installs each (npm into a
temporary prefix, PyPI into a venv of its own), runs the test suite's task through one gateway
(the scripted model calls the agent's own edit tool; the agent must make that exact edit), and
prints agent, version, API, requests of its loop, whether the edit landed, the smallest share of a
follow-up prompt read from the cache, and seconds. The rows are `tests/test_agent_matrix.py`'s.

    .venv/bin/python bench/agents.py                 # every agent
    .venv/bin/python bench/agents.py claude-code pi  # some
    .venv/bin/python bench/agents.py --pinned        # the versions the tests pin
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from stack import PYTHON, Gateway  # noqa: E402
from test_agent_matrix import AFTER, AGENTS, BEFORE, Session, loop_requests  # noqa: E402

APIS = {"anthropic_messages": "messages", "chat_completions": "chat", "responses": "responses"}


def newest(package: str, python: str | None = None) -> str:
    """The newest version the registry serves (PyPI: for the Python the agent's venv is made from)."""
    if package.startswith("pypi:"):
        shown = subprocess.run([python or PYTHON, "-m", "pip", "index", "versions", package[5:]], capture_output=True,
                               text=True).stdout
        return shown.split("(", 1)[1].split(")", 1)[0] if "(" in shown else "?"
    return subprocess.run(["npm", "view", package, "version"], capture_output=True, text=True).stdout.strip() or "?"


def install(agent, folder: Path) -> str:
    if agent.package.startswith("pypi:"):
        base = agent.python or PYTHON
        subprocess.run([base, "-m", "venv", str(folder)], check=True, capture_output=True)
        subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "-q",
                        f"{agent.package[5:]}=={agent.version}"], check=True, capture_output=True)
        return str(folder / "bin" / agent.command)
    subprocess.run(["npm", "install", "--prefix", str(folder), "--no-audit", "--no-fund",
                    f"{agent.package}@{agent.version}"], check=True, capture_output=True)
    return str(folder / "node_modules" / ".bin" / agent.command)


class Served:
    """What the tests' `Session` needs of a gateway, for the bench's own one."""

    def __init__(self, gateway: Gateway):
        self.gateway, self.url, self.api_key, self.env, self.home = gateway, gateway.url, gateway.key, \
            gateway.env, gateway.home
        self.ollama_url = gateway.ollama_url


def rows_since(home: Path, since: float, model: str) -> list[dict]:
    time.sleep(2)  # the ledger is written in batches every second
    with sqlite3.connect(home / "usage.sqlite") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM requests WHERE at >= ? AND served_model LIKE ? ORDER BY at",
                                            (since, f"%{model}"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("agents", nargs="*", default=list(AGENTS))
    parser.add_argument("--pinned", action="store_true", help="the tests' pinned versions, not the newest")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlxgate-bench-agents-"))
    models = work / "models"
    models.mkdir()
    gateway = Gateway(work, [models], "--max-tokens", "4096")
    print(f"{'agent':14} {'version':10} {'API':10} {'loop':>4} {'edit':10} {'cache':>6} {'s':>5}", flush=True)
    try:
        for name in args.agents:
            agent = AGENTS[name]
            if not args.pinned:
                agent = replace(agent, version=newest(agent.package, agent.python))
            started = time.monotonic()
            folder, home, task = work / f"{name}-pkg", work / f"{name}-home", work / f"{name}-work"
            for path in (home, task):
                path.mkdir()
            try:
                binary = install(agent, folder)
            except subprocess.CalledProcessError as e:
                show((name, agent.version, "-", "-", f"install failed: {(e.stderr or b'')[-80:]!r}", "-", "-"))
                continue
            if not Path(binary).exists():
                show((name, agent.version, "-", "-", f"installed, but no {agent.command} executable", "-", "-"))
                continue
            (task / "hello.txt").write_text(BEFORE)
            model = f"edit-{name}"
            steps = work / f"{name}-steps.json"
            steps.write_text(json.dumps(agent.steps(task)))
            subprocess.run([PYTHON, "-m", "mlxgate.cli", "demo-model", str(models / model), "--scripted", "--context",
                            "131072", "--steps", str(steps)], check=True, capture_output=True)
            run = agent.run(Session(binary, model, Served(gateway), task, home))
            env = {**os.environ, "HOME": str(home), "PWD": str(task), **run.env}
            since = time.time()
            result = subprocess.run(run.argv, env=env, cwd=task, capture_output=True, text=True, timeout=900,
                                    stdin=subprocess.DEVNULL)
            rows = rows_since(gateway.home, since, model)
            loop = loop_requests(rows) if rows else []
            shares = [r["cached_tokens"] / max(1, r["cached_tokens"] + r["input_tokens"]) for r in loop[1:]]
            edited = (task / "hello.txt").read_text() == AFTER
            show((name, agent.version, ",".join(sorted({APIS.get(r["route"], r["route"]) for r in rows})) or "-",
                  str(len(loop)), ("yes" if edited else "NO") + ("" if result.returncode == 0
                                                                 else f" (exit {result.returncode})"),
                  f"{min(shares):.0%}" if shares else "-", f"{time.monotonic() - started:.0f}"))
    finally:
        gateway.stop()


def show(row: tuple) -> None:
    """One agent's row, printed as soon as it is known (the whole matrix takes a while)."""
    print(f"{row[0]:14} {row[1]:10} {row[2]:10} {row[3]:>4} {row[4]:10} {row[5]:>6} {row[6]:>5}", flush=True)


if __name__ == "__main__":
    main()
