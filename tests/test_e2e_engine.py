"""End to end on the demo model: prefix caching, small prefill chunks and preemption keep greedy outputs exact."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.pb import generation_pb2 as pb
from tests import reference
from tests.pipeline import Pipeline
from tests.test_e2e_pipeline import assert_matches, greedy_request

pytestmark = [pytest.mark.e2e, pytest.mark.demo_model, pytest.mark.timeout(600)]

SYSTEM = ("You are a helpful assistant who answers questions about geography, history and science "
          "briefly and precisely, in one sentence. ")
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Who wrote Hamlet?",
             "How far is the Moon?", "What is water made of?", "Name a prime number.", "What is DNA?",
             "Where is Mount Everest?"]
# 16 blocks of 16 positions in float32 (30 layers x 3 KV heads x 64 x 2 x 4 bytes per position): one
# 256-token sequence fits, three of the 16 concurrent ones do not, so sequences are preempted and recomputed.
POOL = str(16 * 16 * 30 * 3 * 64 * 2 * 4)


@pytest.fixture(scope="module")
def pipeline(demo_model_path, tmp_path_factory):
    p = Pipeline(demo_model_path, tmp_path_factory.mktemp("engine"), "--max-batch-size", "16",
                 "--max-sequence-length", "256", "--max-prefill-tokens", "16", "--kv-cache-memory", POOL,
                 "--estimate-memory", "off").start()
    yield p
    assert p.stop() == 0, p.logs()


def test_chunked_prefill_and_prefix_cache_single(pipeline, demo_model_path):
    for question in QUESTIONS[:3]:
        response = pipeline.stub.Generate(greedy_request(SYSTEM + question, max_new_tokens=12)).responses[0]
        assert_matches(response, reference.greedy(demo_model_path, SYSTEM + question, 12))
    # The shared system prompt's full blocks were computed once and reused.
    assert pipeline.metric("tgi_prefix_cache_hit_tokens") >= 2 * 16


async def _concurrent(pipeline, texts: list[str], max_new: int) -> list[pb.GenerationResponse]:
    channel, stub = pipeline.aio_stub()
    try:
        calls = [stub.Generate(greedy_request(text, max_new_tokens=max_new)) for text in texts]
        return [r.responses[0] for r in await asyncio.gather(*calls)]
    finally:
        await channel.close()


def test_sixteen_concurrent_under_preemption(pipeline, demo_model_path):
    # Counting goes on without an EOS: ~30-token prompts growing by 20 tokens need 3-4 blocks each, 50+ in all.
    texts = [f"Numbers from {i}: " + ", ".join(str(n) for n in range(i, i + 8)) + "," for i in range(16)]
    responses = asyncio.run(_concurrent(pipeline, texts, 20))
    for response, text in zip(responses, texts, strict=True):
        assert_matches(response, reference.greedy(demo_model_path, text, 20))
    assert pipeline.metric("tgi_kv_preemption") > 0
