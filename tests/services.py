"""Real servers the observability tests talk to, started in temporary folders on free ports:
PostgreSQL (Debian's), Prometheus (Debian's), headless Chromium (Debian's); and Docker, when an
engine answers. Each Debian program is installed with apt when missing and the tests run as root
(CI's `.ci/run` installs them first); elsewhere the tests that need one skip and say why."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from support import free_port, wait_for

APT_PACKAGES = {"initdb": "postgresql", "prometheus": "prometheus", "chromium": "chromium",
                "docker-compose": "docker-compose"}
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def need(program: str) -> str:
    """The path of `program`, installing its Debian package when missing (root only)."""
    found = shutil.which(program) or (str(PG_BIN / program) if (PG_BIN / program).exists() else None)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{program} is not installed and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", APT_PACKAGES[program]], env=env, capture_output=True,
                   timeout=900, check=True)
    return shutil.which(program) or str(PG_BIN / program)


def docker_engine() -> bool:
    """Whether a Docker engine answers here (Docker Desktop running, or Docker Engine on Linux)."""
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class Postgres:
    """A PostgreSQL cluster of its own, run as the `postgres` user, trust auth on 127.0.0.1."""

    def __init__(self):
        initdb = need("initdb")
        self.bin = Path(initdb).parent
        # a folder the postgres user can reach (pytest's own are private to root)
        self.folder = Path(tempfile.mkdtemp(prefix="mlxgate-postgres-"))
        shutil.chown(self.folder, "postgres")
        self.data = self.folder / "pgdata"
        self.port = free_port()
        self._as_postgres([initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres"])
        self.start()
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlxgate")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/mlxgate"

    def _as_postgres(self, command: list[str]) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.data / "log"),
                           "-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1", "start"])

    def stop(self) -> None:
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop"])

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def query(self, sql: str, *args):
        import psycopg

        with psycopg.connect(self.url) as conn:
            return conn.execute(sql, args).fetchall()


class Prometheus:
    """Prometheus scraping one gateway's /metrics every second, with the gateway's key."""

    def __init__(self, folder: Path, target_port: int, key: str):
        binary = need("prometheus")
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / "key"
        key_file.write_text(key)
        config = folder / "prometheus.yml"
        config.write_text(f"""global:
  scrape_interval: 1s
scrape_configs:
  - job_name: mlxgate
    authorization:
      type: Bearer
      credentials_file: {key_file}
    static_configs:
      - targets: ["127.0.0.1:{target_port}"]
""")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (folder / "prometheus.log").open("wb")
        self.process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                                         f"--web.listen-address=127.0.0.1:{self.port}"],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 60, what="Prometheus to start")

    def _ready(self) -> bool:
        try:
            return requests.get(self.url + "/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def query(self, promql: str) -> float | None:
        data = requests.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10).json()
        result = data["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def scraped_after(self, moment: float) -> bool:
        targets = requests.get(self.url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return any(t["health"] == "up" and _unix(t["lastScrape"]) > moment for t in targets)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def _unix(timestamp: str) -> float:
    """Prometheus' RFC 3339 times (nanoseconds, `Z`) as unix time."""
    from datetime import datetime

    base, _, fraction = timestamp.replace("Z", "").split("+")[0].partition(".")
    return datetime.fromisoformat(base + "+00:00").timestamp() + float("0." + (fraction or "0"))


def chromium(url: str, folder: Path, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (and a screenshot, when asked), from headless Chromium."""
    binary = need("chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={folder / 'chromium-profile'}", "--virtual-time-budget=3000",
             "--window-size=1280,1100"]
    if screenshot is not None:
        subprocess.run([binary, *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    return subprocess.run([binary, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout

