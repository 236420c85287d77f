"""Fast failure, end to end: a killed worker, a frozen scheduler and a rank that misses a step are answered in seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import zmq

from services.common.protocol import Step, StepFailed, Welcome, WorkerHello, WorkerReady
from services.common.zmq_io import make_socket, recv_from, send
from services.gateway.pb import generation_pb2 as pb
from tests.pipeline import Pipeline
from tests.test_e2e_failures import started_long_stream

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SMALL = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="hello")],
                                    params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=3)))


def failure_of(stream) -> tuple[grpc.RpcError, float]:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    return info.value, time.monotonic() - started


def test_killed_worker_fails_its_requests_within_two_seconds(tiny_model_path, tmp_path):
    pipeline = Pipeline(tiny_model_path, tmp_path, "--max-sequence-length", "256").start()
    try:
        (worker,) = pipeline.child_pids("services.worker.main")
        stream = started_long_stream(pipeline)
        os.kill(worker, signal.SIGKILL)
        error, seconds = failure_of(stream)
        assert seconds < 2.0  # was 29 s: the worker heartbeat timeout
        assert error.code() == grpc.StatusCode.UNKNOWN
        assert error.details() == "Request failed during generation: worker rank 0 stopped responding"
    finally:
        pipeline.stop()


def test_frozen_scheduler_new_requests_fail_fast_then_recover(tiny_model_path, tmp_path):
    pipeline = Pipeline(tiny_model_path, tmp_path, "--max-sequence-length", "256").start()
    (scheduler,) = pipeline.child_pids("services.scheduler.main")
    try:
        stream = started_long_stream(pipeline)
        os.kill(scheduler, signal.SIGSTOP)
        error, seconds = failure_of(stream)
        assert error.details() == "Request failed during generation: lost connection to the scheduler"
        assert seconds < 8  # three missed pings (a 1 s wait, then 1 s for the answer, each)
        # Once the scheduler is known lost, new calls do not wait for it.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            pipeline.stub.Generate(SMALL, timeout=30)
        assert time.monotonic() - started < 1.0
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "Scheduler unavailable: not answering, try again later"
        assert pipeline.health()[0] == 503
        os.kill(scheduler, signal.SIGCONT)
        deadline = time.monotonic() + 15
        while True:
            try:
                assert pipeline.stub.Generate(SMALL, timeout=30).responses[0].generated_token_count == 3
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        os.kill(scheduler, signal.SIGCONT)
        assert pipeline.stop() == 0, pipeline.logs()


def test_a_rank_that_misses_a_step_reports_it(tiny_model_path, tmp_path):
    ctx = zmq.Context()
    steps = make_socket(ctx, zmq.PUB, bind=f"ipc://{tmp_path}/steps")
    results = make_socket(ctx, zmq.ROUTER, bind=f"ipc://{tmp_path}/results")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "services.worker.main", "--model-name", str(tiny_model_path),
                             "--device", "cpu", "--kv-cache-memory", "64MiB", "--step-endpoint", f"ipc://{tmp_path}/steps",
                             "--result-endpoint", f"ipc://{tmp_path}/results"], env=env, cwd=REPO)

    def expect(kind: type):
        deadline = time.monotonic() + 60
        while results.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            message = recv_from(results)[1]
            if isinstance(message, kind):
                return message
        raise AssertionError(f"no {kind.__name__}")

    try:
        expect(WorkerHello)
        send(steps, Welcome(0))
        expect(WorkerReady)
        send(steps, Step(5, [], [], []))
        send(steps, Step(8, [], [], []))  # 6 and 7 never arrived
        failed = expect(StepFailed)
        assert (failed.step_id, failed.rank) == (8, 0)
        assert failed.message == "worker rank 0 missed step(s) 6..7"
    finally:
        proc.kill()
        proc.wait()
        ctx.destroy(linger=0)
