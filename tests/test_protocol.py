"""Wire codec: every message kind round-trips; bad frames of any shape are refused whole, as ProtocolError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.codec import ProtocolError, decode, encode
from services.common.protocol import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Cancel,
    DetokItem,
    DetokResult,
    DetokTokens,
    GenerateRequest,
    Heartbeat,
    LogitsParams,
    MessageKind,
    ScheduledChunk,
    Step,
    StepResult,
    StopParams,
    StopReason,
    Submit,
    TokenBatch,
    TokenDetail,
    TokenizedText,
    TokenizeResult,
    TokenOutput,
    WorkerReady,
    token_ids,
)


def test_every_message_kind_has_one_type():
    assert set(MESSAGE_TYPES) == set(MessageKind)


def test_submit_round_trip_keeps_nested_structs_and_ids():
    request = GenerateRequest("gw-1", token_ids([1, 2, 70000, -1]), LogitsParams(temperature=0.7, seed=2**32 - 1),
                              StopParams(20, 2, 123.5, True), 1.25)
    decoded = decode(encode(Submit([request])))
    assert decoded == Submit([request])
    assert decoded.requests[0].input_ids.typecode == "i"
    assert decoded.requests[0].logits.sampling


def test_step_and_result_round_trip():
    step = Step(7, [], ["gone"], [ScheduledChunk("a", 3, 1, token_ids([4, 9]))])
    assert decode(encode(step)) == step
    result = StepResult(7, [], 1234, {"b": "sequence b has 0 input tokens"})
    assert decode(encode(result)) == result


def test_token_ids_are_packed_compactly():
    ids = token_ids(range(1000))
    frames = encode(DetokTokens([DetokItem("r", 0, ids, StopReason.NOT_FINISHED, token_ids())]))
    # 4 bytes per id plus small framing, far below msgpack's per-integer encoding.
    assert len(frames[1]) < 4 * 1000 + 100


def test_offsets_come_back_as_pairs():
    result = decode(encode(TokenizeResult(3, [TokenizedText(token_ids([5]), ["a"], [(0, 1)])])))
    assert result.results[0].offsets == [(0, 1)]


def test_token_batch_with_details_and_nan():
    detail = TokenDetail(5, float("nan"), 0, token_ids([1, 2]), [-0.5, -1.5])
    batch = decode(encode(TokenBatch([TokenOutput("a", [detail], 1, StopReason.EOS_TOKEN, [detail])])))
    out = batch.outputs[0]
    assert out.stop_reason == StopReason.EOS_TOKEN and out.generated_count == 1
    assert out.tokens[0].top_logprobs == [-0.5, -1.5] and out.tokens[0].logprob != out.tokens[0].logprob


def _body(*fields) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, list(fields)])


@pytest.mark.parametrize("frames", [
    [b"\x03"],  # body missing
    [b"\xff", msgpack.packb([PROTOCOL_VERSION, []])],  # unknown kind
    [bytes([MessageKind.SUBMIT]), b"\xc1garbage"],  # not msgpack
    [bytes([MessageKind.CANCEL]), msgpack.packb([PROTOCOL_VERSION + 1, [["a"]]])],  # other version
    [bytes([MessageKind.CANCEL]), _body(["a"], "extra", "fields")],
    [bytes([MessageKind.CANCEL]), msgpack.packb([PROTOCOL_VERSION, msgpack.ExtType(99, b"x")])],
    [bytes([MessageKind.CANCEL]), _body(5)],  # Cancel(request_ids=5)
    [bytes([MessageKind.SUBMIT]), _body([1])],  # Submit(requests=[1])
    [bytes([MessageKind.HEARTBEAT]), _body(7)],
    [bytes([MessageKind.WORKER_READY]), _body(0, None)],  # WorkerReady(model=None)
    [bytes([MessageKind.TOKENIZE_RESULT]), _body([1], [])],  # TokenizeResult(job_id=[1])
    [bytes([MessageKind.DETOK_RESULT]), _body(None)],  # DetokResult(deltas=None)
    [bytes([MessageKind.STEP_RESULT]), _body(1, [], 5, {"a": 1})],
    [bytes([MessageKind.DETOK_TOKENS]), _body([["r", 0, b"\x01\x02\x03"]])],  # ids not whole int32s
    [bytes([MessageKind.TOKEN_BATCH]), _body([["a", [], 1, 99]])],  # stop reason out of range
])
def test_bad_frames_are_refused(frames):
    with pytest.raises(ProtocolError):
        decode(frames)


@pytest.mark.parametrize("depth", [190, 5_000, 200_000])
@pytest.mark.parametrize("kind", [MessageKind.CANCEL, MessageKind.SUBMIT, MessageKind.STEP_RESULT])
def test_deep_nesting_is_refused_without_crashing(kind, depth):
    # Nested arrays and maps far deeper than any message type: refused, never a stack overflow.
    for nest in (b"\x91", b"\x81\xa1a"):
        with pytest.raises(ProtocolError):
            decode([bytes([kind]), b"\x92\x01\x91" + nest * depth + b"\xc0"])
        with pytest.raises(ProtocolError):
            decode([bytes([kind]), b"\x92\x01" + nest * depth + b"\xc0"])


def test_wrongly_typed_messages_built_in_code_are_refused_by_the_receiver():
    for bad in (TokenizeResult([1], []), DetokResult(None), Cancel(5), Submit([1]), Heartbeat(3), WorkerReady(0, None)):
        with pytest.raises(ProtocolError):
            decode(encode(bad))


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(list(MessageKind)), fields=st.lists(_msgpack_values, max_size=8))
def test_fuzzed_bodies_decode_to_their_type_or_are_refused(kind, fields):
    frames = [bytes([kind]), msgpack.packb([PROTOCOL_VERSION, fields])]
    try:
        message = decode(frames)
    except ProtocolError:
        return
    assert type(message) is MESSAGE_TYPES[kind]
    assert decode(encode(message)) == message or message != message  # NaN fields never compare equal


@settings(max_examples=300, deadline=None)
@given(kind=st.integers(0, 255), body=st.binary(max_size=64))
def test_random_bytes_never_escape_as_another_error(kind, body):
    try:
        decode([bytes([kind]), body])
    except ProtocolError:
        pass
