"""Two worker ranks (tensor parallel over gloo on CPU) serve the same answers as transformers."""

from __future__ import annotations

import pytest

from services.gateway.pb import generation_pb2 as pb
from tests import reference
from tests.pipeline import Pipeline, free_port

pytestmark = pytest.mark.e2e


def test_two_ranks_generate_like_transformers(tiny_model_path, tmp_path):
    pipeline = Pipeline(tiny_model_path, tmp_path, "--num-shard", "2", "--master-port", str(free_port())).start()
    try:
        assert len(pipeline.child_pids("services.worker.main")) == 2
        prompts = ["hello world", "The quick brown fox jumps over"]
        responses = pipeline.stub.Generate(pb.BatchedGenerationRequest(
            requests=[pb.GenerationRequest(text=p) for p in prompts],
            params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=12)))).responses
        for response, prompt in zip(responses, prompts, strict=True):
            expected = reference.greedy(tiny_model_path, prompt, 12)
            assert (response.text, response.generated_token_count, response.stop_reason) == (
                expected.text, expected.generated_token_count, expected.stop_reason)
    finally:
        assert pipeline.stop() == 0, pipeline.logs()
