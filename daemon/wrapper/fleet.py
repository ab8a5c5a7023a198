"""The resident set: one model server per model, loaded when a request asks for it and kept
while it fits in the memory budget.

- A request's model is found by name; its server (and queue) exists from the first ask.
  The load happens inside that queue (the relay asks `ensure` when the request's turn
  comes), so a load holds nothing but the requests that wait for that model.
- Before a load, `reserve` makes room: a model whose cost cannot fit beside the pinned
  models is refused at once; otherwise the least recently used idle models (nothing
  running, waiting or loading; never a pinned one) are evicted until it fits, and when only
  busy models stand in the way it waits for them (its status says so). The machine must
  also have the memory free, so a load never pushes it into swap.
- The config's default and autocomplete models (`seats`) and `models: {NAME: {pinned:
  true}}` are loaded at start and pinned. The others unload after `keep_alive` idle; each request
  sets its model's: its own (Ollama's API has `keep_alive`), or the configured one.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from .. import seats as seat_table
from ..catalog import Catalog, LocalModel, for_config, weights_digest
from ..config import Config
from ..errors import InsufficientMemory, ModelTooLarge, MlxgateError, RequestRejected, UnknownModel
from ..model_kinds import CHAT, kind_of
from ..private_files import write_private
from . import kinds, memory, tokens
from .admission import Admission
from .model_server import Launcher, ModelServer, State
from .watchdog import Watchdog

log = logging.getLogger("mlxgate.wrapper")

ROOM_WAIT = 0.5  # seconds between looks while a load waits for busy models to finish
MEASURED_FILE = "measured.json"
PROMPT_DISK_FOLDER = "kv"  # in the runtime folder: the prompt caches' disk tier, all models  # what each model's server measured, kept across starts
CRASH_RESTART_EVERY = 60.0  # a model that crashed is loaded again by itself at most this often


class Fleet:
    def __init__(self, config: Config, catalog: Catalog | None = None, launcher: Launcher | None = None,
                 observer=None, budget: memory.Budget | None = None, available=memory.available):
        self.config = config
        self.catalog = catalog or for_config(config)
        self.observer = observer
        self.budget = budget or memory.budget(config.memory_budget)
        self.available = available
        self.avoid_ports = frozenset((config.port, config.https_port, config.wrapper_port, config.listen_port,
                                      config.ollama_port, *seat_table.ports(config).values()))
        self.launcher = launcher or Launcher(config.log_dir, config.server_args)
        self._lock = threading.RLock()
        self._servers: dict[Path, ModelServer] = {}
        self._by_name: dict[str, ModelServer] = {}
        self._measured = _Measured(config.home / MEASURED_FILE)  # what a model's server measured at its last load
        self._evicting: set[ModelServer] = set()
        self._stopping = threading.Event()
        self.evictions: Counter = Counter()   # reason -> count
        self._seats: dict[str, seat_table.Seat] = {name: seat for seat, name in seat_table.configured(config)}
        self._settings = self._model_settings()

    # ------------------------------------------------------------------ finding a model's server
    def _model_settings(self) -> dict[Path, dict]:
        """The `models:` section by model folder (names that are not here are logged and left)."""
        found = {}
        for name, settings in self.config.models.items():
            try:
                found[self.catalog.resolve(name).path] = settings
            except MlxgateError as exc:
                log.warning("models.%s: %s; its settings wait until it is here (restart the wrapper then)",
                            name, exc)
        return found

    def resolve(self, name: str) -> LocalModel:
        return self.catalog.resolve(name)

    def server_for(self, name: str) -> ModelServer:
        """The server of the model `name` names (made, stopped, on first ask)."""
        server = self._by_name.get(name)
        if server is not None:
            return server
        model = self.resolve(name)
        with self._lock:
            server = self._servers.get(model.path)
            if server is None:
                server = self._servers[model.path] = self._new_server(model, self._seats.get(name))
            if len(self._by_name) > 1000:
                self._by_name.clear()
            self._by_name[name] = server
            return server

    def _new_server(self, model: LocalModel, seat: seat_table.Seat | None) -> ModelServer:
        settings = self._settings.get(model.path, {})
        kind = kind_of(model.path, settings.get("kind")).kind
        how = kinds.serving(kind)
        if how is None:
            raise RequestRejected(400, kinds.refusal(kind, model.name, "any route"), "invalid_request")
        allowance, args = 0, ["--kind", settings["kind"]] if settings.get("kind") and kind != CHAT else []
        if how.prompt_cache:
            kv_bits = settings.get("kv_bits")
            allowance = memory.prompt_cache_allowance(model.path, settings.get("prompt_cache", self.config.prompt_cache),
                                                      self.budget.bytes, kv_bits)
            args = ["--prompt-cache-bytes", str(allowance)] + (["--kv-bits", str(kv_bits)] if kv_bits else [])
            if self.config.prompt_cache_disk:  # the disk tier under its prompt cache (see `prompt_disk`)
                args += ["--prompt-disk", str(self.config.home / PROMPT_DISK_FOLDER), "--prompt-disk-bytes",
                         str(self.config.prompt_cache_disk), "--prompt-disk-name", model.name]
        launcher = self.launcher
        if seat is not None and seat.model_key == "default_model" and self.config.distributed:
            from .distributed import launcher as group
            launcher = replace(launcher, launch=group(self.config.distributed))
        server = ModelServer(
            model, launcher, self.config.load_timeout, serving=how, kind=kind,
            port=seat_table.port_of(self.config, seat) if seat else None, name=seat.name if seat else None,
            pinned=seat is not None or bool(settings.get("pinned")),
            keep_alive=settings.get("keep_alive", self.config.keep_alive), server_args=args,
            admission=Admission(model.name, self.config.max_parallel, self.config.max_queue),
            drain_timeout=self.config.drain_timeout, observer=self.observer, avoid_ports=self.avoid_ports)
        server.allowance = allowance
        return server

    @property
    def servers(self) -> list[ModelServer]:
        with self._lock:
            return list(self._servers.values())

    # ------------------------------------------------------------------ memory
    def estimate(self, server: ModelServer) -> int:
        """What the model will cost: measured at its last load, else its weights and what the
        other models' processes measured beyond their weights."""
        base = self._measured.get(server.model.path) or (memory.weights_bytes(server.model.path)
                                                          + self._measured.process_bytes())
        return base + server.allowance

    def used(self, besides: ModelServer | None = None) -> int:
        """What the servers hold or have reserved (a server's cost is 0 once it stops)."""
        return sum(s.cost for s in self.servers if s is not besides)

    def check_fits(self, server: ModelServer) -> None:
        """Refuse at once a model that can never fit: its cost over the budget less what the
        pinned models hold. Nothing is loaded or evicted for it."""
        need = self.estimate(server)
        pinned = [s for s in self.servers if s.pinned and s is not server and s.cost]
        room = self.budget.bytes - sum(s.cost for s in pinned)
        if need <= room:
            return
        weights = memory.weights_bytes(server.model.path)
        held = (f", of which the pinned {', '.join(s.model.name for s in pinned)} hold "
                f"{memory.describe(self.budget.bytes - room)}" if pinned else "")
        raise ModelTooLarge(
            f"model {server.model.name!r} needs {memory.describe(need)} (weights {memory.describe(weights)}, "
            f"prompt cache {memory.describe(server.allowance)}, the process) and cannot fit in the memory budget "
            f"of {memory.describe(self.budget.bytes)} ({self.budget.source}){held}. Ways out: a smaller "
            f"quantization of the model (e.g. a 4-bit one), a smaller prompt_cache for it (models: "
            f"{{{server.model.name}: {{prompt_cache: 512M}}}}), or a larger memory_budget in config/gateway.yaml.")

    def reserve(self, server: ModelServer) -> None:
        """Make room for `server` in the budget and on the machine; evict idle models to do so,
        wait while busy ones stand in the way. Sets its `cost`."""
        need = self.estimate(server)
        try:
            while True:
                if self._stopping.is_set():
                    raise MlxgateError("the wrapper is stopping")
                self.check_fits(server)
                with self._lock:
                    free = self.budget.bytes - self.used(besides=server)
                    idle = self._evictable(besides=server)
                    victims, freed = [], 0
                    for victim in idle:
                        if free + freed >= need:
                            break
                        victims.append(victim)
                        freed += victim.cost
                    fits = free + freed >= need
                    if fits:
                        server.cost = need  # held from now: no other load counts this room as free
                        self._evicting.update(victims)  # theirs to free: no other load counts them
                if fits:
                    for victim in victims:
                        try:
                            self._evict(victim, f"to make room for {server.model.name}")
                        finally:
                            self._evicting.discard(victim)
                    self._machine_room(server, need)
                    server.waiting_for = None
                    return
                busy = [s.model.name for s in self.servers if s is not server and s.cost
                        and not s.pinned and s.admission.pending()]
                server.waiting_for = (f"room in the memory budget: needs {memory.describe(need)}, "
                                      f"{memory.describe(max(free, 0))} free; waiting for "
                                      f"{', '.join(busy) or 'models'} to finish their requests")
                if not server.admission.pending():
                    raise MlxgateError(f"nobody waits for {server.model.name} any more; its load is dropped")
                time.sleep(ROOM_WAIT)
        except BaseException:
            server.cost = 0
            server.waiting_for = None
            raise

    def _machine_room(self, server: ModelServer, need: int) -> None:
        """The machine must have `need` free too (other programs use memory); evict idle
        models further, or refuse."""
        while self.available() < need:
            idle = self._evictable(besides=server)
            if not idle:
                raise InsufficientMemory(
                    f"this machine has {memory.describe(self.available())} of memory free and model "
                    f"{server.model.name!r} needs {memory.describe(need)}: other programs hold the rest. "
                    f"Close some, or lower memory_budget so the gateway plans for less.")
            with self._lock:
                self._evicting.add(idle[0])
            try:
                self._evict(idle[0], f"the machine needs room for {server.model.name}")
            finally:
                self._evicting.discard(idle[0])

    def _evictable(self, besides: ModelServer | None = None) -> list[ModelServer]:
        """Ready, unpinned models with nothing pending, least recently used first."""
        idle = [s for s in self.servers if s is not besides and not s.pinned and s.state is State.READY
                and not s.admission.pending() and s not in self._evicting]
        return sorted(idle, key=lambda s: s.admission.last_used)

    def _evict(self, server: ModelServer, why: str, reason: str = "budget") -> None:
        log.info("%s: unloading (%s)", server.label, why)
        server.stop(why)
        self.evictions[reason] += 1
        if self.observer is not None:
            self.observer.evicted(server.model.name, reason)

    def measure(self, server: ModelServer) -> int | None:
        """The server's memory now (process tree RSS, or MLX's own count if larger)."""
        proc = server.process
        if proc is None or not proc.alive():
            return None
        rss = memory.process_tree_rss(proc.pid)
        alive = proc.alive_report()
        mlx = (alive.get("mlx_active", 0) + alive.get("mlx_cache", 0)) if alive else 0
        return max(rss, mlx)

    def ensure(self, server: ModelServer) -> dict:
        """Load `server`'s model unless it serves (room made first); its measured cost counts
        from then on."""
        was_ready = server.ready()
        status = server.ensure(self.reserve)
        if not was_ready:
            measured = self.measure(server)
            if measured:
                self._measured.set(server.model.path, measured)
                server.cost = measured + server.allowance
                status = server.status()
        return status

    # ------------------------------------------------------------------ what users and hosts see
    def load(self, name: str) -> dict:
        """Load `name` (if it is not loaded) and wait until it answers."""
        server = self.server_for(name)
        self.check_fits(server)
        with server.admission.holding():  # a load asked for by hand counts as someone waiting
            return self.ensure(server)

    def keep_alive(self, server: ModelServer, seconds: float | None) -> None:
        """Each request sets its model's idle unload, as Ollama's do: its own `keep_alive` (seconds
        idle, 0 unloads it once idle, -1 never), or the configured one when it says none. A pinned
        model stays loaded, so for it only -1 can be honoured; anything else is a 400 saying why."""
        if server.pinned:
            if seconds is not None and seconds >= 0:
                raise RequestRejected(400, f"keep_alive: {seconds:g} s cannot be honoured: model "
                                      f"{server.model.name!r} is pinned (a default, autocomplete or `models: "
                                      f"{{NAME: {{pinned: true}}}}` model), so it stays loaded; leave keep_alive "
                                      f"out, or send -1", "invalid_request")
            return
        if seconds is None:
            seconds = self._settings.get(server.model.path, {}).get("keep_alive", self.config.keep_alive)
        elif server.keep_alive != seconds:
            log.info("%s: keep_alive %g s (asked for by a request)", server.label, seconds)
        server.keep_alive = seconds

    def unload(self, name: str) -> dict:
        server = self.server_for(name)
        status = server.stop("unloaded by request")
        self.evictions["unload"] += 1
        if self.observer is not None:
            self.observer.evicted(server.model.name, "unload")
        return status

    def status(self) -> dict:
        """Every model server known, by model name."""
        return {s.model.name: s.status() for s in self.servers}

    def memory(self) -> dict:
        used = self.used()
        return {"budget": self.budget.bytes, "source": self.budget.source, "used": used,
                "free": self.budget.bytes - used, "machine_available": self.available(),
                "evictions": dict(self.evictions)}

    def models(self) -> list[dict]:
        by_path = {s.model.path: s for s in self.servers}
        rows = []
        for model in self.catalog.list():
            server = by_path.get(model.path)
            rows.append(_model_row(model, server.status() if server else None))
        return rows

    # ------------------------------------------------------------------ life
    def start_configured(self) -> list[threading.Thread]:
        """Load the pinned models in the background: the default and autocomplete models, and
        those `models:` pins."""
        names = [name for _, name in seat_table.configured(self.config)]
        names += [name for name, settings in self.config.models.items() if settings.get("pinned")]
        threads = []
        for name in dict.fromkeys(names):
            thread = threading.Thread(target=self._load_logged, args=(name,), name=f"initial-{name}", daemon=True)
            thread.start()
            threads.append(thread)
        return threads

    def _load_logged(self, name: str) -> None:
        try:
            server = self.server_for(name)
            server.pinned = True
            # the relay's tokenizer loads while the model does: the first request need not wait for it
            threading.Thread(target=tokens.counter, args=(server.model.path,), name=f"tokenizer-{name}",
                             daemon=True).start()
            self.load(name)
        except UnknownModel as exc:
            log.error("initial load of %r failed: %s", name, exc)
        except Exception as exc:  # the state shows it; the log says why
            log.error("initial load of %r failed: %s", name, exc)

    def start_maintenance(self, interval: float = 1.0) -> list[threading.Thread]:
        """The idle unloads and the watchdog."""
        watchdog = Watchdog(self.servers_snapshot, self.config.stall_timeout, observer=self.observer)

        def idle_unloads():
            while not self._stopping.wait(interval):
                for server in self.servers:
                    self._after_crash(server)
                    idle = server.admission.idle_for()
                    if (server.pinned or server.keep_alive < 0 or idle is None or idle < server.keep_alive
                            or not server.ready()):
                        continue
                    try:
                        self._evict(server, f"idle for {idle:.0f} s (keep_alive {server.keep_alive:g} s)", "idle")
                    except Exception:  # keep going for the others
                        log.exception("%s: idle unload failed", server.label)
        thread = threading.Thread(target=idle_unloads, name="idle-unloads", daemon=True)
        thread.start()
        return [thread, watchdog.start(self._stopping)]

    def _after_crash(self, server: ModelServer) -> None:
        """A model whose process died on its own while it served loads again by itself (not
        more often than every CRASH_RESTART_EVERY seconds: a model that keeps crashing waits
        for a request)."""
        crashed = server.crashed
        if crashed is None or server.state is not State.FAILED:
            return
        server.crashed = None
        if crashed - server.last_crash_restart < CRASH_RESTART_EVERY:
            log.warning("%s crashed again within %g s; it loads again when asked for", server.label,
                        CRASH_RESTART_EVERY)
            return
        server.last_crash_restart = crashed
        log.warning("%s: its server exited on its own; loading it again", server.label)

        def again() -> None:
            try:
                with server.admission.holding():
                    self.ensure(server)
            except Exception as exc:  # the state shows it
                log.error("%s: loading again after a crash failed: %s", server.label, exc)
        threading.Thread(target=again, name="after-crash", daemon=True).start()

    def servers_snapshot(self) -> list[ModelServer]:
        return self.servers

    def shutdown(self) -> None:
        """Stop every model server at once (each writes what its disk tier holds pending first)."""
        self._stopping.set()
        servers = self.servers
        for server in servers:
            server.kill_now(wait=False)
        for server in servers:
            server.kill_now()


class _Measured:
    """Each model's measured memory (weights and process), by folder, kept in the runtime
    folder so a restarted wrapper plans with it too; a folder whose weights changed is
    measured again."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._known = json.loads(path.read_text())
        except (OSError, ValueError):
            self._known = {}

    def get(self, folder: Path) -> int | None:
        entry = self._known.get(str(folder))
        if isinstance(entry, dict) and entry.get("weights") == weights_digest(folder):
            return int(entry.get("bytes") or 0) or None
        return None

    def process_bytes(self) -> int:
        """What a model server measures beyond its weights (the median over the models measured
        here; Python, MLX and mlx_lm themselves), or the estimate before any was measured."""
        beyond = sorted(e["bytes"] - e["weights_bytes"] for e in self._known.values()
                        if isinstance(e, dict) and e.get("bytes") and e.get("weights_bytes") is not None)
        return beyond[len(beyond) // 2] if beyond else memory.PROCESS_ESTIMATE

    def set(self, folder: Path, size: int) -> None:
        self._known[str(folder)] = {"weights": weights_digest(folder), "bytes": size,
                                    "weights_bytes": memory.weights_bytes(folder)}
        try:
            write_private(self.path, json.dumps(self._known).encode())
        except OSError as exc:
            log.warning("cannot keep the measured memory in %s: %s", self.path, exc)


def _model_row(model: LocalModel, status: dict | None) -> dict:
    state = status["state"] if status else "stopped"
    return {
        "name": model.name,
        "path": str(model.path),
        "source": model.source,
        "weights": weights_digest(model.path),  # what `hosts add` compares across machines
        "size_bytes": memory.weights_bytes(model.path),
        "loaded": state == "ready",
        "state": state,
        "server": status["name"] if status else None,
        "port": status["port"] if status and state in ("ready", "starting") else None,
    }
