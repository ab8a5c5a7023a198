"""The usage ledger: one row per request (`usage.Record`), in SQLite under the runtime folder
by default, or in PostgreSQL when `database_url` / `MLXGATE_DATABASE_URL` names one.

The wrapper writes it (in batches, off the request path: `wrapper/recorder.py`); `mlxgate
usage` reads it. Both go through `Ledger`, so the two databases answer the same queries.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Iterable

from .errors import ConfigError, MlxgateError
from .usage import COLUMNS, Record

SQLITE_FILE = "usage.sqlite"
TYPES = {"at": "DOUBLE PRECISION", "status": "INTEGER", "input_tokens": "BIGINT", "cached_tokens": "BIGINT",
         "output_tokens": "BIGINT", "images": "INTEGER", "ttft_ms": "DOUBLE PRECISION", "total_ms": "DOUBLE PRECISION",
         "queue_ms": "DOUBLE PRECISION", "cancelled": "BOOLEAN", "stream": "BOOLEAN"}
GROUPS = {  # --by: the SQL expression a row is grouped by
    "model": "served_model",
    "api": "api",
    "client": "client",
    "route": "route",
}


def _schema(sqlite: bool) -> list[str]:
    key = "id INTEGER PRIMARY KEY AUTOINCREMENT" if sqlite else "id BIGSERIAL PRIMARY KEY"
    columns = ", ".join(f"{name} {TYPES.get(name, 'TEXT')}" for name in COLUMNS)
    return [f"CREATE TABLE IF NOT EXISTS requests ({key}, {columns})",
            "CREATE INDEX IF NOT EXISTS requests_at ON requests (at)"]


def _added_columns(conn, sqlite: bool) -> list[str]:
    """The statements that give a ledger written by an earlier version the columns added since."""
    if sqlite:
        have = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
    else:
        have = {row[0] for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'requests'")}
    return [f"ALTER TABLE requests ADD COLUMN {name} {TYPES.get(name, 'TEXT')}" for name in COLUMNS if name not in have]


class Ledger:
    def __init__(self, url: str):
        self.url = url
        self.sqlite = not url.startswith(("postgresql://", "postgres://"))
        self.where = url if self.sqlite else url.split("@")[-1]  # never show a password
        self._conn = None

    @classmethod
    def for_config(cls, config) -> "Ledger":
        return cls(config.database_url or str(config.home / SQLITE_FILE))

    def connect(self):
        if self._conn is not None:
            return self._conn
        try:
            if self.sqlite:
                Path(self.url).parent.mkdir(parents=True, exist_ok=True)
                Path(self.url).touch(mode=0o600, exist_ok=True)  # with DETAILED_DEBUG it holds request bodies
                self._conn = sqlite3.connect(self.url, check_same_thread=False, timeout=10)
                self._conn.execute("PRAGMA journal_mode=WAL")
            else:
                import psycopg
                self._conn = psycopg.connect(self.url, connect_timeout=5, autocommit=True)
            for statement in _schema(self.sqlite):
                self._conn.execute(statement)
            for statement in _added_columns(self._conn, self.sqlite):
                self._conn.execute(statement)
            if self.sqlite:
                self._conn.commit()
        except Exception as exc:
            self._conn = None
            raise MlxgateError(f"the usage ledger at {self.where} cannot be opened: {exc}") from None
        return self._conn

    def insert(self, records: Iterable[Record]) -> int:
        rows = [tuple(getattr(r, c) for c in COLUMNS) for r in records]
        if not rows:
            return 0
        marks = ", ".join(["?" if self.sqlite else "%s"] * len(COLUMNS))
        statement = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({marks})"
        conn = self.connect()
        try:
            if self.sqlite:
                conn.executemany(statement, rows)
                conn.commit()
            else:
                with conn.cursor() as cursor:
                    cursor.executemany(statement, rows)
        except Exception:
            self.close()  # a fresh connection next time (the database may have restarted)
            raise
        return len(rows)

    def summary(self, since: float, by: str) -> list[dict]:
        """Per `by` (model, day, api, client, route): requests, errors, tokens, speed."""
        if by == "day":
            group = ("date(at, 'unixepoch')" if self.sqlite else
                     "to_char(to_timestamp(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')")
        elif by in GROUPS:
            group = GROUPS[by]
        else:
            raise ConfigError(f"--by: expected one of day, {', '.join(GROUPS)}, got {by!r}")
        failed = "CASE WHEN status >= 400 OR error <> '' THEN 1 ELSE 0 END"
        cancelled = "CASE WHEN cancelled THEN 1 ELSE 0 END"
        mark = "?" if self.sqlite else "%s"
        query = (f"SELECT {group} AS key, COUNT(*), SUM({failed}), SUM({cancelled}), SUM(input_tokens), "
                 f"SUM(cached_tokens), SUM(output_tokens), AVG(ttft_ms), "
                 f"SUM(CASE WHEN output_tokens > 0 AND total_ms > ttft_ms THEN output_tokens ELSE 0 END), "
                 f"SUM(CASE WHEN output_tokens > 0 AND total_ms > ttft_ms THEN total_ms - ttft_ms ELSE 0 END) "
                 f"FROM requests WHERE at >= {mark} GROUP BY key ORDER BY key")
        rows = self.connect().execute(query, (since,)).fetchall()
        out = []
        for key, *values in rows:  # PostgreSQL sums are Decimals
            count, errors, cancels, input_tokens, cached, output, ttft, timed_out, gen_ms = (
                None if v is None else float(v) for v in values)
            out.append({"key": key or "-", "requests": int(count), "errors": int(errors or 0),
                        "cancelled": int(cancels or 0), "input_tokens": int(input_tokens or 0),
                        "cached_tokens": int(cached or 0), "output_tokens": int(output or 0), "ttft_ms": ttft,
                        "tokens_per_second": (timed_out / (gen_ms / 1000)) if gen_ms else None})
        return out

    def totals(self, since: float = 0.0) -> dict:
        mark = "?" if self.sqlite else "%s"
        row = self.connect().execute(f"SELECT COUNT(*), SUM(input_tokens), SUM(cached_tokens), SUM(output_tokens) "
                                     f"FROM requests WHERE at >= {mark}", (since,)).fetchone()
        return dict(zip(("requests", "input_tokens", "cached_tokens", "output_tokens"), (int(v or 0) for v in row)))

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None


def parse_since(text: str, now: float | None = None) -> float:
    """`30m`, `12h`, `1d`, `2w` → the unix time that long ago; `all` → 0."""
    now = time.time() if now is None else now
    text = text.strip().lower()
    if text in ("all", "0"):
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return now - float(text[:-1]) * units[text[-1]]
    raise ConfigError(f"--since: expected a duration such as 30m, 12h, 1d or 2w (or `all`), got {text!r}")
