"""TGIS conformance: generation semantics against a plain reference, on the real pipeline (tiny model).

Server limits are those of TGIS's own integration tests (max_sequence_length
200, max_new_tokens 169, batch 8, waiting tokens 10).  Every single-input
generation is also run as a stream and checked for parity, as TGIS's tests do.
"""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest

from services.gateway.pb import generation_pb2 as pb
from tests import tgis_reference as ref
from tests.conformance import (
    assert_details_like,
    assert_echo_with_truncation,
    assert_like_reference,
    close,
    generate,
    to_params,
)
from tests.pipeline import Pipeline
from tests.reference import load

pytestmark = pytest.mark.e2e

PROMPT = "A long time ago, in a galaxy far away"


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    p = Pipeline(tiny_model_path, tmp_path_factory.mktemp("conformance"), "--max-sequence-length", "200",
                 "--max-new-tokens", "169", "--max-batch-size", "8", "--max-waiting-tokens", "10",
                 "--max-concurrent-requests", "16").start()
    yield p
    assert p.stop() == 0, p.logs()


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return load(tiny_model_path)[0]


# ---------------------------------------------------------------------------------------------- 1. validation


ERRORS = [
    ("invalid prefix id", dict(prefix_id="invalid_prefix_id"), pb.Parameters(),
     "can't retrieve prompt prefix with id 'invalid_prefix_id': prefix id \"invalid_prefix_id\" not found"),
    ("unsupported combo", {}, pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=4),
                                            response=pb.ResponseOptions(token_logprobs=True)),
     "must request input and/or generated tokens to request extra token detail"),
    ("max < min", {}, pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=10, min_new_tokens=20)),
     "min_new_tokens must be <= max_new_tokens"),
    ("max > 169", {}, pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=170)), "max_new_tokens must be <= 169"),
    ("empty stop seq", {}, pb.Parameters(stopping=pb.StoppingCriteria(
        max_new_tokens=30, stop_sequences=["empty not allowed", ""])),
     "can specify at most 6 non-empty stop sequences, each not more than 240 UTF8 bytes"),
    ("temperature too small", {}, pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(
        temperature=0.02, top_p=0.7), stopping=pb.StoppingCriteria(max_new_tokens=6)), "temperature must be >= 0.05"),
]


@pytest.mark.parametrize("name, extra, params, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_error_cases(server, name, extra, params, message):
    request = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=PROMPT)], params=params, **extra)
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Generate(request)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    stream_request = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=PROMPT), params=params, **extra)
    with pytest.raises(grpc.RpcError) as info:
        list(server.stub.GenerateStream(stream_request))
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)


def text_of_length(tok, n: int) -> str:
    """A text that encodes to exactly n tokens (special tokens included)."""
    words = " ".join(["hello"] * n)
    ids = tok(words, add_special_tokens=True).input_ids
    specials = len(ids) - len(tok(words, add_special_tokens=False).input_ids)
    text = " ".join(["hello"] * (n - specials))
    assert len(tok(text, add_special_tokens=True).input_ids) == n
    return text


def test_length_errors_and_token_limit(server, tok, tiny_model_path):
    def error(text: str, stopping: pb.StoppingCriteria) -> str:
        with pytest.raises(grpc.RpcError) as info:
            server.stub.Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=text)],
                                                             params=pb.Parameters(stopping=stopping)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return info.value.details()

    assert error(text_of_length(tok, 200), pb.StoppingCriteria(max_new_tokens=100)) == \
        "input tokens (200) plus prefix length (0) must be < 200"
    assert error(text_of_length(tok, 69), pb.StoppingCriteria(max_new_tokens=168, min_new_tokens=150)) == \
        "input tokens (69) plus prefix length (0) plus min_new_tokens (150) must be <= 200"
    # Non-error boundaries: the token limit lowers max_new_tokens and reports TOKEN_LIMIT.
    response = generate(server, text_of_length(tok, 186), to_params(ref.Settings(max_new_tokens=100)))
    assert (response.generated_token_count, response.stop_reason) == (14, pb.TOKEN_LIMIT)
    response = generate(server, text_of_length(tok, 198), to_params(ref.Settings(min_new_tokens=2)))
    assert (response.generated_token_count, response.stop_reason) == (2, pb.TOKEN_LIMIT)
    assert_like_reference(response, ref.generate(tiny_model_path, text_of_length(tok, 198), ref.Settings(
        min_new_tokens=2)), tok)


def test_one_bad_input_fails_the_whole_batch_and_empty_batch_answers_at_once(server, tok):
    request = pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text="short"), pb.GenerationRequest(text=text_of_length(tok, 200))],
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=5)))
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Generate(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Even invalid parameters succeed with no inputs.
    empty = pb.BatchedGenerationRequest(params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=1000)))
    assert list(server.stub.Generate(empty).responses) == []


# ---------------------------------------------------------------------------------------------- 2-3. conversion, seeds


def test_greedy_ignores_sampling_fields(server, tok, tiny_model_path):
    params = to_params(ref.Settings(max_new_tokens=10))
    params.sampling.CopyFrom(pb.SamplingParameters(temperature=0.02, top_k=3, top_p=0.5, seed=99))
    response = generate(server, PROMPT, params)
    assert response.seed == 0
    assert_like_reference(response, ref.generate(tiny_model_path, PROMPT, ref.Settings(max_new_tokens=10)), tok)


def test_random_seeds_differ_per_input(server):
    request = pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=PROMPT)] * 5,
        params=pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(top_k=20),
                             stopping=pb.StoppingCriteria(max_new_tokens=8)))
    responses = server.stub.Generate(request).responses
    seeds = {r.seed for r in responses}
    assert len(seeds) == 5 and all(0 <= s <= 2**32 - 1 for s in seeds)
    assert len({r.text for r in responses}) == 5


def test_explicit_seed_reproduces_alone_in_batch_and_streamed(server, tok, tiny_model_path):
    s = ref.Settings(sample=True, top_k=50, seed=1234, max_new_tokens=12)
    alone = generate(server, PROMPT, to_params(s))
    assert alone.seed == 1234
    assert_like_reference(alone, ref.generate(tiny_model_path, PROMPT, s), tok)
    batch = server.stub.Generate(pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text="other prompt"), pb.GenerationRequest(text=PROMPT)],
        params=to_params(s))).responses
    assert batch[1].text == alone.text and batch[1].seed == 1234


@pytest.mark.parametrize("settings", [
    ref.Settings(sample=True, temperature=0.7, seed=7, max_new_tokens=10),
    ref.Settings(sample=True, top_k=5, seed=8, max_new_tokens=10),
    ref.Settings(sample=True, top_p=0.6, seed=9, max_new_tokens=10),
    ref.Settings(sample=True, top_p=1e-9, seed=9, max_new_tokens=10),
    ref.Settings(sample=True, typical_p=0.5, seed=10, max_new_tokens=10),
    ref.Settings(sample=True, temperature=1.5, top_k=40, top_p=0.9, seed=11, max_new_tokens=10),
    ref.Settings(sample=True, seed=12, min_new_tokens=10, max_new_tokens=10),
], ids=["temperature", "top_k", "top_p", "top_p_tiny", "typical_p", "combined", "min_equals_max"])
def test_sampling_matches_reference(server, tok, tiny_model_path, settings):
    response = generate(server, PROMPT, to_params(settings))
    assert response.seed == settings.seed
    assert_like_reference(response, ref.generate(tiny_model_path, PROMPT, settings), tok)


# ---------------------------------------------------------------------------------------------- 4. stopping


def test_min_new_tokens_masks_eos_and_length_penalty_boosts_it(server, tok, tiny_model_path):
    boosted = ref.Settings(length_penalty=(2, 10.0), max_new_tokens=40)
    expected = ref.generate(tiny_model_path, PROMPT, boosted)
    assert expected.stop_reason == pb.EOS_TOKEN, "the boost should make EOS win within 40 tokens"
    assert_like_reference(generate(server, PROMPT, to_params(boosted)), expected, tok)
    held = ref.Settings(length_penalty=(2, 10.0), min_new_tokens=len(expected.steps) + 3, max_new_tokens=60)
    expected_held = ref.generate(tiny_model_path, PROMPT, held)
    response = generate(server, PROMPT, to_params(held))
    assert response.generated_token_count >= held.min_new_tokens
    assert_like_reference(response, expected_held, tok)


def test_max_new_tokens_one(server, tok, tiny_model_path):
    s = ref.Settings(max_new_tokens=1)
    assert_like_reference(generate(server, PROMPT, to_params(s)), ref.generate(tiny_model_path, PROMPT, s), tok)


def stop_params(max_new: int, stops: list[str], include: bool | None) -> pb.Parameters:
    stopping = pb.StoppingCriteria(max_new_tokens=max_new, stop_sequences=stops)
    if include is not None:
        stopping.include_stop_sequence = include
    return pb.Parameters(stopping=stopping)


def token_texts(tok, ids: list[int]) -> list[str]:
    """Cumulative decoded text after each token."""
    return [tok.decode(ids[: i + 1], skip_special_tokens=True) for i in range(len(ids))]


def spanning_stop(texts: list[str]) -> tuple[int, int, int]:
    """(start, end, tokens): the first stop sequence of the reference output that starts inside one token's text,
    spans the next token and ends inside the one after (its last character left out), occurring first there;
    chosen from the output, as a fixed choice can recur earlier in a model's repetitive text."""
    full, lengths = texts[-1], [0] + [len(t) for t in texts]
    for k in range(len(texts) - 2):
        start, end = lengths[k + 1] - 1, lengths[k + 3] - 1
        # Whole characters per token (the text grows by each), the first token's own text not empty, the third's
        # at least 2 characters so that the stop ends inside it.
        whole = all(full.startswith(t) for t in texts[k: k + 3])
        if whole and start >= lengths[k] and end > lengths[k + 2] and full.find(full[start:end]) == start:
            return start, end, k + 3
    pytest.fail(f"no stop sequence spanning three tokens occurs first where it ends in {full!r}")


@pytest.mark.parametrize("include", [None, True, False])
def test_stop_sequence_across_tokens(server, tok, tiny_model_path, include):
    expected = ref.generate(tiny_model_path, PROMPT, ref.Settings(max_new_tokens=30))
    texts = token_texts(tok, expected.ids)
    start, end, tokens = spanning_stop(texts)
    stop = texts[-1][start:end]
    response = generate(server, PROMPT, stop_params(30, [stop], include))
    assert response.stop_reason == pb.STOP_SEQUENCE and response.stop_sequence == stop
    assert response.generated_token_count == tokens
    cut = end if include in (None, True) else start
    assert response.text == texts[-1][:cut]


def test_first_stop_sequence_in_list_wins(server, tok, tiny_model_path):
    expected = ref.generate(tiny_model_path, PROMPT, ref.Settings(max_new_tokens=30))
    texts = token_texts(tok, expected.ids)
    early = texts[2][len(texts[1]):]  # token 3's own text
    late = texts[3][len(texts[2]):] if texts[3] != texts[2] else texts[4][len(texts[3]):]
    both = texts[3] if texts[3].endswith(late) else texts[4]
    assert late and early and both.rfind(late) >= 0
    response = generate(server, PROMPT, stop_params(30, [late, early], True))
    # The later-listed one matched first in time (token 3); the first-listed one wins only if it matches then too.
    assert response.stop_reason == pb.STOP_SEQUENCE
    assert response.stop_sequence == (late if late in texts[2] else early)


def test_stop_sequence_on_last_allowed_token_is_max_tokens(server, tok, tiny_model_path):
    expected = ref.generate(tiny_model_path, PROMPT, ref.Settings(max_new_tokens=30))
    texts = token_texts(tok, expected.ids)
    # The first token limit whose last token's text is a fresh stop sequence (chosen from the output: in a
    # repetitive one a fixed limit's last token text has often occurred before).
    before = ["", *texts]  # the text before each token
    fresh = [n for n in range(1, len(texts) + 1)
             if texts[n - 1].startswith(before[n - 1]) and texts[n - 1][len(before[n - 1]):] not in before[n - 1]]
    assert fresh, f"no token of {texts[-1]!r} has a text that did not occur before it"
    n = fresh[0]
    stop = texts[n - 1][len(before[n - 1]):]
    response = generate(server, PROMPT, stop_params(n, [stop], False))
    assert (response.stop_reason, response.text, response.stop_sequence) == (pb.MAX_TOKENS, texts[n - 1], "")


def test_time_limit_in_batch_and_in_queue(server, tok):
    params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=169, min_new_tokens=169,
                                                        time_limit_millis=50))
    # Unary and streamed separately: a time limit makes their token counts differ.
    started = time.monotonic()
    response = server.stub.Generate(pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text="def doit():\n")], params=params)).responses[0]
    assert response.stop_reason == pb.TIME_LIMIT and 1 <= response.generated_token_count < 169
    assert 0.05 <= time.monotonic() - started < 10
    messages = list(server.stub.GenerateStream(pb.SingleGenerationRequest(
        request=pb.GenerationRequest(text="def doit():\n"), params=params)))
    assert messages[-1].stop_reason == pb.TIME_LIMIT and 1 <= messages[-1].generated_token_count < 169
    params.stopping.time_limit_millis = 1
    response = server.stub.Generate(pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text="def doit():\n")], params=params)).responses[0]
    assert response.stop_reason == pb.TIME_LIMIT and response.generated_token_count >= 1

    async def scenario():
        channel, stub = server.aio_stub()
        # A full batch (max_batch_size 8), and the queued request sent mid-way through its tokens: sent after a
        # fixed sleep, it could arrive as a fast machine finished the batch, find room and run.
        fill = pb.SingleGenerationRequest(
            request=pb.GenerationRequest(text=PROMPT),
            params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=150, min_new_tokens=150)))
        streams = [stub.GenerateStream(fill) for _ in range(8)]
        received = 0
        async for _ in streams[0]:
            received += 1
            if received == 10:
                break
        queued = pb.BatchedGenerationRequest(
            requests=[pb.GenerationRequest(text=PROMPT)],
            params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=5, time_limit_millis=1),
                                 response=pb.ResponseOptions(input_text=True)))
        result = (await stub.Generate(queued)).responses[0]
        for stream in streams:
            stream.cancel()
        await channel.close()
        return result

    result = asyncio.run(scenario())
    assert (result.stop_reason, result.generated_token_count, result.text) == (pb.TIME_LIMIT, 0, "")
    assert result.input_token_count > 0


# ---------------------------------------------------------------------------------------------- 5. text


def test_input_text_echo_uses_full_untruncated_text(server, tok, tiny_model_path):
    separator = "\n\n" if load(tiny_model_path)[1].config.is_encoder_decoder else ""  # TGIS's seq2seq echo
    assert_echo_with_truncation(server, tok, tiny_model_path, PROMPT, keep=4, separator=separator)


# ---------------------------------------------------------------------------------------------- 6. token details


@pytest.mark.parametrize("settings", [ref.Settings(max_new_tokens=6, top_n=3),
                                      ref.Settings(sample=True, top_k=1, seed=5, max_new_tokens=4, top_n=2),
                                      ref.Settings(max_new_tokens=4, repetition_penalty=1.3, top_n=10)],
                         ids=["greedy", "sample_top_k_1", "repetition_top_n_above_5"])
def test_generated_token_details(server, tok, tiny_model_path, settings):
    params = to_params(settings, generated_tokens=True, token_logprobs=True, token_ranks=True,
                       top_n_tokens=settings.top_n)
    response = generate(server, PROMPT, params)
    expected = ref.generate(tiny_model_path, PROMPT, settings)
    assert_details_like(response.tokens, expected.steps, tok)
    if settings.sample and settings.top_k == 1:
        assert all(t.logprob == 0.0 for t in response.tokens)


def test_top_tokens_without_logprobs_are_in_id_order(server, tok, tiny_model_path):
    settings = ref.Settings(max_new_tokens=3, top_n=4)
    response = generate(server, PROMPT, to_params(settings, generated_tokens=True, top_n_tokens=4))
    expected = ref.generate(tiny_model_path, PROMPT, settings)
    for info, step in zip(response.tokens, expected.steps, strict=True):
        assert [t.text for t in info.top_tokens] == tok.convert_ids_to_tokens(sorted(i for i, _ in step.top))
        assert all(t.logprob == 0.0 for t in info.top_tokens) and info.logprob == 0.0 and info.rank == 0


def test_input_token_details(server, tok, tiny_model_path):
    params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=2), response=pb.ResponseOptions(
        input_tokens=True, token_logprobs=True, token_ranks=True, top_n_tokens=2))
    response = generate(server, PROMPT, params)
    expected = ref.input_details(tiny_model_path, PROMPT, top_n=2)
    assert len(response.input_tokens) == len(expected) == response.input_token_count
    first = response.input_tokens[0]
    assert math.isnan(first.logprob) and first.rank == 0 and not first.top_tokens
    for info, step in zip(response.input_tokens[1:], expected[1:], strict=True):
        assert info.text == tok.convert_ids_to_tokens(step.token)
        assert close(info.logprob, step.logprob) and info.rank == step.rank
        assert [t.text for t in info.top_tokens] == tok.convert_ids_to_tokens([i for i, _ in step.top])
    single = generate(server, "a", params)
    assert len(single.input_tokens) == single.input_token_count


# ---------------------------------------------------------------------------------------------- 7. logits processing


@pytest.mark.parametrize("settings", [
    ref.Settings(repetition_penalty=2.5, max_new_tokens=20),
    ref.Settings(repetition_penalty=2.5, truncate_input_tokens=3, max_new_tokens=20),
    ref.Settings(length_penalty=(3, 1.5), max_new_tokens=30),
    ref.Settings(length_penalty=(3, 1.5), repetition_penalty=1.8, max_new_tokens=30),
], ids=["repetition", "repetition_truncated", "length", "length_and_repetition"])
def test_penalties_match_reference(server, tok, tiny_model_path, settings):
    response = generate(server, PROMPT, to_params(settings))
    assert_like_reference(response, ref.generate(tiny_model_path, PROMPT, settings), tok)


# ---------------------------------------------------------------------------------------------- 9. concurrency


def test_batch_larger_than_concurrency_limit_is_overloaded(server):
    request = pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="x")] * 17,
                                          params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=1)))
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Generate(request)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "Model is overloaded")


# ---------------------------------------------------------------------------------------------- 10. tokenize


def test_tokenize_tokens_offsets_and_truncation(server, tok):
    texts = ["Hello world, how are you?", "x"]
    response = server.stub.Tokenize(pb.BatchedTokenizeRequest(
        requests=[pb.TokenizeRequest(text=t) for t in texts], return_tokens=True, return_offsets=True))
    for r, text in zip(response.responses, texts, strict=True):
        encoding = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        assert r.token_count == len(encoding.input_ids)
        assert list(r.tokens) == tok.convert_ids_to_tokens(encoding.input_ids)
        assert [(o.start, o.end) for o in r.offsets] == [tuple(o) for o in encoding.offset_mapping]
    truncated = server.stub.Tokenize(pb.BatchedTokenizeRequest(
        requests=[pb.TokenizeRequest(text=texts[0])], return_tokens=True, truncate_input_tokens=3)).responses[0]
    full = tok.convert_ids_to_tokens(tok(texts[0], add_special_tokens=True).input_ids)
    assert truncated.token_count == 3 and list(truncated.tokens) == full[-3:]
    count_only = server.stub.Tokenize(pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=texts[0])]))
    assert count_only.responses[0].token_count == len(full) and not count_only.responses[0].tokens


# ---------------------------------------------------------------------------------------------- 5. special tokens


def test_output_special_tokens_keeps_them_but_never_the_trailing_eos(tiny_model_path, tmp_path, tok):
    server = Pipeline(tiny_model_path, tmp_path, "--max-sequence-length", "200", "--output-special-tokens").start()
    try:
        # Length penalty makes EOS come quickly; text must keep specials yet drop the final EOS.
        settings = ref.Settings(length_penalty=(1, 10.0), max_new_tokens=30)
        expected = ref.generate(tiny_model_path, PROMPT, settings)
        assert expected.stop_reason == pb.EOS_TOKEN
        response = generate(server, PROMPT, to_params(settings))
        assert response.stop_reason == pb.EOS_TOKEN
        assert response.text == tok.decode(expected.ids[:-1], skip_special_tokens=False)
        assert tok.eos_token not in response.text
        # A special token in the prompt is not part of the generated text either way.
        assert tok.decode(expected.ids, skip_special_tokens=False).endswith(tok.eos_token)
    finally:
        assert server.stop() == 0


def test_correlation_id_is_logged(server):
    server.stub.Generate(pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=PROMPT)], params=pb.Parameters(stopping=pb.StoppingCriteria(
            max_new_tokens=2))), metadata=[("x-correlation-id", "corr-4711")])
    deadline = time.monotonic() + 5
    while "x-correlation-id=corr-4711" not in server.logs() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "x-correlation-id=corr-4711" in server.logs()
