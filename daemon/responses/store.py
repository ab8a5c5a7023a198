"""Stored responses: what `previous_response_id` chains on and `GET /v1/responses/{id}` reads.

A response created with `store` true (the API's default) is kept as one JSON file in the
runtime folder (`$MLXGATE_HOME/responses/<id>.json`, folder mode 700, files mode 600:
they hold conversation text): the response, this request's input items, and the items of
the chain before it, so a chained request reads one file however long the chain is.
The folder is bounded: files older than `max_age` are removed, and beyond `max_bytes`
the oldest go first (checked on the first save and then at most once a minute). A
request with `store: false` (what Codex sends) leaves nothing here.

The wrapper's relay owns the store: it translates the chain into the prompt, it has the
answer when the stream ends, and it is one process (the proxy runs one per listener).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable

from ..errors import RequestRejected, invalid
from ..private_files import write_private

MAX_BYTES = 256 * 1024 * 1024
MAX_AGE = 30 * 24 * 3600
PRUNE_EVERY = 60.0
RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{48}$")


def not_found(response_id: str) -> RequestRejected:
    return RequestRejected(404, f"Response with id {response_id!r} not found (responses are kept when "
                                f"created with store: true, for {MAX_AGE // 86400} days)", "response_not_found")


class ResponseStore:
    def __init__(self, folder: Path, max_bytes: int = MAX_BYTES, max_age: float = MAX_AGE,
                 clock: Callable[[], float] = time.time):
        self.folder = Path(folder)
        self.max_bytes, self.max_age, self.clock = max_bytes, max_age, clock
        self._lock = threading.Lock()
        self._pruned_at: float | None = None

    def _path(self, response_id: str) -> Path:
        if not isinstance(response_id, str) or not RESPONSE_ID.match(response_id):
            raise not_found(str(response_id)[:80])
        return self.folder / f"{response_id}.json"

    def save(self, response: dict, items: list[dict], earlier: list[dict]) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(response["id"])
        temporary = path.with_suffix(".tmp")
        write_private(temporary, json.dumps({"response": response, "input": items, "earlier": earlier}).encode())
        os.replace(temporary, path)
        self._prune()

    def record(self, response_id: str) -> dict:
        """The stored record; 404 when there is none (never stored, deleted or too old)."""
        path = self._path(response_id)
        try:
            if self.clock() - path.stat().st_mtime > self.max_age:
                raise FileNotFoundError
            return json.loads(path.read_bytes())
        except (FileNotFoundError, ValueError):
            raise not_found(response_id) from None

    def history(self, response_id: str | None) -> list[dict]:
        """The items a request chained on `response_id` continues: every earlier input and output."""
        if response_id is None:
            return []
        if not isinstance(response_id, str):
            raise invalid("previous_response_id: Input should be a string")
        record = self.record(response_id)
        return [*record["earlier"], *record["input"], *record["response"]["output"]]

    def delete(self, response_id: str) -> dict:
        path = self._path(response_id)
        self.record(response_id)
        path.unlink(missing_ok=True)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    def input_items(self, response_id: str, order: str = "desc", limit: int = 20, after: str | None = None) -> dict:
        """`GET /v1/responses/{id}/input_items`: the items this response was given, a page of them."""
        items = list(self.record(response_id)["input"])
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [item.get("id") for item in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    def _prune(self) -> None:
        now = self.clock()
        with self._lock:
            if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY:
                return
            self._pruned_at = now
        files = []
        for entry in os.scandir(self.folder):
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            if now - stat.st_mtime > self.max_age:
                Path(entry.path).unlink(missing_ok=True)
            else:
                files.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            Path(path).unlink(missing_ok=True)
            total -= size
