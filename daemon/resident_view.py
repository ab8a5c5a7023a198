"""The resident set as people read it: one row per model that holds memory, is loading,
waits for room or failed, from the wrapper's `GET /models` answer. `mlxgate ps`, `mlxgate
status` and the status page all show these rows."""

from __future__ import annotations

SHOWN = ("ready", "starting", "stopping", "failed")
GIB, MIB = 1024 ** 3, 1024 ** 2


def size(value: int | None) -> str:
    if not value:
        return "-"
    if value >= GIB:
        return f"{value / GIB:.1f} GiB"
    return f"{value / MIB:.0f} MiB" if value >= MIB else f"{value / 1024:.0f} KiB"


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.0f} s"
    return f"{value / 60:.0f} min" if value < 7200 else f"{value / 3600:.1f} h"


def unloads(server: dict) -> str:
    """When the model unloads if nothing asks for it."""
    queue = server.get("queue") or {}
    if server.get("pinned"):
        return "never (pinned)"
    keep = server.get("keep_alive", -1)
    if keep is None or keep < 0:
        return "never (keep_alive -1)"
    if queue.get("pending") or queue.get("idle_s") is None:
        return f"{seconds(keep)} after its last request"
    return f"in {seconds(max(0.0, keep - queue['idle_s']))}"


def rows(servers: dict) -> list[dict]:
    """The rows of the models worth showing, the loaded ones first."""
    out = []
    for name, server in servers.items():
        if server.get("state") not in SHOWN and not server.get("waiting_for"):
            continue
        queue = server.get("queue") or {}
        out.append({
            "model": name,
            "state": "waiting" if server.get("waiting_for") else server.get("state"),
            "port": server.get("port"),
            "memory": size(server.get("cost_bytes")),
            "in_flight": len(queue.get("active") or ()),
            "queued": queue.get("queued", 0),
            "idle": seconds(queue.get("idle_s")) if not queue.get("pending") else "busy",
            "unloads": unloads(server),
            "detail": server.get("waiting_for") or server.get("error") or "",
        })
    return sorted(out, key=lambda r: (r["state"] != "ready", r["model"]))


def budget_line(memory: dict) -> str:
    if not memory:
        return ""
    evictions = memory.get("evictions") or {}
    shown = ", ".join(f"{n} {reason}" for reason, n in sorted(evictions.items())) or "none"
    return (f"memory budget {size(memory.get('budget'))} ({memory.get('source')}): {size(memory.get('used'))} "
            f"held, {size(max(memory.get('free') or 0, 0))} free; machine {size(memory.get('machine_available'))} "
            f"available; unloads so far: {shown}")
