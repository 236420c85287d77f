"""End to end: LoRA adapters (adapter_id) over gRPC on a tiny Llama, against PEFT's own generate(); the vLLM TGIS
adapter's LoRA cases (tests/test_grpc_server.py, tests/test_adapters.py) reimplemented from their behaviour."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import grpc
import pytest

from services.gateway.pb import generation_pb2 as pb
from tests import reference
from tests.lora import make_adapter, peft_greedy
from tests.pipeline import Pipeline

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def cache(tiny_model_path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapter-cache")
    make_adapter(tiny_model_path, root / "lora-test", seed=1)
    make_adapter(tiny_model_path, root / "team" / "qv", seed=2, targets=("q_proj", "v_proj", "down_proj"), r=4,
                 use_rslora=True)
    make_adapter(tiny_model_path, root / "third", seed=3, targets=("o_proj", "up_proj"))
    make_adapter(tiny_model_path, root / "head", seed=4, targets=("q_proj", "lm_head"))
    (root / "prompt-tuned").mkdir()
    (root / "prompt-tuned" / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    return root


@pytest.fixture(scope="module")
def pipeline(tiny_model_path, cache, tmp_path_factory):
    p = Pipeline(tiny_model_path, tmp_path_factory.mktemp("e2e-lora"), "--max-sequence-length", "256",
                 env={"ADAPTER_CACHE": str(cache), "MAX_LORAS": "2"}).start()
    yield p
    assert p.stop() == 0, p.logs()


def _expected(model_path: Path, cache: Path, adapter_id: str | None) -> tuple[str, int]:
    """PEFT's greedy text and token count for PROMPT with the adapter (stopping at EOS, as the server does)."""
    tokenizer, model = reference.load(model_path)
    tokens = peft_greedy(model_path, cache / adapter_id if adapter_id else None, tokenizer(PROMPT).input_ids,
                         NEW_TOKENS)
    eos = reference.eos_id(model)
    if eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


def _request(adapter_id: str | None, text: str = PROMPT) -> pb.BatchedGenerationRequest:
    params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=NEW_TOKENS))
    return pb.BatchedGenerationRequest(adapter_id=adapter_id, requests=[pb.GenerationRequest(text=text)], params=params)


def _loads(pipeline: Pipeline, adapter_id: str) -> int:
    return len(re.findall(rf"LoRA adapter {re.escape(adapter_id)} loaded", pipeline.logs()))


def test_greedy_output_equals_peft(pipeline, tiny_model_path, cache):
    response = pipeline.stub.Generate(_request("lora-test")).responses[0]
    assert (response.text, response.generated_token_count) == _expected(tiny_model_path, cache, "lora-test")
    assert response.text != _expected(tiny_model_path, cache, None)[0]  # the adapter changes the output


def test_two_adapters_and_none_in_one_batch_each_equal_their_reference(pipeline, tiny_model_path, cache):
    ids = ["lora-test", "team/qv", None, "lora-test", None]

    async def run():
        channel, stub = pipeline.aio_stub()
        async with channel:
            unary = [stub.Generate(_request(adapter_id), timeout=60) for adapter_id in ids]
            stream = stub.GenerateStream(pb.SingleGenerationRequest(
                adapter_id="team/qv", request=pb.GenerationRequest(text=PROMPT), params=_request(None).params),
                timeout=60)
            return await asyncio.gather(*unary), [m async for m in stream]

    responses, messages = asyncio.run(run())
    for adapter_id, response in zip(ids, responses, strict=True):
        r = response.responses[0]
        assert (r.text, r.generated_token_count) == _expected(tiny_model_path, cache, adapter_id), adapter_id
    assert "".join(m.text for m in messages) == _expected(tiny_model_path, cache, "team/qv")[0]


def test_eviction_and_reload(pipeline, tiny_model_path, cache):
    """MAX_LORAS 2 and three adapters in turn: the least recently used is evicted and loaded again when asked."""
    for adapter_id in ("lora-test", "team/qv", "third"):
        pipeline.stub.Generate(_request(adapter_id))
    loads = _loads(pipeline, "lora-test")
    response = pipeline.stub.Generate(_request("lora-test")).responses[0]
    assert (response.text, response.generated_token_count) == _expected(tiny_model_path, cache, "lora-test")
    assert _loads(pipeline, "lora-test") == loads + 1
    assert "LoRA adapter lora-test evicted" in pipeline.logs()


@pytest.mark.parametrize(("adapter_id", "message"), [
    ("nope", "can't retrieve adapter with id 'nope': directory does not exist"),
    ("../escape", "Invalid adapter id '../escape', must contain only alphanumeric, _ and - and /"),
    ("/etc", "Invalid adapter id '/etc', must contain only alphanumeric, _ and - and /"),
    ("team", "can't retrieve adapter with id 'team': invalid adapter: no adapter_config.json found"),
    ("prompt-tuned", "adapter type PROMPT_TUNING is not currently supported"),
    ("head", "can't load adapter with id 'head': target module lm_head is not one LoRA is served on for this model "
             "(supported: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)"),
])
def test_bad_adapters_are_refused_before_queueing(pipeline, adapter_id, message):
    for call in (lambda: pipeline.stub.Generate(_request(adapter_id)),
                 lambda: list(pipeline.stub.GenerateStream(pb.SingleGenerationRequest(
                     adapter_id=adapter_id, request=pb.GenerationRequest(text=PROMPT)))),
                 lambda: pipeline.stub.Tokenize(pb.BatchedTokenizeRequest(
                     adapter_id=adapter_id, requests=[pb.TokenizeRequest(text=PROMPT)]))):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details() == message


def test_tokenize_checks_the_ids_and_tokenizes_as_without(pipeline):
    """As the adapter: adapter_id (or prefix_id standing for it) is validated, the base tokenizer is used."""
    def tokenize(**ids):
        request = pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=PROMPT)], return_tokens=True, **ids)
        return pipeline.stub.Tokenize(request).responses[0]

    plain = tokenize()
    assert tokenize(adapter_id="lora-test") == plain
    assert tokenize(prefix_id="team/qv") == plain
    with pytest.raises(grpc.RpcError) as error:
        tokenize(prefix_id="nope")
    assert error.value.details() == "can't retrieve adapter with id 'nope': directory does not exist"


def test_adapter_lora_request_answers_and_is_loaded_once(pipeline):
    """The adapter's test_lora_request (text for "hello" with adapter_id) and test_lora_adapters_are_cached_remotely
    (a second request reuses the loaded adapter)."""
    first = pipeline.stub.Generate(_request("lora-test", "hello")).responses[0]
    loads = _loads(pipeline, "lora-test")
    second = pipeline.stub.Generate(_request("lora-test", "hello")).responses[0]
    assert first.text and second.text == first.text
    assert _loads(pipeline, "lora-test") == loads


def test_metrics_per_adapter(pipeline):
    def sample(name: str, adapter_id: str) -> float:
        match = re.search(rf'^{name}{{adapter_id="{re.escape(adapter_id)}"}} (\S+)$', pipeline.metrics(), re.M)
        return float(match.group(1)) if match else 0.0

    requests, tokens = sample("tgi_lora_request_count", "team/qv"), sample("tgi_lora_generated_tokens", "team/qv")
    response = pipeline.stub.Generate(_request("team/qv")).responses[0]
    assert sample("tgi_lora_request_count", "team/qv") == requests + 1
    assert sample("tgi_lora_generated_tokens", "team/qv") == tokens + response.generated_token_count
