"""End to end: prompt prefixes over gRPC (tiny Llama, PREFIX_STORE_PATH): output, counts, details, errors, limits."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from services.gateway.pb import generation_pb2 as pb
from tests import reference
from tests.pipeline import Pipeline

pytestmark = pytest.mark.e2e

PROMPT = "The quick brown fox"
PREFIX_LENGTH = 4


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prefix-store")
    gen = torch.Generator().manual_seed(11)
    for name, tensor in {"soft": torch.randn(PREFIX_LENGTH, 64, generator=gen),
                         "too-long": torch.randn(129, 64, generator=gen),  # default limit: 256 / 2
                         "inf": torch.full((2, 64), float("inf"))}.items():
        (path / name).mkdir()
        torch.save(tensor, path / name / "decoder.pt")
    return path


@pytest.fixture(scope="module")
def pipeline(tiny_model_path, store, tmp_path_factory):
    p = Pipeline(tiny_model_path, tmp_path_factory.mktemp("e2e-prefixes"), "--max-sequence-length", "256",
                 env={"PREFIX_STORE_PATH": str(store)}).start()
    yield p
    assert p.stop() == 0, p.logs()


def _request(prefix_id: str | None, text: str = PROMPT, max_new_tokens: int = 8, **details) -> pb.BatchedGenerationRequest:
    response = pb.ResponseOptions(**details) if details else None
    params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens), response=response)
    return pb.BatchedGenerationRequest(prefix_id=prefix_id, requests=[pb.GenerationRequest(text=text)], params=params)


def _expected(model_path: Path, store: Path, text: str, max_new_tokens: int) -> tuple[str, int]:
    """transformers' greedy text and token count from inputs_embeds = concat(prefix, embed(ids)), stopping at EOS."""
    tokenizer, model = reference.load(model_path)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    embeds = torch.cat([torch.load(store / "soft" / "decoder.pt"), model.get_input_embeddings()(ids)])
    eos = reference.eos_id(model)
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
    new = out[0].tolist()
    if eos in new:
        new = new[: new.index(eos) + 1]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def test_prefix_output_equals_transformers_and_counts_exclude_it(pipeline, tiny_model_path, store):
    response = pipeline.stub.Generate(_request("soft")).responses[0]
    plain = pipeline.stub.Generate(_request(None)).responses[0]
    text, count = _expected(tiny_model_path, store, PROMPT, 8)
    assert (response.text, response.generated_token_count) == (text, count)
    assert response.input_token_count == plain.input_token_count == len(reference.load(tiny_model_path)[0](PROMPT).input_ids)
    assert response.text != plain.text  # the prefix changes the continuation


def test_input_token_details_show_the_prefix_positions_as_pad_tokens(pipeline, tiny_model_path):
    tokenizer, model = reference.load(tiny_model_path)
    response = pipeline.stub.Generate(_request("soft", input_tokens=True, token_logprobs=True)).responses[0]
    n = response.input_token_count
    assert len(response.input_tokens) == PREFIX_LENGTH + n
    pad = tokenizer.convert_ids_to_tokens(reference.eos_id(model))  # no pad id: the EOS stands in, as in TGIS
    assert [t.text for t in response.input_tokens[:PREFIX_LENGTH]] == [pad] * PREFIX_LENGTH
    assert [t.text for t in response.input_tokens[PREFIX_LENGTH:]] == tokenizer.convert_ids_to_tokens(
        tokenizer(PROMPT).input_ids)


def test_stream_counts_like_tgis(pipeline, tiny_model_path, store):
    request = _request("soft", input_tokens=True)
    single = pb.SingleGenerationRequest(prefix_id="soft", request=request.requests[0], params=request.params)
    messages = list(pipeline.stub.GenerateStream(single))
    n = len(reference.load(tiny_model_path)[0](PROMPT).input_ids)
    assert messages[0].input_token_count == n  # the input alone
    assert messages[1].input_token_count == PREFIX_LENGTH + n == len(messages[1].input_tokens)  # the details list
    assert "".join(m.text for m in messages) == _expected(tiny_model_path, store, PROMPT, 8)[0]


@pytest.mark.parametrize(("prefix_id", "cause"), [
    ("missing", 'prefix id "missing" not found'),
    ("no good", "Invalid prefix id no good, must contain only alphanumeric, _ and - and /"),
    ("too-long", "Invalid prefix embedding length of 129"),
    ("inf", "Prefix contains non-finite elements"),
])
def test_lookup_failures_are_refused_before_queueing(pipeline, prefix_id, cause):
    before = pipeline.metric("tgi_prompt_load_failure_total")
    with pytest.raises(grpc.RpcError) as error:
        pipeline.stub.Generate(_request(prefix_id))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == f"can't retrieve prompt prefix with id '{prefix_id}': {cause}"
    assert pipeline.metric("tgi_prompt_load_failure_total") == before + 1


def test_prefix_length_counts_against_the_sequence_limit(pipeline):
    text = " fox" * 252  # 252 tokens + 4 prefix positions = the limit
    with pytest.raises(grpc.RpcError) as error:
        pipeline.stub.Generate(_request("soft", text=text))
    assert error.value.details().endswith("plus prefix length (4) must be < 256")


def test_tokenize_takes_a_prompt_prefix_id_and_refuses_an_unknown_one(pipeline):
    """Tokenize's prefix_id (a vLLM TGIS adapter field): one of our prefixes counts nothing; another id is refused."""
    def tokenize(prefix_id: str | None):
        return pipeline.stub.Tokenize(pb.BatchedTokenizeRequest(prefix_id=prefix_id,
                                                                requests=[pb.TokenizeRequest(text=PROMPT)]))
    assert tokenize("soft") == tokenize(None)
    with pytest.raises(grpc.RpcError) as error:
        tokenize("missing")
    assert error.value.details() == "can't retrieve prompt prefix with id 'missing': prefix id \"missing\" not found"
