"""Two worker ranks (tensor parallel over gloo on CPU) serve the same answers as transformers."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from services.common.protocol import LogitsParams
from services.gateway.guided import guide_of
from services.gateway.pb import generation_pb2 as pb
from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from tests import reference
from tests.guided_checks import DECODING, check
from tests.local_engine import LocalEngine
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
        # Guided decoding: every rank masks the same rows, so the ranks keep sampling the same tokens, which are
        # those of one rank alone (a rank that drifted would compute other K/V and change the text).
        one_rank = LocalEngine(Engine(WorkerConfig(model_name=str(tiny_model_path), device="cpu",
                                                   kv_cache_memory="64MiB")))
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
        for kind in ("choice", "json_schema", "grammar"):
            guided = pipeline.stub.Generate(pb.BatchedGenerationRequest(
                requests=[pb.GenerationRequest(text=p) for p in prompts],
                params=pb.Parameters(decoding=DECODING[kind], stopping=pb.StoppingCriteria(max_new_tokens=16))))
            guide_kind, guide = guide_of(DECODING[kind])
            alone = one_rank.generate({p: tokenizer.encode(p) for p in prompts}, 16,
                                      LogitsParams(guide_kind=guide_kind, guide=guide), min_new_tokens=0)
            for response, prompt in zip(guided.responses, prompts, strict=True):
                check(kind, response.text, response.stop_reason == pb.EOS_TOKEN)
                assert response.text == tokenizer.decode(alone[prompt], skip_special_tokens=True), (kind, prompt)
    finally:
        assert pipeline.stop() == 0, pipeline.logs()
