"""End to end over gRPC, TGIS's seq2seq replies (ENCODER_DECODER kind, generate() parity, echo, NaN input details,
prefixes): a tiny T5 on tgis_native and a tiny BART on hf_transformers (demo tokenizer)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from services.gateway.pb import generation_pb2 as pb
from tests.families import build_with_tokenizer
from tests.pipeline import Pipeline

pytestmark = pytest.mark.e2e

PROMPT = "Translate to French: the cat"
NEW = 10


@pytest.fixture(scope="module", params=["t5", "bart"])
def t5_model(request, demo_model_path, tmp_path_factory) -> Path:
    """T5 (served by tgis_native) or BART (by hf_transformers), both with decoder start token 0, 32 wide."""
    target = tmp_path_factory.mktemp(f"e2e-{request.param}") / "model"
    return build_with_tokenizer(request.param, target, demo_model_path, seed=3)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A prompt prefix with encoder and decoder parts (TGIS's encoder-decoder form)."""
    path = tmp_path_factory.mktemp("t5-prefixes")
    (path / "tuned").mkdir()
    gen = torch.Generator().manual_seed(5)
    torch.save(torch.randn(4, 32, generator=gen), path / "tuned" / "encoder.pt")
    torch.save(torch.randn(2, 32, generator=gen), path / "tuned" / "decoder.pt")
    return path


@pytest.fixture(scope="module")
def pipeline(t5_model, store, tmp_path_factory):
    p = Pipeline(t5_model, tmp_path_factory.mktemp("e2e-t5-run"), "--max-sequence-length", "128",
                 "--prefix-store-path", str(store)).start()
    yield p
    assert p.stop() == 0, p.logs()


def _expected(model_path: Path) -> tuple[list[int], str, int]:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW)
    new = out[0, 1:].tolist()
    eos = model.config.eos_token_id
    new = new[: new.index(eos) + 1] if eos in new else new
    return new, tokenizer.decode(new, skip_special_tokens=True), ids.shape[1]


def _params(**response) -> pb.Parameters:
    return pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=NEW), response=pb.ResponseOptions(**response))


def test_model_info_says_encoder_decoder(pipeline, t5_model):
    info = pipeline.stub.ModelInfo(pb.ModelInfoRequest(model_id="t5"))
    assert info.model_kind == pb.ModelInfoResponse.ENCODER_DECODER
    model_type = json.loads((t5_model / "config.json").read_text())["model_type"]
    engine = "tgis_native" if model_type == "t5" else "hf_transformers"
    assert f"Engine {engine} for {model_type}" in pipeline.logs()


def test_unary_equals_generate_with_echo_separator_and_nan_input_logprobs(pipeline, t5_model):
    tokens, text, input_count = _expected(t5_model)
    request = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=PROMPT)], params=_params(
        input_text=True, generated_tokens=True, input_tokens=True, token_logprobs=True))
    response = pipeline.stub.Generate(request).responses[0]
    assert response.text == PROMPT + "\n\n" + text
    assert [t.logprob for t in response.tokens] and response.generated_token_count == len(tokens)
    assert response.input_token_count == input_count == len(response.input_tokens)
    assert all(math.isnan(t.logprob) for t in response.input_tokens)


def test_stream_matches_unary(pipeline, t5_model):
    _, text, input_count = _expected(t5_model)
    messages = list(pipeline.stub.GenerateStream(pb.SingleGenerationRequest(
        request=pb.GenerationRequest(text=PROMPT), params=_params(input_text=True))))
    assert messages[0].text == PROMPT and messages[0].input_token_count == input_count  # no separator here
    assert "".join(m.text for m in messages[1:]) == text


def test_prompt_prefix_with_encoder_and_decoder_parts(pipeline, t5_model, store):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(t5_model)
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_model, dtype=torch.float32).eval()
    encoder, decoder = torch.load(store / "tuned" / "encoder.pt"), torch.load(store / "tuned" / "decoder.pt")
    embed, eos = model.get_input_embeddings(), model.config.eos_token_id
    ids = tokenizer(PROMPT).input_ids
    tokens = [0]
    with torch.no_grad():  # greedy by hand: transformers' generate() takes no decoder prefix embeddings
        x = torch.cat([encoder, embed(torch.tensor(ids))])[None]
        for _ in range(NEW):
            y = torch.cat([decoder, embed(torch.tensor(tokens))])[None]
            tokens.append(int(model(inputs_embeds=x, decoder_inputs_embeds=y).logits[0, -1].argmax()))
            if tokens[-1] == eos:
                break
    request = pb.BatchedGenerationRequest(prefix_id="tuned", requests=[pb.GenerationRequest(text=PROMPT)],
                                          params=_params())
    response = pipeline.stub.Generate(request).responses[0]
    assert response.generated_token_count == len(tokens) - 1
    assert response.text == tokenizer.decode(tokens[1:], skip_special_tokens=True)
    assert response.input_token_count == len(ids)  # the prefix (4 + 2 + 1) is not counted
