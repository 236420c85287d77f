"""The worker process end to end: this test plays the scheduler with a PUB and a ROUTER socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from services.common.protocol import (
    Heartbeat,
    LogitsParams,
    NewSequence,
    ScheduledChunk,
    Shutdown,
    Step,
    StepResult,
    Welcome,
    WorkerHello,
    WorkerReady,
    token_ids,
)
from services.common.zmq_io import make_socket, recv_from, send

REPO = Path(__file__).resolve().parents[1]


class FakeScheduler:
    def __init__(self, tmp_path: Path) -> None:
        self.ctx = zmq.Context()
        self.step_endpoint = f"ipc://{tmp_path}/steps"
        self.result_endpoint = f"ipc://{tmp_path}/results"
        self.pub = make_socket(self.ctx, zmq.PUB, bind=self.step_endpoint)
        self.router = make_socket(self.ctx, zmq.ROUTER, bind=self.result_endpoint)
        self.heartbeats = 0

    def expect(self, kind: type, timeout: float = 30.0):
        """The next message of `kind` from a worker (counting heartbeats on the way)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.router.poll(int(left * 1000)):
                _, message = recv_from(self.router)
                self.heartbeats += isinstance(message, Heartbeat)
                if isinstance(message, kind):
                    return message
        raise AssertionError(f"no {kind.__name__} within {timeout} s")

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def _start_worker(model: Path, scheduler: FakeScheduler, rank: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank)}
    command = [
        sys.executable, "-m", "services.worker.main", "--model-name", str(model), "--device", "cpu",
        "--max-batch-size", "3", "--step-endpoint", scheduler.step_endpoint,
        "--result-endpoint", scheduler.result_endpoint, "--heartbeat-interval", "0.1", "--kv-cache-memory", "64MiB",
    ]
    return subprocess.Popen(command, env=env, cwd=REPO)


@pytest.fixture
def scheduler(tmp_path):
    fake = FakeScheduler(tmp_path)
    yield fake
    fake.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_worker_serves_steps_and_fails_a_bad_sequence_alone(tiny_model_path, scheduler):
    proc = _start_worker(tiny_model_path, scheduler)
    try:
        hello = scheduler.expect(WorkerHello)
        assert (hello.rank, hello.world_size) == (0, 1)
        send(scheduler.pub, Welcome(rank=0))
        ready = scheduler.expect(WorkerReady)
        assert (ready.rank, ready.model.max_sequence_length, ready.model.max_batch_size) == (0, 256, 3)

        params = LogitsParams(input_details=True, token_logprobs=True)
        add = [NewSequence("a", token_ids([1, 2, 3]), params), NewSequence("b", token_ids([4, 5]), LogitsParams())]
        prefill = [ScheduledChunk("a", 0, 3, token_ids([0])), ScheduledChunk("b", 0, 2, token_ids([1]))]
        send(scheduler.pub, Step(step_id=1, add=add, remove=[], run=prefill))
        result = scheduler.expect(StepResult)
        assert result.step_id == 1 and result.forward_ns > 0 and not result.failed
        outputs = {o.request_id: o for o in result.outputs}
        assert sorted(outputs) == ["a", "b"]
        assert [d.token_id for d in outputs["a"].input_details] == [1, 2, 3]
        assert outputs["b"].input_details is None

        decode = [ScheduledChunk("a", 3, 1, token_ids([0])), ScheduledChunk("b", 2, 1, token_ids([1]))]
        send(scheduler.pub, Step(step_id=2, add=[], remove=[], run=decode))
        assert sorted(o.request_id for o in scheduler.expect(StepResult).outputs) == ["a", "b"]
        send(scheduler.pub, Step(step_id=3, add=[], remove=["a"], run=[ScheduledChunk("b", 3, 1, token_ids([1]))]))
        assert [o.request_id for o in scheduler.expect(StepResult).outputs] == ["b"]

        # A sequence the worker cannot run fails alone, with its own id; the others' step runs.
        too_long = NewSequence("c", token_ids([7] * 300), LogitsParams())
        run = [ScheduledChunk("b", 4, 1, token_ids([1])), ScheduledChunk("c", 0, 300, token_ids(range(2, 21)))]
        send(scheduler.pub, Step(step_id=4, add=[too_long], remove=[], run=run))
        result = scheduler.expect(StepResult)
        assert [o.request_id for o in result.outputs] == ["b"]
        assert list(result.failed) == ["c"] and "max_sequence_length" in result.failed["c"]
        assert scheduler.heartbeats > 0

        send(scheduler.pub, Shutdown(reason="test"))
        assert proc.wait(timeout=30) == 0
    finally:
        _stop(proc)


def test_worker_exits_cleanly_on_sigterm(tiny_model_path, scheduler):
    proc = _start_worker(tiny_model_path, scheduler)
    try:
        scheduler.expect(WorkerHello)
        send(scheduler.pub, Welcome(rank=0))
        scheduler.expect(WorkerReady)  # now blocked waiting for steps
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        _stop(proc)
