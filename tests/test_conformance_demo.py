"""TGIS conformance on the real demo model: real text for stop sequences, multi-byte text, details and sampling.

Same limits as TGIS's integration tests (max_sequence_length 200, max_new_tokens
169); expected outputs come from `tests/tgis_reference.py` on transformers.
"""

from __future__ import annotations

import pytest

from services.gateway.pb import generation_pb2 as pb
from tests import tgis_reference as ref
from tests.conformance import (
    assert_details_like,
    assert_echo_with_truncation,
    assert_like_reference,
    generate,
    to_params,
)
from tests.pipeline import Pipeline
from tests.reference import load

pytestmark = [pytest.mark.e2e, pytest.mark.demo_model]

PARIS = "The capital of France is"


@pytest.fixture(scope="module")
def server(demo_model_path, tmp_path_factory):
    p = Pipeline(demo_model_path, tmp_path_factory.mktemp("conformance-demo"), "--max-sequence-length", "200",
                 "--max-new-tokens", "169", "--max-batch-size", "8").start()
    yield p
    assert p.stop() == 0, p.logs()


@pytest.fixture(scope="module")
def tok(demo_model_path):
    return load(demo_model_path)[0]


def first_match(tok, ids: list[int], stop: str) -> tuple[int, str]:
    """(tokens generated when `stop` first appears in the decoded text, that text)."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n], skip_special_tokens=True)
        if stop in text:
            return n, text
    raise AssertionError(f"{stop!r} never appears")


@pytest.mark.parametrize("include", [True, False])
def test_stop_sequence_on_real_text(server, tok, demo_model_path, include):
    expected = ref.generate(demo_model_path, PARIS, ref.Settings(max_new_tokens=12))
    count, text = first_match(tok, expected.ids, "\n\n")
    params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=12, stop_sequences=["answer", "\n\n"],
                                                        include_stop_sequence=include))
    response = generate(server, PARIS, params)
    assert (response.stop_reason, response.stop_sequence, response.generated_token_count) == (
        pb.STOP_SEQUENCE, "\n\n", count)
    cut = text.index("\n\n") + (2 if include else 0)
    assert response.text == text[:cut]
    assert response.text.startswith(" Paris.")


def test_multibyte_text_streams_whole_characters(server, tok, demo_model_path):
    prompt = "Translate to French: I would like a coffee and a croissant, please. Réponse :"
    settings = ref.Settings(max_new_tokens=24)
    messages = list(server.stub.GenerateStream(pb.SingleGenerationRequest(
        request=pb.GenerationRequest(text=prompt), params=to_params(settings))))
    assert all("\ufffd" not in m.text for m in messages)
    response = generate(server, prompt, to_params(settings))
    assert_like_reference(response, ref.generate(demo_model_path, prompt, settings), tok)


def test_multibyte_stop_sequence(server, tok, demo_model_path):
    prompt = "Écrivez une phrase en français sur le café."
    expected = ref.generate(demo_model_path, prompt, ref.Settings(max_new_tokens=30))
    text = tok.decode(expected.ids, skip_special_tokens=True)
    stop = next((c for c in text if len(c.encode()) > 1), None)
    if stop is None:
        pytest.skip("the model wrote no multi-byte character here")
    count, upto = first_match(tok, expected.ids, stop)
    params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=30, stop_sequences=[stop],
                                                        include_stop_sequence=False))
    response = generate(server, prompt, params)
    assert (response.stop_reason, response.generated_token_count) == (pb.STOP_SEQUENCE, count)
    assert response.text == upto[: upto.index(stop)]


def test_token_details_on_the_real_model(server, tok, demo_model_path):
    settings = ref.Settings(max_new_tokens=5, top_n=3, repetition_penalty=1.2)
    response = generate(server, PARIS, to_params(settings, generated_tokens=True, token_logprobs=True,
                                                 token_ranks=True, top_n_tokens=3))
    expected = ref.generate(demo_model_path, PARIS, settings)
    assert_like_reference(response, expected, tok)
    assert_details_like(response.tokens, expected.steps, tok)


def test_seeded_sampling_on_the_real_model(server, tok, demo_model_path):
    settings = ref.Settings(sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=2024, max_new_tokens=10)
    response = generate(server, PARIS, to_params(settings))
    assert response.seed == 2024
    assert_like_reference(response, ref.generate(demo_model_path, PARIS, settings), tok)


def test_input_text_echo_and_truncation(server, tok, demo_model_path):
    assert_echo_with_truncation(server, tok, demo_model_path, PARIS, keep=3)
