"""End to end over gRPC for GPT-NeoX on tgis_native (demo tokenizer): generate() parity in unary and stream calls.

OPT on hf_transformers and MPT go through the whole conformance suite instead
(`test_conformance_families.py`).
"""

from __future__ import annotations

import pytest

from services.gateway.pb import generation_pb2 as pb
from tests import reference
from tests.families import build_with_tokenizer
from tests.pipeline import Pipeline

pytestmark = pytest.mark.e2e

PROMPTS = ["The quick brown fox", "def main():"]


@pytest.fixture(scope="module", params=["gpt_neox"])
def served(request, demo_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"e2e-{request.param}")
    model = build_with_tokenizer(request.param, root / "model", demo_model_path, seed=2)
    p = Pipeline(model, root, "--max-sequence-length", "128").start()
    yield request.param, model, p
    assert p.stop() == 0, p.logs()


def test_model_info_and_engine(served):
    variant, _, pipeline = served
    info = pipeline.stub.ModelInfo(pb.ModelInfoRequest(model_id="x"))
    assert info.model_kind == pb.ModelInfoResponse.DECODER_ONLY and info.max_sequence_length == 128
    assert f"Engine tgis_native for {variant}" in pipeline.logs()


def test_unary_and_stream_equal_transformers(served):
    _, model, pipeline = served
    params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=12))
    batch = pipeline.stub.Generate(pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=t) for t in PROMPTS], params=params))
    for prompt, response in zip(PROMPTS, batch.responses, strict=True):
        expected = reference.greedy(model, prompt, 12)
        assert (response.text, response.generated_token_count, response.stop_reason, response.input_token_count) \
            == (expected.text, expected.generated_token_count, expected.stop_reason, expected.input_token_count)
    stream = list(pipeline.stub.GenerateStream(pb.SingleGenerationRequest(
        request=pb.GenerationRequest(text=PROMPTS[0]), params=params)))
    assert stream[0].input_token_count == reference.greedy(model, PROMPTS[0], 12).input_token_count
    assert "".join(m.text for m in stream) == batch.responses[0].text
    assert stream[-1].generated_token_count == batch.responses[0].generated_token_count
