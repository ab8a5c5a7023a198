"""The queue (`Admission`) and the model server state machine (`ModelServer`) on their own,
against a fake upstream: a launcher whose processes are objects, so every transition,
shared and failed load, and cancellation with several requests in flight is provoked
exactly. The real processes are exercised by the gateway tests."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mlxgate.catalog import LocalModel
from mlxgate.errors import ModelLoadFailed, Overloaded
from mlxgate.wrapper.admission import Admission
from mlxgate.wrapper.model_server import IllegalTransition, Launcher, ModelServer, State

A = LocalModel("model-a", Path("/models/model-a"), "model_dir")
B = LocalModel("model-b", Path("/models/model-b"), "model_dir")
BROKEN = LocalModel("broken", Path("/models/broken"), "model_dir")


# ---------------------------------------------------------------- the queue
class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


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


def test_quiet_means_no_running_request_received_anything_lately():
    clock = Clock()
    queue = Admission("dynamic", max_parallel=4, max_queue=4, clock=clock)
    assert not queue.quiet(10), "nothing running is not stuck"
    first, second = queue.join("chat", A), queue.join("chat", A)
    clock.now += 11
    assert queue.quiet(10)
    second.progress()  # one request of the batch is moving: the server is alive
    assert not queue.quiet(10)
    clock.now += 11
    first.progress()
    assert not queue.quiet(10)


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


# ---------------------------------------------------------------- the model server
class FakeProcess:
    """What `launch` returns, without a process: it 'exits' when told."""

    def __init__(self, path: Path, port: int):
        self.path, self.port = path, port
        self.pid = 40000 + port
        self.secret = "s"
        self.auth_header = "Bearer s"
        self.exited = threading.Event()
        self.popen = self
        self.returncode = None

    def alive(self) -> bool:
        return not self.exited.is_set()

    def wait(self, timeout=None):
        self.exited.wait(timeout)
        return self.returncode

    def stop(self, grace: float = 5.0) -> None:
        self.returncode = 0
        self.exited.set()

    kill = stop

    def failure_reason(self) -> str:
        return "ValueError: shapes do not fit"

    def cpu_seconds(self) -> float:
        return 0.0


class FakeLauncher(Launcher):
    def __init__(self, load_seconds: float = 0.05):
        super().__init__(log_dir=Path("/tmp"), launch=self._launch, probe=self._probe)
        self.load_seconds = load_seconds
        self.launched: list[str] = []

    def _launch(self, path, port, log_path, extra_args=()):
        self.launched.append(path.name)
        return FakeProcess(path, port)

    def _probe(self, proc, port, timeout, clock=time.monotonic):
        time.sleep(self.load_seconds)
        if proc.path.name == "broken":
            raise ModelLoadFailed("the server exited with code 1: ValueError: shapes do not fit")


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr("mlxgate.wrapper.model_server.verify_model_folder", lambda path: None)
    monkeypatch.setattr("mlxgate.wrapper.model_server.port_in_use", lambda port: False)
    made = ModelServer("dynamic", 11402, FakeLauncher(), load_timeout=5,
                       admission=Admission("dynamic", max_parallel=4, max_queue=4), drain_timeout=0.3)
    yield made
    made.kill_now()


def test_a_load_goes_stopped_starting_ready_and_the_same_model_is_not_loaded_twice(server):
    assert server.state is State.STOPPED and server.serving() is None
    status = server.ensure(A)
    assert status["state"] == "ready" and status["model"] == "model-a" and server.serving() == A
    server.ensure(A)
    assert server.launcher.launched == ["model-a"] and server.status()["loads"] == 1


def test_concurrent_loads_of_one_model_share_one_load(server):
    threads = [threading.Thread(target=server.ensure, args=(B,)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert server.launcher.launched == ["model-b"]


def test_a_failed_load_says_why_and_the_previous_model_serves_again(server):
    server.ensure(A)
    with pytest.raises(ModelLoadFailed) as caught:
        server.ensure(BROKEN)
    assert "shapes do not fit" in str(caught.value) and "'model-a' is serving again" in str(caught.value)
    assert server.serving() == A and server.launcher.launched == ["model-a", "broken", "model-a"]


def test_a_switch_drains_several_running_requests_and_ends_those_past_the_timeout(server):
    server.ensure(A)
    quick, stuck = server.admission.join("messages", A), server.admission.join("messages", A)
    threading.Timer(0.05, server.admission.release, args=(quick,)).start()
    server.ensure(B)
    assert stuck.cancel_reason and "switched from 'model-a' to 'model-b'" in stuck.cancel_reason
    assert quick.cancel_reason is None and server.serving() == B


def test_the_state_table_refuses_what_it_does_not_list(server):
    with pytest.raises(IllegalTransition):
        server._transition(State.READY)  # stopped -> ready skips starting


def test_a_process_that_dies_on_its_own_marks_the_server_failed(server):
    server.ensure(A)
    process = server.process
    process.returncode = -9
    process.exited.set()
    deadline = time.monotonic() + 5
    while server.state is not State.FAILED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.state is State.FAILED and "exited with code -9" in server.status()["error"]
    server.ensure(A)  # the next request's load starts it again
    assert server.serving() == A
