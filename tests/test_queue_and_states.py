"""The queue (`Admission`), the model server state machine (`ModelServer`), the resident set's
memory budget (`Fleet`) and the watchdog on their own, against a fake upstream: a launcher
whose processes are objects that report the memory they are told to, so every transition,
eviction, wait for room, refusal and replacement is provoked exactly. The real processes
are exercised by the gateway tests (`test_resident_set.py`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mlxgate.catalog import Catalog, LocalModel
from mlxgate.config import load_config
from mlxgate.errors import InsufficientMemory, ModelLoadFailed, ModelTooLarge, Overloaded
from mlxgate.wrapper.admission import Admission
from mlxgate.wrapper.fleet import Fleet
from mlxgate.wrapper.memory import PROCESS_ESTIMATE
from mlxgate.wrapper.model_server import IllegalTransition, Launcher, State
from mlxgate.wrapper.watchdog import Watchdog
from support import wait_for

A = LocalModel("model-a", Path("/models/model-a"), "model_dir")
B = LocalModel("model-b", Path("/models/model-b"), "model_dir")
BROKEN = LocalModel("broken", Path("/models/broken"), "model_dir")


# ---------------------------------------------------------------- the queue
def test_several_run_at_once_the_rest_wait_in_order_and_a_full_queue_refuses():
    queue = Admission("dynamic", max_parallel=3, max_queue=2)
    tickets = [queue.join("messages", A) for _ in range(5)]
    assert [t.granted is not None for t in tickets] == [True, True, True, False, False]
    with pytest.raises(Overloaded, match="3 request\\(s\\) running and 2 waiting"):
        queue.join("messages", A)
    queue.release(tickets[1])
    assert tickets[3].granted is not None and tickets[4].granted is None, "first come, first served"
    status = queue.status()
    assert (len(status["active"]), status["queued"], status["refused"], status["served"]) == (3, 1, 1, 1)


def test_cancelling_one_request_leaves_the_others_running():
    queue = Admission("dynamic", max_parallel=4, max_queue=4)
    tickets = [queue.join("chat", A) for _ in range(3)]
    closed = []
    for i, ticket in enumerate(tickets):
        ticket.on_cancel(lambda i=i: closed.append(i))
    tickets[1].cancel("the client went away")
    queue.release(tickets[1])
    assert closed == [1]
    assert [t.cancel_reason for t in tickets] == [None, "the client went away", None]
    assert len(queue.status()["active"]) == 2


def test_a_drain_waits_for_every_running_request_then_ends_those_left():
    queue = Admission("dynamic", max_parallel=3, max_queue=4)
    quick, slow, slower = (queue.join("messages", A) for _ in range(3))
    ended = []
    for ticket in (quick, slow, slower):
        ticket.on_cancel(lambda t=ticket: ended.append(t.seq))
    waiting = queue.join("messages", B)
    threading.Timer(0.1, queue.release, args=(quick,)).start()  # frees a place during the drain...
    left = queue.drain(0.5, "switched away")
    assert sorted(t.seq for t in left) == sorted(ended) == [slow.seq, slower.seq]
    assert slow.cancel_reason == slower.cancel_reason == "switched away" and quick.cancel_reason is None
    assert waiting.granted is None, "...which a drain does not hand out"
    queue.release(slow)
    queue.release(slower)
    queue.resume()
    assert waiting.granted is not None


def test_a_ticket_that_steps_out_to_load_comes_back_at_the_head():
    queue = Admission("dynamic", max_parallel=1, max_queue=4)
    running, loading, later = (queue.join("chat", m) for m in (A, B, A))
    queue.release(running)
    assert loading.granted is not None
    queue.step_out(loading)
    assert later.granted is not None, "the line moves while it loads"
    queue.step_in(loading)
    queue.release(later)
    assert loading.granted is not None


# ---------------------------------------------------------------- the resident set
MIB = 1024 ** 2


class FakeProcess:
    """What `launch` returns, without a process: it 'exits' when told, and reports the memory
    it was told to (`measured`, in bytes, by model folder name)."""

    def __init__(self, path: Path, port: int, measured: dict):
        self.path, self.port = path, port
        self.pid = 2 ** 22 + port  # no such process: its RSS reads as 0, its report decides
        self.secret = "s"
        self.auth_header = "Bearer s"
        self.exited = threading.Event()
        self.popen = self
        self.returncode = None
        self.measured = measured
        self.answers = True
        self.cpu = 0.0

    def alive(self) -> bool:
        return not self.exited.is_set()

    def wait(self, timeout=None):
        self.exited.wait(timeout)
        return self.returncode

    def stop(self, grace: float = 5.0) -> None:
        self.returncode = 0
        self.exited.set()

    kill = stop

    def terminate(self) -> None:
        self.stop()

    def failure_reason(self) -> str:
        return "ValueError: shapes do not fit"

    def cpu_seconds(self) -> float:
        return self.cpu

    def alive_report(self, timeout: float = 5.0):
        if not self.answers:
            return None
        return {"generation": True, "idle_s": 0.05, "mlx_active": self.measured.get(self.path.name, 0), "mlx_cache": 0}


class FakeLauncher(Launcher):
    def __init__(self, load_seconds: float = 0.05, measured: dict | None = None):
        super().__init__(log_dir=Path("/tmp"), launch=self._launch, probe=self._probe)
        self.load_seconds = load_seconds
        self.measured = measured or {}
        self.launched: list[str] = []
        self.processes: list[FakeProcess] = []

    def _launch(self, path, port, log_path, extra_args=(), entry=()):
        self.launched.append(path.name)
        self.processes.append(FakeProcess(path, port, self.measured))
        return self.processes[-1]

    def _probe(self, proc, port, timeout, clock=time.monotonic, request=None):
        time.sleep(self.load_seconds)
        if proc.path.name == "broken":
            raise ModelLoadFailed("the server exited with code 1: ValueError: shapes do not fit")


def resident_set(tmp_path, monkeypatch, weights: dict[str, int], budget: str, measured: dict | None = None,
                 available=lambda: 1 << 40, **settings) -> Fleet:
    """A resident set over model folders whose weights have the given sizes (sparse files),
    with a fake launcher; each model's prompt cache allowance is 8 MiB."""
    monkeypatch.setattr("mlxgate.wrapper.model_server.verify_model_folder", lambda path: None)
    monkeypatch.setattr("mlxgate.wrapper.model_server.port_in_use", lambda port: False)
    models = tmp_path / "models"
    for name, size in weights.items():
        folder = models / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"model_type": "qwen2"}')
        with (folder / "model.safetensors").open("wb") as handle:
            handle.truncate(size)
    config = load_config(tmp_path / "none.yaml", env={"MLXGATE_HOME": str(tmp_path / "home"),
                                                      "MLXGATE_MODEL_DIRS": str(models)},
                         overrides={"memory_budget": budget, "prompt_cache": "8M", **settings})
    launcher = FakeLauncher(measured={name: size + 10 * MIB for name, size in weights.items()} | (measured or {}))
    fleet = Fleet(config, catalog=Catalog([models], None), launcher=launcher, available=available)
    return fleet


def loaded(fleet: Fleet) -> list[str]:
    return sorted(s.model.name for s in fleet.servers if s.ready())


def test_a_model_loads_once_and_its_measured_memory_counts_from_then_on(tmp_path, monkeypatch):
    fleet = resident_set(tmp_path, monkeypatch, {"a": 100 * MIB}, "1G")
    server = fleet.server_for("a")
    assert server.state is State.STOPPED and fleet.estimate(server) == 100 * MIB + PROCESS_ESTIMATE + 8 * MIB
    status = fleet.load("a")
    assert status["state"] == "ready" and status["model"] == "a" and status["port"]
    assert status["cost_bytes"] == 110 * MIB + 8 * MIB, "measured (weights + process) plus its allowance"
    assert fleet.estimate(server) == 118 * MIB, "the measured figure is kept for its next load"
    fleet.load("a")
    assert fleet.launcher.launched == ["a"] and server.status()["loads"] == 1
    assert fleet.memory()["used"] == 118 * MIB


def test_concurrent_loads_of_one_model_share_one_load(tmp_path, monkeypatch):
    fleet = resident_set(tmp_path, monkeypatch, {"a": MIB}, "1G")
    threads = [threading.Thread(target=fleet.load, args=("a",)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert fleet.launcher.launched == ["a"]


def test_a_model_that_does_not_fit_evicts_the_least_recently_used_idle_one(tmp_path, monkeypatch):
    fleet = resident_set(tmp_path, monkeypatch, {"a": 300 * MIB, "b": 300 * MIB, "c": 300 * MIB}, "800M",
                         prompt_cache="8M")
    monkeypatch.setattr("mlxgate.wrapper.memory.PROCESS_ESTIMATE", 10 * MIB)
    fleet.load("a")
    fleet.load("b")
    ticket = fleet.server_for("a").admission.join("chat", None)  # a was used after b
    fleet.server_for("a").admission.release(ticket)
    fleet.load("c")
    assert loaded(fleet) == ["a", "c"] and fleet.evictions == {"budget": 1}
    assert fleet.server_for("b").status()["stopped_because"] == "to make room for c"
    assert fleet.memory()["used"] <= fleet.budget.bytes


def test_a_model_with_requests_pending_is_never_evicted_and_the_load_waits_for_it(tmp_path, monkeypatch):
    fleet = resident_set(tmp_path, monkeypatch, {"a": 300 * MIB, "b": 300 * MIB, "c": 300 * MIB}, "800M")
    monkeypatch.setattr("mlxgate.wrapper.memory.PROCESS_ESTIMATE", 10 * MIB)
    fleet.load("a")
    fleet.load("b")
    busy = [fleet.server_for(name).admission.join("chat", None) for name in ("a", "b")]
    asked = fleet.server_for("c").admission.join("chat", None)  # someone waits for c
    loading = threading.Thread(target=fleet.ensure, args=(fleet.server_for("c"),))
    loading.start()
    waiting = wait_for(lambda: fleet.server_for("c").status()["waiting_for"], 10, what="c to wait for room")
    assert loaded(fleet) == ["a", "b"], "nothing busy was evicted"
    assert "room in the memory budget" in waiting and "a, b" in waiting
    fleet.server_for("b").admission.release(busy[1])  # b finishes: it can go now
    loading.join(10)
    assert loaded(fleet) == ["a", "c"] and fleet.server_for("c").status()["waiting_for"] is None
    for ticket, name in ((busy[0], "a"), (asked, "c")):
        fleet.server_for(name).admission.release(ticket)


def test_a_pinned_model_is_never_evicted_and_one_that_cannot_fit_beside_it_is_refused_at_once(tmp_path, monkeypatch):
    fleet = resident_set(tmp_path, monkeypatch, {"a": 500 * MIB, "b": 300 * MIB, "huge": 2000 * MIB}, "800M",
                         models={"a": {"pinned": True}})
    monkeypatch.setattr("mlxgate.wrapper.memory.PROCESS_ESTIMATE", 10 * MIB)
    fleet.load("a")
    started = time.monotonic()
    with pytest.raises(ModelTooLarge) as caught:
        fleet.load("huge")
    assert time.monotonic() - started < 1
    message = str(caught.value)
    assert "'huge' needs 2.0 GiB (weights 2.0 GiB" in message and "memory budget of 800 MiB" in message
    assert "smaller quantization" in message and "memory_budget" in message
    with pytest.raises(ModelTooLarge, match="the pinned a hold"):
        fleet.load("b")  # 300 + 500 > 800 with the allowances: b can never fit beside a
    assert fleet.launcher.launched == ["a"] and loaded(fleet) == ["a"], "nothing loaded, nothing evicted"


def test_a_load_needs_that_memory_free_on_the_machine_too(tmp_path, monkeypatch):
    free = [10 ** 12]
    fleet = resident_set(tmp_path, monkeypatch, {"a": 100 * MIB, "b": 100 * MIB}, "10G", available=lambda: free[0])
    fleet.load("a")
    free[0] = 50 * MIB  # another program took the rest
    with pytest.raises(InsufficientMemory, match="50 MiB of memory free"):
        fleet.load("b")
    assert loaded(fleet) == [], "the idle model went first, and that was not enough"


def test_idle_models_unload_after_their_keep_alive_and_pinned_ones_stay(tmp_path, monkeypatch):
    fleet = resident_set(tmp_path, monkeypatch, {"a": MIB, "b": MIB, "c": MIB}, "1G", keep_alive=0.5,
                         models={"b": {"pinned": True}, "c": {"keep_alive": -1}})
    for name in ("a", "b", "c"):
        fleet.load(name)
    fleet.start_maintenance(interval=0.1)
    try:
        wait_for(lambda: loaded(fleet) == ["b", "c"], 5, what="a to unload")
        assert fleet.evictions == {"idle": 1}
        assert "keep_alive 0.5 s" in fleet.server_for("a").status()["stopped_because"]
    finally:
        fleet.shutdown()


def test_the_state_table_refuses_what_it_does_not_list(tmp_path, monkeypatch):
    server = resident_set(tmp_path, monkeypatch, {"a": MIB}, "1G").server_for("a")
    with pytest.raises(IllegalTransition):
        server._transition(State.READY)  # stopped -> ready skips starting


def test_a_process_that_dies_on_its_own_marks_the_server_failed_and_frees_its_room(tmp_path, monkeypatch):
    fleet = resident_set(tmp_path, monkeypatch, {"a": MIB}, "1G")
    fleet.load("a")
    server = fleet.server_for("a")
    process = server.process
    process.returncode = -9
    process.exited.set()
    wait_for(lambda: server.state is State.FAILED, 5, interval=0.01, what="the server to be marked failed")
    assert "exited with code -9" in server.status()["error"]
    assert fleet.memory()["used"] == 0
    fleet.load("a")  # the next request's load starts it again
    assert server.ready() and fleet.launcher.launched == ["a", "a"]


def test_a_failed_load_says_why_and_holds_no_room(tmp_path, monkeypatch):
    fleet = resident_set(tmp_path, monkeypatch, {"broken": MIB}, "1G")
    with pytest.raises(ModelLoadFailed, match="'broken' failed to load: .*shapes do not fit"):
        fleet.load("broken")
    assert fleet.memory()["used"] == 0 and fleet.server_for("broken").state is State.FAILED


def test_an_unload_drains_its_running_requests_and_ends_those_past_the_timeout(tmp_path, monkeypatch):
    fleet = resident_set(tmp_path, monkeypatch, {"a": MIB}, "1G", drain_timeout=0.3)
    fleet.load("a")
    admission = fleet.server_for("a").admission
    quick, stuck = admission.join("messages", None), admission.join("messages", None)
    threading.Timer(0.05, admission.release, args=(quick,)).start()
    fleet.unload("a")
    assert stuck.cancel_reason and "was unloaded (unloaded by request)" in stuck.cancel_reason
    assert quick.cancel_reason is None and loaded(fleet) == []


def test_the_watchdog_replaces_a_server_that_stops_answering_even_with_nobody_waiting(tmp_path, monkeypatch):
    fleet = resident_set(tmp_path, monkeypatch, {"a": MIB}, "1G")
    fleet.load("a")
    server = fleet.server_for("a")
    first = server.process
    watchdog = Watchdog(fleet.servers_snapshot, stall_timeout=0.6, look_every=0.1)
    stopping = threading.Event()
    watchdog.start(stopping, interval=0.05)
    try:
        time.sleep(1.0)
        assert server.process is first, "a server that answers is left alone"
        first.answers = False  # SIGSTOP: no answer, no CPU
        wait_for(lambda: server.process is not first, 5, what="the watchdog to replace the server")
        assert fleet.launcher.launched == ["a", "a"]
        second = server.process
        wait_for(server.ready, 5, what="the new server to be ready")
        second.answers = False
        for _ in range(20):  # computing (a long prefill): CPU moves, so it is not wedged
            second.cpu += 0.1
            time.sleep(0.05)
        assert server.process is second
    finally:
        stopping.set()
        fleet.shutdown()
