"""End to end: guided decoding (the vLLM TGIS adapter's `guided` oneof) and `adapter_id` over gRPC, demo model."""

from __future__ import annotations

import ast

import grpc
import pytest

from services import client
from services.gateway.pb import generation_pb2 as pb
from tests import reference
from tests.guided_checks import CHOICES, DECODING, check
from tests.pipeline import Pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.demo_model]

PROMPTS = {
    "json": "Describe a cat as a JSON object:",
    "json_schema": "Give the name and age of a person as JSON:",
    "regex": "Write a product code:",
    "choice": "Is the sky blue? Answer yes or no:",
    "grammar": "Write a small sum in parentheses:",
}
FREE = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
MAX_NEW = 24


@pytest.fixture(scope="module")
def pipeline(demo_model_path, tmp_path_factory):
    p = Pipeline(demo_model_path, tmp_path_factory.mktemp("guided"), "--max-batch-size", "8",
                 "--max-new-tokens", "64").start()
    yield p
    assert p.stop() == 0, p.logs()


def params(decoding: pb.DecodingParameters | None = None, max_new_tokens: int = MAX_NEW, **kw) -> pb.Parameters:
    return pb.Parameters(decoding=decoding, stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens), **kw)


def unary(pipeline, text: str, p: pb.Parameters):
    return pipeline.stub.Generate.future(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=text)],
                                                                     params=p))


def streamed(pipeline, text: str, p: pb.Parameters) -> tuple[str, int, int]:
    """(text, stop reason, generated tokens) of a GenerateStream call."""
    messages = list(pipeline.stub.GenerateStream(pb.SingleGenerationRequest(request=pb.GenerationRequest(text=text),
                                                                           params=p)))
    return "".join(m.text for m in messages), messages[-1].stop_reason, messages[-1].generated_token_count


def test_five_kinds_unary_in_one_batch_with_free_requests(pipeline, demo_model_path):
    guided = {kind: unary(pipeline, PROMPTS[kind], params(DECODING[kind])) for kind in DECODING}
    free = [unary(pipeline, text, params()) for text in FREE]  # 8 calls at once: one batch of 8
    for kind, call in guided.items():
        response = call.result().responses[0]
        assert response.stop_reason in (pb.EOS_TOKEN, pb.MAX_TOKENS), kind
        check(kind, response.text, response.stop_reason == pb.EOS_TOKEN)
    for text, call in zip(FREE, free, strict=True):
        expected = reference.greedy(demo_model_path, text, MAX_NEW)
        assert call.result().responses[0].text == expected.text, text


def test_five_kinds_streaming_equal_their_unary_text(pipeline):
    for kind in DECODING:
        p = params(DECODING[kind])
        text, reason, count = streamed(pipeline, PROMPTS[kind], p)
        check(kind, text, reason == pb.EOS_TOKEN)
        response = unary(pipeline, PROMPTS[kind], p).result().responses[0]
        assert (text, reason, count) == (response.text, response.stop_reason, response.generated_token_count), kind


def test_stop_sequences_seeds_min_new_tokens_and_details(pipeline):
    # A stop sequence cuts a constrained output like any other: what is left is a prefix of the language.
    stopped = unary(pipeline, PROMPTS["regex"], params(DECODING["regex"])).result().responses[0]
    cut = unary(pipeline, PROMPTS["regex"], pb.Parameters(decoding=DECODING["regex"], stopping=pb.StoppingCriteria(
        max_new_tokens=MAX_NEW, stop_sequences=["-"], include_stop_sequence=True))).result().responses[0]
    assert cut.stop_reason == pb.STOP_SEQUENCE and cut.text.endswith("-") and cut.stop_sequence == "-"
    check("regex", cut.text, finished=False)
    assert stopped.text.startswith(cut.text)
    # A seeded sample is reproducible; the constraint holds for it too.
    sample = params(DECODING["json_schema"], method=pb.SAMPLE,
                    sampling=pb.SamplingParameters(temperature=1.3, top_k=40, seed=42))
    first, again = (unary(pipeline, PROMPTS["json_schema"], sample).result().responses[0] for _ in range(2))
    assert (first.text, first.seed) == (again.text, again.seed) and first.seed == 42
    check("json_schema", first.text, first.stop_reason == pb.EOS_TOKEN)
    # min_new_tokens: the choice ends, then EOS (no text) until the minimum; the text is still one choice.
    long = unary(pipeline, PROMPTS["choice"], pb.Parameters(decoding=DECODING["choice"], stopping=pb.StoppingCriteria(
        max_new_tokens=MAX_NEW, min_new_tokens=10))).result().responses[0]
    assert long.text in CHOICES and long.generated_token_count == 10 and long.stop_reason == pb.EOS_TOKEN
    # Token details are those of the constrained distribution: every top token may start a choice.
    detailed = unary(pipeline, PROMPTS["choice"], params(DECODING["choice"], response=pb.ResponseOptions(
        generated_tokens=True, token_logprobs=True, top_n_tokens=3))).result().responses[0]
    assert detailed.text in CHOICES
    first_token = detailed.tokens[0]
    assert first_token.logprob <= 0.0
    assert all(any(c.startswith(top.text.replace("Ġ", " ")) for c in CHOICES) for top in first_token.top_tokens)


@pytest.mark.parametrize(("decoding", "message"), [
    (pb.DecodingParameters(json_schema='{"type": 5}'), "invalid guided decoding json_schema: "),
    (pb.DecodingParameters(json_schema="{not json"), "invalid guided decoding json_schema: "),
    (pb.DecodingParameters(regex="(ab"), "invalid guided decoding regex: Regex parsing error at position 4: The parenthesis is not closed."),
    (pb.DecodingParameters(grammar="root ::= missing"), 'invalid guided decoding grammar: EBNF parser error'),
    (pb.DecodingParameters(choice=pb.DecodingParameters.StringChoices()),
     "guided decoding choice must list at least one string"),
])
def test_bad_constraints_are_refused_before_queueing(pipeline, decoding, message):
    for call in (lambda: unary(pipeline, "x", params(decoding)).result(),
                 lambda: streamed(pipeline, "x", params(decoding))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(message), info.value.details()


def test_adapter_id_without_adapter_cache_is_refused_naming_it(pipeline):
    """As the vLLM TGIS adapter without an adapter store; Tokenize's prefix_id stands for adapter_id there."""
    message = "can't retrieve adapter with id 'my-lora': adapter_id supplied but no adapter store was configured"
    calls = [
        lambda: pipeline.stub.Generate(pb.BatchedGenerationRequest(adapter_id="my-lora",
                                                                   requests=[pb.GenerationRequest(text="x")])),
        lambda: list(pipeline.stub.GenerateStream(pb.SingleGenerationRequest(
            adapter_id="my-lora", request=pb.GenerationRequest(text="x")))),
        lambda: pipeline.stub.Tokenize(pb.BatchedTokenizeRequest(adapter_id="my-lora",
                                                                 requests=[pb.TokenizeRequest(text="x")])),
        lambda: pipeline.stub.Tokenize(pb.BatchedTokenizeRequest(prefix_id="my-lora",
                                                                 requests=[pb.TokenizeRequest(text="x")])),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)


def test_tgis_client_constraint_flags(pipeline, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(DECODING["json_schema"].json_schema)
    address = ["--address", pipeline.address]
    assert client.main([*address, "generate", PROMPTS["choice"], "--choice", ",".join(CHOICES)]) == 0
    text, status = capsys.readouterr().out.rsplit(" [", 1)
    assert ast.literal_eval(text) in CHOICES and status.startswith("EOS_TOKEN")
    assert client.main([*address, "generate", PROMPTS["regex"], "--regex", "[0-9]{3}-[a-z]{2,8}", "--stream"]) == 0
    text, status = capsys.readouterr().out.rsplit("\n[", 1)
    check("regex", text, status.startswith("EOS_TOKEN"))
    assert client.main([*address, "generate", PROMPTS["json_schema"], "--json-schema", str(schema),
                        "--max-new-tokens", str(MAX_NEW)]) == 0
    text, status = capsys.readouterr().out.rsplit(" [", 1)
    check("json_schema", ast.literal_eval(text), status.startswith("EOS_TOKEN"))
    assert client.main([*address, "generate", "x", "--adapter-id", "my-lora"]) == 1
    assert "can't retrieve adapter with id 'my-lora'" in capsys.readouterr().err
