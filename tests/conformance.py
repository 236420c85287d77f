"""Shared by the conformance suites: request building, unary + stream parity checks, reference comparison."""

from __future__ import annotations

import math

from services.gateway.pb import generation_pb2 as pb
from tests import tgis_reference as ref


def to_params(s: ref.Settings, **response) -> pb.Parameters:
    params = pb.Parameters(
        method=pb.SAMPLE if s.sample else pb.GREEDY,
        stopping=pb.StoppingCriteria(max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens),
        decoding=pb.DecodingParameters(repetition_penalty=s.repetition_penalty),
        truncate_input_tokens=s.truncate_input_tokens,
        response=pb.ResponseOptions(**response),
    )
    if s.length_penalty:
        params.decoding.length_penalty.start_index, params.decoding.length_penalty.decay_factor = s.length_penalty
    if s.sample:
        params.sampling.CopyFrom(pb.SamplingParameters(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                                       typical_p=s.typical_p, seed=s.seed))
    return params


def generate(server, text: str, params: pb.Parameters, echo_separator: str = "") -> pb.GenerationResponse:
    """Unary and streamed; asserts TGIS's stream layout and parity, returns the unary response (an echoed input
    is followed by `echo_separator` in the unary text only: "\n\n" for encoder-decoders)."""
    unary = server.stub.Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=text)],
                                                             params=params)).responses[0]
    messages = list(server.stub.GenerateStream(pb.SingleGenerationRequest(request=pb.GenerationRequest(text=text),
                                                                          params=params)))
    first, last = messages[0], messages[-1]
    assert first.input_token_count == unary.input_token_count and first.generated_token_count == 0
    assert first.seed == unary.seed and last.seed == unary.seed
    assert all(m.seed == 0 for m in messages[1:-1]), "seed only in the first and last messages"
    assert all(m.stop_reason == pb.NOT_FINISHED for m in messages[:-1])
    body = [m for m in messages[1:] if not m.input_tokens]
    counts = [m.generated_token_count for m in body]
    assert counts == sorted(set(counts)), "counts strictly increase"
    assert (last.generated_token_count, last.stop_reason, last.stop_sequence) == (
        unary.generated_token_count, unary.stop_reason, unary.stop_sequence)
    separator = echo_separator if params.response.input_text else ""
    assert messages[0].text + separator + "".join(m.text for m in messages[1:]) == unary.text
    assert [t for m in messages for t in m.tokens] == list(unary.tokens)
    streamed_inputs = [t for m in messages for t in m.input_tokens]
    assert len(streamed_inputs) == len(unary.input_tokens)
    return unary


def assert_like_reference(response: pb.GenerationResponse, expected: ref.Result, tok, skip_special=True) -> None:
    assert response.generated_token_count == len(expected.steps)
    assert response.stop_reason == expected.stop_reason
    assert response.input_token_count == len(expected.input_ids)
    assert response.text == tok.decode(expected.ids, skip_special_tokens=skip_special)


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=5e-4, abs_tol=1e-5)


def assert_details_like(infos, steps: list[ref.Step], tok) -> None:
    """TokenInfos (with logprobs, ranks, top-n) equal the reference steps."""
    assert len(infos) == len(steps)
    for info, step in zip(infos, steps, strict=True):
        assert info.text == tok.convert_ids_to_tokens(step.token)
        assert close(info.logprob, step.logprob) and info.rank == step.rank
        assert [t.text for t in info.top_tokens] == tok.convert_ids_to_tokens([i for i, _ in step.top])
        assert all(close(t.logprob, lp) for t, (_, lp) in zip(info.top_tokens, step.top, strict=True))


def assert_echo_with_truncation(server, tok, model_path, prompt: str, keep: int, separator: str = "") -> None:
    """`input_text` echoes the whole prompt (then `separator`: "\n\n" for encoder-decoders) even when only the
    last `keep` tokens are generated from."""
    settings = ref.Settings(max_new_tokens=6, truncate_input_tokens=keep)
    response = generate(server, prompt, to_params(settings, input_text=True), separator)
    expected = ref.generate(model_path, prompt, settings)
    assert response.input_token_count == keep
    assert response.text == prompt + separator + tok.decode(expected.ids, skip_special_tokens=True)
