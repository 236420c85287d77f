"""TGIS parameter conversion and the 15 validation checks, with TGIS's exact messages and order."""

from __future__ import annotations

import pytest

from services.common.protocol import token_ids
from services.gateway.pb import generation_pb2 as pb
from services.gateway.validation import (
    STOP_SEQ_ERROR,
    Limits,
    ValidationError,
    check_input,
    convert_and_validate,
)

LIMITS = Limits(max_sequence_length=200, max_new_tokens=169)


def params(**kw) -> pb.Parameters:
    return pb.Parameters(**kw)


def error_of(p: pb.Parameters) -> str:
    with pytest.raises(ValidationError) as info:
        convert_and_validate(p, LIMITS)
    return str(info.value)


def test_defaults_when_params_absent():
    v = convert_and_validate(None, LIMITS)
    assert (v.max_new_tokens, v.min_new_tokens, v.include_stop_sequence, v.deadline) == (20, 0, True, 0.0)
    assert v.logits.temperature == 0.0 and v.logits.top_p == 1.0 and v.logits.repetition_penalty == 1.0
    assert v.seed is None and not v.sampling


def test_greedy_ignores_sampling_fields_without_error():
    v = convert_and_validate(params(method=pb.GREEDY, sampling=pb.SamplingParameters(
        temperature=0.02, top_p=5.0, top_k=3, seed=7)), LIMITS)
    assert v.logits.temperature == 0.0 and v.logits.top_k == 0 and v.seed is None


def test_sample_with_zero_temperature_means_one_and_zero_means_disabled():
    v = convert_and_validate(params(method=pb.SAMPLE, sampling=pb.SamplingParameters(top_p=0, typical_p=0)), LIMITS)
    assert v.logits.temperature == 1.0 and v.logits.top_p == 1.0 and v.logits.typical_p == 0.0
    v = convert_and_validate(params(decoding=pb.DecodingParameters(repetition_penalty=0)), LIMITS)
    assert v.logits.repetition_penalty == 1.0


def test_include_stop_sequence_server_default_and_override():
    assert not convert_and_validate(None, Limits(200, 169, default_include_stop_seqs=False)).include_stop_sequence
    v = convert_and_validate(params(stopping=pb.StoppingCriteria(include_stop_sequence=False)), LIMITS)
    assert v.include_stop_sequence is False


def test_time_limit_sets_deadline_from_receive_time():
    v = convert_and_validate(params(stopping=pb.StoppingCriteria(time_limit_millis=250)), LIMITS, received_at=100.0)
    assert v.deadline == pytest.approx(100.25)


SAMPLE = pb.SAMPLE


@pytest.mark.parametrize("p, message", [
    (params(method=SAMPLE, sampling=pb.SamplingParameters(temperature=0.02, top_p=0.7)), "temperature must be >= 0.05"),
    (params(method=SAMPLE, sampling=pb.SamplingParameters(top_p=1.5)), "top_p must be > 0.0 and <= 1.0"),
    (params(method=SAMPLE, sampling=pb.SamplingParameters(top_p=-0.5)), "top_p must be > 0.0 and <= 1.0"),
    (params(method=SAMPLE, sampling=pb.SamplingParameters(typical_p=1.01)), "typical_p must be <= 1.0"),
    (params(method=SAMPLE, sampling=pb.SamplingParameters(top_k=2**31)), "top_k must be strictly positive"),
    (params(stopping=pb.StoppingCriteria(max_new_tokens=170)), "max_new_tokens must be <= 169"),
    (params(stopping=pb.StoppingCriteria(max_new_tokens=10, min_new_tokens=20)),
     "min_new_tokens must be <= max_new_tokens"),
    (params(decoding=pb.DecodingParameters(repetition_penalty=-1)), "repetition_penalty must be > 0.0"),
    (params(decoding=pb.DecodingParameters(length_penalty=pb.DecodingParameters.LengthPenalty(decay_factor=0.5))),
     "length_penalty must be >= 1.0 and <= 10.0"),
    (params(stopping=pb.StoppingCriteria(stop_sequences=["a"] * 7)), STOP_SEQ_ERROR),
    (params(response=pb.ResponseOptions(token_logprobs=True)),
     "must request input and/or generated tokens to request extra token detail"),
    (params(response=pb.ResponseOptions(top_n_tokens=2)),
     "must request input and/or generated tokens to request extra token detail"),
    (params(stopping=pb.StoppingCriteria(max_new_tokens=30, stop_sequences=["empty not allowed", ""])), STOP_SEQ_ERROR),
    # 240 bytes is the limit in UTF-8 bytes, not characters: 81 three-byte characters are 243 bytes.
    (params(stopping=pb.StoppingCriteria(stop_sequences=["€" * 81])), STOP_SEQ_ERROR),
])
def test_validation_messages(p, message):
    assert error_of(p) == message


def test_check_order_first_failure_wins():
    # Both temperature and max_new_tokens are wrong: temperature is checked first.
    p = params(method=SAMPLE, sampling=pb.SamplingParameters(temperature=0.01),
               stopping=pb.StoppingCriteria(max_new_tokens=1000))
    assert error_of(p) == "temperature must be >= 0.05"
    # Too many stop sequences (check 9) beats the token-detail rule (10), which beats an empty one (11).
    p = params(response=pb.ResponseOptions(token_ranks=True), stopping=pb.StoppingCriteria(stop_sequences=[""] * 7))
    assert error_of(p) == STOP_SEQ_ERROR
    p = params(response=pb.ResponseOptions(token_ranks=True), stopping=pb.StoppingCriteria(stop_sequences=[""]))
    assert error_of(p) == "must request input and/or generated tokens to request extra token detail"


def test_default_max_new_tokens_checked_against_server_max():
    with pytest.raises(ValidationError, match="max_new_tokens must be <= 10"):
        convert_and_validate(None, Limits(200, 10))


def test_top_n_above_five_is_accepted_as_in_tgis():
    v = convert_and_validate(params(response=pb.ResponseOptions(generated_tokens=True, top_n_tokens=10)), LIMITS)
    assert v.logits.top_n_tokens == 10


def test_input_length_checks_exact_messages():
    v = convert_and_validate(params(stopping=pb.StoppingCriteria(max_new_tokens=100)), LIMITS)
    with pytest.raises(ValidationError) as info:
        check_input(token_ids(range(200)), v, LIMITS)
    assert str(info.value) == "input tokens (200) plus prefix length (0) must be < 200"
    v = convert_and_validate(params(stopping=pb.StoppingCriteria(max_new_tokens=168, min_new_tokens=150)), LIMITS)
    with pytest.raises(ValidationError) as info:
        check_input(token_ids(range(69)), v, LIMITS)
    assert str(info.value) == "input tokens (69) plus prefix length (0) plus min_new_tokens (150) must be <= 200"


def test_token_limit_lowers_max_new_tokens():
    v = convert_and_validate(params(stopping=pb.StoppingCriteria(max_new_tokens=100)), LIMITS)
    checked = check_input(token_ids(range(186)), v, LIMITS)
    assert checked.stop.max_new_tokens == 14 and checked.stop.token_limited
    v = convert_and_validate(params(stopping=pb.StoppingCriteria(min_new_tokens=2)), LIMITS)
    checked = check_input(token_ids(range(198)), v, LIMITS)
    assert checked.stop.max_new_tokens == 2 and checked.stop.token_limited


def test_truncation_keeps_last_tokens_and_is_checked_after():
    v = convert_and_validate(params(truncate_input_tokens=5), LIMITS)
    checked = check_input(token_ids(range(300)), v, LIMITS)
    assert list(checked.input_ids) == [295, 296, 297, 298, 299] and checked.input_length == 5
    v = convert_and_validate(params(truncate_input_tokens=500), LIMITS)
    assert check_input(token_ids(range(10)), v, LIMITS).input_length == 10


def test_seeds_greedy_zero_explicit_kept_random_per_input():
    greedy = convert_and_validate(None, LIMITS)
    assert check_input(token_ids([1]), greedy, LIMITS).seed == 0
    seeded = convert_and_validate(params(method=SAMPLE, sampling=pb.SamplingParameters(seed=42)), LIMITS)
    assert check_input(token_ids([1]), seeded, LIMITS).seed == 42
    sampled = convert_and_validate(params(method=SAMPLE), LIMITS)
    seeds = {check_input(token_ids([1]), sampled, LIMITS).seed for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= s <= 2**32 - 1 for s in seeds)


def test_truncation_keeps_a_leading_bos_like_tgis_tokenizer():
    bos_limits = Limits(200, 169, special_prefix=(1,))
    v = convert_and_validate(params(truncate_input_tokens=3), bos_limits)
    checked = check_input(token_ids([1, 10, 11, 12, 13]), v, bos_limits)
    assert list(checked.input_ids) == [1, 12, 13] and checked.input_length == 3
    # Without that prefix in the ids (or without a BOS-adding tokenizer) it is the plain last N.
    assert list(check_input(token_ids([7, 10, 11, 12, 13]), v, bos_limits).input_ids) == [11, 12, 13]
    assert list(check_input(token_ids([1, 10, 11, 12, 13]), v, LIMITS).input_ids) == [11, 12, 13]
