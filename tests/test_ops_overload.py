"""Operations: overload (TGIS's concurrency permits), oversized messages and misbehaving clients.

One pipeline (tiny model, --max-concurrent-requests 4) for the module.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import grpc
import pytest

from services.gateway.pb import generation_pb2 as pb
from tests import reference
from tests.pipeline import Pipeline

pytestmark = pytest.mark.e2e

LIMIT = 4
PROMPTS = ["The quick brown fox", "Once upon a time", "def main():", "Water boils at"]


@pytest.fixture(scope="module")
def pipeline(tiny_model_path, tmp_path_factory):
    p = Pipeline(tiny_model_path, tmp_path_factory.mktemp("ops-overload"), "--max-sequence-length", "256",
                 "--max-concurrent-requests", str(LIMIT)).start()
    yield p
    assert p.stop() == 0, p.logs()


def greedy(*texts: str, max_new_tokens: int = 20) -> pb.BatchedGenerationRequest:
    return pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=t) for t in texts],
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens)),
    )


def stream_request(text: str, max_new_tokens: int) -> pb.SingleGenerationRequest:
    return pb.SingleGenerationRequest(request=pb.GenerationRequest(text=text),
                                      params=greedy(text, max_new_tokens=max_new_tokens).params)


def expected(model, prompt: str, max_new_tokens: int) -> tuple[str, int, int]:
    e = reference.greedy(model, prompt, max_new_tokens)
    return e.text, e.generated_token_count, e.stop_reason


async def generate_or_status(stub, prompt: str, max_new_tokens: int, streaming: bool):
    """(text, count, stop_reason) or (status code, details)."""
    try:
        if streaming:
            messages = [m async for m in stub.GenerateStream(stream_request(prompt, max_new_tokens), timeout=60)]
            return "".join(m.text for m in messages), messages[-1].generated_token_count, messages[-1].stop_reason
        r = (await stub.Generate(greedy(prompt, max_new_tokens=max_new_tokens), timeout=60)).responses[0]
        return r.text, r.generated_token_count, r.stop_reason
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()


def test_burst_over_the_limit_is_partly_refused_and_the_rest_is_right(pipeline, tiny_model_path):
    n, max_new = 12, 60

    async def burst():
        channel, stub = pipeline.aio_stub()
        async with channel:
            jobs = [(PROMPTS[i % len(PROMPTS)], i % 3 == 0) for i in range(n)]
            results = await asyncio.gather(*(generate_or_status(stub, p, max_new, s) for p, s in jobs))
        return jobs, results

    jobs, results = asyncio.run(burst())
    refused = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert all(r == (grpc.StatusCode.RESOURCE_EXHAUSTED, "Model is overloaded") for r in refused)
    assert 1 <= len(refused) <= n - LIMIT
    for (prompt, _), result in zip(jobs, results, strict=True):
        if result not in refused:
            assert result == expected(tiny_model_path, prompt, max_new)
    assert f'tgi_request_failure{{err="conc_limit"}} {float(len(refused))}' in pipeline.metrics()


def test_batch_larger_than_the_limit_always_fails(pipeline, tiny_model_path):
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as info:
            pipeline.stub.Generate(greedy(*["x"] * (LIMIT + 1), max_new_tokens=2), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == "Model is overloaded"
    responses = pipeline.stub.Generate(greedy(*PROMPTS[:LIMIT], max_new_tokens=5), timeout=60).responses
    assert [(r.text, r.generated_token_count, r.stop_reason) for r in responses] == [
        expected(tiny_model_path, p, 5) for p in PROMPTS[:LIMIT]]


def test_oversized_message_is_refused_and_the_server_keeps_serving(pipeline, tiny_model_path):
    huge = "a" * (4 * 1024 * 1024 + 1024)  # over GRPC_MAX_MESSAGE_BYTES (4 MiB)
    with pytest.raises(grpc.RpcError) as info:
        pipeline.stub.Generate(greedy(huge, max_new_tokens=2), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as info:
        pipeline.stub.Tokenize(pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=huge)]), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    r = pipeline.stub.Generate(greedy(PROMPTS[0], max_new_tokens=8), timeout=60).responses[0]
    assert (r.text, r.generated_token_count, r.stop_reason) == expected(tiny_model_path, PROMPTS[0], 8)
    assert pipeline.health()[0] == 200


def _raw(port: int, *chunks: bytes, read: bool = False) -> None:
    """Connect, send the chunks, maybe read a little, and drop the connection (with a reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for chunk in chunks:
            try:
                s.sendall(chunk)
            except OSError:
                return  # the server already closed on us: fine
        if read:
            try:
                s.recv(4096)
            except OSError:
                pass
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def abuse(pipeline) -> None:
    """Garbage and half-finished conversations on both ports."""
    g, h = pipeline.grpc_port, pipeline.http_port
    _raw(g, os.urandom(64 * 1024))
    _raw(g, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", read=True)
    _raw(g, H2_PREFACE)
    _raw(g, H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + os.urandom(3000), read=True)
    # A HEADERS frame that opens a stream and never finishes it.
    _raw(g, H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + b"\x00\x00\x05\x01\x04\x00\x00\x00\x01" + b"\x82\x84")
    _raw(h, os.urandom(16 * 1024), read=True)
    _raw(h, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never end
    _raw(h, b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\npartial body")
    _raw(h, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # disconnects before the answer
    _raw(h, b"\x16\x03\x01\x02\x00" + os.urandom(512), read=True)  # a TLS hello to a plaintext port


def test_bad_clients_never_hurt_other_requests(pipeline, tiny_model_path):
    max_new = 40

    async def run():
        channel, stub = pipeline.aio_stub()
        async with channel:
            good = [asyncio.ensure_future(generate_or_status(stub, PROMPTS[i], max_new, i == 1)) for i in range(2)]
            # A stream that the client drops after a few tokens.
            call = stub.GenerateStream(stream_request(PROMPTS[2], 200), timeout=60)
            got = 0
            async for _ in call:
                got += 1
                if got == 3:
                    break
            call.cancel()
            # A unary call whose deadline passes mid-generation.
            try:
                await stub.Generate(greedy(PROMPTS[3], max_new_tokens=200), timeout=0.3)
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.get_running_loop().run_in_executor(None, abuse, pipeline)
            return await asyncio.wait_for(asyncio.gather(*good), 90)

    results = asyncio.run(run())
    for prompt, result in zip(PROMPTS[:2], results, strict=True):
        assert result == expected(tiny_model_path, prompt, max_new)
    # The abandoned calls free their slots and batch places; the server still answers everything.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (pipeline.metric("tgi_batch_current_size") or
                                           pipeline.metric("tgi_queue_size")):
        time.sleep(0.2)
    assert pipeline.metric("tgi_batch_current_size") == 0 and pipeline.metric("tgi_queue_size") == 0
    assert pipeline.health()[0] == 200
    responses = pipeline.stub.Generate(greedy(*PROMPTS, max_new_tokens=6), timeout=60).responses  # all 4 permits free
    assert [(r.text, r.generated_token_count, r.stop_reason) for r in responses] == [
        expected(tiny_model_path, p, 6) for p in PROMPTS]
    assert pipeline.process.poll() is None
    assert "Traceback" not in pipeline.logs()
