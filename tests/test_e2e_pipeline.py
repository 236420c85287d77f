"""End to end: the launcher starts every service; TGIS clients talk gRPC to it (issue: the whole slice)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import grpc
import pytest

from services.gateway.pb import generation_pb2 as pb
from tests import reference
from tests.pipeline import Pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.demo_model]

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="module")
def pipeline(demo_model_path, tmp_path_factory):
    p = Pipeline(demo_model_path, tmp_path_factory.mktemp("pipeline"), "--max-batch-size", "8",
                 "--max-new-tokens", "64").start()
    yield p
    code = p.stop()
    assert code == 0, p.logs()


def greedy_request(*texts: str, max_new_tokens: int = 20) -> pb.BatchedGenerationRequest:
    return pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=t) for t in texts],
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens)),
    )


def assert_matches(response: pb.GenerationResponse, expected: reference.Expected) -> None:
    assert (response.text, response.generated_token_count, response.stop_reason, response.input_token_count) == (
        expected.text, expected.generated_token_count, expected.stop_reason, expected.input_token_count)


def test_model_info(pipeline):
    info = pipeline.stub.ModelInfo(pb.ModelInfoRequest(model_id="ignored"))
    assert info.model_kind == pb.ModelInfoResponse.DECODER_ONLY
    assert info.max_new_tokens == 64 and info.max_sequence_length == 8192


def test_greedy_single_equals_transformers(pipeline, demo_model_path):
    for prompt in PROMPTS:
        response = pipeline.stub.Generate(greedy_request(prompt)).responses[0]
        assert_matches(response, reference.greedy(demo_model_path, prompt))
    paris = pipeline.stub.Generate(greedy_request("The capital of France is", max_new_tokens=2)).responses[0]
    assert paris.text == " Paris." and paris.stop_reason == pb.MAX_TOKENS and paris.seed == 0


def test_greedy_batched_equals_transformers(pipeline, demo_model_path):
    responses = pipeline.stub.Generate(greedy_request(*PROMPTS)).responses
    assert len(responses) == len(PROMPTS)
    for response, prompt in zip(responses, PROMPTS, strict=True):
        assert_matches(response, reference.greedy(demo_model_path, prompt))


def stream(pipeline, text: str, max_new_tokens: int = 20) -> list[pb.GenerationResponse]:
    request = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=text),
                                         params=greedy_request(text, max_new_tokens=max_new_tokens).params)
    return list(pipeline.stub.GenerateStream(request))


def test_stream_equals_unary(pipeline):
    for prompt in PROMPTS[:2]:
        unary = pipeline.stub.Generate(greedy_request(prompt)).responses[0]
        messages = stream(pipeline, prompt)
        assert messages[0].input_token_count == unary.input_token_count
        assert messages[0].generated_token_count == 0
        assert "".join(m.text for m in messages) == unary.text
        assert messages[-1].stop_reason == unary.stop_reason
        assert messages[-1].generated_token_count == unary.generated_token_count
        assert all(m.stop_reason == pb.NOT_FINISHED for m in messages[:-1])
        counts = [m.generated_token_count for m in messages[1:]]
        assert counts == sorted(set(counts)), "counts must strictly increase"


def test_tokenize_equals_hf_tokenizer(pipeline, demo_model_path):
    tokenizer, _ = reference.load(demo_model_path)
    texts = ["Hello world", "Ünïcödé and emoji 🎉 text", ""]
    response = pipeline.stub.Tokenize(pb.BatchedTokenizeRequest(
        requests=[pb.TokenizeRequest(text=t) for t in texts], return_tokens=True))
    for r, text in zip(response.responses, texts, strict=True):
        ids = tokenizer(text, add_special_tokens=True).input_ids
        assert r.token_count == len(ids)
        assert list(r.tokens) == tokenizer.convert_ids_to_tokens(ids)


async def _mixed(pipeline, demo_model_path, count: int) -> None:
    channel, stub = pipeline.aio_stub()
    rng = random.Random(7)
    jobs = [(PROMPTS[i % len(PROMPTS)], rng.choice([3, 8, 20]), i % 2 == 0) for i in range(count)]

    async def one(prompt, max_new, streaming):
        if streaming:
            request = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=prompt),
                                                 params=greedy_request(prompt, max_new_tokens=max_new).params)
            messages = [m async for m in stub.GenerateStream(request)]
            return "".join(m.text for m in messages), messages[-1].generated_token_count, messages[-1].stop_reason
        r = (await stub.Generate(greedy_request(prompt, max_new_tokens=max_new))).responses[0]
        return r.text, r.generated_token_count, r.stop_reason

    results = await asyncio.gather(*(one(*job) for job in jobs))
    await channel.close()
    for (prompt, max_new, _), result in zip(jobs, results, strict=True):
        expected = reference.greedy(demo_model_path, prompt, max_new)
        assert result == (expected.text, expected.generated_token_count, expected.stop_reason)


def test_sixteen_concurrent_mixed_requests(pipeline, demo_model_path):
    asyncio.run(_mixed(pipeline, demo_model_path, 16))


def test_cancelled_stream_frees_its_slot(pipeline, demo_model_path):
    request = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=PROMPTS[1]),
                                         params=greedy_request(max_new_tokens=64).params)
    call = pipeline.stub.GenerateStream(request)
    for i, _ in enumerate(call):
        if i == 3:
            break
    call.cancel()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if pipeline.metric("tgi_batch_current_size") == 0 and pipeline.metric("tgi_queue_size") == 0:
            break
        time.sleep(0.2)
    assert pipeline.metric("tgi_batch_current_size") == 0 and pipeline.metric("tgi_queue_size") == 0
    assert 'tgi_request_failure_total{err="cancelled"}' in pipeline.metrics()
    assert_matches(pipeline.stub.Generate(greedy_request(PROMPTS[0])).responses[0],
                   reference.greedy(demo_model_path, PROMPTS[0]))


def test_killed_tokenizer_is_replaced_and_requests_complete(pipeline, demo_model_path):
    tokenizers = pipeline.child_pids("services.tokenizer.main")
    assert len(tokenizers) == 2

    async def run() -> None:
        task = asyncio.ensure_future(_mixed(pipeline, demo_model_path, 8))
        await asyncio.sleep(0.3)
        os.kill(tokenizers[0], signal.SIGKILL)
        await task

    asyncio.run(run())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(pipeline.child_pids("services.tokenizer.main")) < 2:
        time.sleep(0.2)
    assert tokenizers[0] not in pipeline.child_pids("services.tokenizer.main")
    assert "starting a replacement" in pipeline.logs()
    assert pipeline.health()[0] == 200


def test_bad_input_gets_invalid_argument_and_server_keeps_serving(pipeline, demo_model_path):
    with pytest.raises(grpc.RpcError) as info:
        pipeline.stub.Generate(greedy_request("x", max_new_tokens=65))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "max_new_tokens must be <= 64"
    assert pipeline.stub.Generate(greedy_request()).responses == []
    assert_matches(pipeline.stub.Generate(greedy_request(PROMPTS[0])).responses[0],
                   reference.greedy(demo_model_path, PROMPTS[0]))
