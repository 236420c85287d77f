"""Wire codec: every message kind round-trips; bad frames are refused, never half-decoded."""

from __future__ import annotations

import msgpack
import pytest

from services.common.codec import ProtocolError, decode, encode
from services.common.protocol import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    DetokItem,
    DetokTokens,
    GenerateRequest,
    LogitsParams,
    MessageKind,
    StopParams,
    StopReason,
    Submit,
    TokenBatch,
    TokenDetail,
    TokenOutput,
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


def test_token_ids_are_packed_compactly():
    ids = token_ids(range(1000))
    frames = encode(DetokTokens([DetokItem("r", 0, ids, StopReason.NOT_FINISHED, token_ids())]))
    # 4 bytes per id plus small framing, far below msgpack's per-integer encoding.
    assert len(frames[1]) < 4 * 1000 + 100


def test_token_batch_with_details_and_nan():
    detail = TokenDetail(5, float("nan"), 0, token_ids([1, 2]), [-0.5, -1.5])
    batch = decode(encode(TokenBatch([TokenOutput("a", [detail], 1, StopReason.EOS_TOKEN, [detail])])))
    out = batch.outputs[0]
    assert out.stop_reason == StopReason.EOS_TOKEN and out.generated_count == 1
    assert out.tokens[0].top_logprobs == [-0.5, -1.5] and out.tokens[0].logprob != out.tokens[0].logprob


@pytest.mark.parametrize("frames", [
    [b"\x03"],  # body missing
    [b"\xff", msgpack.packb([PROTOCOL_VERSION])],  # unknown kind
    [bytes([MessageKind.SUBMIT]), b"\xc1garbage"],  # not msgpack
    [bytes([MessageKind.CANCEL]), msgpack.packb([PROTOCOL_VERSION + 1, ["a"]])],  # other version
    [bytes([MessageKind.CANCEL]), msgpack.packb([PROTOCOL_VERSION, ["a"], "extra", "fields"])],
    [bytes([MessageKind.CANCEL]), msgpack.packb([PROTOCOL_VERSION, msgpack.ExtType(99, b"x")])],
])
def test_bad_frames_are_refused(frames):
    with pytest.raises(ProtocolError):
        decode(frames)
