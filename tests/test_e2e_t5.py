"""End to end: a tiny T5 (demo tokenizer) over gRPC: ENCODER_DECODER kind, generate() parity, TGIS's seq2seq replies."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from services.gateway.pb import generation_pb2 as pb
from tests.conftest import TOKENIZER_FILES
from tests.pipeline import Pipeline

pytestmark = pytest.mark.e2e

PROMPT = "Translate to French: the cat"
NEW = 10


@pytest.fixture(scope="module")
def t5_model(demo_model_path, tmp_path_factory) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    target = tmp_path_factory.mktemp("e2e-t5") / "model"
    demo = json.loads((demo_model_path / "config.json").read_text())
    config = T5Config(vocab_size=demo["vocab_size"], d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=demo["eos_token_id"], n_positions=128)
    torch.manual_seed(3)
    T5ForConditionalGeneration(config).eval().save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (demo_model_path / name).exists():
            shutil.copy(demo_model_path / name, target / name)
    return target


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
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = T5ForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW)
    new = out[0, 1:].tolist()
    eos = model.config.eos_token_id
    new = new[: new.index(eos) + 1] if eos in new else new
    return new, tokenizer.decode(new, skip_special_tokens=True), ids.shape[1]


def _params(**response) -> pb.Parameters:
    return pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=NEW), response=pb.ResponseOptions(**response))


def test_model_info_says_encoder_decoder(pipeline):
    info = pipeline.stub.ModelInfo(pb.ModelInfoRequest(model_id="t5"))
    assert info.model_kind == pb.ModelInfoResponse.ENCODER_DECODER


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
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(t5_model)
    model = T5ForConditionalGeneration.from_pretrained(t5_model, dtype=torch.float32).eval()
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
