"""Operations: graceful drain on SIGTERM to the launcher (tiny model).

The launcher forwards SIGTERM to the gateway first: health turns 503, new
calls get UNAVAILABLE, the calls in flight finish (up to DRAIN_GRACE_PERIOD_S),
then everything stops and the launcher exits 0.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.pb import generation_pb2 as pb
from services.gateway.pb import generation_pb2_grpc
from tests.pipeline import Pipeline

pytestmark = pytest.mark.e2e

N, TOKENS = 8, 150


@pytest.fixture
def pipeline(tiny_model_path, tmp_path):
    p = Pipeline(tiny_model_path, tmp_path, "--max-sequence-length", "256", env={"DRAIN_GRACE_PERIOD_S": "60"}).start()
    yield p
    if p.process.poll() is None:
        p.stop()


def long_params() -> pb.Parameters:
    return pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=TOKENS, min_new_tokens=TOKENS))


def refused_while_draining(address: str) -> dict[str, object]:
    """What new calls get now (blocking; run in a thread)."""
    seen: dict[str, object] = {}
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        calls = {
            "Generate": lambda: stub.Generate(pb.BatchedGenerationRequest(
                requests=[pb.GenerationRequest(text="late")], params=long_params()), timeout=10),
            "GenerateStream": lambda: list(stub.GenerateStream(pb.SingleGenerationRequest(
                request=pb.GenerationRequest(text="late"), params=long_params()), timeout=10)),
            "Tokenize": lambda: stub.Tokenize(pb.BatchedTokenizeRequest(
                requests=[pb.TokenizeRequest(text="late")]), timeout=10),
        }
        for name, call in calls.items():
            try:
                call()
                seen[name] = "OK"
            except grpc.RpcError as e:
                seen[name] = e.code()
        try:
            seen["health"] = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="fmaas.GenerationService"), timeout=10).status
        except grpc.RpcError as e:
            seen["health"] = e.code()
    return seen


def test_sigterm_drains_in_flight_requests_and_exits_0(pipeline):
    loop_results: dict[str, object] = {}

    async def run():
        channel, stub = pipeline.aio_stub()
        async with channel:
            async def unary(i):
                r = (await stub.Generate(pb.BatchedGenerationRequest(
                    requests=[pb.GenerationRequest(text=f"request {i}")], params=long_params()), timeout=120))
                return r.responses[0].generated_token_count, r.responses[0].stop_reason, r.responses[0].text

            async def stream(i):
                messages = [m async for m in stub.GenerateStream(pb.SingleGenerationRequest(
                    request=pb.GenerationRequest(text=f"request {i}"), params=long_params()), timeout=120)]
                return messages[-1].generated_token_count, messages[-1].stop_reason, "".join(m.text for m in messages)

            tasks = [asyncio.ensure_future(unary(i) if i % 2 else stream(i)) for i in range(N)]
            loop = asyncio.get_running_loop()
            deadline = time.monotonic() + 30
            while await loop.run_in_executor(None, pipeline.metric, "tgi_batch_current_size") < N:
                assert time.monotonic() < deadline, "the requests never ran together"
                await asyncio.sleep(0.05)
            pipeline.process.send_signal(signal.SIGTERM)
            # Health says why as soon as the gateway drains.
            deadline = time.monotonic() + 10
            while (health := await loop.run_in_executor(None, pipeline.health))[0] != 503:
                assert time.monotonic() < deadline, health
                await asyncio.sleep(0.05)
            loop_results["health"] = health
            loop_results["refused"] = await loop.run_in_executor(None, refused_while_draining, pipeline.address)
            loop_results["still_running"] = sum(not t.done() for t in tasks)
            return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    results = asyncio.run(run())
    code = pipeline.process.wait(60)

    status, body = loop_results["health"]
    assert json.loads(body) == {"error": "shutting down"}
    assert loop_results["still_running"] > 0, "drain started after the requests were done"
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert loop_results["refused"] == {"Generate": unavailable, "GenerateStream": unavailable,
                                       "Tokenize": unavailable,
                                       "health": health_pb2.HealthCheckResponse.NOT_SERVING}, pipeline.logs()
    assert [(count, reason) for count, reason, _ in results] == [(TOKENS, pb.MAX_TOKENS)] * N
    assert all(text for _, _, text in results)
    assert code == 0, pipeline.logs()
    logs = pipeline.logs()
    assert "draining" in logs and "gateway stopped" in logs and "grace period over" not in logs
    # After the exit, the port is closed: still UNAVAILABLE, never anything else.
    with grpc.insecure_channel(pipeline.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="x")]), timeout=5)
    assert info.value.code() == unavailable
