"""Failures are noticed and reported: a frozen scheduler fails in-flight requests instead of hanging them."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from services.gateway.pb import generation_pb2 as pb
from tests.pipeline import Pipeline

pytestmark = pytest.mark.e2e


def started_long_stream(pipeline: Pipeline):
    """A 200-token stream whose first message has arrived (so it is in the pipeline)."""
    request = pb.SingleGenerationRequest(
        request=pb.GenerationRequest(text="hello"),
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=200, min_new_tokens=200)))
    stream = pipeline.stub.GenerateStream(request, timeout=60)
    next(stream)
    return stream


def test_unresponsive_scheduler_fails_requests_then_service_recovers(tiny_model_path, tmp_path):
    pipeline = Pipeline(tiny_model_path, tmp_path, "--max-sequence-length", "256").start()
    try:
        (scheduler,) = pipeline.child_pids("services.scheduler.main")
        stream = started_long_stream(pipeline)
        os.kill(scheduler, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.UNKNOWN
        assert info.value.details() == "Request failed during generation: lost connection to the scheduler"
        assert time.monotonic() - started < 20
        os.kill(scheduler, signal.SIGCONT)
        response = pipeline.stub.Generate(pb.BatchedGenerationRequest(
            requests=[pb.GenerationRequest(text="hello")],
            params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=3))), timeout=30).responses[0]
        assert response.generated_token_count == 3
    finally:
        os.kill(scheduler, signal.SIGCONT)
        assert pipeline.stop() == 0, pipeline.logs()


def test_unresponsive_worker_fails_requests_and_stops_the_group(tiny_model_path, tmp_path):
    pipeline = Pipeline(tiny_model_path, tmp_path, "--max-sequence-length", "256",
                        env={"WORKER_TIMEOUT_S": "2"}).start()
    (worker,) = pipeline.child_pids("services.worker.main")
    try:
        stream = started_long_stream(pipeline)
        os.kill(worker, signal.SIGSTOP)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.UNKNOWN
        assert info.value.details() == "Request failed during generation: worker rank 0 stopped responding"
        assert pipeline.health()[0] == 503
        os.kill(worker, signal.SIGCONT)  # it wakes up, reads the Shutdown, and the launcher reports it
        assert pipeline.process.wait(30) == 1
        assert "worker-0 exited unexpectedly" in pipeline.logs()
    finally:
        if pipeline.process is not None and pipeline.process.poll() is None:
            os.kill(worker, signal.SIGCONT)
        pipeline.stop()
